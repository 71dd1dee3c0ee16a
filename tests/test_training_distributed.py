"""``torchrun --nproc-per-node 2 -m recursive train`` on the CPU (gloo): the loss curve and the weights equal
one process with the same global batch (float64), with DDP and with FSDP2; a checkpoint written by two ranks
resumes in one process; Ctrl-C stops both ranks with a checkpoint."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.distributed as dist

from recursive import RecursiveForCausalLM
from recursive.training import stdlib_sources
from tests.helpers import make_model

pytestmark = pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(),
                                reason="torch.distributed with gloo")

TIMEOUT_S = 300


def _fsdp2_missing() -> bool:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError:
        return True
    return False


def run_train(model_dir, save, processes, *extra):
    launcher = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(processes),
                "--standalone"] if processes > 1 else [sys.executable]
    command = [*launcher, "-m", "recursive", "train", "--model", str(model_dir), "--data", *stdlib_sources(limit=8),
               "--steps", "4", "--batch-size", "8", "--seq-len", "16", "--save-every", "2", "--keep-checkpoints", "0",
               "--eval-every", "2", "--cache-dir", str(save) + "-cache", "--save", str(save), "--no-progress", *extra]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.path.exists("/sys/class/net/lo"):  # every rank on this machine: loopback, whatever the host name resolves to
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    done = subprocess.run(command, capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(os.path.join(save, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    return rows, RecursiveForCausalLM.from_pretrained(str(save))


def assert_same_run(rows, model, reference_rows, reference_model):
    assert [row["step"] for row in rows] == [1, 2, 3, 4]
    for key in ("loss", "eval_loss"):
        ours = [row.get(key, 0.0) for row in rows]
        assert ours == pytest.approx([row.get(key, 0.0) for row in reference_rows], rel=1e-10), key
    for name, value in reference_model.named_parameters():
        torch.testing.assert_close(model.get_parameter(name), value, rtol=1e-9, atol=1e-11, msg=name)


@pytest.fixture(scope="module")
def single_process(tmp_path_factory):
    """The float64 model folder and the one-process run every distributed run is held to."""
    folder = tmp_path_factory.mktemp("single")
    make_model(vocab_size=256, relaxation="depth_lora", tie_word_embeddings=True).save_pretrained(str(folder / "model"))
    rows, model = run_train(folder / "model", folder / "run", 1)
    assert next(model.parameters()).dtype == torch.float64
    return folder / "model", rows, model


@pytest.mark.parametrize("kind", ["ddp", pytest.param("fsdp", marks=pytest.mark.skipif(
    _fsdp2_missing(), reason="this torch has no torch.distributed.fsdp.fully_shard (FSDP2)"))])
def test_two_processes_match_one_and_resume_in_one(kind, single_process, tmp_path):
    model_dir, reference_rows, reference_model = single_process
    extra = ["--fsdp"] if kind == "fsdp" else ["--grad-accum", "2"]
    rows, model = run_train(model_dir, tmp_path / "two", 2, *extra)
    assert_same_run(rows, model, reference_rows, reference_model)

    # the two ranks' checkpoint of step 2, continued by one process
    os.makedirs(tmp_path / "resumed")
    rows, model = run_train(model_dir, tmp_path / "resumed", 1, "--resume", str(tmp_path / "two" / "checkpoint-2"))
    assert [row["step"] for row in rows] == [3, 4]
    assert_same_run(reference_rows[:2] + rows, model, reference_rows, reference_model)


def test_ctrl_c_stops_every_rank_with_a_checkpoint(tmp_path):
    """Ctrl-C at a terminal reaches torchrun and its workers (one process group): the ranks stop at the same
    step, rank 0 writes the checkpoint, and one process resumes it to the end."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m",
               "recursive", "train", "--steps", "300", "--batch-size", "8", "--seq-len", "32", "--save",
               str(tmp_path / "run"), "--no-progress"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if os.path.exists("/sys/class/net/lo"):
        env.setdefault("GLOO_SOCKET_IFNAME", "lo")
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                           start_new_session=True)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + TIMEOUT_S
    try:
        while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
            assert run.poll() is None and time.monotonic() < deadline, (
                run.stdout.read() if run.poll() is not None else "")
            time.sleep(0.05)
        os.killpg(run.pid, signal.SIGINT)  # what a terminal's Ctrl-C does
        out, _ = run.communicate(timeout=TIMEOUT_S)
    finally:
        if run.poll() is None:
            os.killpg(run.pid, signal.SIGKILL)
    checkpoints = sorted(os.listdir(tmp_path / "run"))
    assert "interrupted after step" in out, out
    step = int(next(name for name in checkpoints if name.startswith("checkpoint-")).split("-")[1])
    assert 3 <= step < 300
    done = subprocess.run([sys.executable, "-m", "recursive", *command[command.index("train"):], "--resume",
                           str(tmp_path / "run")], capture_output=True, text=True, timeout=TIMEOUT_S, env=env)
    assert done.returncode == 0, done.stdout + done.stderr
    with open(metrics) as f:
        assert [json.loads(line)["step"] for line in f] == list(range(1, 301))
