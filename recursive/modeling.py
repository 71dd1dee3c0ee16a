"""The recursive model family: a shared-block backbone, a causal LM and a bidirectional encoder.

Hugging Face conventions: ``model(input_ids, attention_mask=None, labels=None)`` returns an output with
``.logits`` and ``.loss`` (None without labels); ``attention_mask`` is (B, S_past + S) of 1 (token) and 0
(padding); labels of -100 are ignored; the causal LM shifts its labels inside. Checkpoints are a
directory with ``config.json`` and ``model.safetensors`` (never pickle).

Padding: when ``attention_mask`` has a zero, every layer attends over the real tokens only, through
:func:`recursive_kernels.circuit_attention_varlen` (:class:`recursive.cache.VarlenPacking`), which is exact for left
padding (decoding) as for right padding; without one, the dense :func:`recursive_kernels.circuit_attention`
runs. Default positions count real tokens only (``cumsum(attention_mask) - 1``), so a left-padded row
gets the positions it would have alone.

Cache: ``past_key_values`` is a tuple with one :class:`recursive.cache.LayerKV` per effective layer
(keys and values after RoPE, (B, Hkv, S_past, D), plus the circuit's ``key_c``/``value_c``); a forward
with ``use_cache=True`` returns it extended by the new tokens. A Mixture-of-Recursions model caches
recursion-wise: a recursion's layers hold a :class:`recursive.cache.RecursionKV` with the keys of the tokens that ran
it only (with KV sharing the later recursions hold None: they read the first one's).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint, set_checkpoint_early_stop

from .cache import LayerKV, PastKeyValues, RecursionKV, SharedKeyValue, VarlenPacking, ints_to_device
from .config import RecursiveConfig
from .generation import GenerationMixin
from .losses import IGNORE_INDEX, masked_mean, next_token_loss, upcast, with_router_losses
from .nn import RecursiveBlock, RMSNorm, activation, rotary_embedding
from .pretrained import RecursivePreTrainedModel


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
    the layers before and after the recursions cache every token (:class:`recursive.cache.LayerKV`), a
    recursion's layers the tokens that ran it (:class:`recursive.cache.RecursionKV`); with KV sharing the later
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
                loss of early exit at loop boundaries, :func:`recursive.losses.exit_loss`).
        """
        if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point:
            raise ValueError("input_ids: expected an int tensor (B, S), "
                             f"got {getattr(input_ids, 'shape', input_ids)!r}")
        B, S = input_ids.shape
        past_length = 0
        if past_key_values is not None:
            if len(past_key_values) != self.config.num_layers:
                raise ValueError(
                    f"past_key_values: expected one entry per effective layer ({self.config.num_layers}), "
                    f"got {len(past_key_values)}"
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
            name = ("output_hidden_states" if output_hidden_states
                    else "past_key_values" if past_key_values is not None else "use_cache")
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
            real = (packing.query_mask if packing is not None
                    else torch.ones(B, S, dtype=torch.bool, device=hidden.device))
            hidden, recursion_loss, recursion_depths = self._mixture_of_recursions(
                hidden, real, position_ids, run_cached, run_block, past_key_values, presents if cached else None)
        elif self.config.sharing == "hierarchical":
            hidden = self.hierarchical(hidden, run)
        else:
            for layer in range(self.config.num_layers):
                hidden = run(layer, hidden)
        return RecursiveModelOutput(
            last_hidden_state=self.norm(hidden),
            past_key_values=(tuple(presents.get(layer) for layer in range(self.config.num_layers))
                             if use_cache else None),
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
    def _default_position_ids(batch: int, length: int, past_length: int, attention_mask: Optional[Tensor],
                              device) -> Tensor:
        if attention_mask is None:
            return torch.arange(past_length, past_length + length, device=device).expand(batch, length)
        positions = attention_mask.long().cumsum(-1) - 1
        return positions[:, past_length:].clamp(min=0)  # padding gets position 0; it is never attended to

    def hierarchical(self, x: Tensor, run: Callable[[int, Tensor], Tensor]) -> Tensor:
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
        recursion's layers attend over their :class:`recursive.cache.RecursionKV` of the earlier tokens
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
            logits = upcast(self.mor_router(hidden))  # (B, S, N)
            probs = logits.softmax(-1)
            chosen = probs.argmax(-1)  # the last recursion each token runs
            gate = alpha * probs.gather(-1, chosen.unsqueeze(-1)).squeeze(-1)
            used = masked_mean(F.one_hot(chosen, len(recursions)).to(probs.dtype), real)
            balance_loss = len(recursions) * (used * masked_mean(probs, real)).sum()
            z_losses.append(masked_mean(logits.logsumexp(-1).square(), real))
        for r, layers in enumerate(recursions):
            if config.mor_routing == "expert_choice":
                logits = upcast(F.linear(hidden, self.mor_router.weight[r:r + 1]).squeeze(-1))  # (B, S)
                scored = selected
                z_losses.append(masked_mean(logits.square(), scored))  # the z-loss of a single logit
                if config.mor_capacities[r] == 1.0:
                    pass  # every active token stays
                elif config.mor_threshold_routing:
                    selected = selected & (logits >= 0)  # sigmoid >= 1/2
                else:
                    kept_counts = [min(active, config.mor_tokens_kept(r, n))
                                   for active, n in zip(kept_counts, real_counts)]
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
        position_embeddings = rotary_embedding(take(position_ids), self.config.head_dim, self.config.rope_theta,
                                               h.dtype)
        # The compact tokens follow the cached ones, each row's in order, so causal attention over the
        # row's real columns is exact (holes and compact rows past a row's count are masked out).
        if known_counts is not None and past is None:
            key_mask = compact
            packing = (None if all(c == n for c in known_counts)
                       else VarlenPacking.from_lengths(known_counts, n, hidden.device))
        else:
            key_mask = compact if past is None or past[0] is None else torch.cat((past[0].token_mask, compact), 1)
            packing = None if bool(key_mask.all()) else VarlenPacking.from_attention_mask(key_mask, n)
        keep = self.config.mor_kv_sharing and first is None
        key_values = []
        out = h
        for i, layer in enumerate(layers):
            shared = (None if first is None
                      else SharedKeyValue(first.key_values[i], first.order.shape[1], rows, first.packing))
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


class RecursiveForCausalLM(GenerationMixin, RecursivePreTrainedModel):
    """A recursive decoder with a language-modelling head; ``generate`` comes from
    :class:`recursive.generation.GenerationMixin`.

    Parameters: ``model`` (:class:`RecursiveModel`, causal) and ``lm_head`` (vocab <- hidden, no bias;
    the embedding matrix when ``tie_word_embeddings``). Factorised embeddings are an encoder option.
    """

    def __init__(self, config: RecursiveConfig) -> None:
        super().__init__(config)
        if config.embedding_size is not None:
            raise ValueError("config: embedding_size (factorised embeddings) is an encoder option; "
                             "use RecursiveEncoder")
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
                raise ValueError(f"labels: expected shape {tuple(input_ids.shape)} like input_ids, "
                                 f"got {tuple(labels.shape)}")
            loss = with_router_losses(next_token_loss(logits, labels), out, self.config)
        return CausalLMOutput(logits=logits, loss=loss, aux_loss=out.aux_loss, past_key_values=out.past_key_values,
                              hidden_states=out.hidden_states, recursion_loss=out.recursion_loss,
                              recursion_depths=out.recursion_depths)

    def logits_at(self, hidden: Tensor) -> Tensor:
        """The LM head at any depth (early exit, the loss at loop boundaries): the final norm, then ``lm_head``;
        (*, hidden) -> (*, vocab)."""
        return self.lm_head(self.model.norm(hidden))


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
            loss = with_router_losses(self._loss(logits, labels), out, self.config)
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
                raise ValueError(f"labels: expected shape {tuple(logits.shape[:-1])} like input_ids, "
                                 f"got {tuple(labels.shape)}")
            return F.cross_entropy(upcast(logits).reshape(-1, logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX)
        if tuple(labels.shape) != (logits.shape[0],):
            raise ValueError(f"labels: expected shape ({logits.shape[0]},), one per sequence, "
                             f"got {tuple(labels.shape)}")
        if self.config.num_labels == 1:
            return F.mse_loss(upcast(logits).squeeze(-1), labels.to(upcast(logits).dtype))
        return F.cross_entropy(upcast(logits), labels)
