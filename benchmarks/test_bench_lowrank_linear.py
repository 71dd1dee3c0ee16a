"""The lowrank_linear benchmark cases under pytest-benchmark: ``pytest benchmarks/``.

Kept out of the default test run (``testpaths = tests``). Each case times the base matmul, the eager
way and every available backend, so pytest-benchmark's comparison table shows the ratios; the timed call's
result is checked against eager in higher precision. The benchmark's own table (``run``) is checked on tiny
cases: its columns, timings, ratios, GFLOP/s and cases.
"""

import functools
import math

import pytest
import torch

from . import bench_lowrank_linear, common
from .bench_lowrank_linear import MODES, PEERS, _callable, default_cases, make_inputs, peft_available
from .common import available_backends, relative_error, resolve, run_benchmark

DEVICE, DTYPE = resolve(None, None)
IMPLS = ["base", "eager", *available_backends("lowrank_linear", DEVICE, DTYPE)]
REFERENCE_DTYPE = torch.float32 if DEVICE.type == "cuda" else torch.float64
# float32 sums these sizes to about 1e-6; bfloat16 and float16 round each input and output at 2^-9 or finer
ERROR_BOUND = 1e-5 if DTYPE == torch.float32 else 5e-2


@functools.lru_cache(maxsize=None)
def reference(case, backward: bool):
    """The eager way's output (or gradients) on the case's inputs in higher precision, once per case and mode."""
    return _callable("eager", make_inputs(case, DEVICE, REFERENCE_DTYPE, requires_grad=backward), backward)()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", default_cases(DEVICE), ids=lambda c: c.label.replace(" ", "-"))
def test_lowrank_linear(benchmark, case, mode, impl):
    benchmark.group = f"{case.label} {mode}"
    backward = mode == "fwd+bwd"
    result = run_benchmark(benchmark, _callable(impl, make_inputs(case, DEVICE, DTYPE, requires_grad=backward),
                                                backward), DEVICE)
    if impl != "base":  # the base matmul leaves the adapters out: it computes something else
        assert relative_error(result, reference(case, backward)) < ERROR_BOUND


def test_lowrank_linear_table(monkeypatch, one_thread):
    """Every case, mode and implementation is a row of every column; each ratio is the two rows' median times'
    ratio and GFLOP/s the case's FLOPs over the row's time."""
    monkeypatch.setattr(common, "CPU_ROUNDS", 1)
    cpu = torch.device("cpu")
    cases = [bench_lowrank_linear.Case(form, 9, 32, 24) for form in bench_lowrank_linear.FORMS]
    backends = available_backends("lowrank_linear", cpu, torch.float32)
    result = bench_lowrank_linear.run(device=cpu, dtype=torch.float32, cases=cases, compiled_forms=())
    assert result["dtype"] == "float32"
    rows = {(row["case"], row["mode"], row["impl"]): row for row in result["rows"]}
    assert len(rows) == len(result["rows"])
    peft = {("per-row", "fwd", "peft")} if peft_available() else set()
    assert set(rows) == {(case.form, mode, impl) for case in cases for mode in MODES
                         for impl in ("base", "eager", *backends)} | peft
    columns = {column.name for column in bench_lowrank_linear.COLUMNS}
    for case in cases:
        for mode in MODES:
            backward = mode == "fwd+bwd"
            timed = {impl: row for (form, row_mode, impl), row in rows.items() if (form, row_mode) == (case.form, mode)}
            peer = min((impl for impl in PEERS if impl in timed), key=lambda impl: timed[impl]["ms"])
            for impl, row in timed.items():
                assert set(row) == columns
                assert (row["M"], row["K"], row["N"], row["r"], row["E"]) == (case.M, case.K, case.N, case.r, case.E)
                assert 0 < row["ms"] < math.inf
                seconds = row["ms"] * 1e-3
                assert row["GFLOP/s"] == pytest.approx(case.flops(backward, lowrank=impl != "base") / seconds / 1e9)
                for column, baseline in (("vs base", "base"), ("vs eager", "eager"), ("vs peer", peer)):
                    assert row[column] == pytest.approx(timed[baseline]["ms"] / row["ms"]), (impl, column)
                assert row["peer"] == peer
                byte_bound = case.forward_elements(impl != "base") / case.forward_elements(False)
                assert row["vs bytes"] == (None if backward else
                                           pytest.approx(timed["base"]["ms"] * byte_bound / row["ms"]))
