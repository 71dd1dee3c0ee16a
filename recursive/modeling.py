"""The recursive model family: a shared-block backbone, a causal LM and a bidirectional encoder.

Hugging Face conventions: ``model(input_ids, attention_mask=None, labels=None)`` returns an output with
``.logits`` and ``.loss`` (None without labels); ``attention_mask`` is (B, S_past + S) of 1 (token) and 0
(padding); labels of -100 are ignored; the causal LM shifts its labels inside. Checkpoints are a
directory with ``config.json`` and ``model.safetensors`` (never pickle).

Padding: when ``attention_mask`` has a zero, every layer attends over the real tokens only, through
:func:`recursive_kernels.circuit_attention_varlen` (:class:`recursive.nn.VarlenPacking`), which is exact for left
padding (decoding) as for right padding; without one, the dense :func:`recursive_kernels.circuit_attention`
runs. Default positions count real tokens only (``cumsum(attention_mask) - 1``), so a left-padded row
gets the positions it would have alone.

Cache: ``past_key_values`` is a tuple with one :class:`recursive.nn.LayerKV` per effective layer
(keys and values after RoPE, (B, Hkv, S_past, D), plus the circuit's ``key_c``/``value_c``); a forward
with ``use_cache=True`` returns it extended by the new tokens. A Mixture-of-Recursions model caches
recursion-wise: a recursion's layers hold a :class:`RecursionKV` with the keys of the tokens that ran
it only (with KV sharing the later recursions hold None: they read the first one's).
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple, Type, TypeVar, Union

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from .config import RecursiveConfig
from .nn import (LayerKV, LowRankLinear, RecursiveBlock, RMSNorm, SharedKeyValue, VarlenPacking, _ints_to_device,
                 activation, rotary_embedding)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"
IGNORE_INDEX = -100


class RecursionKV(NamedTuple):
    """The cache of one layer of a Mixture-of-Recursions recursion (recursion-wise caching): the keys
    and values of the tokens that ran the recursion, and only those.

    ``key_value``: a :class:`recursive.nn.LayerKV` (B, Hkv, C, .) whose columns are shared by the
    batch: each step appends as many as the row with the most tokens in the recursion needs, and each
    row's tokens lie in their order among its columns; ``token_mask``: (B, C) bool, the columns that
    hold one of the row's tokens (the others are never attended to); ``length``: the sequence length
    the cache covers (the ``S_past`` of a plain :class:`recursive.nn.LayerKV`).
    """

    key_value: LayerKV
    token_mask: Tensor
    length: int


PastKeyValues = Tuple[Optional[Union[LayerKV, RecursionKV]], ...]
Model = TypeVar("Model", bound="RecursivePreTrainedModel")


@dataclass
class RecursiveModelOutput:
    """``last_hidden_state`` (B, S, hidden) after the final norm; ``past_key_values`` (with
    ``use_cache``); ``aux_loss``: the MoL load-balancing loss averaged over layers (None without MoL);
    ``hidden_states`` (with ``output_hidden_states``): num_layers + 1 tensors (B, S, hidden), the
    embeddings and the output of every effective layer, all before the final norm (``hierarchical``:
    the state, fast or slow, that the layer updated). Mixture-of-Recursions only: ``recursion_loss``,
    the routers' losses weighted by their coefficients (``mor_balance_loss_coef`` times the
    token-choice balancing loss, ``mor_router_loss_coef`` times the expert-choice routers' auxiliary
    loss, ``mor_z_loss_coef`` times the z-loss), and ``recursion_depths``
    (B, S) int64, the recursions each token ran (0 at padding)."""

    last_hidden_state: Tensor
    past_key_values: Optional[PastKeyValues] = None
    aux_loss: Optional[Tensor] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    recursion_loss: Optional[Tensor] = None
    recursion_depths: Optional[Tensor] = None


@dataclass
class CausalLMOutput:
    """``logits`` (B, S, vocab); ``loss``: next-token cross-entropy (plus ``router_aux_loss_coef *
    aux_loss`` with MoL, plus ``recursion_loss`` with Mixture-of-Recursions) when labels are given;
    ``aux_loss``, ``past_key_values``, ``hidden_states``, ``recursion_loss`` and ``recursion_depths`` as
    :class:`RecursiveModelOutput`."""

    logits: Tensor
    loss: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None
    past_key_values: Optional[PastKeyValues] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    recursion_loss: Optional[Tensor] = None
    recursion_depths: Optional[Tensor] = None


@dataclass
class EncoderOutput:
    """``logits``: (B, S, vocab) for the masked-LM head, (B, num_labels) for sequence classification;
    ``loss`` with labels; ``last_hidden_state`` (B, S, hidden); ``aux_loss``, ``recursion_loss`` and
    ``recursion_depths`` as :class:`RecursiveModelOutput`."""

    logits: Tensor
    loss: Optional[Tensor] = None
    last_hidden_state: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None
    recursion_loss: Optional[Tensor] = None
    recursion_depths: Optional[Tensor] = None


def _upcast(logits: Tensor) -> Tensor:
    """Losses and routing are computed in float32 at least."""
    return logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """The mean of ``values`` (B, S, *) over the (B, S) positions where ``mask`` is True, as
    ``values[mask].mean(0)`` but without the boolean indexing's read of the device (NaN when none is)."""
    mask = mask.view(*mask.shape, *[1] * (values.dim() - mask.dim()))
    return torch.where(mask, values, 0).sum((0, 1)) / mask.sum()


def next_token_loss(logits: Tensor, labels: Tensor) -> Tensor:
    """Cross-entropy of ``logits`` (B, S, vocab) at position t predicting ``labels[:, t + 1]`` (B, S; -100:
    ignored), in float32 at least."""
    return F.cross_entropy(
        _upcast(logits[:, :-1]).reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=IGNORE_INDEX
    )


def _with_router_losses(loss: Tensor, out: RecursiveModelOutput, config: RecursiveConfig) -> Tensor:
    """The task loss plus the routers' losses: the mixture of LoRAs' load balancing, weighted by
    ``router_aux_loss_coef``, and the Mixture-of-Recursions' (already weighted)."""
    if out.aux_loss is not None:
        loss = loss + config.router_aux_loss_coef * out.aux_loss
    if out.recursion_loss is not None:
        loss = loss + out.recursion_loss
    return loss


class RecursiveModel(nn.Module):
    """The backbone: embeddings, the ``num_blocks`` shared blocks run over ``num_layers`` effective
    layers by the sharing scheme, and the final norm.

    Parameters: ``embed_tokens`` (vocab, embedding_size or hidden), ``embed_proj`` (hidden <-
    embedding_size, factorised embeddings only), ``blocks.{b}`` (:class:`recursive.nn.RecursiveBlock`),
    ``mor_router`` (recursions <- hidden, Mixture-of-Recursions only), ``norm``. ``causal`` picks
    decoder (True) or encoder (False) attention.

    ``hierarchical`` sharing runs the HRM data flow and ``mor_routing`` the Mixture-of-Recursions one
    (:mod:`recursive.config`). A Mixture-of-Recursions forward has no ``output_hidden_states`` (its
    recursions run on token subsets) and a cache only when ``config.kv_cacheable`` (causal routing):
    the layers before and after the recursions cache every token (:class:`recursive.nn.LayerKV`), a
    recursion's layers the tokens that ran it (:class:`RecursionKV`); with KV sharing the later
    recursions' entries are None, as they read the first's.
    """

    adapter_parameters = ("mor_router.weight",)

    def __init__(self, config: RecursiveConfig, causal: bool = True) -> None:
        super().__init__()
        self.config = config
        embedding_size = config.embedding_size or config.hidden_size
        self.embed_tokens = nn.Embedding(config.vocab_size, embedding_size)
        if config.embedding_size is not None:
            self.embed_proj = nn.Linear(config.embedding_size, config.hidden_size, bias=False)
        else:
            self.register_module("embed_proj", None)
        self.blocks = nn.ModuleList(RecursiveBlock(config, b, causal) for b in range(config.num_blocks))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
        self.block_of_layer = tuple(config.block_of_layer(layer) for layer in range(config.num_layers))
        self.gradient_checkpointing = False  # RecursivePreTrainedModel.gradient_checkpointing_enable
        if config.mor_routing is not None:
            # Row r scores recursion r (expert choice); all rows together assign depths (token choice).
            self.mor_router = nn.Linear(config.hidden_size, len(config.recursions()[1]), bias=False)
        else:
            self.register_module("mor_router", None)

    def embed(self, input_ids: Tensor) -> Tensor:
        """(B, S) token ids -> (B, S, hidden)."""
        hidden = self.embed_tokens(input_ids)
        if self.embed_proj is not None:
            hidden = self.embed_proj(hidden)
        if self.config.embed_scale != 1.0:
            # Hugging Face Gemma rounds the multiplier to the activations' dtype first; so do we.
            hidden = hidden * torch.tensor(self.config.embed_scale, dtype=hidden.dtype)
        return hidden

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        past_key_values: Optional[PastKeyValues] = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
    ) -> RecursiveModelOutput:
        """Args:
            input_ids: (B, S) int64.
            attention_mask: (B, S_past + S) of 1 and 0, or None (no padding).
            position_ids: (B, S); default: the count of earlier real tokens (see the module docstring).
            past_key_values: one cache per effective layer (the module docstring), or None.
            use_cache: return the extended cache.
            output_hidden_states: also return the embeddings and every layer's output (e.g. for the
                loss of early exit at loop boundaries, :func:`recursive.generation.exit_loss`).
        """
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError(f"input_ids: expected an int tensor (B, S), got {getattr(input_ids, 'shape', input_ids)!r}")
        B, S = input_ids.shape
        past_length = 0
        if past_key_values is not None:
            if len(past_key_values) != self.config.num_layers:
                raise ValueError(
                    f"past_key_values: expected one entry per effective layer ({self.config.num_layers}), got {len(past_key_values)}"
                )
            past_length = self._past_length(past_key_values)
        if attention_mask is not None and tuple(attention_mask.shape) != (B, past_length + S):
            raise ValueError(
                f"attention_mask: expected shape (B={B}, past + S={past_length + S}), got {tuple(attention_mask.shape)}"
            )
        if position_ids is None:
            position_ids = self._default_position_ids(B, S, past_length, attention_mask, input_ids.device)
        elif tuple(position_ids.shape) != (B, S):
            raise ValueError(f"position_ids: expected shape ({B}, {S}), got {tuple(position_ids.shape)}")

        mor = self.config.mor_routing is not None
        cached = past_key_values is not None or use_cache
        if mor and (output_hidden_states or (cached and not self.config.kv_cacheable)):
            name = "output_hidden_states" if output_hidden_states else "past_key_values" if past_key_values is not None else "use_cache"
            raise ValueError(f"{name}: a Mixture-of-Recursions model runs its recursions on token subsets; it has no "
                             f"per-layer hidden states, and a KV cache only with causal routing (token choice, or "
                             f"expert choice with mor_threshold_routing)")

        hidden = self.embed(input_ids)
        position_embeddings = rotary_embedding(position_ids, self.config.head_dim, self.config.rope_theta, hidden.dtype)
        packing = None
        if attention_mask is not None and not bool(attention_mask.all()):
            packing = VarlenPacking.from_attention_mask(attention_mask, S)
        presents, aux_losses, hidden_states = {}, [], [hidden]  # presents: effective layer -> its cache

        def run_block(layer: int, hidden: Tensor, position_embeddings, packing: Optional[VarlenPacking],
                      **options) -> Tuple[Tensor, Optional[LayerKV]]:
            block = self.blocks[self.block_of_layer[layer]]
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # The whole block again (no early stop): the fused ops recompute whole anyway, and
                # recursive.flops.training_step_flops counts it so, on every backend.
                with set_checkpoint_early_stop(False):
                    hidden, present, aux_loss = checkpoint(block, hidden, layer, position_embeddings, packing,
                                                           use_reentrant=False, **options)
            else:
                hidden, present, aux_loss = block(hidden, layer, position_embeddings, packing, **options)
            if aux_loss is not None:
                aux_losses.append(aux_loss)
            return hidden, present

        def run_cached(layer: int, hidden: Tensor) -> Tuple[Tensor, Optional[LayerKV]]:
            """Effective layer ``layer`` on the whole batch, with its cache; also returns the extended cache."""
            past = None if past_key_values is None else past_key_values[layer]
            hidden, present = run_block(layer, hidden, position_embeddings, packing, past_key_value=past,
                                        use_cache=cached)
            presents[layer] = present
            hidden_states.append(hidden)
            return hidden, present

        def run(layer: int, hidden: Tensor) -> Tensor:
            return run_cached(layer, hidden)[0]

        recursion_loss = recursion_depths = None
        if mor:
            real = packing.query_mask if packing is not None else torch.ones(B, S, dtype=torch.bool, device=hidden.device)
            hidden, recursion_loss, recursion_depths = self._mixture_of_recursions(
                hidden, real, position_ids, run_cached, run_block, past_key_values, presents if cached else None)
        elif self.config.sharing == "hierarchical":
            hidden = self._hierarchical(hidden, run)
        else:
            for layer in range(self.config.num_layers):
                hidden = run(layer, hidden)
        return RecursiveModelOutput(
            last_hidden_state=self.norm(hidden),
            past_key_values=tuple(presents.get(layer) for layer in range(self.config.num_layers)) if use_cache else None,
            aux_loss=torch.stack(aux_losses).mean() if aux_losses else None,
            hidden_states=tuple(hidden_states) if output_hidden_states else None,
            recursion_loss=recursion_loss,
            recursion_depths=recursion_depths,
        )

    def _past_length(self, past_key_values: PastKeyValues) -> int:
        """The sequence length a cache covers (Mixture-of-Recursions: after checking that each entry is
        of its layer's kind, as the module docstring has it)."""
        config = self.config
        if config.mor_routing is None:
            return past_key_values[0].key.shape[2]
        recursions = config.recursions()[1]
        kinds = {layer: RecursionKV for recursion in recursions for layer in recursion}
        if config.mor_kv_sharing:
            kinds.update((layer, type(None)) for recursion in recursions[1:] for layer in recursion)
        lengths = set()
        for layer, entry in enumerate(past_key_values):
            kind = kinds.get(layer, LayerKV)
            if not isinstance(entry, kind):
                expected = "None" if kind is type(None) else kind.__name__
                raise ValueError(f"past_key_values: entry {layer} must be {expected}, got {type(entry).__name__}")
            if entry is not None:
                lengths.add(entry.length if kind is RecursionKV else entry.key.shape[2])
        if len(lengths) != 1:
            raise ValueError(f"past_key_values: the entries cover different sequence lengths {sorted(lengths)}")
        return lengths.pop()

    @staticmethod
    def _default_position_ids(batch: int, length: int, past_length: int, attention_mask: Optional[Tensor], device) -> Tensor:
        if attention_mask is None:
            return torch.arange(past_length, past_length + length, device=device).expand(batch, length)
        positions = attention_mask.long().cumsum(-1) - 1
        return positions[:, past_length:].clamp(min=0)  # padding gets position 0; it is never attended to

    def _hierarchical(self, x: Tensor, run: Callable[[int, Tensor], Tensor]) -> Tensor:
        """HRM: the fast state ``z_L <- f_L(z_L + z_H + x)`` at each fast step, the slow state
        ``z_H <- f_H(z_H + z_L)`` after every ``hrm_period`` of them, both from zero; returns ``z_H``.
        ``run(layer, h)`` runs effective layer ``layer`` on ``h``."""
        config = self.config
        module = config.num_blocks // 2
        fast_layers = config.hrm_period * module
        recording = torch.is_grad_enabled()
        # One-step gradient: only the last fast and the last slow module application record.
        first_recorded = config.num_layers - 2 * module if config.hrm_one_step_gradient else 0
        fast = slow = torch.zeros_like(x)
        for layer in range(config.num_layers):
            position = layer % config.hrm_cycle_length
            with torch.set_grad_enabled(recording and layer >= first_recorded):
                if position < fast_layers:
                    if position % module == 0:
                        fast = fast + slow + x
                    fast = run(layer, fast)
                else:
                    if position == fast_layers:
                        slow = slow + fast
                    slow = run(layer, slow)
        return slow

    def _mixture_of_recursions(
        self, hidden: Tensor, real: Tensor, position_ids: Tensor,
        run_cached: Callable[[int, Tensor], Tuple[Tensor, Optional[LayerKV]]],
        run_block: Callable[..., Tuple[Tensor, Optional[LayerKV]]], past_key_values: Optional[PastKeyValues],
        presents: Optional[Dict[int, Optional[RecursionKV]]],
    ) -> Tuple[Tensor, Tensor, Tensor]:
        """Mixture-of-Recursions over ``hidden`` (B, S, hidden) with real tokens ``real`` (B, S) bool.

        The layers before and after the recursions run on every token (``run_cached(layer, h) -> (h,
        cache)``); each recursion runs its layers on its selected tokens only, gathered in order into a
        compact batch (``run_block(layer, h, position_embeddings, packing, **block_options) -> (h,
        present)``). With a cache (``presents``, filled here with the recursions' layers' caches) each
        recursion's layers attend over their :class:`RecursionKV` of the earlier tokens
        (``past_key_values``) too. Returns the hidden states, the weighted router losses and the
        recursions each token ran.
        """
        config = self.config
        before, recursions, after = config.recursions()
        for layer in before:
            hidden = run_cached(layer, hidden)[0]
        alpha = config.mor_router_alpha
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
            logits = _upcast(self.mor_router(hidden))  # (B, S, N)
            probs = logits.softmax(-1)
            chosen = probs.argmax(-1)  # the last recursion each token runs
            gate = alpha * probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
            used = _masked_mean(F.one_hot(chosen, len(recursions)).to(probs.dtype), real)
            balance_loss = len(recursions) * (used * _masked_mean(probs, real)).sum()
            z_losses.append(_masked_mean(logits.logsumexp(-1).square(), real))
        for r, layers in enumerate(recursions):
            if config.mor_routing == "expert_choice":
                logits = _upcast(F.linear(hidden, self.mor_router.weight[r:r + 1]).squeeze(-1))  # (B, S)
                scored = selected
                z_losses.append(_masked_mean(logits.square(), scored))  # the z-loss of a single logit
                if config.mor_capacities[r] == 1.0:
                    pass  # every active token stays
                elif config.mor_threshold_routing:
                    selected = selected & (logits >= 0)  # sigmoid >= 1/2
                else:
                    kept_counts = [min(active, config.mor_tokens_kept(r, n)) for active, n in zip(kept_counts, real_counts)]
                    kept = _ints_to_device(hidden.device, kept_counts)[0]
                    rank = logits.masked_fill(~selected, float("-inf")).argsort(dim=1, descending=True, stable=True).argsort(dim=1)
                    selected = selected & (rank < kept[:, None])
                router_losses.append(_masked_mean(F.binary_cross_entropy_with_logits(
                    logits, selected.to(logits.dtype), reduction="none"), scored))
                gate, gated = alpha * logits.sigmoid(), selected
            else:
                selected, gated = real & (chosen >= r), chosen == r
            depths = depths + selected
            # With KV sharing the later recursions read the first one's keys and have no cache.
            own_cache = presents is not None and (r == 0 or not config.mor_kv_sharing)
            past = None
            if own_cache:
                past = [None if past_key_values is None else past_key_values[layer] for layer in layers]
            hidden, first, caches = self._recursion_step(hidden, layers, selected, gate, gated, position_ids, run_block,
                                                         first, past, kept_counts)
            if own_cache:
                presents.update(zip(layers, caches))
        for layer in after:
            hidden = run_cached(layer, hidden)[0]
        loss = config.mor_z_loss_coef * torch.stack(z_losses).nan_to_num().mean()
        if balance_loss is not None:
            loss = loss + config.mor_balance_loss_coef * balance_loss.nan_to_num()
        if router_losses:
            loss = loss + config.mor_router_loss_coef * torch.stack(router_losses).nan_to_num().mean()
        return hidden, loss, depths

    def _recursion_step(
        self, hidden: Tensor, layers, selected: Tensor, gate: Tensor, gated: Tensor, position_ids: Tensor,
        run_block: Callable[..., Tuple[Tensor, Optional[LayerKV]]], first: Optional["_FirstRecursion"],
        past: Optional[List[Optional[RecursionKV]]], known_counts: Optional[List[int]] = None,
    ) -> Tuple[Tensor, Optional["_FirstRecursion"], Optional[List[RecursionKV]]]:
        """One recursion on the ``selected`` (B, S) tokens: ``h + gate * (F(h) - h)`` where ``gated``,
        ``F(h)`` elsewhere among them; the other tokens keep ``hidden``. With KV sharing, the first
        recursion returns its layout and keys (``first``) and the later ones attend over them. ``past``:
        with a cache, each layer's cache of the earlier tokens (None: there are none), which this step
        extends and returns. ``known_counts``: the selected tokens of each row when the host knows them
        (no cache), which spares the step's reads of the device."""
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
        position_embeddings = rotary_embedding(take(position_ids), self.config.head_dim, self.config.rope_theta, h.dtype)
        # The compact tokens follow the cached ones, each row's in order, so causal attention over the
        # row's real columns is exact (holes and compact rows past a row's count are masked out).
        if known_counts is not None and past is None:
            key_mask = compact
            packing = None if all(c == n for c in known_counts) else VarlenPacking.from_lengths(known_counts, n, hidden.device)
        else:
            key_mask = compact if past is None or past[0] is None else torch.cat((past[0].token_mask, compact), 1)
            packing = None if bool(key_mask.all()) else VarlenPacking.from_attention_mask(key_mask, n)
        keep = self.config.mor_kv_sharing and first is None
        key_values = []
        out = h
        for i, layer in enumerate(layers):
            shared = None if first is None else SharedKeyValue(first.key_values[i], first.order.shape[1], rows, first.packing)
            past_key_value = None if past is None or past[i] is None else past[i].key_value
            out, present = run_block(layer, out, position_embeddings, packing, past_key_value=past_key_value,
                                     use_cache=keep or past is not None, shared_key_value=shared)
            key_values.append(present)
        g = take(gate).unsqueeze(-1).to(h.dtype)
        out = torch.where(take(gated).unsqueeze(-1), h + g * (out - h), out)
        out = torch.where(compact.unsqueeze(-1), out, h)  # compact rows past a row's count hold unselected tokens
        if keep:
            first = _FirstRecursion(order, packing, key_values)
        caches = None
        if past is not None:
            length = (0 if past[0] is None else past[0].length) + S
            caches = [RecursionKV(key_value, key_mask, length) for key_value in key_values]
        return hidden.scatter(1, order.unsqueeze(-1).expand(B, n, width), out), first, caches


class _FirstRecursion(NamedTuple):
    """The first recursion's layout (``order`` (B, n): the token of each row; ``packing``: its
    :class:`VarlenPacking`) and each of its layers' keys and values (with a cache, the cached ones
    too), which the later recursions share."""

    order: Tensor
    packing: Optional[VarlenPacking]
    key_values: List[LayerKV]


class RecursivePreTrainedModel(nn.Module):
    """Config, weight init, weight tying and the ``save_pretrained``/``from_pretrained`` checkpoint format
    shared by the models.

    Init (driven by ``torch.manual_seed``): projections and embeddings ``normal(0, initializer_range)``,
    biases zeros; LoRA adapters (Kaiming-uniform A, zero B), circuit factors and norms keep their
    modules' init, so a fresh relaxation changes nothing.
    """

    def __init__(self, config: RecursiveConfig) -> None:
        super().__init__()
        if not isinstance(config, RecursiveConfig):
            raise ValueError(f"config: expected a RecursiveConfig, got {type(config).__name__}")
        self.config = config

    def tied_weights(self) -> Tuple[Tuple[str, str], ...]:
        """``(name, source)`` pairs of parameters that are the same tensor; the checkpoint stores the source."""
        return ()

    def tie_weights(self) -> None:
        """Make each parameter of :meth:`tied_weights` its source (again, after ``to_empty`` or a
        ``load_state_dict(assign=True)`` gave them separate storage)."""
        for name, source in self.tied_weights():
            module_name, _, attribute = name.rpartition(".")
            setattr(self.get_submodule(module_name), attribute, self.get_parameter(source))

    def _tie_and_init(self) -> None:
        self.tie_weights()
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, LowRankLinear)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)

    def save_pretrained(self, save_directory: str) -> None:
        """Write ``config.json`` and ``model.safetensors`` (tied parameters once) into ``save_directory``."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(self.config.to_json_string())
        tied = {name for name, _ in self.tied_weights()}
        state = {name: tensor.contiguous() for name, tensor in self.state_dict().items() if name not in tied}
        save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls: Type[Model], directory: str, device=None, dtype: Optional[torch.dtype] = None) -> Model:
        """Load a model written by :meth:`save_pretrained`, in the checkpoint's dtype unless ``dtype`` is
        given, on ``device`` (default CPU), in eval mode."""
        config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise ValueError(f"directory: {directory!r} holds no {os.path.basename(path)}")
        with open(config_path) as f:
            config = RecursiveConfig.from_dict(json.load(f))
        state = load_file(weights_path, device=str(torch.device(device or "cpu")))
        if dtype is None:
            dtype = next(t.dtype for t in state.values() if t.is_floating_point())
        model = cls(config).to(device=device, dtype=dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = set(missing) - {name for name, _ in model.tied_weights()}
        if missing or unexpected:
            raise ValueError(f"directory: the checkpoint does not match the config (missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)})")
        return model.eval()

    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing per effective layer, as Hugging Face's: in training, each block call
        keeps only its input and runs again in the backward (``torch.utils.checkpoint``, non-reentrant).
        Activation memory then grows with the depth by one hidden state per layer instead of every
        intermediate of the block: what lets a deep loop of a small block train."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing

    # Adapters: what the relaxation and the routers add to the shared model (PEFT's workflow).

    def adapter_state_dict(self) -> Dict[str, Tensor]:
        """The adapters' parameters by name: per-depth LoRA (``lora_a``, ``lora_b``), QK/OV circuit factors,
        the mixture of LoRAs' experts and routers, the Mixture-of-Recursions router; empty for a plain
        shared model. Everything else (embeddings, shared blocks, norms, heads) is the base model."""
        parameters = dict(self.named_parameters())
        state = {}
        for prefix, module in self.named_modules():
            for name in getattr(module, "adapter_parameters", ()):
                path = f"{prefix}.{name}" if prefix else name
                if path in parameters:
                    state[path] = parameters[path]
        return state

    def mark_only_adapters_trainable(self) -> int:
        """Freeze the base model: ``requires_grad`` True on the adapters' parameters only (the depth-as-
        modulation recipe, or LoRA uptraining of a converted model). Returns the trainable parameter count.
        A new task head trains beside them after ``model.classifier.requires_grad_(True)`` (PEFT's
        ``modules_to_save``); :meth:`save_adapter` saves the adapters only."""
        adapters = self.adapter_state_dict()
        if not adapters:
            raise ValueError(f"model: has no adapters to train (relaxation {self.config.relaxation!r}, "
                             f"mor_routing {self.config.mor_routing!r})")
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name in adapters)
        return sum(p.numel() for p in adapters.values())

    def save_adapter(self, save_directory: str) -> None:
        """Write the adapters alone into ``save_directory``: ``adapter_config.json`` (the model's config,
        which fixes every adapter's shape) and ``adapter_model.safetensors``. Several adapters trained on
        one base checkpoint then load into it in turn (:meth:`load_adapter`)."""
        state = self.adapter_state_dict()
        if not state:
            raise ValueError(f"model: has no adapters to save (relaxation {self.config.relaxation!r})")
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, ADAPTER_CONFIG_NAME), "w") as f:
            f.write(self.config.to_json_string())
        tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
        save_file(tensors, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})

    @torch.no_grad()
    def load_adapter(self, directory: str) -> None:
        """Copy the adapters written by :meth:`save_adapter` into this model, in its dtype and on its
        device. The adapter's config must equal this model's (the kernels backend aside)."""
        config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
        weights_path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise ValueError(f"directory: {directory!r} holds no {os.path.basename(path)}")
        with open(config_path) as f:
            saved = RecursiveConfig.from_dict(json.load(f)).to_dict()
        ours = self.config.to_dict()
        differ = sorted(name for name in ours if name != "backend" and saved[name] != ours[name])
        if differ:
            raise ValueError(f"directory: the adapter was saved for another config; fields that differ: "
                             + ", ".join(f"{name} ({saved[name]!r} there, {ours[name]!r} here)" for name in differ))
        adapters = self.adapter_state_dict()
        state = load_file(weights_path)
        if set(state) != set(adapters):
            raise ValueError(f"directory: the adapter's tensors do not match the model's adapters (missing "
                             f"{sorted(set(adapters) - set(state))}, unexpected {sorted(set(state) - set(adapters))})")
        for name, tensor in state.items():
            if tensor.shape != adapters[name].shape:
                raise ValueError(f"directory: {name}: shape {tuple(tensor.shape)}, the model's is "
                                 f"{tuple(adapters[name].shape)}")
        for name, tensor in state.items():
            adapters[name].copy_(tensor)

    @torch.no_grad()
    def merge_and_untie(self: Model) -> Model:
        """The untied model this one computes: every effective layer its own block, holding its block's
        weights with its LoRA merged in (``W + s B_l A_l``, :meth:`recursive.nn.LowRankLinear.merged_weight`).
        A new model of the same class in this one's dtype and on its device (``num_blocks = num_layers``,
        relaxation "none"); this one is unchanged. Serves the shared-stack schemes with relaxation
        "none", "depth_lora" or "qkov_lora"; the circuit and the mixtures act on activations, not weights,
        and HRM and Mixture-of-Recursions do not run a plain stack."""
        config = self.config
        if config.relaxation not in ("none", "depth_lora", "qkov_lora"):
            raise ValueError(f"model: relaxation {config.relaxation!r} does not merge into weights (it acts on the "
                             "activations); merge_and_untie serves 'none', 'depth_lora' and 'qkov_lora'")
        if config.sharing == "hierarchical" or config.mor_routing is not None:
            raise ValueError("model: HRM and Mixture-of-Recursions models do not run a plain stack of layers; "
                             "merge_and_untie serves cycle, sequence and middle-cycle sharing")
        untied_config = dataclasses.replace(config, num_blocks=config.num_layers, sharing="cycle", relaxation="none",
                                            lora_rank=0, lora_targets=None, start_index=0)
        # Clones: the new model shares no storage with this one.
        state = {name: t.clone() for name, t in self.state_dict().items() if not name.startswith("model.blocks.")}
        for layer in range(config.num_layers):
            block = self.model.blocks[config.block_of_layer(layer)]
            adapter = block.adapter_index(layer)
            merged = {f"{name}.weight": module.merged_weight(adapter) for name, module in block.named_modules()
                      if isinstance(module, LowRankLinear)}
            for name, tensor in block.state_dict().items():
                if name.rpartition(".")[2] not in LowRankLinear.adapter_parameters:
                    state[f"model.blocks.{layer}.{name}"] = merged[name].clone() if name in merged else tensor.clone()
        parameter = next(self.parameters())
        with torch.device("meta"):
            untied = type(self)(untied_config)
        untied.load_state_dict(state, assign=True)
        untied.tie_weights()
        for block in untied.model.blocks:  # the non-persistent layer -> adapter tables, left on the meta device
            block.adapter_of_layer = torch.tensor(block._adapter_of_layer, dtype=torch.int64)
        return untied.to(device=parameter.device, dtype=parameter.dtype).train(self.training)


class RecursiveForCausalLM(RecursivePreTrainedModel):
    """A recursive decoder with a language-modelling head.

    Parameters: ``model`` (:class:`RecursiveModel`, causal) and ``lm_head`` (vocab <- hidden, no bias;
    the embedding matrix when ``tie_word_embeddings``). Factorised embeddings are an encoder option.
    """

    def __init__(self, config: RecursiveConfig) -> None:
        super().__init__(config)
        if config.embedding_size is not None:
            raise ValueError("config: embedding_size (factorised embeddings) is an encoder option; use RecursiveEncoder")
        self.model = RecursiveModel(config, causal=True)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self._tie_and_init()

    def tied_weights(self) -> Tuple[Tuple[str, str], ...]:
        return (("lm_head.weight", "model.embed_tokens.weight"),) if self.config.tie_word_embeddings else ()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
        past_key_values: Optional[PastKeyValues] = None,
        use_cache: bool = False,
        output_hidden_states: bool = False,
    ) -> CausalLMOutput:
        """Args:
            input_ids: (B, S).
            attention_mask: (B, S_past + S) of 1 and 0, or None.
            labels: (B, S) token ids (-100: ignored); the loss predicts ``labels[:, t + 1]`` from position t.
            position_ids, past_key_values, use_cache, output_hidden_states: as :meth:`RecursiveModel.forward`.
        """
        out = self.model(input_ids, attention_mask, position_ids, past_key_values, use_cache, output_hidden_states)
        logits = self.lm_head(out.last_hidden_state)
        loss = None
        if labels is not None:
            if tuple(labels.shape) != tuple(input_ids.shape):
                raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} like input_ids, got {tuple(labels.shape)}")
            loss = _with_router_losses(next_token_loss(logits, labels), out, self.config)
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=out.aux_loss, past_key_values=out.past_key_values,
                              hidden_states=out.hidden_states, recursion_loss=out.recursion_loss,
                              recursion_depths=out.recursion_depths)

    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        attention_mask: Optional[Tensor] = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos_token_id: Optional[int] = None,
        exit_threshold: Optional[float] = None,
    ) -> Tensor:
        """KV-cached generation, like Hugging Face's ``generate``: the prompt (B, S) followed by up to
        ``max_new_tokens`` new tokens, (B, S + T); generation stops early once every row has produced
        ``eos_token_id``, and finished rows are padded with it.

        Args:
            input_ids: (B, S) token ids; padded rows need ``attention_mask`` (any padding side).
            max_new_tokens: new tokens per row (0 returns ``input_ids``).
            attention_mask: (B, S) of 1 (token) and 0 (padding), or None.
            do_sample: sample (from torch's global generator) instead of greedy argmax.
            temperature, top_k, top_p: the sampling distribution (:func:`recursive.generation.next_tokens`).
            eos_token_id: the end-of-sequence token, or None.
            exit_threshold: early exit at loop boundaries for decoded tokens (the module docstring of
                :mod:`recursive.generation`); None or 1.0: off. A plain stack only: not with
                hierarchical sharing or Mixture-of-Recursions.

        A Mixture-of-Recursions model without a KV cache (``config.kv_cacheable``) recomputes the whole
        sequence at each step.
        """
        from .generation import generate

        return generate(self, input_ids, max_new_tokens, attention_mask, do_sample, temperature, top_k, top_p,
                        eos_token_id, exit_threshold)


class RecursiveEncoder(RecursivePreTrainedModel):
    """A bidirectional recursive encoder (ModernALBERT style: RoPE, GeGLU with ``hidden_act="gelu"``,
    optional factorised embeddings) with the head named by ``config.encoder_head``.

    - ``"mlm"``: ``head_dense`` (width <- hidden, width = embedding_size or hidden), activation,
      ``head_norm``, ``decoder`` (vocab <- width, with bias; its weight is the embedding matrix when
      ``tie_word_embeddings``). Logits (B, S, vocab); loss: cross-entropy over labels != -100.
    - ``"sequence_classification"``: pooling (``classifier_pooling``: the mean over real tokens, or the
      first token), ``head_dense``, activation, ``head_norm``, ``classifier`` (num_labels <- hidden).
      Logits (B, num_labels); loss: cross-entropy over int labels (B,), or the squared error against
      float labels (B,) when ``num_labels == 1``.
    """

    def __init__(self, config: RecursiveConfig) -> None:
        super().__init__(config)
        self.model = RecursiveModel(config, causal=False)
        self.head_act = activation(config.hidden_act)
        if config.encoder_head == "mlm":
            width = config.embedding_size or config.hidden_size
            self.head_dense = nn.Linear(config.hidden_size, width)
            self.head_norm = RMSNorm(width, config.rms_norm_eps, config.norm_unit_offset)
            self.decoder = nn.Linear(width, config.vocab_size)
        else:
            self.head_dense = nn.Linear(config.hidden_size, config.hidden_size)
            self.head_norm = RMSNorm(config.hidden_size, config.rms_norm_eps, config.norm_unit_offset)
            self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._tie_and_init()

    def tied_weights(self) -> Tuple[Tuple[str, str], ...]:
        if self.config.encoder_head == "mlm" and self.config.tie_word_embeddings:
            return (("decoder.weight", "model.embed_tokens.weight"),)
        return ()

    def forward(
        self,
        input_ids: Tensor,
        attention_mask: Optional[Tensor] = None,
        labels: Optional[Tensor] = None,
        position_ids: Optional[Tensor] = None,
    ) -> EncoderOutput:
        """Args:
            input_ids: (B, S).
            attention_mask: (B, S) of 1 and 0, or None.
            labels: "mlm": (B, S) token ids, -100 where not masked; classification: (B,).
            position_ids: (B, S); default as :meth:`RecursiveModel.forward`.
        """
        out = self.model(input_ids, attention_mask, position_ids)
        hidden = out.last_hidden_state
        if self.config.encoder_head == "mlm":
            logits = self.decoder(self.head_norm(self.head_act(self.head_dense(hidden))))
        else:
            logits = self.classifier(self.head_norm(self.head_act(self.head_dense(self._pool(hidden, attention_mask)))))
        loss = None
        if labels is not None:
            loss = _with_router_losses(self._loss(logits, labels), out, self.config)
        return EncoderOutput(logits=logits, loss=loss, last_hidden_state=hidden, aux_loss=out.aux_loss,
                             recursion_loss=out.recursion_loss, recursion_depths=out.recursion_depths)

    def _pool(self, hidden: Tensor, attention_mask: Optional[Tensor]) -> Tensor:
        """(B, S, hidden) -> (B, hidden)."""
        if self.config.classifier_pooling == "cls":
            return hidden[:, 0]
        if attention_mask is None:
            return hidden.mean(1)
        weight = attention_mask.to(hidden.dtype).unsqueeze(-1)
        return (hidden * weight).sum(1) / weight.sum(1).clamp(min=1.0)

    def _loss(self, logits: Tensor, labels: Tensor) -> Tensor:
        if self.config.encoder_head == "mlm":
            if tuple(labels.shape) != tuple(logits.shape[:-1]):
                raise ValueError(f"labels: expected shape {tuple(logits.shape[:-1])} like input_ids, got {tuple(labels.shape)}")
            return F.cross_entropy(_upcast(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=IGNORE_INDEX)
        if tuple(labels.shape) != (logits.shape[0],):
            raise ValueError(f"labels: expected shape ({logits.shape[0]},), one per sequence, got {tuple(labels.shape)}")
        if self.config.num_labels == 1:
            return F.mse_loss(_upcast(logits).squeeze(-1), labels.to(_upcast(logits).dtype))
        return F.cross_entropy(_upcast(logits), labels)
