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
    if config.exit_gate or config.injection != "none":
        raise ValueError("model: calibration finds a confidence threshold, and this model exits by its own rule "
                         "(Ouro's gate, Huginn's KL criterion), whose scale the threshold is: give exit_threshold")
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

    With early exit (a shape that marks its loop boundaries) the loops run one at a time: a row that left keeps its
    state, so the blocks it still runs (for rows that did not leave) give the keys and values of that state; once
    every row has left, the remaining layers only project keys and values. A model with a tail (Huginn's coda) reads
    each boundary out through it (:func:`boundary_logits`), and a row's tail keys are those of its exit. tokens (B,),
    positions (B,), position_embeddings (cos, sin) each (B, 1, head_dim) of the tokens' positions -> logits
    (B, vocab) and the extended cache.
    """
    backbone = model.model
    hidden = backbone.embed(tokens[:, None])
    inputs = LayerInputs(position_embeddings, packing)
    if exit_rule is None:
        out = backbone.run(hidden, positions[:, None], inputs, past, use_cache=True)
        return model.lm_head(out.last_hidden_state[:, -1]), out.past_key_values
    shape = backbone.shape
    core_end = len(shape.steps) - shape.tail
    ends = [i + 1 for i, step in enumerate(shape.steps) if step.exit_after] + [core_end]
    running: Optional[Tensor] = None  # None: every row (before the first boundary)
    exit_logits = exit_tail = None  # per row, at its exit
    rule_state = exit_rule.initial_state(len(tokens), model)
    states, all_left, presents, start = None, False, [], 0
    for loop, end in enumerate(ends, 1):
        run = backbone.run_layers(hidden, shape.steps[start:end], inputs, past[start:end], use_cache=True,
                                  active=running, keys_only=all_left, states=states)
        presents.extend(run.presents)
        states, start = run.states, end
        if all_left or end == core_end:
            continue
        logits, tail = boundary_logits(model, states, inputs, past[core_end:], normed=False)
        leaving, rule_state = exit_rule.decide(model, torch.full_like(tokens, loop), states[shape.output_state][:, -1],
                                               logits, rule_state)
        if running is not None:
            leaving = leaving & running
        exit_logits = _rows(leaving, logits, exit_logits)
        exit_tail = tail if exit_tail is None else [_rows(leaving, new, old) for new, old in zip(tail, exit_tail)]
        running = ~leaving if running is None else running & ~leaving
        all_left = not bool(running.any())
    if all_left:
        logits, tail = exit_logits, exit_tail
    else:
        logits, tail = boundary_logits(model, states, inputs, past[core_end:], normed=True)
        if exit_logits is not None:
            logits = _rows(running, logits, exit_logits)
            tail = tail if exit_tail is None else [_rows(running, new, old) for new, old in zip(tail, exit_tail)]
    return logits, tuple(presents + list(tail or ()))


def boundary_logits(model, states, inputs: LayerInputs, tail_past, normed: bool):
    """The next-token logits (rows, vocab) of the rows' ``states`` at a loop boundary, and the tail's extended caches
    (None without a tail): the final norm and the LM head, or for a model with a tail (Huginn) the norm (unless the
    last core step ``normed`` it), the tail over ``tail_past`` and the final norm, then the LM head."""
    backbone = model.model
    shape = backbone.shape
    hidden = states[shape.output_state]
    if not shape.tail:
        return model.logits_at(hidden[:, -1]), None
    if not normed:
        states = list(states)
        states[shape.output_state] = backbone.norm(hidden)
    run = backbone.run_layers(None, shape.steps[len(shape.steps) - shape.tail:], inputs, tail_past, use_cache=True,
                              states=states)
    return model.lm_head(backbone.final_norm(run.hidden[:, -1])), run.presents


def _rows(chosen: Tensor, new, old):
    """Per row (the first dim), ``new`` where ``chosen`` (rows,) else ``old`` (``new`` alone when ``old`` is None);
    tensors, or the :class:`recursive.cache.LayerKV` of a layer."""
    if old is None:
        return new
    if isinstance(new, Tensor):
        return torch.where(chosen.view(-1, *[1] * (new.dim() - 1)), new, old)
    return type(new)(*(None if n is None else _rows(chosen, n, o) for n, o in zip(new, old)))
