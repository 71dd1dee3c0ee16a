"""Early exit at loop boundaries (the package docstring of :mod:`recursive.generation`): the confidence threshold's
calibration on untrained models, and the KV-cached decoding step (every model's) that applies an exit rule."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..cache import PastKeyValues, VarlenPacking
from ..checks import check_ids
from ..loops import LayerInputs
from ..nn import rotary_embedding
from .exit_rules import ExitRule, top_probability


@torch.no_grad()
def calibrate_exit_threshold(model, input_ids: Tensor, exit_fraction: float) -> float:
    """The exit threshold at which about ``exit_fraction`` of the tokens of ``input_ids`` (B, S) leave at
    the first loop boundary: the ``1 - exit_fraction`` quantile of the LM head's top probability there.

    For models whose confidence is not known in advance (random weights rarely reach a fixed threshold
    such as 0.9); the tokens run the first loop as a prompt does (causal attention over ``input_ids``).
    """
    config = model.config
    if isinstance(exit_fraction, bool) or not isinstance(exit_fraction, (int, float)) or not 0.0 < exit_fraction < 1.0:
        raise ValueError(f"exit_fraction: expected a number in (0, 1), got {exit_fraction!r}")
    period = config.loop_length()
    config.check_loop_boundaries("model")
    if config.exit_gate:
        raise ValueError("model: calibration finds a confidence threshold, and this model exits by its own gate "
                         "(its exit probabilities are the threshold's scale): give exit_threshold instead")
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError("input_ids: expected a non-empty int tensor (B, S), "
                         f"got {getattr(input_ids, 'shape', input_ids)!r}")
    check_ids("input_ids", input_ids, config.vocab_size)
    backbone = model.model
    B, S = input_ids.shape
    positions = torch.arange(S, device=input_ids.device).expand(B, S)
    hidden = backbone.embed(input_ids)
    position_embeddings = rotary_embedding(positions, config.head_dim, config.rope_theta, hidden.dtype)
    hidden = backbone.run_layers(hidden, backbone.shape.steps[:period], LayerInputs(position_embeddings)).hidden
    top = top_probability(model.logits_at(hidden)).flatten()
    return float(top.double().quantile(1.0 - exit_fraction))


def decode_step(
    model, tokens: Tensor, positions: Tensor, position_embeddings: Tuple[Tensor, Tensor],
    packing: Optional[VarlenPacking], past: PastKeyValues, exit_rule: Optional[ExitRule],
) -> Tuple[Tensor, PastKeyValues]:
    """One new token per row through the model, leaving at loop boundaries by ``exit_rule``: the decoding step of
    :meth:`GenerationMixin.generate` for every kind of model (its cache's own kind: plain, HRM,
    Mixture-of-Recursions).

    With early exit (a plain stack, whose shape marks its loop boundaries) the loops run one at a time: a row
    that left keeps its exit hidden state, so the blocks it still runs (for rows that did not leave) give the
    keys and values of that state; once every row has left, the remaining layers only project keys and
    values. tokens (B,), positions (B,), position_embeddings (cos, sin) each (B, 1, head_dim) of the tokens'
    positions -> logits (B, vocab) and the extended cache.
    """
    backbone = model.model
    hidden = backbone.embed(tokens[:, None])
    inputs = LayerInputs(position_embeddings, packing)
    if exit_rule is None:
        out = backbone.run(hidden, positions[:, None], inputs, past, use_cache=True)
        return model.lm_head(out.last_hidden_state[:, -1]), out.past_key_values
    steps = backbone.shape.steps
    ends = [i + 1 for i, step in enumerate(steps) if step.exit_after] + [len(steps)]
    running: Optional[Tensor] = None  # None: every row (before the first boundary)
    exit_logits: Optional[Tensor] = None
    state = exit_rule.initial_state(len(tokens), model)
    all_left = False
    presents, start = [], 0
    for loop, end in enumerate(ends, 1):
        run = backbone.run_layers(hidden, steps[start:end], inputs, past[start:end], use_cache=True, active=running,
                                  keys_only=all_left)
        presents.extend(run.presents)
        hidden, start = run.hidden, end
        if all_left or end == len(steps):
            continue
        logits = model.logits_at(hidden[:, -1])
        leaving, state = exit_rule.decide(model, torch.full_like(tokens, loop), hidden[:, -1], logits, state)
        if running is not None:
            leaving = leaving & running
        exit_logits = logits if exit_logits is None else torch.where(leaving[:, None], logits, exit_logits)
        running = ~leaving if running is None else running & ~leaving
        all_left = not bool(running.any())
    if all_left:
        return exit_logits, tuple(presents)
    logits = model.logits_at(hidden[:, -1])
    if exit_logits is not None:
        logits = torch.where(running[:, None], logits, exit_logits)
    return logits, tuple(presents)
