"""The model benchmark cases under pytest-benchmark: ``pytest benchmarks/``; the timed forward gives finite logits
of the batch's shape, the timed training step a finite gradient for every parameter. The benchmark's own table
(``run``) is checked on a tiny model: its columns, timings, ratios, tokens/s, GFLOP/s and cases."""

import math

import pytest
import torch

from recursive import RecursiveConfig

from . import bench_model, common
from .bench_model import IMPLS, MODES, PEER, _callable, build_model, default_cases, peer_available
from .common import resolve, run_benchmark

DEVICE, DTYPE = resolve(None, None)


CASES = [(case, mode) for case in default_cases(DEVICE) for mode in MODES if case.runs(mode)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case, mode", CASES, ids=[f"{c.label}-{m}".replace(" ", "-") for c, m in CASES])
def test_model(benchmark, case, mode, impl):
    benchmark.group = f"{case.label} {mode}"
    model = build_model(case, impl, DEVICE, DTYPE)
    result = run_benchmark(benchmark, _callable(model, case, mode == "fwd+bwd", DEVICE), DEVICE)
    if mode == "fwd":  # the logits
        assert result.shape == (case.batch_size, case.seq_len, case.config.vocab_size)
        assert torch.isfinite(result).all()
    else:  # the step leaves its gradients
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_model_table(monkeypatch, one_thread):
    """The modes and implementations asked for, each a row of every column; each ratio is the two rows' median
    times' ratio, tokens/s and GFLOP/s the case's tokens and FLOPs over the row's time."""
    monkeypatch.setattr(common, "CPU_ROUNDS", 1)
    base = RecursiveConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_layers=4)
    cases = [bench_model.Case("relaxed ckpt", base, 1, 9), bench_model.Case("untied", base, 2, 5)]
    result = bench_model.run(device=torch.device("cpu"), dtype=torch.float32, modes=("fwd+bwd",),
                             impls=("auto", "torch"), cases=cases)
    assert result["cases"] == [case.label for case in cases]
    rows = {(row["model"], row["impl"]): row for row in result["rows"]}
    assert len(rows) == len(result["rows"])
    peer = {("untied", PEER)} if peer_available() else set()
    assert set(rows) == {(case.variant, impl) for case in cases for impl in ("auto", "torch")} | peer
    columns = {column.name for column in bench_model.COLUMNS}
    for case in cases:
        for (variant, impl), row in rows.items():
            if variant != case.variant:
                continue
            config = case.config
            assert set(row) == columns and row["mode"] == "fwd+bwd"
            assert (row["L"], row["B"], row["h"]) == (config.num_layers, config.num_blocks, config.hidden_size)
            assert row["tokens"] == f"{case.batch_size}x{case.seq_len}"
            assert 0 < row["ms"] < math.inf
            seconds = row["ms"] * 1e-3
            assert row["tokens/s"] == pytest.approx(case.batch_size * case.seq_len / seconds)
            assert row["GFLOP/s"] == pytest.approx(case.flops(backward=True) / seconds / 1e9)
            assert row["vs torch"] == pytest.approx(rows[variant, "torch"]["ms"] / row["ms"])
            assert row["vs untied"] == (None if impl == PEER else pytest.approx(rows["untied", impl]["ms"] / row["ms"]))
            assert row["vs transformers"] == (pytest.approx(rows["untied", PEER]["ms"] / row["ms"]) if peer else None)
