"""``RecursiveConfig``: the architecture of a recursive (weight-sharing) transformer, as a JSON-able dataclass.

Effective depth ``num_layers`` (L) runs over ``num_blocks`` (B) unique blocks; effective layer ``l`` uses
block ``block_of_layer(l)``:

- ``"cycle"``: ``l mod B``;
- ``"sequence"``: ``l // (L / B)``;
- ``"middle_cycle"``: the first and the last layers own blocks 0 and B - 1, the middle L - 2 layers
  cycle over blocks 1 .. B - 2.

``relaxation`` gives depth back some freedom:

- ``"none"``: every use of a block is identical;
- ``"depth_lora"``: a LoRA per effective layer on each of ``lora_targets`` (Relaxed Recursive
  Transformers);
- ``"qkov_lora"``: the same on the attention projections q, k, v, o only (depth as modulation);
- ``"circuit"``: rank-``circuit_rank`` factors per depth and head at the attention's logit (QK) and
  value (OV) sites (depth as modulation);
- ``"mol"``: a mixture of ``num_experts`` LoRA experts in the feed-forward projections, top
  ``num_experts_per_tok`` per token (ModernALBERT); the experts belong to the block, shared by depth.

The per-depth relaxations (all but ``"mol"``) leave the layers before ``start_index`` unmodified.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields
from typing import Any, Dict, List, Optional, Tuple, Union

from kernels.backends import BACKENDS

SHARING_SCHEMES = ("cycle", "sequence", "middle_cycle")
RELAXATIONS = ("none", "depth_lora", "qkov_lora", "circuit", "mol")
ACTIVATIONS = ("silu", "gelu", "gelu_pytorch_tanh")
ATTENTION_TARGETS = ("q", "k", "v", "o")
FEED_FORWARD_TARGETS = ("gate", "up", "down")
LORA_TARGETS = ATTENTION_TARGETS + FEED_FORWARD_TARGETS
ENCODER_HEADS = ("mlm", "sequence_classification")
CLASSIFIER_POOLINGS = ("mean", "cls")

# The projections each LoRA relaxation may target, and its default targets.
_ALLOWED_TARGETS = {"depth_lora": LORA_TARGETS, "qkov_lora": ATTENTION_TARGETS, "mol": FEED_FORWARD_TARGETS}


@dataclass
class RecursiveConfig:
    """Sizes, sharing scheme and relaxation of a recursive transformer (see the module docstring).

    Field names follow Hugging Face's Llama config where one exists. ``None`` in
    ``num_key_value_heads``, ``head_dim`` and ``lora_targets`` is resolved on construction (to the
    number of heads, ``hidden_size // num_attention_heads`` and the relaxation's default targets), so
    the JSON form always holds concrete values.

    Attributes:
        vocab_size, hidden_size, intermediate_size: the usual sizes.
        num_attention_heads, num_key_value_heads: query heads and key/value heads (grouped-query
            attention when fewer).
        head_dim: per-head width; may differ from ``hidden_size / num_attention_heads`` (Gemma).
        num_layers: effective depth L.
        num_blocks: unique blocks B; L must be a multiple of B (``middle_cycle``: L - 2 of B - 2).
        sharing: ``"cycle"``, ``"sequence"`` or ``"middle_cycle"``.
        relaxation: ``"none"``, ``"depth_lora"``, ``"qkov_lora"``, ``"circuit"`` or ``"mol"``.
        lora_rank: rank of every targeted projection, or a dict from target to rank.
        lora_alpha: LoRA alpha; the scaling is ``lora_alpha / rank`` (PEFT's convention).
        lora_targets: projections carrying LoRA, among "q", "k", "v", "o", "gate", "up", "down"
            (default: all seven for depth_lora, q/k/v/o for qkov_lora, gate/up/down for mol).
        start_index: per-depth relaxations modify layers ``start_index .. L - 1`` only.
        circuit_rank: rank of the QK/OV circuit factors (relaxation "circuit").
        num_experts, num_experts_per_tok, router_aux_loss_coef: the mixture of LoRAs (relaxation
            "mol"); the load-balancing loss enters the training loss with this coefficient.
        hidden_act: ``"silu"`` (SwiGLU), ``"gelu"`` or ``"gelu_pytorch_tanh"`` (GeGLU; Gemma's is tanh).
        rms_norm_eps: RMSNorm epsilon.
        norm_unit_offset: RMSNorm scales by ``1 + weight`` (Gemma) instead of ``weight``.
        rope_theta: RoPE base (rotate-half convention, as Hugging Face Llama).
        qkv_bias: biases on the q, k and v projections (Qwen2).
        tie_word_embeddings: the output projection shares the input embedding matrix.
        embed_scale: the embeddings are multiplied by this (Gemma: ``sqrt(hidden_size)``).
        embedding_size: factorised embeddings (ALBERT): tokens embed to this width, then a projection
            to ``hidden_size``; encoder only. None: embed straight to ``hidden_size``.
        encoder_head: the head of ``RecursiveEncoder``: ``"mlm"`` or ``"sequence_classification"``.
        num_labels: classes of the sequence-classification head (1: regression with a squared error).
        classifier_pooling: ``"mean"`` over the unpadded tokens, or ``"cls"`` (the first token).
        initializer_range: standard deviation of the normal init of projections and embeddings.
        backend: kernels backend for every op ("triton", "cuda", "cpp", "torch"); None: automatic.
    """

    vocab_size: int = 32000
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_attention_heads: int = 8
    num_key_value_heads: Optional[int] = None
    head_dim: Optional[int] = None
    num_layers: int = 8
    num_blocks: int = 1
    sharing: str = "cycle"
    relaxation: str = "none"
    lora_rank: Union[int, Dict[str, int]] = 8
    lora_alpha: float = 8.0
    lora_targets: Optional[Tuple[str, ...]] = None
    start_index: int = 0
    circuit_rank: int = 8
    num_experts: int = 8
    num_experts_per_tok: int = 2
    router_aux_loss_coef: float = 0.01
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    norm_unit_offset: bool = False
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    tie_word_embeddings: bool = False
    embed_scale: float = 1.0
    embedding_size: Optional[int] = None
    encoder_head: str = "mlm"
    num_labels: int = 2
    classifier_pooling: str = "mean"
    initializer_range: float = 0.02
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_layers", "num_blocks"):
            _check_positive_int(name, getattr(self, name))
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        _check_positive_int("num_key_value_heads", self.num_key_value_heads)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} must divide num_attention_heads ({self.num_attention_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"head_dim: hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                    f"({self.num_attention_heads}); give head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        _check_positive_int("head_dim", self.head_dim)
        if self.head_dim % 2:
            raise ValueError(f"head_dim: rotary embeddings need an even head_dim, got {self.head_dim}")
        _check_choice("sharing", self.sharing, SHARING_SCHEMES)
        self._check_sharing()
        _check_choice("relaxation", self.relaxation, RELAXATIONS)
        _check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        _check_choice("encoder_head", self.encoder_head, ENCODER_HEADS)
        _check_choice("classifier_pooling", self.classifier_pooling, CLASSIFIER_POOLINGS)
        self._resolve_lora()
        if not isinstance(self.start_index, int) or not 0 <= self.start_index <= self.num_layers:
            raise ValueError(f"start_index: expected an int in [0, num_layers={self.num_layers}], got {self.start_index!r}")
        _check_positive_int("circuit_rank", self.circuit_rank, allow_zero=True)
        _check_positive_int("num_experts", self.num_experts)
        _check_positive_int("num_experts_per_tok", self.num_experts_per_tok)
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok: {self.num_experts_per_tok} exceeds num_experts ({self.num_experts})")
        if self.embedding_size is not None:
            _check_positive_int("embedding_size", self.embedding_size)
        _check_positive_int("num_labels", self.num_labels)
        if self.backend is not None:
            _check_choice("backend", self.backend, BACKENDS)

    def _check_sharing(self) -> None:
        L, B = self.num_layers, self.num_blocks
        if self.sharing == "middle_cycle":
            if B < 3 or L < B or (L - 2) % (B - 2):
                raise ValueError(
                    f"num_blocks: middle_cycle needs 3 <= num_blocks <= num_layers and num_layers - 2 a multiple of "
                    f"num_blocks - 2, got num_layers={L}, num_blocks={B}"
                )
        elif L % B:
            raise ValueError(f"num_blocks: num_layers ({L}) must be a multiple of num_blocks ({B})")

    def _resolve_lora(self) -> None:
        allowed = _ALLOWED_TARGETS.get(self.relaxation, ())
        if self.lora_targets is None:
            self.lora_targets = allowed
        self.lora_targets = tuple(self.lora_targets)
        for target in self.lora_targets:
            if target not in allowed:
                raise ValueError(
                    f"lora_targets: {target!r} is not a target of relaxation {self.relaxation!r} (allowed: {allowed})"
                )
        if isinstance(self.lora_rank, dict):
            for target, rank in self.lora_rank.items():
                if target not in self.lora_targets:
                    raise ValueError(f"lora_rank: {target!r} is not in lora_targets {self.lora_targets}")
                _check_positive_int(f"lora_rank[{target!r}]", rank, allow_zero=True)
            missing = [t for t in self.lora_targets if t not in self.lora_rank]
            if missing:
                raise ValueError(f"lora_rank: no rank for the targets {missing}")
        else:
            _check_positive_int("lora_rank", self.lora_rank, allow_zero=True)
        if not isinstance(self.lora_alpha, (int, float)) or isinstance(self.lora_alpha, bool):
            raise ValueError(f"lora_alpha: expected a number, got {self.lora_alpha!r}")

    # The layer plan.

    def block_of_layer(self, layer: int) -> int:
        """The block that effective layer ``layer`` (in [0, num_layers)) runs."""
        L, B = self.num_layers, self.num_blocks
        if not 0 <= layer < L:
            raise ValueError(f"layer: expected an effective layer in [0, {L}), got {layer}")
        if self.sharing == "cycle":
            return layer % B
        if self.sharing == "sequence":
            return layer // (L // B)
        if layer == 0 or layer == L - 1:
            return 0 if layer == 0 else B - 1
        return 1 + (layer - 1) % (B - 2)

    def layers_of_block(self, block: int) -> List[int]:
        """The effective layers that run ``block``, in order of depth."""
        if not 0 <= block < self.num_blocks:
            raise ValueError(f"block: expected a block in [0, {self.num_blocks}), got {block}")
        return [layer for layer in range(self.num_layers) if self.block_of_layer(layer) == block]

    @property
    def per_depth(self) -> bool:
        """Whether the relaxation gives each effective layer its own parameters."""
        return self.relaxation in ("depth_lora", "qkov_lora", "circuit")

    def depth_layers_of_block(self, block: int) -> List[int]:
        """The effective layers of ``block`` that own per-depth parameters (those from ``start_index``
        on, for a per-depth relaxation), in order of depth: adapter ``i`` of the block is the i-th."""
        if not self.per_depth:
            return []
        return [layer for layer in self.layers_of_block(block) if layer >= self.start_index]

    def lora_rank_of(self, target: str) -> int:
        """The LoRA rank of projection ``target`` ("q", ..., "down"); 0 when it is not targeted."""
        if target not in LORA_TARGETS:
            raise ValueError(f"target: expected one of {LORA_TARGETS}, got {target!r}")
        if target not in self.lora_targets:
            return 0
        return self.lora_rank[target] if isinstance(self.lora_rank, dict) else self.lora_rank

    # JSON.

    def to_dict(self) -> Dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Dict[str, Any]) -> "RecursiveConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"values: unknown config fields {unknown}")
        return cls(**values)

    def to_json_string(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n"

    @classmethod
    def from_json_string(cls, text: str) -> "RecursiveConfig":
        return cls.from_dict(json.loads(text))


def _check_positive_int(name: str, value: Any, allow_zero: bool = False) -> None:
    low = 0 if allow_zero else 1
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")


def _check_choice(name: str, value: Any, choices: Tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
