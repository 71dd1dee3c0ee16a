"""Experiment 5, HRM-LM against a parameter-matched Universal Transformer: two blocks either way, trained
from scratch for the same steps at the same depth (6 block calls). HRM-LM runs a fast module (block 0) twice
per step of a slow module (block 1), twice over; the Universal Transformer loops the two blocks three times."""

from __future__ import annotations

import time
from typing import Dict, List

from ..training.plots import figure
from .common import Claim, Context, Report, mean, spread, verdict

NAME = "hrm"

UNIVERSAL = "Universal Transformer (2 blocks x 3 loops)"

HRM = "HRM-LM (fast x2, slow, twice)"


def run(context: Context) -> Report:
    budget = context.budget
    configs = {
        UNIVERSAL: context.config(num_blocks=2, sharing="cycle"),
        HRM: context.config(num_blocks=2, sharing="hierarchical", hrm_period=2),
    }
    report = Report(NAME, "HRM-LM against a parameter-matched Universal Transformer",
                    f"Both models: {budget.num_layers} block calls over 2 blocks of hidden {budget.hidden_size} (the "
                    f"same parameters and FLOPs), trained from scratch {budget.pretrain_steps} steps with the same "
                    "windows per seed.")
    start = time.perf_counter()
    runs = {name: context.from_scratch(config, budget.pretrain_steps) for name, config in configs.items()}
    losses = {name: run.losses for name, run in runs.items()}
    curves = {name: run.curve for name, run in runs.items()}
    parameters = {name: sum(p.numel() for p in context.fresh(config).parameters()) for name, config in configs.items()}
    report.seconds = time.perf_counter() - start
    report.table("Held-out loss after the same steps:",
                 ["model", "parameters", "held-out loss (mean)", "spread over seeds"],
                 [[name, f"{parameters[name]:,}", mean(v), spread(v)] for name, v in losses.items()])
    report.claims = claims(losses)
    report.figure = lambda path: _plot(path, curves)
    return report


def claims(losses: Dict[str, List[float]]) -> List[Claim]:
    """The claim decided on the held-out losses over the seeds of :data:`UNIVERSAL` and :data:`HRM`."""
    ut, hrm = mean(losses[UNIVERSAL]), mean(losses[HRM])
    noise = max([spread(v) for v in losses.values()] + [0.002])
    return [Claim("HRM-LM beats a parameter-matched Universal Transformer at the same budget",
                  "HRM-LM's held-out loss below the Universal Transformer's by more than the seeds' spread",
                  verdict(hrm < ut, clear=abs(hrm - ut) > noise), f"HRM-LM {hrm:.4f}, UT {ut:.4f}")]


def _plot(path: str, curves: Dict[str, List[float]]) -> None:
    with figure(path) as axes:
        for name, curve in curves.items():
            smooth = [mean(curve[max(0, i - 9):i + 1]) for i in range(len(curve))]
            axes.plot(range(1, len(curve) + 1), smooth, label=name)
        axes.set_xlabel("step")
        axes.set_ylabel("training loss (10-step mean, seed 0)")
        axes.legend(fontsize=8)
