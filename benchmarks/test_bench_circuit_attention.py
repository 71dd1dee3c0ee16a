"""The circuit_attention benchmark cases under pytest-benchmark: ``pytest benchmarks/``; the timed call's result is
checked against eager in higher precision. The benchmark's own table (``run``) is checked on tiny cases: its
columns, timings, ratios, TFLOP/s and cases."""

import functools
import math

import pytest
import torch

from . import bench_circuit_attention, common
from .bench_circuit_attention import MODES, PEERS, _callable, default_cases, make_inputs
from .common import available_backends, relative_error, resolve, run_benchmark

DEVICE, DTYPE = resolve(None, None)
IMPLS = ["sdpa", "eager", *available_backends("circuit_attention", DEVICE, DTYPE, head_dim=64)]
REFERENCE_DTYPE = torch.float32 if DEVICE.type == "cuda" else torch.float64
# float32 sums these sizes to about 1e-6; bfloat16 and float16 round each input and output at 2^-9 or finer
ERROR_BOUND = 1e-5 if DTYPE == torch.float32 else 5e-2


@functools.lru_cache(maxsize=None)
def reference(case, backward: bool):
    """The eager way's outputs (or gradients) on the case's inputs in higher precision, once per case and mode."""
    return _callable("eager", make_inputs(case, DEVICE, REFERENCE_DTYPE, backward), case, backward)()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", default_cases(DEVICE), ids=lambda c: c.label.replace(" ", "-"))
def test_circuit_attention(benchmark, case, mode, impl):
    benchmark.group = f"{case.label} {mode}"
    backward = mode == "fwd+bwd"
    result = run_benchmark(benchmark, _callable(impl, make_inputs(case, DEVICE, DTYPE, backward), case, backward),
                           DEVICE)
    if impl != "sdpa":  # sdpa leaves the corrections out: it computes something else
        assert relative_error(result, reference(case, backward)) < ERROR_BOUND


def test_circuit_attention_table(monkeypatch, one_thread):
    """Every case, mode and implementation is a row of every column; each ratio is the two rows' median times'
    ratio and TFLOP/s the case's FLOPs over the row's time."""
    monkeypatch.setattr(common, "CPU_ROUNDS", 1)
    cpu = torch.device("cpu")
    cases = [bench_circuit_attention.Case(17, 8, False, 1, 2, 4), bench_circuit_attention.Case(9, 16, True, 2, 1, 4)]
    backends = available_backends("circuit_attention", cpu, torch.float32, head_dim=64)
    result = bench_circuit_attention.run(device=cpu, dtype=torch.float32, cases=cases, compiled_cases=0)
    assert result["dtype"] == "float32" and "peak_memory_MiB_at_S4096" not in result
    rows = {(row["S"], row["mode"], row["impl"]): row for row in result["rows"]}
    assert len(rows) == len(result["rows"])
    assert set(rows) == {(case.S, mode, impl) for case in cases for mode in MODES
                         for impl in ("sdpa", "eager", *backends)}
    columns = {column.name for column in bench_circuit_attention.COLUMNS}
    for case in cases:
        for mode in MODES:
            backward = mode == "fwd+bwd"
            timed = {impl: row for (S, row_mode, impl), row in rows.items() if (S, row_mode) == (case.S, mode)}
            peer = min((impl for impl in PEERS if impl in timed), key=lambda impl: timed[impl]["ms"])
            for impl, row in timed.items():
                assert set(row) == columns
                shape = (row["B"], row["H"], row["D"], row["R"], row["causal"])
                assert shape == (case.B, case.H, case.D, case.R, case.causal)
                assert 0 < row["ms"] < math.inf
                flops = case.flops(backward, corrections=impl != "sdpa")
                assert row["TFLOP/s"] == pytest.approx(flops / (row["ms"] * 1e-3) / 1e12)
                for column, baseline in (("vs sdpa", "sdpa"), ("vs eager", "eager"), ("vs peer", peer)):
                    assert row[column] == pytest.approx(timed[baseline]["ms"] / row["ms"]), (impl, column)
                assert row["peer"] == peer == "eager"  # compiled is timed on none of the cases
