"""``python -m recursive reproduce``: every experiment runs end to end at a tiny budget and writes its table,
claims and plot; the verdict rules and the claims' criteria decide as stated."""

import importlib.util
import os
import re

import pytest

from recursive import smollm2
from recursive.__main__ import main as cli
from recursive.reproduce import (
    EXPERIMENTS,
    Budget,
    early_exit,
    hrm,
    mixture_of_loras,
    modulation,
    pretrained,
    recursions,
    relaxed,
    run_experiments,
)
from recursive.reproduce.common import verdict

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = Budget("tiny", hidden_size=32, intermediate_size=64, num_heads=2, num_kv_heads=1, num_layers=6, seq_len=32,
              batch_size=4, pretrain_steps=4, train_steps=2, lr=3e-3, eval_windows=4, seeds=(0,), files=24,
              requests=4, new_tokens=4, timing_s=0.01)

VERDICTS = ("held", "did not hold", "mixed")


# SmolLM2's first 3 layers as 1 block looped 3 times (and 3 blocks), one step per model.
TINY_PRETRAINED = pretrained.Setting(layers=3, blocks=1, wide_blocks=3, rank=2, second_rank=4, files=6, seq_len=16,
                                     batch_size=2, steps=1, exit_steps=1, adapter_lr=1e-3, full_lr=1e-4, eval_windows=2,
                                     calibration_tokens=32, requests=2, new_tokens=(2, 3), timing_s=0.01)


def test_every_experiment_writes_its_report(tmp_path, monkeypatch):
    pytest.importorskip("transformers")  # the conversion experiments go through the Hugging Face export
    monkeypatch.setattr(pretrained, "QUICK", TINY_PRETRAINED)
    names = [name for name in EXPERIMENTS if name != pretrained.NAME or smollm2.gguf_path() is not None]
    reports = run_experiments(names, out=str(tmp_path), budget=TINY, progress=False)
    assert [report.name for report in reports] == names
    summary = (tmp_path / "summary.md").read_text()
    for report in reports:
        assert report.claims and all(claim.verdict in VERDICTS for claim in report.claims), report.name
        text = (tmp_path / f"{report.name}.md").read_text()
        assert text.startswith(f"# {report.title}") and "Wall time" in text
        assert ("SmolLM2's tokens" if report.name == pretrained.NAME else "sha256") in text
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


def test_pretrained_claims_follow_their_criteria():
    """The criteria of the pretrained experiment on made-up losses and serving points, each verdict reached."""
    setting = pretrained.FULL
    inits = {"svd, unfolded": 3.30, "svd": 3.20, "activation": 3.10, "zero": 3.25}
    after = {"original, fine-tuned": 2.30, "vanilla 10x3": 3.50, **{f"10x3 r=64, {k}": v for k, v in inits.items()},
             "10x3 r=128, activation": 3.00, "15x2 r=64, activation": 2.90}
    conversion = {**{label: 14.0 for label in after}, "10x3 r=64, svd, unfolded": 16.0, "10x3 r=64, svd": 15.0,
                  "10x3 r=64, activation": 13.0}
    exact = {True: 2.4455, False: 13.1}
    points = {"engine": [(1.0, 100.0), (0.97, 140.0), (0.90, 180.0)], "plain": [(1.0, 90.0), (0.97, 95.0), (0.9, 99.0)]}

    def verdicts(after=after, conversion=conversion, exact=exact, points=points, hf_rate=100.0):
        return [c.verdict for c in pretrained.claims(after, conversion, exact, 2.4455, points, hf_rate, setting,
                                                     "activation")]

    assert verdicts() == ["held"] * 7
    assert verdicts(exact={True: 2.46, False: 13.1})[0] == "did not hold"
    assert verdicts(after={**after, "vanilla 10x3": 3.25})[1] == "did not hold"  # zero and unfolded above it
    assert verdicts(after={**after, "10x3 r=64, zero": 3.21})[2] == "mixed"  # within the margin
    assert verdicts(conversion={**conversion, "10x3 r=64, svd": 16.5})[3] == "did not hold"
    assert verdicts(after={**after, "15x2 r=64, activation": 3.2})[5] == "did not hold"
    assert verdicts(hf_rate=110.0)[6] == "did not hold"  # 140 / 110 < 1.3
    assert verdicts(points={**points, "engine": [(1.0, 100.0), (0.94, 200.0)]})[6] == "did not hold"  # not kept


def test_mol_claims_follow_their_criteria():
    """The criteria of the Mixture-of-LoRAs experiment on made-up losses over seeds, each verdict reached."""
    def claims(per_depth=(1.10,), mixture=(1.05,), merged_6=1.06, merged_24=1.05):
        return mixture_of_loras.claims({"shared, no adapters": [1.20], "LoRA per depth": list(per_depth),
                                        "mixture of LoRAs": list(mixture), "mixture merged, rank 6": [merged_6],
                                        "mixture merged, rank 24": [merged_24]})

    def verdicts(**numbers):
        return [claim.verdict for claim in claims(**numbers)]

    assert verdicts() == ["held", "held"]
    assert verdicts(mixture=(1.15,))[0] == "did not hold"
    assert verdicts(mixture=(1.099,))[0] == "mixed"  # below by less than the 0.002 floor
    assert verdicts(mixture=(1.15,), per_depth=(1.149,))[0] == "mixed"  # above by less than the floor
    assert verdicts(per_depth=(1.10, 1.14), mixture=(1.05, 1.15))[0] == "mixed"  # 0.02 below, seeds spread 0.1
    assert verdicts(merged_6=1.08)[1] == "did not hold"  # loses 0.03 > MERGE_MARGIN
    assert verdicts(merged_24=1.50)[1] == "held"  # decided at the experts' rank alone
    assert claims()[1].evidence == "merged - mixture: rank 6 +0.0100, rank 24 +0.0000"


def test_mor_claims_follow_their_criteria():
    """The criteria of the Mixture-of-Recursions experiment on made-up losses and decode rates."""
    def verdicts(vanilla=(1.10,), expert=(1.00,), token=(1.05,), rate=(100.0, 120.0, 90.0)):
        losses = {"vanilla": list(vanilla), "expert_choice": list(expert), "token_choice": list(token)}
        return [claim.verdict for claim in recursions.claims(losses, dict(zip(losses, rate)))]

    assert verdicts() == ["held", "held"]
    assert verdicts(expert=(1.20,), token=(1.00,))[0] == "held"  # the better of the two MoR models decides
    assert verdicts(vanilla=(0.95,))[0] == "did not hold"
    assert verdicts(vanilla=(1.001,))[0] == "mixed"  # within the 0.002 floor
    assert verdicts(vanilla=(1.04, 1.10), expert=(1.00, 1.06))[0] == "mixed"  # 0.04 below, seeds spread 0.06
    assert verdicts(rate=(100.0, 90.0, 101.0))[1] == "held"  # token choice alone faster
    assert verdicts(rate=(130.0, 120.0, 90.0))[1] == "did not hold"


def test_modulation_claims_follow_their_criteria():
    """The criteria of the modulation experiment on made-up losses, each verdict reached at its boundary."""
    qkov = "QKOV-LoRA r=5"
    circuit = [f"circuit R={modulation.CIRCUIT_RANK}, start index {s}" for s in modulation.START_INDICES]

    def claims(qkov_loss=1.10, starts=(1.08, 1.13, 1.18)):
        losses = {"shared, no adapters": [1.20], qkov: [qkov_loss],
                  **{label: [loss] for label, loss in zip(circuit, starts)}}
        counts = {"shared, no adapters": 0, qkov: 5000, **{label: 4096 for label in circuit}}
        return modulation.claims(losses, counts, qkov_rank=5)

    def verdicts(**numbers):
        return [claim.verdict for claim in claims(**numbers)]

    assert verdicts() == ["held", "held"]  # start index 2 keeps 0.07 of 0.12
    assert verdicts(qkov_loss=1.079)[0] == "held"  # circuit above, within the 0.002 floor
    assert verdicts(qkov_loss=1.077)[0] == "did not hold"
    assert verdicts(starts=(1.08, 1.15, 1.18))[1] == "did not hold"  # keeps 0.05 < half of 0.12
    assert claims()[0].evidence == "circuit 1.0800 (4,096 parameters), QKOV-LoRA 1.1000 (5,000)"


def test_hrm_claims_follow_their_criteria():
    """The criterion of the HRM experiment on made-up losses over seeds, each verdict reached."""
    def verdict_of(universal, hierarchical):
        return hrm.claims({hrm.UNIVERSAL: universal, hrm.HRM: hierarchical})[0].verdict

    assert verdict_of([2.00], [1.90]) == "held"
    assert verdict_of([1.90], [2.00]) == "did not hold"
    assert verdict_of([2.000], [1.999]) == verdict_of([1.999], [2.000]) == "mixed"  # within the 0.002 floor
    assert verdict_of([2.00, 2.10], [1.95, 2.05]) == "mixed"  # 0.05 below, seeds spread 0.1
    assert verdict_of([2.00, 2.01], [1.95, 1.96]) == "held"  # 0.05 below, seeds spread 0.01


def test_early_exit_claims_follow_their_criteria():
    """The criteria of the early-exit experiment on made-up (agreement, tokens/s) points: the first of each
    method without exit, the rest at lower thresholds."""
    engine = [(1.0, 100.0), (0.97, 150.0), (0.90, 200.0)]
    plain = [(1.0, 90.0), (0.97, 120.0), (0.90, 150.0)]

    def verdicts(engine=engine, plain=plain):
        return [claim.verdict for claim in early_exit.claims({"engine": engine, "plain": plain}, hf_rate=80.0)]

    assert verdicts() == ["held", "held"]
    assert verdicts(engine=[(1.0, 100.0), (0.95, 101.0), (0.90, 200.0)])[0] == "held"  # exactly AGREEMENT is kept
    # kept but slower (the faster 0.90 point does not count): mixed
    assert verdicts(engine=[(1.0, 100.0), (0.97, 95.0), (0.90, 200.0)])[0] == "mixed"
    # faster but none kept: mixed; neither: did not hold
    assert verdicts(engine=[(1.0, 100.0), (0.94, 200.0), (0.90, 250.0)])[0] == "mixed"
    assert verdicts(engine=[(1.0, 100.0), (0.94, 90.0), (0.90, 95.0)])[0] == "did not hold"
    # plain batching without exit is faster than the kept point: not faster; nor is the engine faster everywhere
    slow_engine = verdicts(plain=[(1.0, 160.0), (0.97, 120.0), (0.90, 150.0)])
    assert slow_engine == ["mixed", "did not hold"]
    assert early_exit.claims({"engine": engine, "plain": plain}, 80.0)[1].evidence == "1.11x, 1.25x, 1.33x"
