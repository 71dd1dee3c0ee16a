"""Experiment 2, Mixture of LoRAs (ModernALBERT): on the frozen shared model (the pretrained untied model
converted to 2 blocks looped 3 times), a LoRA per depth on the feed-forward projections against a mixture of
LoRA experts in each shared block's feed-forward (top-2 of 4, chosen per token), at matched trainable
parameters; then the experts merged into one adapter per block (``MoLFeedForward.merge_experts``, routing
weights averaged over held-out inputs)."""

from __future__ import annotations

import time
from copy import deepcopy
from typing import Dict, List

import torch

from .common import Claim, Context, Report, bar_plot, mean, shared_start, spread, trainable, verdict, with_adapters

NAME = "mol"

FEED_FORWARD = ("gate", "up", "down")

DEPTH_LORA = dict(relaxation="depth_lora", lora_rank=8, lora_targets=FEED_FORWARD)

# 2 blocks x 4 experts x rank 6 = 6 depths x rank 8 (plus the routers' 4 x hidden per block)
MIXTURE = dict(relaxation="mol", num_experts=4, num_experts_per_tok=2, lora_rank=6, lora_targets=FEED_FORWARD)

MERGE_MARGIN = 0.02  # nats per byte the merged model may lose against the mixture


def merged(model, context: Context, rank=None):
    """A copy of the mixture model with each block's experts merged into one adapter of ``rank``, the routing
    weights averaged over the feed-forward inputs of a batch of held-out windows at every depth."""
    copy = deepcopy(model)
    inputs: Dict[int, List[torch.Tensor]] = {}
    hooks = [block.mlp.register_forward_pre_hook(
                 lambda module, args, b=b: inputs.setdefault(b, []).append(args[0].detach()))
             for b, block in enumerate(copy.model.blocks)]
    length = context.budget.seq_len
    windows = context.corpus.held_out.windows([i * length for i in range(context.budget.batch_size)], length)
    with torch.no_grad():
        copy(windows.to(context.device))
    for hook in hooks:
        hook.remove()
    for b, block in enumerate(copy.model.blocks):
        block.mlp = block.mlp.merge_experts(torch.cat([x.reshape(-1, x.shape[-1]) for x in inputs[b]]), rank=rank)
    return copy


def run(context: Context) -> Report:
    budget = context.budget
    report = Report(NAME, "Mixture of LoRAs against a LoRA per depth, and merging the experts",
                    f"The frozen shared model (the pretrained {budget.num_layers}-layer model converted to 2 blocks "
                    f"x 3 loops, no relaxation); only the adapters train, {budget.train_steps} steps. Per-depth LoRA: "
                    "rank 8 on gate, up and down at each of the 6 depths. Mixture: 4 LoRA experts of rank 6 on the "
                    "same projections in each of the 2 blocks, top-2 per token by a router. Merged: each block's "
                    "experts summed with their mean routing weights into one adapter (rank 6, the experts' rank, or "
                    "24, exact).")
    start = time.perf_counter()
    base = shared_start(context)
    losses: Dict[str, List[float]] = {"shared, no adapters": [context.held_out_loss(base)] * len(budget.seeds)}
    counts = {"shared, no adapters": 0}
    for seed in budget.seeds:
        for name, relaxation in (("LoRA per depth", DEPTH_LORA), ("mixture of LoRAs", MIXTURE)):
            model = with_adapters(base, **relaxation)
            counts[name] = trainable(model)
            context.train(model, budget.train_steps, seed=seed)
            losses.setdefault(name, []).append(context.held_out_loss(model))
            if name == "mixture of LoRAs":
                for rank in (6, 24):
                    label = f"mixture merged, rank {rank}"
                    losses.setdefault(label, []).append(context.held_out_loss(merged(model, context, rank)))
                    counts[label] = 0
    report.seconds = time.perf_counter() - start
    report.table("Held-out loss:", ["model", "trained parameters", "held-out loss (mean)", "spread over seeds"],
                 [[name, f"{counts[name]:,}", mean(v), spread(v)] for name, v in losses.items()])
    report.claims = claims(losses)
    report.figure = lambda path: bar_plot(path, {name: mean(v) for name, v in losses.items()})
    return report


def claims(losses: Dict[str, List[float]]) -> List[Claim]:
    """The claims decided on the held-out losses over the seeds of the shared model without adapters, the
    per-depth LoRA, the mixture and the mixture merged at ranks 6 and 24."""
    loss = {name: mean(v) for name, v in losses.items()}
    noise = max([spread(v) for v in losses.values()] + [0.002])
    lost = {rank: loss[f"mixture merged, rank {rank}"] - loss["mixture of LoRAs"] for rank in (6, 24)}
    return [
        Claim("A mixture of LoRA experts beats a LoRA per depth at matched trainable parameters",
              "the mixture's held-out loss below the per-depth LoRA's by more than the seeds' spread",
              verdict(loss["mixture of LoRAs"] < loss["LoRA per depth"],
                      clear=abs(loss["mixture of LoRAs"] - loss["LoRA per depth"]) > noise),
              f"mixture {loss['mixture of LoRAs']:.4f}, per depth {loss['LoRA per depth']:.4f}, "
              f"no adapters {loss['shared, no adapters']:.4f}"),
        Claim("The experts merge into one adapter and keep the loss", f"merged at the experts' rank within "
              f"{MERGE_MARGIN} nats of the mixture", verdict(lost[6] <= MERGE_MARGIN),
              f"merged - mixture: rank 6 {lost[6]:+.4f}, rank 24 {lost[24]:+.4f}"),
    ]
