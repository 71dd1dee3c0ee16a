"""Experiment 3, Mixture-of-Recursions (Bae et al., 2025): a vanilla recursive model (2 shared blocks looped 3
times) against Mixture-of-Recursions models of the same shape (expert choice and token choice) trained from
scratch with the same training FLOPs (``recursive.flops``: a MoR step costs less, so it takes more steps),
compared on held-out loss and greedy decode throughput."""

from __future__ import annotations

import time
from typing import Dict, List

from ..flops import training_step_flops
from ..generation import generate_in_batches
from ..training.plots import figure
from .common import Claim, Context, Report, mean, spread, verdict
from .early_exit import prompts

NAME = "mor"

ROUTINGS = (None, "expert_choice", "token_choice")


def step_flops(context: Context, config) -> int:
    """A training step's FLOPs; token choice counted with balanced routing (each depth a third of the tokens),
    what its balancing loss aims at."""
    budget = context.budget
    recursion_tokens = None
    if config.mor_routing == "token_choice":
        n = len(config.recursions()[1])
        recursion_tokens = [[round(budget.seq_len * (n - r) / n)] * budget.batch_size for r in range(n)]
    return training_step_flops(config, budget.batch_size, budget.seq_len, recursion_tokens=recursion_tokens)


def run(context: Context) -> Report:
    from recursive_benchmarks.common import median_seconds

    budget = context.budget
    configs = {routing or "vanilla": context.config(num_blocks=2, mor_routing=routing) for routing in ROUTINGS}
    flops = context.budget.pretrain_steps * step_flops(context, configs["vanilla"])
    steps = {name: round(flops / step_flops(context, config)) for name, config in configs.items()}
    report = Report(NAME, "Mixture-of-Recursions: quality and decode speed at equal training FLOPs",
                    f"{budget.num_layers} effective layers over 2 shared blocks (3 recursions), trained from scratch; "
                    f"each model gets the training FLOPs of {budget.pretrain_steps} vanilla steps "
                    f"({flops / 1e12:.2f} TFLOP; token choice counted with balanced routing). Expert choice keeps "
                    "1, 2/3 and 1/3 of each sequence's tokens at the three recursions; token choice assigns each "
                    f"token a depth. Decode: {budget.requests} held-out prompts, {budget.new_tokens} new bytes each, "
                    "batches of 8, greedy.")
    start = time.perf_counter()
    runs = {name: context.from_scratch(config, steps[name]) for name, config in configs.items()}
    losses = {name: run.losses for name, run in runs.items()}
    models = {name: run.model for name, run in runs.items()}
    requests, new_tokens = prompts(context.corpus.held_out, budget.requests), budget.new_tokens
    seconds = median_seconds({name: (lambda m=model: generate_in_batches(m, requests, new_tokens, 8))
                              for name, model in models.items()}, context.device, min_run_time=budget.timing_s / 2)
    report.seconds = time.perf_counter() - start
    rate = {name: len(requests) * new_tokens / s for name, s in seconds.items()}
    rows = [[name, steps[name], f"{step_flops(context, configs[name]) / 1e9:.1f}", mean(values), spread(values),
             rate[name]] for name, values in losses.items()]
    report.table("Held-out loss at equal training FLOPs, and decode throughput:",
                 ["model", "steps", "GFLOP per step", "held-out loss (mean)", "spread over seeds", "decode tokens/s"],
                 rows)
    report.claims = claims(losses, rate)
    report.figure = lambda path: _plot(path, {name: mean(v) for name, v in losses.items()}, rate)
    return report


def claims(losses: Dict[str, List[float]], rate: Dict[str, float]) -> List[Claim]:
    """The claims decided on the held-out losses over the seeds and the decode tokens/s of the vanilla, expert
    choice and token choice models."""
    noise = max([spread(v) for v in losses.values()] + [0.002])
    loss = {name: mean(v) for name, v in losses.items()}
    best = min(("expert_choice", "token_choice"), key=lambda name: loss[name])
    return [
        Claim("Mixture-of-Recursions buys quality per training FLOP",
              "a MoR model's held-out loss below the vanilla recursive model's at equal training FLOPs, by more than "
              "the seeds' spread",
              verdict(loss[best] < loss["vanilla"], clear=abs(loss[best] - loss["vanilla"]) > noise),
              f"vanilla {loss['vanilla']:.4f}, expert choice {loss['expert_choice']:.4f}, token choice "
              f"{loss['token_choice']:.4f}"),
        Claim("Mixture-of-Recursions decodes faster", "a MoR model's greedy decode tokens/s above the vanilla model's",
              verdict(max(rate["expert_choice"], rate["token_choice"]) > rate["vanilla"]),
              ", ".join(f"{name} {value:,.0f} tok/s" for name, value in rate.items())),
    ]


def _plot(path: str, loss: Dict[str, float], rate: Dict[str, float]) -> None:
    with figure(path, size=(6.0, 4.0)) as axes:
        for name in loss:
            axes.scatter(rate[name], loss[name], s=40)
            axes.annotate(name, (rate[name], loss[name]), textcoords="offset points", xytext=(6, 4), fontsize=8)
        axes.set_xlabel("greedy decode, new tokens / s")
        axes.set_ylabel("held-out loss at equal training FLOPs")
