"""The generation benchmark under pytest-benchmark: ``pytest benchmarks/``.

One workload (the default of ``bench_generation``), one case per method, so pytest-benchmark's
comparison table shows the engine against plain batching and the untied model.
"""

import pytest
import torch

from recursive.generation import calibrate_exit_threshold

from .bench_generation import METHODS, _runner, default_workload, make_models, make_requests
from .common import resolve, run_benchmark

DEVICE, DTYPE = resolve(None, None)
WORKLOAD = default_workload(DEVICE)


@pytest.fixture(scope="module")
def setup():
    models = make_models(WORKLOAD, DEVICE, DTYPE)
    prompts, lengths = make_requests(WORKLOAD)
    calibration = torch.tensor([p[: WORKLOAD.prompt_lengths[0]] for p in prompts], device=DEVICE)
    return models, prompts, lengths, calibrate_exit_threshold(models[0], calibration, 0.5)


@pytest.mark.parametrize("method", METHODS)
def test_generation(benchmark, setup, method):
    models, prompts, lengths, threshold = setup
    benchmark.group = f"generation {WORKLOAD.label}"
    run_benchmark(benchmark, _runner(method, models, prompts, lengths, WORKLOAD, threshold), DEVICE)
