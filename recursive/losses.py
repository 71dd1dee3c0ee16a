"""The losses of the model family: next-token cross-entropy, the LM head's loss at loop boundaries (early
exit), and the routers' load-balancing losses; with the float32-at-least and masked-mean helpers they share."""

from __future__ import annotations

from typing import Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from recursive_kernels.backends import accumulation_dtype

from .config import RecursiveConfig

IGNORE_INDEX = -100


def upcast(logits: Tensor) -> Tensor:
    """Losses and routing are computed in float32 at least (:func:`recursive_kernels.backends.accumulation_dtype`)."""
    return logits.to(accumulation_dtype(logits.dtype))


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``values`` (B, S, *) over the (B, S) positions where ``mask`` is True, as
    ``values[mask].mean(0)`` but without the boolean indexing's read of the device (NaN when none is)."""
    mask = mask.view(*mask.shape, *[1] * (values.dim() - mask.dim()))
    return torch.where(mask, values, 0).sum((0, 1)) / mask.sum()


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` (B, S, vocab) at position t predicting ``labels[:, t + 1]`` (B, S; -100:
    ignored), in float32 at least."""
    return F.cross_entropy(
        upcast(logits[:, :-1]).reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def with_router_losses(loss: Tensor, out, config: RecursiveConfig) -> Tensor:
    """The task loss plus the routers' losses: the mixture of LoRAs' load balancing, weighted by
    ``router_aux_loss_coef``, and the Mixture-of-Recursions' (already weighted)."""
    if out.aux_loss is not None:
        loss = loss + config.router_aux_loss_coef * out.aux_loss
    if out.recursion_loss is not None:
        loss = loss + out.recursion_loss
    return loss


def load_balancing_loss(probs: Tensor, experts: Tensor, token_mask: Optional[Tensor]) -> Tensor:
    """``E * sum_i f_i P_i`` over the masked tokens: probs (*, E), experts (*, k), token_mask (*,)."""
    num_experts, top_k = probs.shape[-1], experts.shape[-1]
    probs = probs.reshape(-1, num_experts)
    chosen = F.one_hot(experts.reshape(-1, top_k), num_experts).sum(1).to(probs.dtype)  # (T, E) slot counts
    if token_mask is None:
        weight = probs.new_ones(probs.shape[0], 1)
    else:
        weight = token_mask.reshape(-1, 1).to(probs.dtype)
    tokens = weight.sum().clamp(min=1.0)
    fraction = (chosen * weight).sum(0) / (tokens * top_k)
    mean_prob = (probs * weight).sum(0) / tokens
    return num_experts * (fraction * mean_prob).sum()


def exit_loss(model, hidden_states: Sequence[Tensor], labels: Tensor) -> Tensor:
    """The next-token cross-entropy of the LM head at every loop boundary but the last, averaged over the
    boundaries: the loss that teaches a model to decode from the depths where early exit stops tokens.
    Add it, weighted, to the final loss (``python -m recursive train --exit-loss-weight``).

    Args:
        model: a :class:`recursive.RecursiveForCausalLM` with more than one loop.
        hidden_states: its forward's ``hidden_states`` (``output_hidden_states=True``).
        labels: (B, S) token ids (-100: ignored), as the forward's ``labels``.
    """
    config = model.config
    period = config.loop_length()
    config.check_loop_boundaries("model")
    if len(hidden_states) != config.num_layers + 1:
        raise ValueError(f"hidden_states: expected {config.num_layers + 1} tensors (the forward's "
                         f"output_hidden_states), got {len(hidden_states)}")
    if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(hidden_states[0].shape[:2]):
        raise ValueError(f"labels: expected shape {tuple(hidden_states[0].shape[:2])}, "
                         f"got {getattr(labels, 'shape', labels)!r}")
    boundaries = range(period, config.num_layers, period)  # hidden_states[l] is layer l - 1's output
    return torch.stack([next_token_loss(model.logits_at(hidden_states[b]), labels) for b in boundaries]).mean()
