"""Next-token choice: greedy, or sampling with temperature, top-k and top-p (Hugging Face's order)."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..losses import upcast


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """logits (B, V) with every entry below the row's ``top_k``-th largest set to -inf (ties with it
    stay, as in Hugging Face)."""
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """logits (B, V) keeping, per row, the smallest set of most probable tokens whose probability mass
    reaches ``top_p`` (always at least the most probable one); the rest -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= top_p  # the mass already reached p before this token
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(
    logits: Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> Tensor:
    """logits (B, V) -> next tokens (B,) int64: the argmax, or with ``do_sample`` a draw from
    ``softmax(logits / temperature)`` after the top-k then the top-p filter (Hugging Face's order), in
    float32 at least, from torch's global generator (seed it with ``torch.manual_seed``)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = upcast(logits) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)
