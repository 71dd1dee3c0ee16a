"""``torchrun --nproc-per-node 2 -m recursive train`` on the CPU (gloo): the loss curve and the weights equal
one process with the same global batch (float64), with DDP and with FSDP2, and a checkpoint written by two
ranks resumes in one process."""

import json
import os
import subprocess
import sys

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
