"""``RMSNorm`` and ``RecursiveBlock``: one shared pre-norm block, called with the adapter of the depth it runs at."""

from __future__ import annotations

from typing import Optional, Tuple, Union

import torch
from torch import Tensor, nn

from recursive_kernels.backends import accumulation_dtype

from ..cache import KVCache, LayerKV, SharedKeyValue, VarlenPacking
from ..config import ATTENTION_TARGETS, FEED_FORWARD_TARGETS, RecursiveConfig
from .attention import CircuitAttention
from .feed_forward import GatedFeedForward, MoLFeedForward


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dim, computed in float32 (float64 for float64 inputs).

    ``unit_offset=False`` (Llama): ``weight * normed``, weight initialised to ones, the product taken
    after casting back to the input dtype. ``unit_offset=True`` (Gemma): ``normed * (1 + weight)`` in the
    compute dtype, weight initialised to zeros. ``weight=False``: no gain, ``normed`` cast back (HRM-Text).
    All as in Hugging Face, so converted weights match.
    """

    def __init__(self, hidden_size: int, eps: float = 1e-6, unit_offset: bool = False, weight: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__()
        self.eps, self.unit_offset, self.hidden_size = eps, unit_offset, hidden_size
        if weight:
            init = torch.zeros if unit_offset else torch.ones
            self.weight = nn.Parameter(init(hidden_size, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def forward(self, x: Tensor) -> Tensor:
        """(*, hidden) -> (*, hidden)."""
        compute = accumulation_dtype(x.dtype)
        h = x.to(compute)
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        if self.weight is None:
            return h.to(x.dtype)
        if self.unit_offset:
            return (h * (1.0 + self.weight.to(compute))).to(x.dtype)
        return self.weight * h.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.hidden_size}, eps={self.eps}, unit_offset={self.unit_offset}, weight={self.weight is not None}"


class RecursiveBlock(nn.Module):
    """One shared pre-norm transformer block, called with the adapter of the depth it runs at (``indices``).

    ``x + attn(norm(x))``, then ``+ mlp(norm(.))`` (or with a second norm per sublayer: ``config.block_norms``);
    attention is :class:`CircuitAttention`, the MLP a :class:`GatedFeedForward` or, for relaxation "mol", a
    :class:`MoLFeedForward`. The block of
    ``block_index`` holds per-depth parameters for its own effective layers from ``start_index`` on
    (``config.depth_layers_of_block``): adapter ``i`` belongs to the i-th of them, so its LoRA
    tensors have E = that many adapters (:meth:`adapter_index` maps effective layers to them). Any other layer
    runs the shared weights unmodified (index -1).

    Parameter names follow Hugging Face's decoder layer (``input_layernorm``, ``self_attn.{q,k,v,o}_proj``,
    ``post_attention_layernorm``, ``mlp.{gate,up,down}_proj``; Ouro's ``input_layernorm_2`` and
    ``post_attention_layernorm_2``) so converted checkpoints map by name.
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
        norm = {"eps": config.rms_norm_eps, "unit_offset": config.norm_unit_offset, "weight": config.norm_weight}
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = CircuitAttention(
            config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim,
            qkv_bias=config.qkv_bias or (("q", "k") if config.qk_bias else False),
            output_gate=config.attention_output_gate, causal=causal,
            num_depths=len(depth_layers), lora_rank=attention_ranks,
            lora_alpha=config.lora_alpha, circuit_rank=config.circuit_rank if config.relaxation == "circuit" else 0,
            backend=config.backend,
        )
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.block_norms = config.block_norms
        if config.block_norms != "pre":  # the second norm of each sublayer (Ouro's and Huginn's names differ)
            self.input_layernorm_2 = RMSNorm(config.hidden_size, **norm)
            self.post_attention_layernorm_2 = RMSNorm(config.hidden_size, **norm)
        else:
            self.register_module("input_layernorm_2", None)
            self.register_module("post_attention_layernorm_2", None)
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

    def reset_buffers(self, device=None) -> None:
        """Write the layer -> adapter table anew on ``device`` (after ``to_empty``, which leaves buffers uninitialised,
        or a build on the meta device)."""
        self.register_buffer("adapter_of_layer", torch.tensor(self._adapter_of_layer, device=device),
                             persistent=False)

    def adapter_index(self, depth: Union[int, Tensor], check_indices: bool = True) -> Union[int, Tensor]:
        """This block's adapter for effective layer ``depth`` (an int, or an int tensor of any shape): -1 where
        the layer has no per-depth parameters here; the ``indices`` :meth:`forward` takes. A tensor's values
        are read on the host to check them only when ``check_indices``."""
        if isinstance(depth, int) and not isinstance(depth, bool):
            if not 0 <= depth < self.num_layers:
                raise ValueError(f"depth: expected an effective layer in [0, {self.num_layers}), got {depth}")
            return self._adapter_of_layer[depth]
        if not isinstance(depth, Tensor) or depth.dtype.is_floating_point or depth.dtype == torch.bool:
            raise ValueError(f"depth: expected an int or an integer tensor, got {depth!r}")
        if check_indices and depth.numel() and not torch.compiler.is_compiling():
            low, high = (int(t) for t in torch.aminmax(depth))
            if low < 0 or high >= self.num_layers:
                raise ValueError(f"depth: values must be effective layers in [0, {self.num_layers}), got {low}..{high}")
        return self.adapter_of_layer[depth]

    def forward(
        self,
        hidden_states: Tensor,
        indices: Union[int, Tensor],
        position_embeddings: Tuple[Tensor, Tensor],
        packing: Optional[VarlenPacking] = None,
        past_key_value: Optional[KVCache] = None,
        use_cache: bool = False,
        *,
        check_indices: bool = True,
        shared_key_value: Optional[SharedKeyValue] = None,
    ) -> Tuple[Tensor, Optional[LayerKV], Optional[Tensor]]:
        """Args:
            hidden_states: (B, S, hidden).
            indices: the per-depth adapter of this block to run with (:meth:`adapter_index` of the effective
                layer): an int for the whole batch (-1: none, the shared weights alone), or an int tensor (B,)
                or (B, S) per row (tokens at different depths in one batch).
            position_embeddings, packing, past_key_value, use_cache: as :meth:`CircuitAttention.forward`.
            check_indices: False trusts a tensor ``indices`` to lie in [-1, E) (no host read of its values, a
                synchronisation on the GPU), as every op and module of the package takes it.
            shared_key_value: the attention attends over these instead of its own keys and values
                (:meth:`CircuitAttention.forward`).

        Returns:
            ``(hidden_states, present, aux_loss)``: (B, S, hidden), the extended cache (None unless
            ``use_cache``) and the MoL load-balancing loss (None without a mixture).
        """
        indices = self._per_token(indices, hidden_states)
        attn_out, present = self.self_attn(
            self.input_layernorm(hidden_states), position_embeddings, indices, packing, past_key_value, use_cache,
            check_indices=check_indices, shared_key_value=shared_key_value,
        )
        hidden_states = self._residual(hidden_states, attn_out, self.input_layernorm_2)
        normed = self.post_attention_layernorm(hidden_states)
        aux_loss = None
        if isinstance(self.mlp, MoLFeedForward):
            mlp_out, aux_loss = self.mlp(normed, None if packing is None else packing.query_mask)
        else:
            mlp_out = self.mlp(normed, indices if self._per_depth_mlp else None, check_indices=False)
        return self._residual(hidden_states, mlp_out, self.post_attention_layernorm_2), present, aux_loss

    def _residual(self, hidden_states: Tensor, out: Tensor, second_norm: Optional[RMSNorm]) -> Tensor:
        """A sublayer's output ``out`` added to its input by ``config.block_norms``."""
        if self.block_norms == "pre_and_output":
            return hidden_states + second_norm(out)
        if self.block_norms == "pre_and_residual":
            return second_norm(hidden_states + out)
        return hidden_states + out

    def key_value(self, hidden_states: Tensor, indices: Union[int, Tensor], position_embeddings: Tuple[Tensor, Tensor],
                  *, check_indices: bool = True) -> LayerKV:
        """The keys and values this block appends to a cache for ``hidden_states`` (B, S, hidden) with adapter
        ``indices``, without running it (tokens that left at an earlier depth); the arguments as
        :meth:`forward`."""
        return self.self_attn.key_value(self.input_layernorm(hidden_states), position_embeddings,
                                        self._per_token(indices, hidden_states), check_indices=check_indices)

    @staticmethod
    def _per_token(indices: Union[int, Tensor], hidden_states: Tensor) -> Union[int, Tensor]:
        """An index per sequence (B,) repeated over its tokens (B, S)."""
        if isinstance(indices, Tensor) and indices.dim() == 1:
            return indices[:, None].expand(hidden_states.shape[:2])
        return indices

    def extra_repr(self) -> str:
        return f"block_index={self.block_index}"
