"""Experiment 1, Relaxed Recursive Transformers (Bae et al., 2024): pretrain an untied model, convert it to
two shared blocks looped three times (``convert_hf`` of its Hugging Face export, cycle sharing) without LoRA
(three initialisations) and with a depth LoRA (SVD or zero init, three ranks), then uptrain every variant
(every parameter) for the same steps, beside the untied model trained as long again."""

from __future__ import annotations

import importlib.util
import time
from typing import Dict, List

from ..convert import convert_hf, export_hf
from ..training.plots import figure
from .common import Claim, Context, Report, mean, spread, verdict

NAME = "relaxed"

NUM_BLOCKS = 2


def variants(context: Context) -> List[Dict[str, object]]:
    """The conversions compared: label, init scheme, LoRA rank (0: none; the budget's intermediate size: full
    rank, clamped to each projection's), SVD init."""
    full = context.budget.intermediate_size
    rows = [dict(label=f"vanilla, {init}", init=init, rank=0, lora_init="svd")
            for init in ("stepwise", "average", "lower")]
    for rank in (8, 32, full):
        rows.append(dict(label=f"relaxed r={'full' if rank == full else rank}, SVD", init="stepwise", rank=rank,
                         lora_init="svd"))
    for rank in (8, 32):
        rows.append(dict(label=f"relaxed r={rank}, zero init", init="stepwise", rank=rank, lora_init="zero"))
    return rows


def run(context: Context) -> Report:
    if importlib.util.find_spec("transformers") is None:
        raise ValueError("reproduce relaxed: needs transformers (the conversion goes through the Hugging Face export)")
    budget = context.budget
    report = Report(NAME, "Relaxed Recursive Transformers: sharing, relaxing and uptraining a pretrained model",
                    f"An untied {budget.num_layers}-layer model pretrained on the corpus, converted to {NUM_BLOCKS} "
                    f"shared blocks (cycle sharing, {budget.num_layers // NUM_BLOCKS} loops) by `convert_hf`, then "
                    f"each variant and the untied model trained {budget.train_steps} more steps (all parameters, "
                    "AdamW, the same window order per seed). Losses are held-out next-byte losses in nats.")
    start = time.perf_counter()
    untied, pretrain_seconds = context.pretrained_untied()
    hf = export_hf(untied).float()
    at_conversion = {"untied": context.held_out_loss(untied)}
    after: Dict[str, List[float]] = {"untied": []}
    trainable: Dict[str, int] = {"untied": sum(p.numel() for p in untied.parameters())}
    for seed in budget.seeds:
        model, _ = context.pretrained_untied()
        context.train(model, budget.train_steps, seed=seed)
        after["untied"].append(context.held_out_loss(model))
    for variant in variants(context):
        label = variant["label"]
        after[label] = []
        for seed in budget.seeds:
            model = convert_hf(hf, NUM_BLOCKS, "cycle", variant["init"], variant["rank"],
                               lora_init=variant["lora_init"], progress=False).to(context.device)
            if seed == budget.seeds[0]:
                at_conversion[label] = context.held_out_loss(model)
                trainable[label] = sum(p.numel() for p in model.parameters())
            context.train(model, budget.train_steps, seed=seed)
            after[label].append(context.held_out_loss(model))
    report.seconds = time.perf_counter() - start

    rows = [[label, f"{trainable[label]:,}", at_conversion[label], mean(losses), spread(losses)]
            for label, losses in after.items()]
    report.table(f"Held-out loss (pretraining: {budget.pretrain_steps} steps, {pretrain_seconds / 60:.1f} min):",
                 ["model", "parameters", "at conversion", f"after {budget.train_steps} steps (mean)",
                  "spread over seeds"],
                 rows)
    report.claims = claims(after, at_conversion)
    report.figure = lambda path: _plot(path, at_conversion, after)
    return report


def claims(after: Dict[str, List[float]], at_conversion: Dict[str, float]) -> List[Claim]:
    loss = {label: mean(values) for label, values in after.items()}
    noise = max([spread(values) for values in after.values()] + [0.002])
    full = "relaxed r=full, SVD"
    gap = loss["vanilla, stepwise"] - loss["untied"]
    recovered = {rank: (loss["vanilla, stepwise"] - loss[f"relaxed r={rank}, SVD"]) / gap if gap > 0 else float("nan")
                 for rank in ("8", "32", "full")}
    monotone = loss["relaxed r=8, SVD"] >= loss["relaxed r=32, SVD"] - noise >= loss[full] - 2 * noise
    svd_margin = [loss[f"relaxed r={r}, zero init"] - loss[f"relaxed r={r}, SVD"] for r in (8, 32)]
    best_init = min(loss[f"vanilla, {init}"] for init in ("stepwise", "average", "lower"))
    return [
        Claim("Sharing the layers loses quality", "after the same steps, vanilla (stepwise) above the untied model by "
              "more than the seeds' spread", verdict(gap > noise), f"vanilla {loss['vanilla, stepwise']:.4f} vs untied "
              f"{loss['untied']:.4f} (at conversion {at_conversion['vanilla, stepwise']:.4f} "
              f"vs {at_conversion['untied']:.4f})"),
        Claim("Relaxation recovers most of the gap, more with rank", "the full-rank relaxed model recovers >= 50% of "
              "the vanilla-untied gap, and the loss falls from r=8 to r=32 to full (within the spread)",
              verdict(recovered["full"] >= 0.5 and monotone, clear=(recovered["full"] >= 0.5) == monotone),
              "recovered: " + ", ".join(f"r={rank} {value:.0%}" for rank, value in recovered.items())),
        Claim("SVD init beats zero init",
              "SVD-initialised LoRA below zero-initialised at r=8 and r=32 after the same steps",
              verdict(all(m > 0 for m in svd_margin), clear=all(abs(m) > noise for m in svd_margin)),
              f"zero - SVD: r=8 {svd_margin[0]:+.4f}, r=32 {svd_margin[1]:+.4f} (noise {noise:.4f})"),
        Claim("Stepwise is a good default init", "vanilla stepwise within the spread of the best of stepwise, average, "
              "lower after the same steps", verdict(loss["vanilla, stepwise"] <= best_init + noise),
              ", ".join(f"{init} {loss[f'vanilla, {init}']:.4f}" for init in ("stepwise", "average", "lower"))),
    ]


def _plot(path: str, at_conversion: Dict[str, float], after: Dict[str, List[float]]) -> None:
    labels = list(after)
    with figure(path, size=(7.5, 4.2)) as axes:
        y = range(len(labels))
        axes.barh([i + 0.2 for i in y], [at_conversion[label] for label in labels], height=0.4, label="at conversion",
                  color="#bbbbbb")
        axes.barh([i - 0.2 for i in y], [mean(after[label]) for label in labels], height=0.4, label="after uptraining",
                  color="#3b75af")
        axes.set_yticks(list(y), labels, fontsize=8)
        axes.invert_yaxis()
        axes.set_xlim(min(mean(v) for v in after.values()) * 0.9, max(at_conversion.values()) * 1.02)
        axes.set_xlabel("held-out loss (nats per byte)")
        axes.legend(fontsize=8)
