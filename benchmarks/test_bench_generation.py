"""The generation benchmark under pytest-benchmark: ``pytest benchmarks/``.

One workload (the default of ``bench_generation``), one case per method, so pytest-benchmark's
comparison table shows the engine against plain batching and the untied model; each timed run gives every
request its prompt and its requested number of new tokens. The benchmark's own table (``run``) is checked on a
tiny workload: its columns, timings, ratios, agreement and exit loops, and the methods asked for.
"""

import math

import pytest
import torch

from recursive.generation import calibrate_exit_threshold

from . import bench_generation
from .bench_generation import (
    METHODS,
    PEER,
    Workload,
    _runner,
    available_methods,
    default_workload,
    make_models,
    make_requests,
)
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
    outputs = run_benchmark(benchmark, _runner(method, models, prompts, lengths, WORKLOAD, threshold), DEVICE)
    assert [output[:len(prompt)] for output, prompt in zip(outputs, prompts)] == prompts
    assert [len(output) - len(prompt) for output, prompt in zip(outputs, prompts)] == lengths


def test_generation_table(one_thread):
    """The methods asked for, in order, each a row of every column; tokens/s is the requests' new tokens over the
    median time and each ratio the two rows' ratio; decoding without exit agrees with full depth and runs every
    loop."""
    workload = Workload(32, 64, 2, 4, 2, 64, 6, 4, (2, 5), (2, 5))
    methods = ("plain", PEER, "engine", "engine+exit", "mor")
    result = bench_generation.run(device=torch.device("cpu"), dtype=torch.float32, workload=workload, repeats=1,
                                  methods=methods)
    loops = workload.num_layers // workload.num_blocks
    assert result["loops"] == loops and result["workload"] == workload.label
    assert result["new_tokens"] == sum(make_requests(workload)[1])
    assert 0 < result["exit_threshold"] <= 1  # calibrated: a top probability
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == list(available_methods(methods))
    columns = {column.name for column in bench_generation.COLUMNS}
    for method, row in rows.items():
        assert set(row) == columns
        assert 0 < row["s"] < math.inf
        assert row["tokens/s"] == pytest.approx(result["new_tokens"] / row["s"])
        assert row["vs plain"] == pytest.approx(rows["plain"]["s"] / row["s"])
        assert row["vs transformers"] == (pytest.approx(rows[PEER]["s"] / row["s"]) if PEER in rows else None)
    assert rows["plain"]["agree"] == rows["engine"]["agree"] == 1.0  # greedy at full depth, the same tokens
    assert 0 <= rows["engine+exit"]["agree"] <= 1
    assert rows["mor"]["agree"] is None and (PEER not in rows or rows[PEER]["agree"] is None)
    assert rows["engine"]["exit loops"] == loops
    assert 1 <= rows["engine+exit"]["exit loops"] <= loops and 1 <= rows["mor"]["exit loops"] <= loops
    assert rows["plain"]["exit loops"] is None and (PEER not in rows or rows[PEER]["exit loops"] is None)
