"""``CircuitAttention``: RoPE, grouped-query heads, per-depth QKOV-LoRA and the QK/OV circuit, in one fused
attention pass."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import recursive_kernels
from recursive_kernels.lowrank_linear import check_index_values

from ..cache import KVCache, LayerKV, SharedKeyValue, VarlenPacking
from ..config import ATTENTION_TARGETS
from .functional import apply_rotary
from .linear import AdapterIndex, LowRankLinear, target_ranks


def _depth_projection(x: Tensor, factors: Tensor, index: Union[int, Tensor]) -> Tensor:
    """Per-depth rank-R head projections: ``x`` (B, S, K) by ``factors`` (E, heads, R, K) of depth
    ``index`` (an int, or (B, S) with -1 for none) -> (B, S, heads, R).

    A tensor ``index`` projects on every depth's factors and keeps each row's: E times a rank-R
    projection, which is cheap next to the block's matmuls and needs no host synchronisation.
    """
    E, heads, R, K = factors.shape
    B, S = x.shape[:2]
    if isinstance(index, int):
        return F.linear(x, factors[index].reshape(heads * R, K)).view(B, S, heads, R)
    every = F.linear(x, factors.reshape(E * heads * R, K)).view(B, S, E, heads, R)
    picked = every.gather(2, index.clamp(min=0)[:, :, None, None, None].expand(B, S, 1, heads, R)).squeeze(2)
    return picked * (index >= 0)[:, :, None, None].to(picked.dtype)


class CircuitAttention(nn.Module):
    """Multi-head attention with RoPE, grouped-query heads and per-depth low-rank modulation.

    Per-depth parameters (``num_depths`` sets, selected by ``indices``):

    - QKOV-LoRA: LoRA adapters on q_proj, k_proj, v_proj, o_proj (:class:`LowRankLinear`).
    - The QK/OV circuit, rank R per depth and head:
      ``S_h += (X U_h)(X V_g)^T`` at the logit site and ``out_h += P_h (X C_g) D_h^T`` at the value site,
      with ``g`` the key/value head of query head ``h``. One :func:`recursive_kernels.circuit_attention` pass takes
      ``q_c = X U_h``, ``k_c = X V_g``, ``v_c = X C_g``; ``out_c @ D_h^T`` is added to head h's output
      before ``o_proj``. This is our reading of the depth-as-modulation paper's abstract (its exact
      formula is not published). The corrections carry no RoPE and no logit scale. U and D start at
      zero, V and C Kaiming-uniform, so fresh factors change nothing.

    An output gate (HRM-Text, as Qwen3-Next's) scales the attention output per channel before ``o_proj``:
    ``sigmoid(gate_proj(x)) * out``.

    Parameters: ``q_proj`` (H * D <- hidden), ``k_proj``, ``v_proj`` (Hkv * D <- hidden), ``o_proj``
    (hidden <- H * D), ``gate_proj`` (H * D <- hidden, with the output gate only); with the circuit
    ``qk_u`` (E, H, R, hidden), ``qk_v`` (E, Hkv, R, hidden),
    ``ov_c`` (E, Hkv, R, hidden), ``ov_d`` (E, H, D, R).

    Args:
        hidden_size, num_heads: model width and query heads H.
        num_key_value_heads: Hkv (default H); must divide H.
        head_dim: D (default hidden_size // H).
        qkv_bias: biases on q, k, v (Qwen2) and the output gate (True), or on the projections named (some of
            "q", "k", "v"; Huginn's q and k); o_proj has none.
        output_gate: gate the output per channel (``gate_proj``).
        causal: causal (decoder) or bidirectional (encoder) attention.
        num_depths: E, the number of per-depth parameter sets.
        lora_rank: rank of the per-depth LoRA on every one of q, k, v, o, or a mapping from some of
            "q", "k", "v", "o" to ranks; 0: none.
        lora_alpha: LoRA alpha (scaling alpha / rank).
        circuit_rank: R of the QK/OV circuit; 0: none.
        backend: kernels backend, None for automatic.
    """

    adapter_parameters = ("qk_u", "qk_v", "ov_c", "ov_d")

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        num_key_value_heads: Optional[int] = None,
        head_dim: Optional[int] = None,
        *,
        qkv_bias: Union[bool, Sequence[str]] = False,
        output_gate: bool = False,
        causal: bool = True,
        num_depths: int = 0,
        lora_rank: Union[int, Mapping[str, int]] = 0,
        lora_alpha: float = 8.0,
        circuit_rank: int = 0,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        num_key_value_heads = num_heads if num_key_value_heads is None else num_key_value_heads
        if num_key_value_heads < 1 or num_heads % num_key_value_heads:
            raise ValueError(f"num_key_value_heads: {num_key_value_heads} must divide num_heads ({num_heads})")
        if head_dim is None:
            if hidden_size % num_heads:
                raise ValueError(f"head_dim: hidden_size ({hidden_size}) is not a multiple of num_heads ({num_heads})")
            head_dim = hidden_size // num_heads
        if head_dim % 2:
            raise ValueError(f"head_dim: rotary embeddings need an even head_dim, got {head_dim}")
        self.hidden_size, self.num_heads, self.num_key_value_heads, self.head_dim = (
            hidden_size, num_heads, num_key_value_heads, head_dim)
        self.causal, self.num_depths, self.circuit_rank, self.backend = causal, num_depths, circuit_rank, backend
        ranks = target_ranks(lora_rank, ATTENTION_TARGETS)
        factory = {"device": device, "dtype": dtype}

        def projection(target: str, fan_in: int, fan_out: int, bias: bool) -> LowRankLinear:
            return LowRankLinear(fan_in, fan_out, bias, num_adapters=num_depths, rank=ranks[target], alpha=lora_alpha,
                                 backend=backend, **factory)

        biased = ("q", "k", "v") if qkv_bias is True else tuple(qkv_bias or ())
        unknown = sorted(set(biased) - {"q", "k", "v"})
        if unknown:
            raise ValueError(f"qkv_bias: expected a bool or some of 'q', 'k', 'v', got {unknown}")
        self.q_proj = projection("q", hidden_size, num_heads * head_dim, "q" in biased)
        self.k_proj = projection("k", hidden_size, num_key_value_heads * head_dim, "k" in biased)
        self.v_proj = projection("v", hidden_size, num_key_value_heads * head_dim, "v" in biased)
        self.o_proj = projection("o", num_heads * head_dim, hidden_size, False)
        if output_gate:
            self.gate_proj = LowRankLinear(hidden_size, num_heads * head_dim, qkv_bias is True, num_adapters=0, rank=0,
                                           backend=backend, **factory)
        else:
            self.register_module("gate_proj", None)
        if num_depths and circuit_rank:
            E, R, Hkv = num_depths, circuit_rank, num_key_value_heads
            self.qk_u = nn.Parameter(torch.empty(E, num_heads, R, hidden_size, **factory))
            self.qk_v = nn.Parameter(torch.empty(E, Hkv, R, hidden_size, **factory))
            self.ov_c = nn.Parameter(torch.empty(E, Hkv, R, hidden_size, **factory))
            self.ov_d = nn.Parameter(torch.empty(E, num_heads, head_dim, R, **factory))
        else:
            for name in ("qk_u", "qk_v", "ov_c", "ov_d"):
                self.register_parameter(name, None)
        self.reset_circuit()

    def reset_circuit(self) -> None:
        """U and D zeros, V and C Kaiming-uniform (bound 1/sqrt(hidden), as LoRA's A)."""
        if self.qk_u is None:
            return
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.zeros_(self.qk_u)
        nn.init.zeros_(self.ov_d)
        nn.init.uniform_(self.qk_v, -bound, bound)
        nn.init.uniform_(self.ov_c, -bound, bound)

    def _check_index(self, indices: AdapterIndex, batch: int, length: int,
                     check_values: bool) -> Union[int, Tensor]:
        """An int in [-1, E), or an int64 tensor (B, S) (its values read on the host when ``check_values``)."""
        if indices is None:
            return -1
        if isinstance(indices, int) and not isinstance(indices, bool):
            if not -1 <= indices < self.num_depths:
                raise IndexError(f"indices: {indices} is outside [-1, {self.num_depths})")
            return indices
        if (not isinstance(indices, Tensor) or indices.dtype.is_floating_point
                or indices.dtype == torch.bool):
            raise ValueError(f"indices: expected None, an int or an integer tensor, got {indices!r}")
        if tuple(indices.shape) == (batch,):
            indices = indices[:, None].expand(batch, length)
        elif tuple(indices.shape) != (batch, length):
            raise ValueError(f"indices: expected shape ({batch},) or ({batch}, {length}), "
                             f"got {tuple(indices.shape)}")
        if check_values:  # once; the projections trust it
            check_index_values(indices, self.num_depths, "indices")
        return indices.long()

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: Tuple[Tensor, Tensor],
        indices: AdapterIndex = None,
        packing: Optional[VarlenPacking] = None,
        past_key_value: Optional[KVCache] = None,
        use_cache: bool = False,
        *,
        check_indices: bool = True,
        shared_key_value: Optional[SharedKeyValue] = None,
    ) -> Tuple[Tensor, Optional[LayerKV]]:
        """Args:
            hidden_states: (B, S, hidden).
            position_embeddings: ``(cos, sin)``, each (B, S, head_dim), from :func:`rotary_embedding`.
            indices: which per-depth parameters to use: None or -1 (none: the shared attention
                unmodified), an int in [0, E), or an int tensor (B,) or (B, S) (per row; -1: none).
            packing: the real tokens of a padded batch (:class:`VarlenPacking`); None: no padding.
            past_key_value: this layer's cache from earlier steps (a :class:`recursive.cache.KVCache`: a
                :class:`LayerKV`, or the engine's slot cache); the new keys follow it.
            use_cache: also return the cache extended by this step.
            check_indices: False trusts a tensor ``indices`` to lie in [-1, E) (no host read of its
                values, which is a synchronisation on the GPU), as :func:`recursive_kernels.lowrank_linear`'s.
            shared_key_value: attend over these keys and values (:class:`SharedKeyValue`) instead of
                projecting this layer's own; ``packing`` then describes nothing here (the shared
                sequence's is in it), and there is no cache. Not with the QK/OV circuit.

        Returns:
            ``(output, present)``: (B, S, hidden) and the extended :class:`LayerKV` (None unless
            ``use_cache``).
        """
        B, S, _ = hidden_states.shape
        H, D = self.num_heads, self.head_dim
        index = self._check_index(indices, B, S, check_indices)
        q = apply_rotary(self.q_proj(hidden_states, index, check_indices=False).view(B, S, H, D), *position_embeddings)
        if shared_key_value is not None:
            return self._attend_shared(hidden_states, q, shared_key_value, index, past_key_value, use_cache), None
        k, v, k_c, v_c = self._key_value(hidden_states, position_embeddings, index)
        q_c = _depth_projection(hidden_states, self.qk_u, index) if k_c is not None else None
        if past_key_value is not None:
            k, v, k_c, v_c = past_key_value.append(LayerKV(k, v, k_c, v_c))
        present = LayerKV(k, v, k_c, v_c) if use_cache else None

        out, out_c = self._attend(q, k, v, q_c, k_c, v_c, packing)  # (B, S, H, D), (B, S, H, R)
        if out_c is not None:
            out = out + self._ov_output(out_c, index)
        return self._output(hidden_states, out, index), present

    def _output(self, hidden_states: Tensor, out: Tensor, index: Union[int, Tensor]) -> Tensor:
        """The heads' outputs ``out`` (B, S, H, D), gated when the layer has the output gate, through ``o_proj``."""
        out = out.flatten(2)
        if self.gate_proj is not None:
            out = torch.sigmoid(self.gate_proj(hidden_states)) * out
        return self.o_proj(out, index, check_indices=False)

    def key_value(
        self, hidden_states: Tensor, position_embeddings: Tuple[Tensor, Tensor], indices: AdapterIndex = None,
        *, check_indices: bool = True,
    ) -> LayerKV:
        """The keys and values of ``hidden_states`` (B, S, hidden) in the cache layout, as :meth:`forward`
        appends them to the cache, without attending: for tokens whose keys and values a layer needs
        although they do not run it (early exit). Arguments as :meth:`forward`."""
        B, S, _ = hidden_states.shape
        return self._key_value(hidden_states, position_embeddings,
                               self._check_index(indices, B, S, check_indices))

    def _key_value(self, hidden_states: Tensor, position_embeddings: Tuple[Tensor, Tensor],
                   index: Union[int, Tensor]) -> LayerKV:
        """:meth:`key_value` with a checked index; ``key_c``/``value_c`` are None when the circuit is off."""
        B, S, _ = hidden_states.shape
        Hkv, D = self.num_key_value_heads, self.head_dim
        k = apply_rotary(self.k_proj(hidden_states, index, check_indices=False).view(B, S, Hkv, D),
                         *position_embeddings)
        v = self.v_proj(hidden_states, index, check_indices=False).view(B, S, Hkv, D)
        if self.qk_u is None or (isinstance(index, int) and index == -1):
            return LayerKV(k, v)
        return LayerKV(k, v, _depth_projection(hidden_states, self.qk_v, index),
                       _depth_projection(hidden_states, self.ov_c, index))

    def _attend(self, q, k, v, q_c, k_c, v_c, packing: Optional[VarlenPacking],
                causal: Optional[bool] = None) -> Tuple[Tensor, Optional[Tensor]]:
        """q (B, S, H, D), q_c (B, S, H, R), k, v, k_c, v_c (B, Sk, Hkv, .) (token-major, the cache layout) ->
        out (B, S, H, D), out_c (B, S, H, R) or None. ``causal``: None, the layer's own."""
        causal = self.causal if causal is None else causal
        if packing is None:  # (B, H, S, D) views of the token-major tensors: read in place, out comes back token-major
            out, out_c = recursive_kernels.circuit_attention(
                *(None if t is None else t.transpose(1, 2) for t in (q, k, v, q_c, k_c, v_c)),
                causal=causal, backend=self.backend,
            )
            return out.transpose(1, 2), None if out_c is None else out_c.transpose(1, 2)
        if packing.prefix is not None:  # a prefix LM's first forward: calls over disjoint queries
            split = packing.prefix
            parts = [self._attend(q, k, v, q_c, k_c, v_c, part, part_causal)
                     for part, part_causal in ((split.before, causal), (split.span, False), (split.after, causal))
                     if part.max_seqlen_q]
            out, out_c = parts[0]
            for more, more_c in parts[1:]:
                out, out_c = out + more, None if out_c is None else out_c + more_c
            return out, out_c
        B, S = q.shape[:2]

        def packed(t: Optional[Tensor], rows: Tensor, keys: bool) -> Optional[Tensor]:
            """(B, S, heads, d) -> (total, heads, d), the rows of ``packing``."""
            if t is None:
                return None
            if packing.every_key if keys else packing.every_query:
                return t.reshape(-1, *t.shape[2:])
            return t.reshape(-1, *t.shape[2:]).index_select(0, rows)

        def unpacked(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None:
                return None
            if packing.every_query:
                return t.view(B, S, *t.shape[1:])
            full = t.new_zeros(B * S, *t.shape[1:]).index_copy(0, packing.query_rows, t)
            return full.view(B, S, *t.shape[1:])

        out, out_c = recursive_kernels.circuit_attention_varlen(
            packed(q, packing.query_rows, False), packed(k, packing.key_rows, True), packed(v, packing.key_rows, True),
            packing.cu_seqlens_q, packing.cu_seqlens_k, packing.max_seqlen_q, packing.max_seqlen_k,
            packed(q_c, packing.query_rows, False), packed(k_c, packing.key_rows, True),
            packed(v_c, packing.key_rows, True), causal=causal, backend=self.backend,
            check_indices=False,  # built by VarlenPacking: no host synchronisation per layer
        )
        return unpacked(out), unpacked(out_c)

    def _attend_shared(self, hidden_states: Tensor, q: Tensor, shared: SharedKeyValue, index: Union[int, Tensor],
                       past_key_value: Optional[LayerKV], use_cache: bool) -> Tensor:
        """:meth:`forward` over another layer's keys and values; q (B, S, H, D) -> (B, S, hidden)."""
        if past_key_value is not None or use_cache:
            raise ValueError("shared_key_value: a layer attending over shared keys and values has no cache of its own")
        if self.qk_u is not None or shared.key_value.key_c is not None:
            raise ValueError("shared_key_value: the QK/OV circuit's corrections belong to their own depth; not shared")
        B, S, H, D = q.shape
        key, value = shared.key_value.key, shared.key_value.value
        if tuple(shared.query_rows.shape) != (B, S):
            raise ValueError(f"shared_key_value: query_rows must be ({B}, {S}), got {tuple(shared.query_rows.shape)}")
        rows = shared.query_rows[:, :, None, None].expand(B, S, H, D)
        spread = q.new_zeros(B, shared.query_length, H, D).scatter(1, rows, q)  # in that layer's query rows
        out, _ = self._attend(spread, key, value, None, None, None, shared.packing)
        return self._output(hidden_states, out.gather(1, rows), index)

    def _ov_output(self, out_c: Tensor, index: Union[int, Tensor]) -> Tensor:
        """``out_c`` (B, S, H, R) through each head's D (D <- R) of the row's depth -> (B, S, H, D)."""
        if isinstance(index, int):
            return torch.einsum("bshr,hdr->bshd", out_c, self.ov_d[index])
        ov_d = self.ov_d[index.clamp(min=0)]  # (B, S, H, D, R)
        return torch.einsum("bshr,bshdr->bshd", out_c, ov_d) * (index >= 0)[:, :, None, None].to(out_c.dtype)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, output_gate={self.gate_proj is not None}, num_depths={self.num_depths}, "
                f"circuit_rank={self.circuit_rank}")
