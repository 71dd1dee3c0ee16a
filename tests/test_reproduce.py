"""``python -m recursive reproduce``: every experiment runs end to end at a tiny budget and writes its table,
claims and plot; the verdict rules and the claims' criteria decide as stated."""

import importlib.util
import os
import re

import pytest

from recursive.__main__ import main as cli
from recursive.reproduce import EXPERIMENTS, Budget, run_experiments
from recursive.reproduce.common import verdict
from recursive.reproduce import relaxed


pytestmark = pytest.mark.usefixtures("one_thread")

TINY = Budget("tiny", hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, num_layers=6, seq_len=32,
              batch_size=4, pretrain_steps=4, train_steps=2, lr=3e-3, eval_windows=4, seeds=(0,), files=24,
              requests=4, new_tokens=4, timing_s=0.01)

VERDICTS = ("held", "did not hold", "mixed")


def test_every_experiment_writes_its_report(tmp_path):
    pytest.importorskip("transformers")  # the conversion experiments go through the Hugging Face export
    reports = run_experiments(out=str(tmp_path), budget=TINY, progress=False)
    assert [report.name for report in reports] == list(EXPERIMENTS)
    summary = (tmp_path / "summary.md").read_text()
    for report in reports:
        assert report.claims and all(claim.verdict in VERDICTS for claim in report.claims), report.name
        text = (tmp_path / f"{report.name}.md").read_text()
        assert text.startswith(f"# {report.title}") and "Wall time" in text and "sha256" in text
        assert re.search(r"^\| .* \| \*\*(held|did not hold|mixed)\*\* \|", text, re.MULTILINE)
        assert f"]({report.name}.md)" in summary
        if importlib.util.find_spec("matplotlib"):
            assert (tmp_path / f"{report.name}.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_runs_named_experiments_and_rejects_unknown_ones(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr("recursive.reproduce.QUICK", TINY)  # the command's --quick, at the tiny budget
    cli(["reproduce", "hrm", "--quick", "--out", str(tmp_path), "--no-progress"])
    out = capsys.readouterr().out
    assert "hrm" in out and "summary.md" in out and os.path.exists(tmp_path / "hrm.md")
    assert not os.path.exists(tmp_path / "mor.md")
    with pytest.raises(SystemExit, match="experiments: unknown"):
        cli(["reproduce", "nonsense", "--out", str(tmp_path)])


def test_verdicts():
    assert verdict(True) == "held" and verdict(False) == "did not hold"
    assert verdict(True, clear=False) == verdict(False, clear=False) == "mixed"


def test_relaxed_claims_follow_their_criteria():
    """The criteria of experiment 1 on made-up losses, one case per verdict."""
    def losses(**overrides):
        values = {"untied": 1.00, "vanilla, stepwise": 1.20, "vanilla, average": 1.21, "vanilla, lower": 1.30,
                  "relaxed r=8, SVD": 1.12, "relaxed r=32, SVD": 1.08, "relaxed r=full, SVD": 1.04,
                  "relaxed r=8, zero init": 1.15, "relaxed r=32, zero init": 1.10}
        values.update(overrides)
        return {label: [value] for label, value in values.items()}

    conversion = {label: 2.0 for label in losses()}
    held = relaxed.claims(losses(), conversion)
    assert [claim.verdict for claim in held] == ["held"] * 4
    worse = relaxed.claims(losses(**{"relaxed r=full, SVD": 1.19, "relaxed r=8, SVD": 1.16,
                                     "vanilla, stepwise": 1.25}), conversion)
    assert [claim.verdict for claim in worse] == ["held", "did not hold", "did not hold", "did not hold"]
    mixed = relaxed.claims(losses(**{"relaxed r=8, zero init": 1.1201}), conversion)
    assert mixed[2].verdict == "mixed"  # one rank within the noise

