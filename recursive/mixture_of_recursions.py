"""The Mixture-of-Recursions data flow (the ``mor_routing`` part of :mod:`recursive.config`), written on
:meth:`recursive.RecursiveModel.run_layers`: the layers before and after the recursions run on every token, and
each recursion runs its layers on the tokens its routing selects, gathered in order into a compact batch."""

from __future__ import annotations

from typing import Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .cache import LayerKV, PastKeyValues, RecursionKV, SharedKeyValue, VarlenPacking, ints_to_device
from .loops import LayerInputs
from .losses import masked_mean, upcast
from .nn import rotary_embedding


class RecursionsOutput(NamedTuple):
    """``hidden`` (B, S, hidden); ``presents``: effective layer -> its extended cache (with a cache; with KV
    sharing the later recursions' layers have none); ``aux_losses``: the MoL losses of the layers run;
    ``loss``: the routers' losses weighted by their coefficients; ``depths`` (B, S): the recursions each
    token ran."""

    hidden: Tensor
    presents: Dict[int, Optional[Union[LayerKV, RecursionKV]]]
    aux_losses: List[Tensor]
    loss: Tensor
    depths: Tensor


class _FirstRecursion(NamedTuple):
    """The first recursion's layout (``order`` (B, n): the token of each row; ``packing``: its
    :class:`VarlenPacking`) and each of its layers' keys and values (with a cache, the cached ones
    too), which the later recursions share."""

    order: Tensor
    packing: Optional[VarlenPacking]
    key_values: List[LayerKV]


def mixture_of_recursions(
    backbone, hidden: Tensor, real: Tensor, position_ids: Tensor, inputs: LayerInputs,
    past_key_values: Optional[PastKeyValues], cached: bool,
) -> RecursionsOutput:
    """Mixture-of-Recursions over ``hidden`` (B, S, hidden) with real tokens ``real`` (B, S) bool, on
    ``backbone`` (a :class:`recursive.RecursiveModel`): ``inputs`` for the whole batch, ``position_ids`` (B, S)
    for the recursions' compact batches. With a cache (``cached``) each recursion's layers attend over their
    :class:`recursive.cache.RecursionKV` of the earlier tokens (``past_key_values``) too."""
    config, steps = backbone.config, backbone.shape.steps
    before, recursions, after = config.recursions()
    presents: Dict[int, Optional[Union[LayerKV, RecursionKV]]] = {}
    aux_losses: List[Tensor] = []

    def every_token(layers: Sequence[int], hidden: Tensor) -> Tensor:
        caches = None if past_key_values is None else [past_key_values[layer] for layer in layers]
        run = backbone.run_layers(hidden, [steps[layer] for layer in layers], inputs, caches, use_cache=cached)
        presents.update(zip(layers, run.presents))
        aux_losses.extend(run.aux_losses)
        return run.hidden

    hidden = every_token(before, hidden)
    alpha = config.mor_router_alpha
    router = backbone.mor_router
    depths = torch.zeros(real.shape, dtype=torch.int64, device=hidden.device)
    selected = real
    # Top-k expert choice keeps counts the host knows (after one read of the real tokens' counts), so its
    # steps read nothing back from the device.
    kept_counts = real_counts = None
    if config.mor_routing == "expert_choice" and not config.mor_threshold_routing:
        kept_counts = real_counts = real.sum(1).tolist()
    z_losses, router_losses = [], []
    balance_loss = first = None  # first: the first recursion's layout and keys (KV sharing)
    if config.mor_routing == "token_choice":
        logits = upcast(router(hidden))  # (B, S, N)
        probs = logits.softmax(-1)
        chosen = probs.argmax(-1)  # the last recursion each token runs
        gate = alpha * probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
        used = masked_mean(F.one_hot(chosen, len(recursions)).to(probs.dtype), real)
        balance_loss = len(recursions) * (used * masked_mean(probs, real)).sum()
        z_losses.append(masked_mean(logits.logsumexp(-1).square(), real))
    for r, layers in enumerate(recursions):
        if config.mor_routing == "expert_choice":
            logits = upcast(F.linear(hidden, router.weight[r:r + 1]).squeeze(-1))  # (B, S)
            scored = selected
            z_losses.append(masked_mean(logits.square(), scored))  # the z-loss of a single logit
            if config.mor_capacities[r] == 1.0:
                pass  # every active token stays
            elif config.mor_threshold_routing:
                selected = selected & (logits >= 0)  # sigmoid >= 1/2
            else:
                kept_counts = [min(active, config.mor_tokens_kept(r, n)) for active, n in zip(kept_counts, real_counts)]
                kept = ints_to_device(hidden.device, kept_counts)[0]
                rank = (logits.masked_fill(~selected, float("-inf")).argsort(dim=1, descending=True, stable=True)
                        .argsort(dim=1))
                selected = selected & (rank < kept[:, None])
            router_losses.append(masked_mean(F.binary_cross_entropy_with_logits(
                logits, selected.to(logits.dtype), reduction="none"), scored))
            gate, gated = alpha * logits.sigmoid(), selected
        else:
            selected, gated = real & (chosen >= r), chosen == r
        depths = depths + selected
        # With KV sharing the later recursions read the first one's keys and have no cache.
        own_cache = cached and (r == 0 or not config.mor_kv_sharing)
        past = None
        if own_cache:
            past = [None if past_key_values is None else past_key_values[layer] for layer in layers]
        hidden, first, caches = _recursion_step(backbone, hidden, layers, selected, gate, gated, position_ids, first,
                                                past, kept_counts, aux_losses)
        presents.update(zip(layers, caches if own_cache else [None] * len(layers)))
    hidden = every_token(after, hidden)
    loss = config.mor_z_loss_coef * torch.stack(z_losses).nan_to_num().mean()
    if balance_loss is not None:
        loss = loss + config.mor_balance_loss_coef * balance_loss.nan_to_num()
    if router_losses:
        loss = loss + config.mor_router_loss_coef * torch.stack(router_losses).nan_to_num().mean()
    return RecursionsOutput(hidden, presents, aux_losses, loss, depths)


def _recursion_step(
    backbone, hidden: Tensor, layers: Sequence[int], selected: Tensor, gate: Tensor, gated: Tensor,
    position_ids: Tensor, first: Optional[_FirstRecursion], past: Optional[List[Optional[RecursionKV]]],
    known_counts: Optional[List[int]], aux_losses: List[Tensor],
) -> Tuple[Tensor, Optional[_FirstRecursion], Optional[List[RecursionKV]]]:
    """One recursion on the ``selected`` (B, S) tokens: ``h + gate * (F(h) - h)`` where ``gated``, ``F(h)``
    elsewhere among them; the other tokens keep ``hidden``. With KV sharing, the first recursion returns its
    layout and keys (``first``) and the later ones attend over them. ``past``: with a cache, each layer's
    cache of the earlier tokens (None: there are none), which this step extends and returns.
    ``known_counts``: the selected tokens of each row when the host knows them (no cache), which spares the
    step's reads of the device. The layers' MoL losses are appended to ``aux_losses``."""
    config = backbone.config
    B, S, width = hidden.shape
    counts = selected.sum(1)
    if known_counts is not None:
        n = max(known_counts, default=0)
    else:
        n = int(counts.max()) if B else 0
    if n == 0 and (past is None or past[0] is not None):
        caches = None if past is None else [entry._replace(length=entry.length + S) for entry in past]
        return hidden, first, caches
    # (Below, n may be 0: the first step of a cache still creates it, empty.)
    # The selected tokens of each row first, in their order (a stable sort of "not selected"); with
    # KV sharing, placed by their rows in the first recursion's layout.
    if first is None:
        order = (~selected).to(torch.int8).argsort(dim=1, stable=True)[:, :n]
    else:
        rows = (~selected.gather(1, first.order)).to(torch.int8).argsort(dim=1, stable=True)[:, :n]
        order = first.order.gather(1, rows)
    compact = torch.arange(n, device=hidden.device) < counts[:, None]

    def take(t: Tensor) -> Tensor:
        return t.gather(1, order.view(B, n, *[1] * (t.dim() - 2)).expand(B, n, *t.shape[2:]))

    h = take(hidden)
    position_embeddings = rotary_embedding(take(position_ids), config.head_dim, config.rope_theta, h.dtype)
    # The compact tokens follow the cached ones, each row's in order, so causal attention over the
    # row's real columns is exact (holes and compact rows past a row's count are masked out).
    if known_counts is not None and past is None:
        key_mask = compact
        packing = (None if all(c == n for c in known_counts)
                   else VarlenPacking.from_lengths(known_counts, n, hidden.device))
    else:
        key_mask = compact if past is None or past[0] is None else torch.cat((past[0].token_mask, compact), 1)
        packing = None if bool(key_mask.all()) else VarlenPacking.from_attention_mask(key_mask, n)
    keep = config.mor_kv_sharing and first is None
    shared = None
    if first is not None:
        shared = [SharedKeyValue(key_value, first.order.shape[1], rows, first.packing)
                  for key_value in first.key_values]
    caches = None if past is None else [None if entry is None else entry.key_value for entry in past]
    run = backbone.run_layers(h, [backbone.shape.steps[layer] for layer in layers],
                              LayerInputs(position_embeddings, packing), caches, use_cache=keep or past is not None,
                              shared=shared)
    aux_losses.extend(run.aux_losses)
    g = take(gate).unsqueeze(-1).to(h.dtype)
    out = torch.where(take(gated).unsqueeze(-1), h + g * (run.hidden - h), run.hidden)
    out = torch.where(compact.unsqueeze(-1), out, h)  # compact rows past a row's count hold unselected tokens
    if keep:
        first = _FirstRecursion(order, packing, run.presents)
    caches = None
    if past is not None:
        length = (0 if past[0] is None else past[0].length) + S
        caches = [RecursionKV(key_value, key_mask, length) for key_value in run.presents]
    return hidden.scatter(1, order.unsqueeze(-1).expand(B, n, width), out), first, caches
