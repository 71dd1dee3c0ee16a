"""The benchmarks' correctness column: every timed implementation's result against eager in float64."""

from __future__ import annotations

import pytest
import torch

from benchmarks import bench_circuit_attention, bench_lowrank_linear, common


def test_relative_error_over_tensor_sequences():
    ref = (torch.tensor([3.0, 0.0]), torch.tensor([4.0]))
    assert common.relative_error(ref, ref) == 0.0
    assert common.relative_error((torch.tensor([3.0, 0.0]), torch.tensor([4.0 + 5.0])), ref) == pytest.approx(1.0)
    assert common.relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    with pytest.raises(ValueError, match="out"):
        common.relative_error(ref[:1], ref)


def test_seeded_like_draws_the_same_numbers_in_every_dtype():
    low = common.seeded_like(torch.empty(5, 3, dtype=torch.bfloat16))
    high = common.seeded_like(torch.empty(5, 3, dtype=torch.float64))
    assert low.dtype == torch.bfloat16 and high.dtype == torch.float64
    torch.testing.assert_close(low, high.to(torch.bfloat16), rtol=0, atol=0)


@pytest.fixture
def quick_timing(monkeypatch, one_thread):
    monkeypatch.setattr(common, "CPU_ROUNDS", 1)


def _errors(result, baseline):
    rows = result["rows"]
    assert all(row["rel err"] is None for row in rows if row["impl"] == baseline)
    return {(row["impl"], row["mode"]): row["rel err"] for row in rows if row["impl"] != baseline}


def test_lowrank_linear_benchmark_checks_every_implementation(quick_timing):
    cases = [bench_lowrank_linear.Case("top-2", 17, 64, 48), bench_lowrank_linear.Case("one-adapter", 5, 64, 48)]
    result = bench_lowrank_linear.run(device=torch.device("cpu"), cases=cases, progress=False)
    errors = _errors(result, "base")
    assert {impl for impl, _ in errors} >= {"eager", "torch"}
    assert all(0 < err < 1e-5 for err in errors.values()), errors


def test_circuit_attention_benchmark_checks_every_implementation(quick_timing):
    cases = [bench_circuit_attention.Case(33, 16, True, 1, 2)]
    result = bench_circuit_attention.run(device=torch.device("cpu"), cases=cases, progress=False)
    errors = _errors(result, "sdpa")
    assert {impl for impl, _ in errors} >= {"eager", "torch"}
    assert all(0 < err < 1e-5 for err in errors.values()), errors
