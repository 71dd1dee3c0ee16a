"""The model benchmark cases under pytest-benchmark: ``pytest benchmarks/``."""

import pytest

from .bench_model import IMPLS, MODES, _callable, build_model, default_cases
from .common import resolve, run_benchmark

DEVICE, DTYPE = resolve(None, None)


CASES = [(case, mode) for case in default_cases(DEVICE) for mode in MODES if case.runs(mode)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case, mode", CASES, ids=[f"{c.label}-{m}".replace(" ", "-") for c, m in CASES])
def test_model(benchmark, case, mode, impl):
    benchmark.group = f"{case.label} {mode}"
    fn = _callable(build_model(case, impl, DEVICE, DTYPE), case, mode == "fwd+bwd", DEVICE)
    run_benchmark(benchmark, fn, DEVICE)
