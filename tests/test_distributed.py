"""DDP and FSDP2 on gloo with 2 CPU processes match a single process on the full batch.

The model shares each block across depths (4 effective layers over 2 blocks, cycle) with depth LoRA and
tied embeddings, so the gradient of a block weight is a sum over the depths that use it: the check
compares every gradient after the first step and every parameter after two SGD steps, in float64.
"""

import faulthandler
import os
import time
import warnings
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from recursive import RecursiveConfig, RecursiveForCausalLM

WORLD_SIZE = 2
# A collective that waits longer than COLLECTIVE_TIMEOUT_S raises; a worker still running after WORKER_TIMEOUT_S
# writes every thread's stack to its log and exits; the test kills what is left after TEST_TIMEOUT_S. Either
# way the failure shows where the workers were.
COLLECTIVE_TIMEOUT_S, WORKER_TIMEOUT_S, TEST_TIMEOUT_S = 60, 120, 180
STEPS = 2
BATCH, SEQ = 4, 8


def tiny_model() -> RecursiveForCausalLM:
    torch.manual_seed(0)
    config = RecursiveConfig(
        vocab_size=50, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
        num_layers=4, num_blocks=2, relaxation="depth_lora", lora_rank=4, tie_word_embeddings=True,
    )
    model = RecursiveForCausalLM(config).double()
    with torch.no_grad():  # LoRA B starts at zero; nonzero adapters make every depth's path differ
        for name, parameter in model.named_parameters():
            if name.endswith("lora_b"):
                parameter.normal_(0.0, 0.05)
    return model


def batch() -> torch.Tensor:
    return torch.randint(0, 50, (BATCH, SEQ), generator=torch.Generator().manual_seed(1))


def train_steps(model, input_ids, full_tensor=lambda t: t):
    """Two SGD steps; returns the gradients after the first and the parameters after the last, by name
    (``full_tensor`` turns a sharded tensor into the whole one)."""
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    first_grads = None
    for _ in range(STEPS):
        optimizer.zero_grad()
        model(input_ids, labels=input_ids).loss.backward()
        if first_grads is None:
            first_grads = {name: full_tensor(p.grad).clone() for name, p in model.named_parameters()}
        optimizer.step()
    return first_grads, {name: full_tensor(p.detach()).clone() for name, p in model.named_parameters()}


def _log_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}.log")


def _done_path(directory: str, rank: int) -> str:
    return os.path.join(directory, f"rank{rank}.done")


def _train_shard(rank: int, kind: str):
    """This rank's :func:`train_steps` on its half of the batch under ``kind``, by unwrapped parameter name."""
    model = tiny_model()
    local = batch().chunk(WORLD_SIZE)[rank]  # equal token counts: the mean of the means is the full mean
    if kind == "ddp":
        grads, params = train_steps(torch.nn.parallel.DistributedDataParallel(model), local)
        strip = len("module.")
        return {name[strip:]: g for name, g in grads.items()}, {name[strip:]: p for name, p in params.items()}
    from torch.distributed.fsdp import fully_shard

    for block in model.model.blocks:  # each shared block its own group, called at several depths
        fully_shard(block)
    fully_shard(model)
    return train_steps(model, local, full_tensor=lambda t: t.full_tensor())


def _worker(rank: int, kind: str, directory: str) -> None:
    log = open(_log_path(directory, rank), "w")
    faulthandler.dump_traceback_later(WORKER_TIMEOUT_S, exit=True, file=log)
    torch.set_num_threads(1)
    if os.path.exists("/sys/class/net/lo"):  # both ranks on this machine: loopback, whatever the host name resolves to
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    dist.init_process_group("gloo", init_method=f"file://{os.path.join(directory, 'init')}", rank=rank,
                            world_size=WORLD_SIZE, timeout=timedelta(seconds=COLLECTIVE_TIMEOUT_S))
    try:
        grads, params = _train_shard(rank, kind)
        if rank == 0:
            torch.save({"grads": grads, "params": params}, os.path.join(directory, "result.pt"))
        dist.barrier()  # every collective of both ranks is done
        open(_done_path(directory, rank), "w").close()
    finally:
        dist.destroy_process_group()
        faulthandler.cancel_dump_traceback_later()


def _fsdp2_missing() -> str:
    try:
        from torch.distributed.fsdp import fully_shard  # noqa: F401
    except ImportError as exc:
        return f"torch {torch.__version__} has no torch.distributed.fsdp.fully_shard (FSDP2): {exc}"
    return ""


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="torch.distributed with gloo")
@pytest.mark.parametrize("kind", ["ddp", pytest.param("fsdp2", marks=pytest.mark.skipif(bool(_fsdp2_missing()),
                                                                                         reason=_fsdp2_missing()))])
def test_data_parallel_matches_single_process(kind, tmp_path):
    workers = mp.start_processes(_worker, args=(kind, str(tmp_path)), nprocs=WORLD_SIZE, join=False,
                                 start_method="spawn")
    deadline = time.monotonic() + TEST_TIMEOUT_S
    try:
        while not workers.join(timeout=max(0.0, deadline - time.monotonic())):  # True once all ended
            if time.monotonic() >= deadline:
                raise TimeoutError(f"the {WORLD_SIZE} workers did not finish in {TEST_TIMEOUT_S} s")
    except Exception as exc:  # a timeout, or a worker that failed (join raises)
        for process in workers.processes:
            process.kill()
        # Both ranks done: the failure is in process-group teardown, which hangs now and then in torch itself
        # (pytorch/pytorch#75097), after everything this test checks.
        if all(os.path.exists(_done_path(str(tmp_path), rank)) for rank in range(WORLD_SIZE)):
            warnings.warn(f"gloo process-group teardown failed after both ranks finished: {exc}")
        else:
            logs = "\n".join(f"--- rank {rank} ---\n" + open(_log_path(str(tmp_path), rank)).read()
                             for rank in range(WORLD_SIZE) if os.path.exists(_log_path(str(tmp_path), rank)))
            pytest.fail(f"{exc}\n{logs}")
    distributed = torch.load(tmp_path / "result.pt")

    single_grads, single_params = train_steps(tiny_model(), batch())
    assert set(distributed["grads"]) == set(single_grads)
    for name, grad in single_grads.items():
        torch.testing.assert_close(distributed["grads"][name], grad, rtol=1e-10, atol=1e-12, msg=name)
    for name, param in single_params.items():
        torch.testing.assert_close(distributed["params"][name], param, rtol=1e-10, atol=1e-12, msg=name)
    # The shared weights moved (the check is not of untouched tensors), and both blocks serve two depths.
    model = tiny_model()
    assert model.config.layers_of_block(0) == [0, 2] and model.config.layers_of_block(1) == [1, 3]
    for name in ("model.blocks.0.self_attn.q_proj.weight", "model.blocks.1.mlp.down_proj.weight",
                 "model.blocks.1.mlp.down_proj.lora_b", "model.embed_tokens.weight"):
        assert not torch.allclose(single_params[name], model.get_parameter(name)), name
