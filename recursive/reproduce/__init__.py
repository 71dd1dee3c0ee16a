"""``python -m recursive reproduce``: the seed papers' claims rerun at small scale on real text that every
machine has (the Python standard library's sources), each experiment writing a markdown table, a plot and
its claims' verdicts (held, did not hold, mixed) under the criteria fixed with its budget."""

from __future__ import annotations

import importlib.util
import os
import time
from typing import List, Optional, Sequence

import torch

from . import early_exit, hrm, mixture_of_loras, modulation, pretrained, recursions, relaxed
from .common import FULL, QUICK, Budget, Context, Report, log, machine, stdlib_corpus

EXPERIMENTS = {module.NAME: module for module in (relaxed, mixture_of_loras, recursions, modulation, hrm, early_exit,
                                                  pretrained)}


def run_experiments(names: Optional[Sequence[str]] = None, quick: bool = False, out: str = "reproduce",
                    device: Optional[str] = None, progress: bool = True,
                    budget: Optional[Budget] = None) -> List[Report]:
    """Run the experiments ``names`` (default: all, in order) and write ``<name>.md``, ``<name>.png`` and
    ``summary.md`` into ``out``; returns the reports. ``budget``: sizes and steps (default: ``QUICK`` with
    ``quick``, else ``FULL``)."""
    names = list(names or EXPERIMENTS)
    unknown = [name for name in names if name not in EXPERIMENTS]
    if unknown:
        raise ValueError(f"experiments: unknown {unknown}; choose from {list(EXPERIMENTS)}")
    os.makedirs(out, exist_ok=True)
    budget = budget or (QUICK if quick else FULL)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    corpus = stdlib_corpus(os.path.join(out, "token-cache"), limit=budget.files)
    context = Context(out, budget, corpus, device, progress)
    reports = []
    for name in names:
        log(f"reproduce {name} ({budget.name} budget)")
        start = time.perf_counter()
        report = EXPERIMENTS[name].run(context)
        report.seconds = report.seconds or time.perf_counter() - start
        figure_name = _draw(report, out)
        with open(os.path.join(out, f"{name}.md"), "w") as f:
            f.write(report.markdown(context, figure_name))
        reports.append(report)
        log(f"reproduce {name}: {report.seconds / 60:.1f} min, " + ", ".join(f"{c.verdict}" for c in report.claims))
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(_summary(reports, context))
    return reports


def _draw(report: Report, out: str) -> Optional[str]:
    """The report's figure as ``<name>.png`` in ``out`` (None without matplotlib: the tables alone)."""
    if report.figure is None or importlib.util.find_spec("matplotlib") is None:
        return None
    name = f"{report.name}.png"
    report.figure(os.path.join(out, name))
    return name


def _summary(reports: List[Report], context: Context) -> str:
    lines = ["# The seed papers' claims, reproduced at small scale", "",
             f"Machine: {machine()}. Budget: {context.budget.name}. Corpus: {context.corpus.describe()}.", "",
             "| experiment | claim | verdict | evidence |", "| --- | --- | --- | --- |"]
    for report in reports:
        lines += [f"| [{report.name}]({report.name}.md) | {c.claim} | **{c.verdict}** | {c.evidence} |"
                  for c in report.claims]
    return "\n".join(lines) + "\n"


__all__ = ["EXPERIMENTS", "FULL", "QUICK", "Budget", "run_experiments"]
