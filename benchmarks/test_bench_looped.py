"""The looped models' serving benchmark: its table on tiny cases (columns, timings, ratios against the medians, the
methods of each model, agreement of full-depth decoding, the engine's loops)."""

import importlib.util
import math

import torch

from . import bench_looped
from .bench_looped import EXIT_THRESHOLDS, Case, methods_of


def test_looped_table(one_thread):
    models = [m for m in bench_looped.MODELS if m != "hrm_text" or importlib.util.find_spec("transformers")]
    cases = [Case(model, 32, 2, 64, 4, 2, (2, 4)) for model in models]
    result = bench_looped.run(device=torch.device("cpu"), dtype=torch.float32, cases=cases, repeats=1)
    rows = result["rows"]
    assert [row["method"] for row in rows] == [m for case in cases for m in methods_of(case)]
    for case in cases:
        mine = {row["method"]: row for row in rows if row["case"] == case.label}
        plain = mine["plain"]
        for method, row in mine.items():
            assert row["s"] > 0 and math.isclose(row["tokens/s"] * row["s"], plain["tokens/s"] * plain["s"])
            assert math.isclose(row["vs plain"], row["tokens/s"] / plain["tokens/s"])
            if not method.endswith(tuple(f"+exit {q}" for q in EXIT_THRESHOLDS)):
                assert row["agree"] == 1.0  # full depth: the same tokens as plain decoding
        engine = mine["engine"]
        assert engine["exit loops"] == engine["of loops"]  # no exit: every loop
        if case.model == "hrm_text":
            assert math.isclose(mine["transformers"]["vs transformers"], 1.0)
            assert math.isclose(plain["vs transformers"], plain["tokens/s"] / mine["transformers"]["tokens/s"])
        if case.model != "hrm_text":  # Ouro: 4 loops; Huginn: 4 passes of its core
            assert engine["of loops"] == 4
            assert all(mine[f"engine+exit {q}"]["exit loops"] < 4 for q in EXIT_THRESHOLDS)
    assert "looped models' serving" in bench_looped.render_result(result)
