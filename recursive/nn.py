"""Drop-in ``torch.nn`` modules of recursive (weight-sharing) transformers.

Every projection that carries low-rank updates runs through :func:`recursive_kernels.lowrank_linear` (the shared
matmul and all gathered updates in one op) and attention through :func:`recursive_kernels.circuit_attention`;
the ops pick their backend (a module's ``backend`` attribute, when set, is passed through).

Adapter indices follow the op's convention everywhere: an int selects one adapter for the whole batch,
an int tensor one adapter per row (tokens at different depths in one batch) or ``k`` per row (a
mixture of experts, with gates), and ``-1`` means "no adapter" (the shared weights unmodified).

- :class:`LowRankLinear`: ``nn.Linear`` with ``E`` stacked PEFT-style LoRA adapters.
- :class:`CircuitAttention`: RoPE, grouped-query heads, per-depth QKOV-LoRA and/or the QK/OV circuit,
  causal or bidirectional, a key/value cache for decoding and padding masks.
- :class:`GatedFeedForward` (SwiGLU/GeGLU, per-depth LoRA) and :class:`MoLFeedForward` (a mixture of
  LoRA experts with a top-k router).
- :class:`RecursiveBlock`: one shared pre-norm block, called with the effective layer it runs as.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import recursive_kernels
from recursive_kernels.lowrank_linear import check_index_values

from .config import ATTENTION_TARGETS, FEED_FORWARD_TARGETS, RecursiveConfig

AdapterIndex = Union[None, int, Tensor]

_ACTIVATIONS: Mapping[str, Callable[[Tensor], Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def activation(name: str) -> Callable[[Tensor], Tensor]:
    """The activation called ``name`` in Hugging Face configs: "silu", "gelu" or "gelu_pytorch_tanh"."""
    if name not in _ACTIVATIONS:
        raise ValueError(f"hidden_act: expected one of {tuple(_ACTIVATIONS)}, got {name!r}")
    return _ACTIVATIONS[name]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Norms, rotary tables and router probabilities run in float32, or float64 for float64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _ranks(lora_rank: Union[int, Mapping[str, int]], targets: Tuple[str, ...]) -> Mapping[str, int]:
    """One rank per target from an int (every target) or a mapping (a missing target: 0)."""
    if isinstance(lora_rank, Mapping):
        unknown = sorted(set(lora_rank) - set(targets))
        if unknown:
            raise ValueError(f"lora_rank: unknown targets {unknown}; expected some of {targets}")
        return {t: lora_rank.get(t, 0) for t in targets}
    return {t: lora_rank for t in targets}


class LowRankLinear(nn.Module):
    """``nn.Linear`` with ``num_adapters`` stacked LoRA adapters on the same weight.

    ``y = x W^T + b + scaling * sum_j g_j (x A_e^T) B_e^T`` over the adapters ``e`` selected for the
    row, computed by one :func:`recursive_kernels.lowrank_linear` call. With one adapter selected it equals PEFT's
    ``lora.Linear`` holding ``lora_A.weight = lora_a[e]``, ``lora_B.weight = lora_b[e]``.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        num_adapters: E, the number of stacked adapters.
        rank: r, clamped to ``min(in_features, out_features)`` (a higher rank adds nothing).
        alpha: PEFT's ``lora_alpha``; ``scaling = alpha / rank`` with the clamped rank.
        backend: kernels backend, None for automatic.

    With ``num_adapters`` or ``rank`` 0 the layer holds no adapters (both attributes read 0, ``scaling``
    0): a plain linear.

    Parameters: ``weight`` (N, K), ``bias`` (N,) or None, ``lora_a`` (E, r, K) and ``lora_b`` (E, N, r),
    both None without adapters. Initialised like ``nn.Linear`` and PEFT (``lora_a`` Kaiming-uniform,
    ``lora_b`` zeros, so a fresh adapter changes nothing).
    """

    # The parameters a relaxation adds to the shared model (RecursivePreTrainedModel.adapter_state_dict).
    adapter_parameters = ("lora_a", "lora_b")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        num_adapters: int = 1,
        rank: int = 8,
        alpha: float = 8.0,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_adapters", num_adapters), ("rank", rank)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}: expected an int >= 0, got {value!r}")
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._create_adapters(num_adapters, rank, alpha, device=device, dtype=dtype)
        self.reset_parameters()

    def _create_adapters(self, num_adapters: int, rank: int, alpha: float, device, dtype) -> None:
        rank = min(rank, self.in_features, self.out_features) if num_adapters else 0
        self.num_adapters = num_adapters if rank else 0  # both 0 when the layer holds no adapters
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / self.rank if self.rank else 0.0
        if self.rank:
            self.lora_a = nn.Parameter(torch.empty(num_adapters, self.rank, self.in_features, device=device, dtype=dtype))
            self.lora_b = nn.Parameter(torch.empty(num_adapters, self.out_features, self.rank, device=device, dtype=dtype))
        else:
            self.register_parameter("lora_a", None)
            self.register_parameter("lora_b", None)

    def reset_parameters(self) -> None:
        """``nn.Linear``'s init of the weight and bias, then :meth:`reset_adapters`."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapters()

    def reset_adapters(self) -> None:
        """PEFT's LoRA init: each ``lora_a[e]`` Kaiming-uniform (fan-in K), ``lora_b`` zeros."""
        if self.lora_a is None:
            return
        for lora_a in self.lora_a:  # one (r, K) matrix at a time, so the fan-in is K
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    @classmethod
    def from_linear(
        cls, linear: nn.Module, num_adapters: int = 1, rank: int = 8, alpha: float = 8.0, backend: Optional[str] = None
    ) -> "LowRankLinear":
        """A layer whose ``weight`` and ``bias`` are ``linear``'s own parameters (shared, not copied),
        with fresh adapters on the same device and dtype."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                    num_adapters=0, rank=0, backend=backend)
        layer.weight, layer.bias = linear.weight, linear.bias
        layer._create_adapters(num_adapters, rank, alpha, device=weight.device, dtype=weight.dtype)
        layer.reset_adapters()
        return layer

    @torch.no_grad()
    def merged_weight(self, adapter: int) -> Tensor:
        """``weight + scaling * lora_b[adapter] @ lora_a[adapter]`` (N, K), the weight of a plain linear that
        computes what this layer does with ``adapter`` selected; ``weight`` itself (not a copy) for -1 or
        a layer without adapters. Formed in at least float32 and rounded once to the weight's dtype."""
        if isinstance(adapter, bool) or not isinstance(adapter, int):
            raise ValueError(f"adapter: expected an int, got {adapter!r}")
        if self.lora_a is None or adapter == -1:
            return self.weight
        if not 0 <= adapter < self.num_adapters:
            raise IndexError(f"adapter: {adapter} is outside [-1, {self.num_adapters})")
        compute = torch.promote_types(self.weight.dtype, torch.float32)
        delta = self.lora_b[adapter].to(compute) @ self.lora_a[adapter].to(compute)
        return (self.weight.to(compute) + self.scaling * delta).to(self.weight.dtype)

    def forward(self, x: Tensor, indices: AdapterIndex = None, gates: Optional[Tensor] = None, *,
                check_indices: bool = True) -> Tensor:
        """Args:
            x: (*, in_features).
            indices: None (adapter 0; E must be 1), an int in [-1, E) for every row, an int tensor (*,)
                (one adapter per row) or (*, k) (k adapters per row); -1: no adapter. A layer without
                adapters is a plain linear and ignores ``indices`` and ``gates``.
            gates: None (1 per slot) or a float tensor shaped like a tensor ``indices``.
            check_indices: as :func:`recursive_kernels.lowrank_linear` (False: a tensor ``indices`` is trusted to
                lie in [-1, E), saving a host synchronisation).

        Returns:
            (*, out_features).
        """
        plain = self.lora_a is None or (isinstance(indices, int) and not isinstance(indices, bool) and indices == -1)
        if plain:
            return recursive_kernels.lowrank_linear(x, self.weight, self.bias, backend=self.backend)
        return recursive_kernels.lowrank_linear(
            x, self.weight, self.bias, self.lora_a, self.lora_b, indices, gates, self.scaling, backend=self.backend,
            check_indices=check_indices,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"num_adapters={self.num_adapters}, rank={self.rank}, scaling={self.scaling:g}")


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in float32 (float64 for float64 inputs).

    ``unit_offset=False`` (Llama): ``weight * normed``, weight initialised to ones, the product taken
    after casting back to the input dtype. ``unit_offset=True`` (Gemma): ``normed * (1 + weight)`` in the
    compute dtype, weight initialised to zeros. Both as in Hugging Face, so converted weights match.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, unit_offset: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        self.eps, self.unit_offset = eps, unit_offset
        init = torch.zeros if unit_offset else torch.ones
        self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        """(*, hidden) -> (*, hidden)."""
        compute = _compute_dtype(x.dtype)
        h = x.to(compute)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.unit_offset:
            return (h * (1.0 + self.weight.to(compute))).to(x.dtype)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}, unit_offset={self.unit_offset}"


def rotary_embedding(position_ids: Tensor, head_dim: int, theta: float, dtype: torch.dtype) -> Tuple[Tensor, Tensor]:
    """RoPE tables for ``position_ids`` (B, S): ``(cos, sin)``, each (B, S, head_dim) in ``dtype``.

    Hugging Face Llama's convention: frequencies ``theta ** (-2i / head_dim)``, the table repeated over
    both halves of the head (rotate-half), computed in float32 (float64 for float64).
    """
    compute = _compute_dtype(dtype)
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=position_ids.device).to(compute) / head_dim
    inv_freq = 1.0 / (theta ** exponents)
    freqs = position_ids.to(compute)[..., None] * inv_freq
    table = torch.cat((freqs, freqs), dim=-1)
    return table.cos().to(dtype), table.sin().to(dtype)


def _apply_rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x (B, S, heads, D) rotated by cos, sin (B, S, D) (rotate-half convention)."""
    cos, sin = cos.unsqueeze(2), sin.unsqueeze(2)
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class LayerKV(NamedTuple):
    """One effective layer's cached keys and values, after RoPE: ``key``, ``value`` (B, Hkv, S, D);
    with the QK/OV circuit also ``key_c`` (B, Hkv, S, R) and ``value_c`` (B, Hkv, S, R), else None.

    Attention extends a cache through :meth:`append`. Other caches (such as the slot caches of
    :class:`recursive.DepthBatchingEngine`) may stand in for it: anything whose ``append(new)`` stores
    ``new`` and returns the :class:`LayerKV` that attention reads.
    """

    key: Tensor
    value: Tensor
    key_c: Optional[Tensor] = None
    value_c: Optional[Tensor] = None

    def append(self, new: "LayerKV") -> "LayerKV":
        """This cache followed by ``new`` (B, Hkv, S', .) along the sequence, as a new LayerKV."""
        if (self.key_c is None) != (new.key_c is None):
            raise ValueError("past_key_value: cached with and used without the QK/OV circuit, or the reverse")
        return LayerKV(*(None if p is None else torch.cat((p, n), dim=2) for p, n in zip(self, new)))


class SharedKeyValue(NamedTuple):
    """Another layer's keys and values for a layer to attend over instead of its own (Mixture-of-
    Recursions' KV sharing: later recursions reuse the first one's).

    ``key_value``: that layer's :class:`LayerKV` (B, Hkv, Sk, .); ``query_length``: that layer's
    queries were the last ``query_length`` of those keys (all of them without a cache); ``query_rows``:
    (B, Sq) int64, the row of each query among those ``query_length`` (its token's place; unique per
    sequence); ``packing``: that layer's :class:`VarlenPacking` (None: no padding). Attention scatters
    the queries into those rows and attends as that layer did (causal by that order), then gathers them.
    """

    key_value: LayerKV
    query_length: int
    query_rows: Tensor
    packing: Optional["VarlenPacking"] = None


def _ints_to_device(device, *columns: Sequence[int]) -> List[Tensor]:
    """Host integer lists as int64 tensors on ``device``, in one copy; on a GPU from pinned memory, so
    that the copy does not wait for the queued work (one from ordinary host memory does)."""
    packed = torch.tensor([value for column in columns for value in column], dtype=torch.long)
    if torch.device(device).type == "cuda":
        packed = packed.pin_memory().to(device, non_blocking=True)
    else:
        packed = packed.to(device)
    return list(packed.split([len(column) for column in columns]))


@dataclass(frozen=True)
class VarlenPacking:
    """Where the real (unpadded) tokens of a padded batch are, for :func:`recursive_kernels.circuit_attention_varlen`.

    Built once per forward from a Hugging Face ``attention_mask`` (1 real, 0 padding) and shared by every
    layer. Attention then runs on the real tokens only: a query sees the real keys of its sequence (and,
    when causal, those not after it), which is exact for left, right or any other padding; padded query
    rows get zeros.

    Attributes:
        query_rows: (total_q,) int64 rows of the flattened (B * Sq) queries that are real.
        key_rows: (total_k,) int64 rows of the flattened (B * Sk) keys that are real.
        cu_seqlens_q, cu_seqlens_k: (B + 1,) int32 offsets of each sequence's real queries and keys.
        max_seqlen_q, max_seqlen_k: the longest of them.
        query_mask: (B, Sq) bool, True at real queries.
    """

    query_rows: Tensor
    key_rows: Tensor
    cu_seqlens_q: Tensor
    cu_seqlens_k: Tensor
    max_seqlen_q: int
    max_seqlen_k: int
    query_mask: Tensor

    @classmethod
    def from_lengths(cls, lengths: Sequence[int], width: int, device) -> "VarlenPacking":
        """A batch of ``width`` columns whose row b holds ``lengths[b]`` real tokens first, then padding,
        as its queries and keys (no cache), from counts the host knows: nothing is read back from the
        device (a synchronisation on a GPU), unlike :meth:`from_attention_mask`."""
        cumulative = list(accumulate(lengths, initial=0))
        rows = [b * width + i for b, length in enumerate(lengths) for i in range(length)]
        rows, cu, lengths_d = _ints_to_device(device, rows, cumulative, lengths)
        cu = cu.to(torch.int32)
        longest = max(lengths, default=0)
        return cls(query_rows=rows, key_rows=rows, cu_seqlens_q=cu, cu_seqlens_k=cu, max_seqlen_q=longest,
                   max_seqlen_k=longest, query_mask=torch.arange(width, device=device) < lengths_d[:, None])

    @classmethod
    def from_attention_mask(cls, attention_mask: Tensor, query_length: int) -> "VarlenPacking":
        """``attention_mask`` (B, Sk) covers the cached and the new tokens; the queries are its last
        ``query_length`` columns."""
        if attention_mask.dim() != 2 or not 0 <= query_length <= attention_mask.shape[1]:
            raise ValueError(
                f"attention_mask: expected (B, Sk) with Sk >= the {query_length} queries, got {tuple(attention_mask.shape)}"
            )
        keys = attention_mask.bool()
        queries = keys[:, keys.shape[1] - query_length:]

        def offsets(mask: Tensor) -> Tuple[Tensor, int]:
            lengths = mask.sum(1)
            cu = F.pad(lengths.cumsum(0), (1, 0)).to(torch.int32)
            return cu, int(lengths.max()) if lengths.numel() else 0

        cu_q, max_q = offsets(queries)
        cu_k, max_k = offsets(keys)
        return cls(
            query_rows=queries.reshape(-1).nonzero().squeeze(1),
            key_rows=keys.reshape(-1).nonzero().squeeze(1),
            cu_seqlens_q=cu_q,
            cu_seqlens_k=cu_k,
            max_seqlen_q=max_q,
            max_seqlen_k=max_k,
            query_mask=queries,
        )


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

    Per-depth parameters (``num_depths`` sets, selected by ``adapter_index``):

    - QKOV-LoRA: LoRA adapters on q_proj, k_proj, v_proj, o_proj (:class:`LowRankLinear`).
    - The QK/OV circuit, rank R per depth and head:
      ``S_h += (X U_h)(X V_g)^T`` at the logit site and ``out_h += P_h (X C_g) D_h^T`` at the value site,
      with ``g`` the key/value head of query head ``h``. One :func:`recursive_kernels.circuit_attention` pass takes
      ``q_c = X U_h``, ``k_c = X V_g``, ``v_c = X C_g``; ``out_c @ D_h^T`` is added to head h's output
      before ``o_proj``. This is our reading of the depth-as-modulation paper's abstract (its exact
      formula is not published). The corrections carry no RoPE and no logit scale. U and D start at
      zero, V and C Kaiming-uniform, so fresh factors change nothing.

    Parameters: ``q_proj`` (H * D <- hidden), ``k_proj``, ``v_proj`` (Hkv * D <- hidden), ``o_proj``
    (hidden <- H * D); with the circuit ``qk_u`` (E, H, R, hidden), ``qk_v`` (E, Hkv, R, hidden),
    ``ov_c`` (E, Hkv, R, hidden), ``ov_d`` (E, H, D, R).

    Args:
        hidden_size, num_heads: model width and query heads H.
        num_key_value_heads: Hkv (default H); must divide H.
        head_dim: D (default hidden_size // H).
        qkv_bias: biases on q, k, v (Qwen2); o_proj has none.
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
        qkv_bias: bool = False,
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
        ranks = _ranks(lora_rank, ATTENTION_TARGETS)
        factory = {"device": device, "dtype": dtype}

        def projection(target: str, fan_in: int, fan_out: int, bias: bool) -> LowRankLinear:
            return LowRankLinear(fan_in, fan_out, bias, num_adapters=num_depths, rank=ranks[target], alpha=lora_alpha,
                                 backend=backend, **factory)

        self.q_proj = projection("q", hidden_size, num_heads * head_dim, qkv_bias)
        self.k_proj = projection("k", hidden_size, num_key_value_heads * head_dim, qkv_bias)
        self.v_proj = projection("v", hidden_size, num_key_value_heads * head_dim, qkv_bias)
        self.o_proj = projection("o", num_heads * head_dim, hidden_size, False)
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

    def _check_index(self, adapter_index: AdapterIndex, batch: int, length: int, check_values: bool) -> Union[int, Tensor]:
        """An int in [-1, E), or an int64 tensor (B, S) (its values read on the host when ``check_values``)."""
        if adapter_index is None:
            return -1
        if isinstance(adapter_index, int) and not isinstance(adapter_index, bool):
            if not -1 <= adapter_index < self.num_depths:
                raise IndexError(f"adapter_index: {adapter_index} is outside [-1, {self.num_depths})")
            return adapter_index
        if not isinstance(adapter_index, Tensor) or adapter_index.dtype.is_floating_point or adapter_index.dtype == torch.bool:
            raise ValueError(f"adapter_index: expected None, an int or an integer tensor, got {adapter_index!r}")
        if tuple(adapter_index.shape) == (batch,):
            adapter_index = adapter_index[:, None].expand(batch, length)
        elif tuple(adapter_index.shape) != (batch, length):
            raise ValueError(f"adapter_index: expected shape ({batch},) or ({batch}, {length}), got {tuple(adapter_index.shape)}")
        if check_values:  # once; the projections trust it
            check_index_values(adapter_index, self.num_depths, "adapter_index")
        return adapter_index.long()

    def forward(
        self,
        hidden_states: Tensor,
        position_embeddings: Tuple[Tensor, Tensor],
        adapter_index: AdapterIndex = None,
        packing: Optional[VarlenPacking] = None,
        past_key_value: Optional[LayerKV] = None,
        use_cache: bool = False,
        *,
        check_indices: bool = True,
        shared_key_value: Optional[SharedKeyValue] = None,
    ) -> Tuple[Tensor, Optional[LayerKV]]:
        """Args:
            hidden_states: (B, S, hidden).
            position_embeddings: ``(cos, sin)``, each (B, S, head_dim), from :func:`rotary_embedding`.
            adapter_index: which per-depth parameters to use: None or -1 (none: the shared attention
                unmodified), an int in [0, E), or an int tensor (B,) or (B, S) (per row; -1: none).
            packing: the real tokens of a padded batch (:class:`VarlenPacking`); None: no padding.
            past_key_value: this layer's cache from earlier steps (a :class:`LayerKV`, or another cache
                with its ``append``); the new keys follow it.
            use_cache: also return the cache extended by this step.
            check_indices: False trusts a tensor ``adapter_index`` to lie in [-1, E) (no host read of its
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
        index = self._check_index(adapter_index, B, S, check_indices)
        q = _apply_rotary(self.q_proj(hidden_states, index, check_indices=False).view(B, S, H, D), *position_embeddings)
        if shared_key_value is not None:
            return self._attend_shared(q, shared_key_value, index, past_key_value, use_cache), None
        k, v, k_c, v_c = self._key_value(hidden_states, position_embeddings, index)
        q_c = _depth_projection(hidden_states, self.qk_u, index) if k_c is not None else None
        if past_key_value is not None:
            k, v, k_c, v_c = past_key_value.append(LayerKV(k, v, k_c, v_c))
        present = LayerKV(k, v, k_c, v_c) if use_cache else None

        out, out_c = self._attend(q, k, v, q_c, k_c, v_c, packing)  # (B, S, H, D), (B, S, H, R)
        if out_c is not None:
            out = out + self._ov_output(out_c, index)
        return self.o_proj(out.reshape(B, S, H * D), index, check_indices=False), present

    def key_value(
        self, hidden_states: Tensor, position_embeddings: Tuple[Tensor, Tensor], adapter_index: AdapterIndex = None,
        *, check_indices: bool = True,
    ) -> LayerKV:
        """The keys and values of ``hidden_states`` (B, S, hidden) in the cache layout, as :meth:`forward`
        appends them to the cache, without attending: for tokens whose keys and values a layer needs
        although they do not run it (early exit). Arguments as :meth:`forward`."""
        B, S, _ = hidden_states.shape
        return self._key_value(hidden_states, position_embeddings, self._check_index(adapter_index, B, S, check_indices))

    def _key_value(self, hidden_states: Tensor, position_embeddings: Tuple[Tensor, Tensor], index: Union[int, Tensor]) -> LayerKV:
        """:meth:`key_value` with a checked index; ``key_c``/``value_c`` are None when the circuit is off."""
        B, S, _ = hidden_states.shape
        Hkv, D = self.num_key_value_heads, self.head_dim
        k = _apply_rotary(self.k_proj(hidden_states, index, check_indices=False).view(B, S, Hkv, D), *position_embeddings)
        v = self.v_proj(hidden_states, index, check_indices=False).view(B, S, Hkv, D)
        k, v = k.transpose(1, 2), v.transpose(1, 2)  # the cache layout (B, Hkv, S, D)
        if self.qk_u is None or (isinstance(index, int) and index == -1):
            return LayerKV(k, v)
        k_c = _depth_projection(hidden_states, self.qk_v, index).transpose(1, 2)
        v_c = _depth_projection(hidden_states, self.ov_c, index).transpose(1, 2)
        return LayerKV(k, v, k_c, v_c)

    def _attend(self, q, k, v, q_c, k_c, v_c, packing: Optional[VarlenPacking]) -> Tuple[Tensor, Optional[Tensor]]:
        """q (B, S, H, D), q_c (B, S, H, R), k, v, k_c, v_c (B, Hkv, Sk, .) -> out (B, S, H, D),
        out_c (B, S, H, R) or None."""
        if packing is None:
            out, out_c = recursive_kernels.circuit_attention(
                q.transpose(1, 2), k, v, None if q_c is None else q_c.transpose(1, 2), k_c, v_c,
                causal=self.causal, backend=self.backend,
            )
            return out.transpose(1, 2), None if out_c is None else out_c.transpose(1, 2)
        B, S = q.shape[:2]

        def packed(t: Optional[Tensor], rows: Tensor, keys: bool) -> Optional[Tensor]:
            if t is None:
                return None
            if keys:  # (B, Hkv, Sk, d) -> (B * Sk, Hkv, d)
                t = t.transpose(1, 2)
            return t.reshape(-1, *t.shape[2:]).index_select(0, rows)

        def unpacked(t: Optional[Tensor]) -> Optional[Tensor]:
            if t is None:
                return None
            full = t.new_zeros(B * S, *t.shape[1:]).index_copy(0, packing.query_rows, t)
            return full.view(B, S, *t.shape[1:])

        out, out_c = recursive_kernels.circuit_attention_varlen(
            packed(q, packing.query_rows, False), packed(k, packing.key_rows, True), packed(v, packing.key_rows, True),
            packing.cu_seqlens_q, packing.cu_seqlens_k, packing.max_seqlen_q, packing.max_seqlen_k,
            packed(q_c, packing.query_rows, False), packed(k_c, packing.key_rows, True),
            packed(v_c, packing.key_rows, True), causal=self.causal, backend=self.backend,
            check_offsets=False,  # built by VarlenPacking: no host synchronisation per layer
        )
        return unpacked(out), unpacked(out_c)

    def _attend_shared(self, q: Tensor, shared: SharedKeyValue, index: Union[int, Tensor],
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
        return self.o_proj(out.gather(1, rows).reshape(B, S, H * D), index, check_indices=False)

    def _ov_output(self, out_c: Tensor, index: Union[int, Tensor]) -> Tensor:
        """``out_c`` (B, S, H, R) through each head's D (D <- R) of the row's depth -> (B, S, H, D)."""
        if isinstance(index, int):
            return torch.einsum("bshr,hdr->bshd", out_c, self.ov_d[index])
        ov_d = self.ov_d[index.clamp(min=0)]  # (B, S, H, D, R)
        return torch.einsum("bshr,bshdr->bshd", out_c, ov_d) * (index >= 0)[:, :, None, None].to(out_c.dtype)

    def extra_repr(self) -> str:
        return (f"heads={self.num_heads}, kv_heads={self.num_key_value_heads}, head_dim={self.head_dim}, "
                f"causal={self.causal}, num_depths={self.num_depths}, circuit_rank={self.circuit_rank}")


class _GatedProjections(nn.Module):
    """The gated MLP ``down_proj(act(gate_proj(x)) * up_proj(x))`` (no biases) that both feed-forward
    modules are built on, with ``num_adapters`` LoRA adapters on each projection of nonzero rank."""

    def __init__(self, hidden_size, intermediate_size, hidden_act, num_adapters, lora_rank, lora_alpha, backend,
                 device, dtype) -> None:
        super().__init__()
        self.hidden_size, self.intermediate_size, self.lora_alpha, self.backend = (
            hidden_size, intermediate_size, lora_alpha, backend)
        self.num_adapters = num_adapters
        self.hidden_act, self.act = hidden_act, activation(hidden_act)
        ranks = _ranks(lora_rank, FEED_FORWARD_TARGETS)
        options = {"num_adapters": num_adapters, "alpha": lora_alpha, "backend": backend, "device": device, "dtype": dtype}
        self.gate_proj = LowRankLinear(hidden_size, intermediate_size, False, rank=ranks["gate"], **options)
        self.up_proj = LowRankLinear(hidden_size, intermediate_size, False, rank=ranks["up"], **options)
        self.down_proj = LowRankLinear(intermediate_size, hidden_size, False, rank=ranks["down"], **options)

    def _gated(self, x: Tensor, indices: AdapterIndex, gates: Optional[Tensor], check_indices: bool = True) -> Tensor:
        """The MLP with the same adapter selection in all three projections (a tensor ``indices`` is
        checked once here, when ``check_indices``, not by each projection)."""
        if check_indices and isinstance(indices, Tensor) and self.num_adapters:
            check_index_values(indices, self.num_adapters)
        hidden = (self.act(self.gate_proj(x, indices, gates, check_indices=False))
                  * self.up_proj(x, indices, gates, check_indices=False))
        return self.down_proj(hidden, indices, gates, check_indices=False)


class GatedFeedForward(_GatedProjections):
    """Gated MLP ``down_proj(act(gate_proj(x)) * up_proj(x))``: SwiGLU with "silu", GeGLU with "gelu" or
    "gelu_pytorch_tanh"; optional per-depth LoRA adapters on each projection. No biases.

    Args:
        hidden_size, intermediate_size: widths.
        hidden_act: the activation's Hugging Face name.
        num_adapters: E adapters on each projection with a nonzero rank.
        lora_rank: rank of every projection, or a mapping from some of "gate", "up", "down" to ranks.
        lora_alpha: LoRA alpha.
        backend: kernels backend, None for automatic.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        *,
        num_adapters: int = 0,
        lora_rank: Union[int, Mapping[str, int]] = 0,
        lora_alpha: float = 8.0,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(hidden_size, intermediate_size, hidden_act, num_adapters, lora_rank, lora_alpha, backend,
                         device, dtype)

    def forward(self, x: Tensor, adapter_index: AdapterIndex = None, *, check_indices: bool = True) -> Tensor:
        """x (*, hidden) -> (*, hidden); ``adapter_index`` and ``check_indices`` as :meth:`LowRankLinear.forward`'s
        ``indices`` and ``check_indices``."""
        return self._gated(x, adapter_index, None, check_indices)


class MoLFeedForward(_GatedProjections):
    """Gated MLP with a mixture of LoRA experts inside its shared projections (ModernALBERT).

    A router ``p = softmax(W_r x)`` keeps the top-k experts of each token, and every projection becomes
    ``W x + s * sum_{i in topk} p_i B_i A_i x`` (the probabilities are not renormalised over the top k):
    one :func:`recursive_kernels.lowrank_linear` call per projection with (*, k) indices and gates. The router is
    trained through the gates; the load-balancing loss ``E * sum_i f_i P_i`` (f_i: the fraction of
    routing slots given to expert i, P_i: its mean probability; 1 at uniform routing) keeps experts in use.

    Args:
        hidden_size, intermediate_size, hidden_act: as :class:`GatedFeedForward`.
        num_experts: E LoRA experts on each projection with a nonzero rank.
        top_k: experts per token.
        lora_rank: rank of every projection, or a mapping from some of "gate", "up", "down" to ranks.
        lora_alpha: LoRA alpha.
        backend: kernels backend, None for automatic.

    Parameters: the projections' ``weight``, ``lora_a``, ``lora_b`` and ``router.weight`` (E, hidden).
    """

    adapter_parameters = ("router.weight",)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        *,
        num_experts: int = 8,
        top_k: int = 2,
        lora_rank: Union[int, Mapping[str, int]] = 8,
        lora_alpha: float = 8.0,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts: expected an int >= 1, got {num_experts!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected an int in [1, num_experts={num_experts}], got {top_k!r}")
        super().__init__(hidden_size, intermediate_size, hidden_act, num_experts, lora_rank, lora_alpha, backend,
                         device, dtype)
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)

    def route(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x (*, hidden) -> ``(gates, experts, probs)``: the top-k probabilities (*, k) (differentiable),
        their experts (*, k) int64 and all router probabilities (*, E), in float32 (float64 for float64)."""
        probs = torch.softmax(self.router(x).to(_compute_dtype(x.dtype)), dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)
        return gates, experts, probs

    def forward(self, x: Tensor, token_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Args:
            x: (*, hidden).
            token_mask: (*,) bool, the tokens that count in the load-balancing loss (not padding);
                None: all.

        Returns:
            ``(output, load_balancing_loss)``: (*, hidden) and a scalar.
        """
        gates, experts, probs = self.route(x)
        output = self._gated(x, experts, gates, check_indices=False)  # top-k experts: in range by construction
        return output, _load_balancing_loss(probs, experts, token_mask)

    @torch.no_grad()
    def merge_experts(self, calibration: Tensor, rank: Optional[int] = None) -> GatedFeedForward:
        """Compress the mixture into one adapter per projection, for inference.

        ``dW = sum_i pbar_i * s * B_i A_i`` with ``pbar`` the mean routing weight (gate, 0 when not
        chosen) of each expert over the ``calibration`` inputs (*, hidden), refactored to rank ``rank``
        (default: the experts' rank; clamped to the projection's size, where it is exact) by a truncated
        SVD, ``dW ~ U_r S_r V_r^T``: ``A = V_r^T``, ``B = U_r S_r / s``.

        Returns:
            A :class:`GatedFeedForward` with one adapter (call it without ``adapter_index``) sharing this
            module's base weights; it may replace this module in a :class:`RecursiveBlock`.
        """
        if not isinstance(calibration, Tensor) or calibration.shape[-1:] != (self.hidden_size,) or calibration.numel() == 0:
            raise ValueError(f"calibration: expected a non-empty tensor (*, hidden={self.hidden_size}), "
                             f"got {getattr(calibration, 'shape', type(calibration).__name__)}")
        gates, experts, probs = self.route(calibration)
        routing = torch.zeros_like(probs).scatter_add_(-1, experts, gates)
        mean_routing = routing.reshape(-1, self.num_experts).mean(0)  # pbar, (E,)
        merged = GatedFeedForward(self.hidden_size, self.intermediate_size, self.hidden_act, lora_alpha=self.lora_alpha,
                                  backend=self.backend, device="meta")  # its projections are replaced below
        for name in ("gate_proj", "up_proj", "down_proj"):
            mixture: LowRankLinear = getattr(self, name)
            target_rank = mixture.rank if rank is None else rank
            single = LowRankLinear.from_linear(mixture, 1, target_rank, self.lora_alpha, backend=self.backend)
            if single.lora_a is not None and mixture.lora_a is not None:
                compute = torch.promote_types(mixture.weight.dtype, torch.float32)
                delta = mixture.scaling * torch.einsum(
                    "e,enr,erk->nk", mean_routing.to(compute), mixture.lora_b.to(compute), mixture.lora_a.to(compute)
                )
                u, s, vh = torch.linalg.svd(delta, full_matrices=False)
                r = single.rank
                single.lora_a.copy_(vh[:r][None])
                single.lora_b.copy_((u[:, :r] * s[:r] / single.scaling)[None])
            setattr(merged, name, single)
        return merged

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}"


def _load_balancing_loss(probs: Tensor, experts: Tensor, token_mask: Optional[Tensor]) -> Tensor:
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


class RecursiveBlock(nn.Module):
    """One shared pre-norm transformer block, called with the effective layer it runs as.

    ``x + attn(norm(x))``, then ``+ mlp(norm(.))``; attention is :class:`CircuitAttention`, the MLP a
    :class:`GatedFeedForward` or, for relaxation "mol", a :class:`MoLFeedForward`. The block of
    ``block_index`` holds per-depth parameters for its own effective layers from ``start_index`` on
    (``config.depth_layers_of_block``): adapter ``i`` belongs to the i-th of them, so its LoRA
    tensors have E = that many adapters. Any other layer runs the shared weights unmodified.

    Parameter names follow Hugging Face's decoder layer (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
    ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``) so converted checkpoints map by name.
    """

    def __init__(self, config: RecursiveConfig, block_index: int, causal: bool = True) -> None:
        super().__init__()
        if not isinstance(config, RecursiveConfig):
            raise ValueError(f"config: expected a RecursiveConfig, got {type(config).__name__}")
        depth_layers = config.depth_layers_of_block(block_index)
        adapter_of_layer = [-1] * config.num_layers
        for adapter, layer in enumerate(depth_layers):
            adapter_of_layer[layer] = adapter
        self.block_index, self.num_layers = block_index, config.num_layers
        self._adapter_of_layer = tuple(adapter_of_layer)
        self.register_buffer("adapter_of_layer", torch.tensor(adapter_of_layer, dtype=torch.int64), persistent=False)

        lora = config.relaxation in ("depth_lora", "qkov_lora")
        attention_ranks = {t: config.lora_rank_of(t) if lora else 0 for t in ATTENTION_TARGETS}
        feed_forward_ranks = {t: config.lora_rank_of(t) for t in FEED_FORWARD_TARGETS}
        norm = {"eps": config.rms_norm_eps, "unit_offset": config.norm_unit_offset}
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = CircuitAttention(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            qkv_bias=config.qkv_bias, causal=causal, num_depths=len(depth_layers), lora_rank=attention_ranks,
            lora_alpha=config.lora_alpha, circuit_rank=config.circuit_rank if config.relaxation == "circuit" else 0,
            backend=config.backend,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        if config.relaxation == "mol":
            self.mlp = MoLFeedForward(
                config.hidden_size, config.intermediate_size, config.hidden_act, num_experts=config.num_experts,
                top_k=config.num_experts_per_tok, lora_rank=feed_forward_ranks, lora_alpha=config.lora_alpha,
                backend=config.backend,
            )
        else:
            self.mlp = GatedFeedForward(
                config.hidden_size, config.intermediate_size, config.hidden_act, num_adapters=len(depth_layers),
                lora_rank=feed_forward_ranks, lora_alpha=config.lora_alpha, backend=config.backend,
            )
        # Whether the MLP's adapters are per depth; a merged mixture (one adapter) is called without an index.
        self._per_depth_mlp = config.relaxation == "depth_lora" and any(feed_forward_ranks.values())

    def adapter_index(self, depth: Union[int, Tensor], check_values: bool = True) -> Union[int, Tensor]:
        """This block's adapter for effective layer ``depth`` (an int, or an int tensor of any shape):
        -1 where the layer has no per-depth parameters here. A tensor's values are read on the host to
        check them only when ``check_values``."""
        if isinstance(depth, int) and not isinstance(depth, bool):
            if not 0 <= depth < self.num_layers:
                raise ValueError(f"depth: expected an effective layer in [0, {self.num_layers}), got {depth}")
            return self._adapter_of_layer[depth]
        if not isinstance(depth, Tensor) or depth.dtype.is_floating_point or depth.dtype == torch.bool:
            raise ValueError(f"depth: expected an int or an integer tensor, got {depth!r}")
        if check_values and depth.numel() and not torch.compiler.is_compiling():
            low, high = (int(t) for t in torch.aminmax(depth))
            if low < 0 or high >= self.num_layers:
                raise ValueError(f"depth: values must be effective layers in [0, {self.num_layers}), got {low}..{high}")
        return self.adapter_of_layer[depth]

    def forward(
        self,
        hidden_states: Tensor,
        depth: Union[int, Tensor],
        position_embeddings: Tuple[Tensor, Tensor],
        packing: Optional[VarlenPacking] = None,
        past_key_value: Optional[LayerKV] = None,
        use_cache: bool = False,
        *,
        check_depth: bool = True,
        shared_key_value: Optional[SharedKeyValue] = None,
    ) -> Tuple[Tensor, Optional[LayerKV], Optional[Tensor]]:
        """Args:
            hidden_states: (B, S, hidden).
            depth: the effective layer: an int for the whole batch, or an int tensor (B,) or (B, S) of
                layers per row (tokens at different depths in one batch).
            position_embeddings, packing, past_key_value, use_cache: as :meth:`CircuitAttention.forward`.
            check_depth: False trusts a tensor ``depth`` to hold effective layers (no host read of its
                values, a synchronisation on the GPU; :class:`recursive.DepthBatchingEngine` builds its
                depths). The adapter indices derived from the depths are never read again.
            shared_key_value: the attention attends over these instead of its own keys and values
                (:meth:`CircuitAttention.forward`).

        Returns:
            ``(hidden_states, present, aux_loss)``: (B, S, hidden), the extended cache (None unless
            ``use_cache``) and the MoL load-balancing loss (None without a mixture).
        """
        index = self._token_adapter_index(depth, hidden_states, check_depth)
        attn_out, present = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, index, packing, past_key_value, use_cache,
            check_indices=False, shared_key_value=shared_key_value,
        )
        hidden_states = hidden_states + attn_out
        normed = self.post_attention_layernorm(hidden_states)
        aux_loss = None
        if isinstance(self.mlp, MoLFeedForward):
            mlp_out, aux_loss = self.mlp(normed, None if packing is None else packing.query_mask)
        else:
            mlp_out = self.mlp(normed, index if self._per_depth_mlp else None, check_indices=False)
        return hidden_states + mlp_out, present, aux_loss

    def key_value(self, hidden_states: Tensor, depth: Union[int, Tensor], position_embeddings: Tuple[Tensor, Tensor],
                  *, check_depth: bool = True) -> LayerKV:
        """The keys and values this block appends to the cache of effective layer ``depth`` for
        ``hidden_states`` (B, S, hidden), without running it (tokens that left at an earlier depth);
        ``depth``, ``position_embeddings`` and ``check_depth`` as :meth:`forward`."""
        index = self._token_adapter_index(depth, hidden_states, check_depth)
        return self.self_attn.key_value(self.input_layernorm(hidden_states), position_embeddings, index,
                                        check_indices=False)

    def _token_adapter_index(self, depth: Union[int, Tensor], hidden_states: Tensor, check_depth: bool) -> Union[int, Tensor]:
        """:meth:`adapter_index`, with a depth per sequence (B,) repeated over its tokens (B, S)."""
        index = self.adapter_index(depth, check_depth)
        if isinstance(index, Tensor) and index.dim() == 1:
            index = index[:, None].expand(hidden_states.shape[:2])
        return index

    def extra_repr(self) -> str:
        return f"block_index={self.block_index}"
