"""The losses of the model family: next-token cross-entropy, the LM head's loss at loop boundaries (early
exit), Ouro's exit distribution and its objective, and the routers' load-balancing losses; with the
float32-at-least and masked-mean helpers they share."""

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
    if model.model.shape.tail:
        raise ValueError("model: the loss at loop boundaries reads the LM head there, and this model's readout runs "
                         "its coda after each pass (Huginn)")
    if len(hidden_states) != config.num_layers + 1:
        raise ValueError(f"hidden_states: expected {config.num_layers + 1} tensors (the forward's "
                         f"output_hidden_states), got {len(hidden_states)}")
    if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(hidden_states[0].shape[:2]):
        raise ValueError(f"labels: expected shape {tuple(hidden_states[0].shape[:2])}, "
                         f"got {getattr(labels, 'shape', labels)!r}")
    boundaries = range(period, config.num_layers, period)  # hidden_states[l] is layer l - 1's output
    return torch.stack([next_token_loss(model.logits_at(hidden_states[b]), labels) for b in boundaries]).mean()


def exit_distribution(gate_logits: Tensor) -> Tensor:
    """Ouro's exit distribution from its gate's logits (*, T), one per loop: ``lambda_t = sigmoid(g_t)``,
    ``p_t = lambda_t prod_{s<t} (1 - lambda_s)`` for t < T - 1 and the rest, ``prod_{s<T-1} (1 - lambda_s)``, for
    the last loop; (*, T), in float32 at least."""
    lam = torch.sigmoid(upcast(gate_logits))
    survive = torch.cumprod(1 - lam, -1)  # the probability of running past loop t
    before = F.pad(survive[..., :-1], (1, 0), value=1.0)
    return torch.cat((lam[..., :-1] * before[..., :-1], before[..., -1:]), -1)


def exit_readout(exit_probabilities: Tensor, threshold: float) -> Tensor:
    """Per token the first loop whose cumulative exit probability reaches ``threshold`` (the last loop when none
    does): (B, S, T) -> (B, S) int64, Ouro's readout."""
    reached = exit_probabilities.cumsum(-1) >= threshold
    last = exit_probabilities.shape[-1] - 1
    return torch.where(reached.any(-1), reached.int().argmax(-1), last)


def expected_exit_loss(loop_logits: Sequence[Tensor], exit_probabilities: Tensor, labels: Tensor,
                       entropy_coef: float) -> Tensor:
    """Ouro's objective: per predicted token the next-token cross-entropy of each loop's logits (T tensors
    (B, S, vocab)) weighted by the exit distribution (B, S, T), minus ``entropy_coef`` times the distribution's
    entropy, averaged over the tokens whose label (``labels[:, t + 1]``, -100 ignored) counts."""
    targets = labels[:, 1:]
    losses = torch.stack([F.cross_entropy(upcast(logits[:, :-1]).transpose(1, 2), targets, ignore_index=IGNORE_INDEX,
                                          reduction="none") for logits in loop_logits], -1)  # (B, S - 1, T)
    p = exit_probabilities[:, :-1]
    entropy = -(p * torch.log(p.clamp(min=torch.finfo(p.dtype).tiny))).sum(-1)
    return masked_mean((p * losses).sum(-1) - entropy_coef * entropy, targets != IGNORE_INDEX)
