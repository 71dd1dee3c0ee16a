"""The circuit_attention benchmark cases under pytest-benchmark: ``pytest benchmarks/``."""

import pytest
import torch

from benchmarks.bench_circuit_attention import MODES, _callable, available_backends, default_cases, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
IMPLS = ["sdpa", "eager", *available_backends(DEVICE, DTYPE)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", default_cases(DEVICE), ids=lambda c: c.label.replace(" ", "-"))
def test_circuit_attention(benchmark, case, mode, impl):
    benchmark.group = f"{case.label} {mode}"
    backward = mode == "fwd+bwd"
    fn = _callable(impl, make_inputs(case, DEVICE, DTYPE, backward), case, backward)
    if DEVICE.type == "cuda":
        def fn_sync():
            fn()
            torch.cuda.synchronize()
        benchmark(fn_sync)
    else:
        benchmark(fn)
