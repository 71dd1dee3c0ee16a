"""The circuit_attention benchmark cases under pytest-benchmark: ``pytest benchmarks/``."""

import pytest

from .bench_circuit_attention import MODES, _callable, default_cases, make_inputs
from .common import available_backends, resolve, run_benchmark

DEVICE, DTYPE = resolve(None, None)
IMPLS = ["sdpa", "eager", *available_backends("circuit_attention", DEVICE, DTYPE, head_dim=64)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", default_cases(DEVICE), ids=lambda c: c.label.replace(" ", "-"))
def test_circuit_attention(benchmark, case, mode, impl):
    benchmark.group = f"{case.label} {mode}"
    backward = mode == "fwd+bwd"
    fn = _callable(impl, make_inputs(case, DEVICE, DTYPE, backward), case, backward)
    run_benchmark(benchmark, fn, DEVICE)
