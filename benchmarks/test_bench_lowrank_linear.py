"""The lowrank_linear benchmark cases under pytest-benchmark: ``pytest benchmarks/``.

Kept out of the default test run (``testpaths = tests``). Each case times the base matmul, the eager
way and every available backend, so pytest-benchmark's comparison table shows the ratios.
"""

import pytest

from .bench_lowrank_linear import MODES, _callable, default_cases, make_inputs
from .common import available_backends, resolve, run_benchmark

DEVICE, DTYPE = resolve(None, None)
IMPLS = ["base", "eager", *available_backends("lowrank_linear", DEVICE, DTYPE)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", default_cases(DEVICE), ids=lambda c: c.label.replace(" ", "-"))
def test_lowrank_linear(benchmark, case, mode, impl):
    benchmark.group = f"{case.label} {mode}"
    fn = _callable(impl, make_inputs(case, DEVICE, DTYPE, requires_grad=mode == "fwd+bwd"), mode == "fwd+bwd")
    run_benchmark(benchmark, fn, DEVICE)
