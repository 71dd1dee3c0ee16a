"""Early exit at loop boundaries (the package docstring of :mod:`recursive.generation`): the confidence
test, its calibration on untrained models, and the KV-cached decoding step that applies it."""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from ..cache import LayerKV, VarlenPacking
from ..nn import rotary_embedding
from .validation import check_ids


def top_probability(logits: Tensor) -> Tensor:
    """(*, vocab) -> (*,), the largest softmax probability, in float32 at least."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1).amax(-1)


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
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError("input_ids: expected a non-empty int tensor (B, S), "
                         f"got {getattr(input_ids, 'shape', input_ids)!r}")
    check_ids("input_ids", input_ids, config.vocab_size)
    backbone = model.model
    B, S = input_ids.shape
    positions = torch.arange(S, device=input_ids.device).expand(B, S)
    hidden = backbone.embed(input_ids)
    position_embeddings = rotary_embedding(positions, config.head_dim, config.rope_theta, hidden.dtype)
    for layer in range(period):
        hidden = backbone.blocks[backbone.block_of_layer[layer]](hidden, layer, position_embeddings)[0]
    top = top_probability(model.logits_at(hidden)).flatten()
    return float(top.double().quantile(1.0 - exit_fraction))


def decode_step(
    model, tokens: Tensor, position_embeddings: Tuple[Tensor, Tensor], packing: Optional[VarlenPacking],
    past: Tuple[LayerKV, ...], exit_threshold: Optional[float],
) -> Tuple[Tensor, Tuple[LayerKV, ...]]:
    """One new token per row through the stack, leaving at loop boundaries with ``exit_threshold``.

    A row that left keeps its exit hidden state, so the blocks it still runs (for rows that did not
    leave) give the keys and values of that state; once every row has left, the remaining layers only
    project keys and values. tokens (B,), position_embeddings (cos, sin) each (B, 1, head_dim) of the tokens'
    positions -> logits (B, vocab) and the extended cache.
    """
    backbone, config = model.model, model.config
    hidden = backbone.embed(tokens[:, None])
    period = config.loop_length()
    running = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    exit_logits: Optional[Tensor] = None
    all_left = False
    presents = []
    for layer, block_index in enumerate(backbone.block_of_layer):
        block = backbone.blocks[block_index]
        if all_left:
            presents.append(past[layer].append(block.key_value(hidden, layer, position_embeddings)))
            continue
        new_hidden, present, _ = block(hidden, layer, position_embeddings, packing, past[layer], use_cache=True)
        presents.append(present)
        if exit_threshold is None:
            hidden = new_hidden
            continue
        hidden = torch.where(running[:, None, None], new_hidden, hidden)
        if (layer + 1) % period == 0 and layer + 1 < config.num_layers:
            logits = model.logits_at(hidden[:, -1])
            leaving = running & (top_probability(logits) >= exit_threshold)
            exit_logits = logits if exit_logits is None else torch.where(leaving[:, None], logits, exit_logits)
            running = running & ~leaving
            all_left = not bool(running.any())
    if all_left:
        return exit_logits, tuple(presents)
    logits = model.logits_at(hidden[:, -1])
    if exit_logits is not None:
        logits = torch.where(running[:, None], logits, exit_logits)
    return logits, tuple(presents)
