"""Experiment 4, depth as modulation: on the frozen shared model (the pretrained untied model converted to 2
blocks looped 3 times), per-depth QKOV-LoRA (LoRA on q, k, v, o) against the QK/OV circuit (low-rank
corrections of the attention logits and of the OV path per depth) at matched trainable parameters, and the
circuit from a later Start Index (the first layers unmodulated)."""

from __future__ import annotations

import time
from typing import Dict, List

from .common import Claim, Context, Report, bar_plot, mean, shared_start, spread, trainable, verdict, with_adapters

NAME = "modulation"

CIRCUIT_RANK = 8

START_INDICES = (0, 2, 4)


def run(context: Context) -> Report:
    budget = context.budget
    base = shared_start(context)
    circuit_count = trainable(with_adapters(base, relaxation="circuit", circuit_rank=CIRCUIT_RANK))
    per_rank = trainable(with_adapters(base, relaxation="qkov_lora", lora_rank=1))
    qkov_rank = max(1, round(circuit_count / per_rank))
    variants = {f"QKOV-LoRA r={qkov_rank}": dict(relaxation="qkov_lora", lora_rank=qkov_rank)}
    for start_index in START_INDICES:
        variants[f"circuit R={CIRCUIT_RANK}, start index {start_index}"] = dict(
            relaxation="circuit", circuit_rank=CIRCUIT_RANK, start_index=start_index)
    report = Report(NAME, "Depth as modulation: the QK/OV circuit against QKOV-LoRA",
                    f"The frozen shared model (the pretrained {budget.num_layers}-layer model converted to 2 blocks "
                    f"x 3 loops, no relaxation); only the per-depth adapters train, {budget.train_steps} steps. "
                    f"QKOV-LoRA's rank ({qkov_rank}) is chosen to match the circuit's trainable parameters at rank "
                    f"{CIRCUIT_RANK}; a start index s leaves layers 0..s-1 unmodulated.")
    start = time.perf_counter()
    losses: Dict[str, List[float]] = {"shared, no adapters": [context.held_out_loss(base)] * len(budget.seeds)}
    counts = {"shared, no adapters": 0}
    for seed in budget.seeds:
        for name, relaxation in variants.items():
            model = with_adapters(base, **relaxation)
            counts[name] = trainable(model)
            context.train(model, budget.train_steps, seed=seed)
            losses.setdefault(name, []).append(context.held_out_loss(model))
    report.seconds = time.perf_counter() - start
    report.table("Held-out loss:", ["model", "trained parameters", "held-out loss (mean)", "spread over seeds"],
                 [[name, f"{counts[name]:,}", mean(v), spread(v)] for name, v in losses.items()])
    report.claims = claims(losses, counts, qkov_rank)
    report.figure = lambda path: bar_plot(path, {name: mean(v) for name, v in losses.items()})
    return report


def claims(losses: Dict[str, List[float]], counts: Dict[str, int], qkov_rank: int) -> List[Claim]:
    """The claims decided on the held-out losses over the seeds and the trained parameter counts of the shared
    model without adapters, QKOV-LoRA at ``qkov_rank`` and the circuit at each start index."""
    loss = {name: mean(v) for name, v in losses.items()}
    noise = max([spread(v) for v in losses.values()] + [0.002])
    qkov, circuit = loss[f"QKOV-LoRA r={qkov_rank}"], loss[f"circuit R={CIRCUIT_RANK}, start index 0"]
    gains = {s: loss["shared, no adapters"] - loss[f"circuit R={CIRCUIT_RANK}, start index {s}"] for s in START_INDICES}
    return [
        Claim("The QK/OV circuit modulates depth as well as QKOV-LoRA at matched trainable parameters",
              "the circuit's held-out loss at most the seeds' spread above QKOV-LoRA's",
              verdict(circuit <= qkov + noise),
              f"circuit {circuit:.4f} ({counts[f'circuit R={CIRCUIT_RANK}, start index 0']:,} parameters), QKOV-LoRA "
              f"{qkov:.4f} ({counts[f'QKOV-LoRA r={qkov_rank}']:,})"),
        Claim("A later Start Index keeps most of the gain", "the circuit from start index 2 keeps >= 50% of the "
              "start-index-0 circuit's gain over no adapters", verdict(gains[2] >= 0.5 * gains[0]),
              ", ".join(f"start {s}: gain {g:.4f}" for s, g in gains.items())),
    ]
