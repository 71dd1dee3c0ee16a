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
- :class:`RecursiveBlock`: one shared pre-norm block, called with the effective layer it runs as;
  :class:`RMSNorm`.

The caches attention reads live in :mod:`recursive.cache`.
"""

from .attention import CircuitAttention
from .block import RecursiveBlock, RMSNorm
from .feed_forward import GatedFeedForward, MoLFeedForward
from .functional import activation, rotary_embedding, rotary_rows
from .linear import LowRankLinear

__all__ = ["CircuitAttention", "GatedFeedForward", "LowRankLinear", "MoLFeedForward", "RMSNorm", "RecursiveBlock",
           "activation", "rotary_embedding", "rotary_rows"]
