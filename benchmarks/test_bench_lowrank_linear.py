"""The lowrank_linear benchmark cases under pytest-benchmark: ``pytest benchmarks/``.

Kept out of the default test run (``testpaths = tests``). Each case times the base matmul, the eager
way and every available backend, so pytest-benchmark's comparison table shows the ratios.
"""

import pytest
import torch

from benchmarks.bench_lowrank_linear import MODES, _callable, available_backends, default_cases, make_inputs

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
DTYPE = torch.bfloat16 if DEVICE.type == "cuda" else torch.float32
IMPLS = ["base", "eager", *available_backends(DEVICE, DTYPE)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("case", default_cases(DEVICE), ids=lambda c: c.label.replace(" ", "-"))
def test_lowrank_linear(benchmark, case, mode, impl):
    benchmark.group = f"{case.label} {mode}"
    fn = _callable(impl, make_inputs(case, DEVICE, DTYPE, requires_grad=mode == "fwd+bwd"), mode == "fwd+bwd")
    if DEVICE.type == "cuda":
        def fn_sync():
            fn()
            torch.cuda.synchronize()
        benchmark(fn_sync)
    else:
        benchmark(fn)
