"""``RecursiveConfig``: the architecture of a recursive (weight-sharing) transformer, as a JSON-able dataclass.

Effective depth ``num_layers`` (L) runs over ``num_blocks`` (B) unique blocks; effective layer ``l`` uses
block ``block_of_layer(l)``:

- ``"cycle"``: ``l mod B``;
- ``"sequence"``: ``l // (L / B)``;
- ``"middle_cycle"``: the first P = ``prelude_layers`` layers own blocks 0 .. P - 1 and the last C =
  ``coda_layers`` the blocks B - C .. B - 1; the middle L - P - C layers cycle over the blocks between (Huginn's
  prelude, recurrent core and coda);
- ``"hierarchical"`` (HRM-LM): blocks 0 .. B/2 - 1 form a fast module and blocks B/2 .. B - 1 a slow one;
  each cycle runs the fast module ``hrm_period`` (T) times, then the slow module once, so a cycle is
  ``(T + 1) * B / 2`` effective layers. The data flow differs from a plain stack: the fast state is
  updated ``z_L <- f_L(z_L + z_H + x)`` (x the embeddings), the slow one ``z_H <- f_H(z_H + z_L)``, both
  starting at zero, and the output reads ``z_H``. Its parameter-matched Universal Transformer baseline
  loops one block (``"cycle"``, B = 1). ``hrm_flow="hrm_text"`` is Sapient's HRM-Text instead: the slow
  state starts at the embeddings and the fast one at a stored vector ``z_L_init`` (``RecursiveModel.fast_init``),
  the fast update adds the slow state only (``z_L <- f_L(z_L + z_H)``), each module application ends with the
  norm (``RecursiveModel.norm``), and the output is the slow state as the last one left it (no further norm).

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

``mor_routing`` makes the model a Mixture-of-Recursions: the loops over the shared blocks
(:meth:`RecursiveConfig.recursions`) become recursions that each token takes or not. A recursion step
updates its selected tokens ``h <- h + g * (F(h) - h)`` (F the recursion's blocks, run on the selected
tokens only, which attend to each other: recursion-wise KV, or with ``mor_kv_sharing`` to the first
recursion's keys and values of every token it ran) and leaves the others unchanged:

- ``"expert_choice"``: before recursion r a router scores the tokens still active,
  ``g = mor_router_alpha * sigmoid(w_r . h)``, and the top ``mor_capacities[r]`` fraction of each
  sequence's real tokens stays (tokens keep their order; a token left out never returns). The top-k
  runs over the whole sequence, so a token's path depends on the tokens after it, as in the paper;
  an auxiliary loss (``mor_router_loss_coef``: binary cross-entropy of ``sigmoid(w_r . h)`` against
  "kept") teaches each router to tell alone, and ``mor_threshold_routing`` then keeps the active tokens
  whose ``sigmoid(w_r . h)`` reaches 1/2 instead (causal; recursions of capacity 1 keep every token).
- ``"token_choice"``: before the first recursion one router assigns each token a depth,
  ``p = softmax(W h)``, depth ``d = argmax p + 1``; the token runs recursions 0 .. d - 1 and the last of
  them is gated by ``g = mor_router_alpha * p[d - 1]`` (the earlier ones ungated). A balancing loss
  (``mor_balance_loss_coef``) keeps the depths in use.

Both add a router z-loss (``mor_z_loss_coef``) to the training loss.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields, replace
from typing import Any, Dict, List, Optional, Tuple, Union

from recursive_kernels.backends import BACKENDS

from .checks import check_choice, check_int, is_number

SHARING_SCHEMES = ("cycle", "sequence", "middle_cycle", "hierarchical")
HRM_FLOWS = ("hrm_lm", "hrm_text")
BLOCK_NORMS = ("pre", "pre_and_output", "pre_and_residual")
INJECTIONS = ("none", "linear")
MOR_ROUTINGS = ("expert_choice", "token_choice")
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
        num_blocks: unique blocks B; L must be a multiple of B (``middle_cycle``: L - P - C of B - P - C;
            ``hierarchical``: B even and L a multiple of the cycle ``(hrm_period + 1) * B / 2``).
        sharing: ``"cycle"``, ``"sequence"``, ``"middle_cycle"`` or ``"hierarchical"``.
        prelude_layers, coda_layers: ``middle_cycle``: the layers before and after the cycled ones (P, C), each
            with its own block.
        injection: ``middle_cycle``: ``"none"`` (one residual stream through every layer) or ``"linear"`` (Huginn's
            recurrent depth): the cycled layers run on a state of their own, which starts at zero or random
            (``core_state_std``) and is ``adapter([state, e])`` before each pass (``e`` the prelude's output,
            ``RecursiveModel.adapter`` a linear map from twice the width); after the last pass the model's norm, then
            the coda on that state and the final norm (the same norm again).
        core_state_std: ``injection="linear"``: the state starts as a truncated normal draw (std ``core_state_std``,
            cut at 3 std) times ``embed_scale``, from torch's global generator, per forward and per decoded token
            (Huginn's ``like-init``); 0: zeros.
        hrm_period: ``hierarchical``: fast-module steps per slow-module step (T).
        hrm_one_step_gradient: ``hierarchical``: when autograd records, every step but the last fast
            and the last slow module runs without gradient (HRM's one-step gradient approximation).
        hrm_flow: ``hierarchical``: ``"hrm_lm"`` or ``"hrm_text"`` (the module docstring).
        hrm_fast_grad_cycles: ``hierarchical``: HRM-Text's ``L_bp_cycles``: cycle c records the gradient of
            its last ``n_c`` fast module applications only (the earlier ones run without gradient; the slow
            module always records); the list is left-padded with 1s to one entry per cycle. None: all record.
        mor_routing: None, ``"expert_choice"`` or ``"token_choice"`` (Mixture-of-Recursions; the
            module docstring). Needs recursions: ``cycle`` or ``middle_cycle`` sharing, or one block.
        mor_capacities: ``expert_choice``: the fraction of each sequence's tokens kept at each recursion,
            non-increasing, in (0, 1]; default ``(N - r) / N`` for recursion r of N.
        mor_router_alpha: the routers' gate scale (alpha).
        mor_balance_loss_coef: weight of the token-choice balancing loss in the training loss.
        mor_z_loss_coef: weight of the router z-loss in the training loss.
        mor_router_loss_coef: ``expert_choice``: weight of the routers' auxiliary loss (the module
            docstring) in the training loss.
        mor_threshold_routing: ``expert_choice``: route by the routers' own 1/2 threshold, not the
            top-k (causal; for generation, after training with ``mor_router_loss_coef``).
        mor_kv_sharing: the later recursions attend over the first recursion's keys and values (each
            layer of a recursion over those of the same layer of the first) instead of their own
            selected tokens' (recursion-wise); not with the QK/OV circuit.
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
        norm_weight: the RMSNorms have a gain (False: weightless norms, HRM-Text).
        block_norms: where a block norms: ``"pre"`` (Llama: ``x + f(norm(x))``), ``"pre_and_output"`` (Ouro's
            sandwich: ``x + norm_2(f(norm(x)))``) or ``"pre_and_residual"`` (Huginn: ``norm_2(x + f(norm(x)))``),
            for attention and MLP alike; the second norms are ``input_layernorm_2`` and ``post_attention_layernorm_2``.
        loop_norm: the model's norm ends every loop, and its output is the next loop's input (Ouro); the last
            loop's is the output (no further norm).
        exit_gate: Ouro's learned exit gate, ``lambda_t = sigmoid(exit_gate(h_t))`` on each loop's output ``h_t``
            (after its norm): the exit distribution ``p_t = lambda_t prod_{s<t} (1 - lambda_s)`` (the last loop
            takes the rest). With labels the causal LM then trains on Ouro's objective, the expected loss over
            ``p`` minus ``exit_entropy_coef`` times its entropy. Needs a plain stack of several loops.
        exit_entropy_coef: the entropy regulariser's weight (beta) in that objective.
        norm_unit_offset: RMSNorm scales by ``1 + weight`` (Gemma) instead of ``weight``.
        rope_theta: RoPE base (rotate-half convention, as Hugging Face Llama).
        qkv_bias: biases on the q, k and v projections (Qwen2).
        qk_bias: biases on the q and k projections only (Huginn).
        attention_output_gate: the attention output is gated per channel, ``sigmoid(gate_proj(x)) * attn``,
            before ``o_proj`` (HRM-Text).
        prefix_lm: a first forward may take ``token_type_ids``: the tokens of type 1, one contiguous span of
            each row's real tokens, attend to each other both ways, the rest causally (HRM-Text's prefix LM).
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
    prelude_layers: int = 1
    coda_layers: int = 1
    injection: str = "none"
    core_state_std: float = 0.0
    hrm_period: int = 2
    hrm_one_step_gradient: bool = False
    hrm_flow: str = "hrm_lm"
    hrm_fast_grad_cycles: Optional[Tuple[int, ...]] = None
    mor_routing: Optional[str] = None
    mor_capacities: Optional[Tuple[float, ...]] = None
    mor_router_alpha: float = 1.0
    mor_balance_loss_coef: float = 0.01
    mor_z_loss_coef: float = 0.001
    mor_router_loss_coef: float = 0.0
    mor_threshold_routing: bool = False
    mor_kv_sharing: bool = False
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
    norm_weight: bool = True
    block_norms: str = "pre"
    loop_norm: bool = False
    exit_gate: bool = False
    exit_entropy_coef: float = 0.05
    rope_theta: float = 10000.0
    qkv_bias: bool = False
    qk_bias: bool = False
    attention_output_gate: bool = False
    prefix_lm: bool = False
    tie_word_embeddings: bool = False
    embed_scale: float = 1.0
    embedding_size: Optional[int] = None
    encoder_head: str = "mlm"
    num_labels: int = 2
    classifier_pooling: str = "mean"
    initializer_range: float = 0.02
    backend: Optional[str] = None

    def __post_init__(self) -> None:
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_attention_heads", "num_layers",
                     "num_blocks"):
            check_int(name, getattr(self, name), 1)
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        check_int("num_key_value_heads", self.num_key_value_heads, 1)
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_key_value_heads: {self.num_key_value_heads} must divide num_attention_heads "
                f"({self.num_attention_heads})"
            )
        if self.head_dim is None:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"head_dim: hidden_size ({self.hidden_size}) is not a multiple of num_attention_heads "
                    f"({self.num_attention_heads}); give head_dim"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        check_int("head_dim", self.head_dim, 1)
        if self.head_dim % 2:
            raise ValueError(f"head_dim: rotary embeddings need an even head_dim, got {self.head_dim}")
        check_choice("sharing", self.sharing, SHARING_SCHEMES)
        check_int("hrm_period", self.hrm_period, 1)
        for name in ("hrm_one_step_gradient", "norm_weight", "attention_output_gate", "prefix_lm", "loop_norm",
                     "exit_gate", "qk_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        self._check_sharing()
        self._check_hierarchical()
        check_choice("block_norms", self.block_norms, BLOCK_NORMS)
        self._resolve_mor()
        check_choice("relaxation", self.relaxation, RELAXATIONS)
        check_choice("hidden_act", self.hidden_act, ACTIVATIONS)
        check_choice("encoder_head", self.encoder_head, ENCODER_HEADS)
        check_choice("classifier_pooling", self.classifier_pooling, CLASSIFIER_POOLINGS)
        self._resolve_lora()
        if not isinstance(self.start_index, int) or not 0 <= self.start_index <= self.num_layers:
            raise ValueError(f"start_index: expected an int in [0, num_layers={self.num_layers}], "
                             f"got {self.start_index!r}")
        check_int("circuit_rank", self.circuit_rank, 0)
        check_int("num_experts", self.num_experts, 1)
        check_int("num_experts_per_tok", self.num_experts_per_tok, 1)
        if self.num_experts_per_tok > self.num_experts:
            raise ValueError(f"num_experts_per_tok: {self.num_experts_per_tok} exceeds num_experts "
                             f"({self.num_experts})")
        if self.embedding_size is not None:
            check_int("embedding_size", self.embedding_size, 1)
        check_int("num_labels", self.num_labels, 1)
        self._check_injection()
        self._check_loops()
        if self.backend is not None:
            check_choice("backend", self.backend, BACKENDS)

    def _check_sharing(self) -> None:
        L, B = self.num_layers, self.num_blocks
        for name in ("prelude_layers", "coda_layers"):
            check_int(name, getattr(self, name), 1)
            if getattr(self, name) != 1 and self.sharing != "middle_cycle":
                raise ValueError(f"{name}: only middle_cycle sharing has a prelude and a coda")
        if self.sharing == "middle_cycle":
            ends = self.prelude_layers + self.coda_layers
            if B < ends + 1 or L < B or (L - ends) % (B - ends):
                raise ValueError(
                    f"num_blocks: middle_cycle needs prelude_layers + coda_layers < num_blocks <= num_layers and "
                    f"num_layers - {ends} a multiple of num_blocks - {ends}, got num_layers={L}, num_blocks={B}"
                )
        elif self.sharing == "hierarchical":
            if B % 2 or L % self.hrm_cycle_length:
                raise ValueError(
                    f"num_blocks: hierarchical sharing needs an even num_blocks (fast and slow modules of B/2 blocks) "
                    f"and num_layers a multiple of the cycle (hrm_period + 1) * B / 2 = {self.hrm_cycle_length}, "
                    f"got num_layers={L}, num_blocks={B}"
                )
        elif L % B:
            raise ValueError(f"num_blocks: num_layers ({L}) must be a multiple of num_blocks ({B})")

    def _check_hierarchical(self) -> None:
        check_choice("hrm_flow", self.hrm_flow, HRM_FLOWS)
        hierarchical = self.sharing == "hierarchical"
        if not hierarchical:
            for name in ("hrm_one_step_gradient", "hrm_fast_grad_cycles"):
                if getattr(self, name):
                    raise ValueError(f"{name}: given without sharing='hierarchical'")
            if self.hrm_flow != "hrm_lm":
                raise ValueError(f"hrm_flow: {self.hrm_flow!r} needs sharing='hierarchical'")
        if self.norm_unit_offset and not self.norm_weight:
            raise ValueError("norm_unit_offset: a weightless norm (norm_weight=False) has no gain to offset")
        if self.hrm_fast_grad_cycles is None:
            return
        self.hrm_fast_grad_cycles = tuple(self.hrm_fast_grad_cycles)
        cycles = self.num_layers // self.hrm_cycle_length
        if self.hrm_one_step_gradient:
            raise ValueError("hrm_fast_grad_cycles: choose it or hrm_one_step_gradient, not both")
        if len(self.hrm_fast_grad_cycles) > cycles or any(
                isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= self.hrm_period
                for n in self.hrm_fast_grad_cycles):
            raise ValueError(f"hrm_fast_grad_cycles: expected at most {cycles} counts (one per cycle) in "
                             f"[0, hrm_period={self.hrm_period}], got {self.hrm_fast_grad_cycles!r}")

    def _check_injection(self) -> None:
        check_choice("injection", self.injection, INJECTIONS)
        if self.injection != "none" and (self.sharing != "middle_cycle" or self.mor_routing is not None):
            raise ValueError("injection: the recurrent core's own state belongs to middle_cycle sharing (prelude, "
                             "core, coda), without Mixture-of-Recursions")
        if not is_number(self.core_state_std) or self.core_state_std < 0:
            raise ValueError(f"core_state_std: expected a finite number >= 0, got {self.core_state_std!r}")
        if self.core_state_std and self.injection == "none":
            raise ValueError("core_state_std: only the recurrent core of injection='linear' has a state to start")
        if self.qk_bias and self.qkv_bias:
            raise ValueError("qk_bias: qkv_bias already gives q and k biases (and v's); choose one")

    def _check_loops(self) -> None:
        if self.loop_norm and (self.sharing == "hierarchical" or self.mor_routing is not None):
            raise ValueError("loop_norm: the norm after every loop belongs to a plain stack of loops, not to "
                             "hierarchical sharing or a Mixture-of-Recursions")
        if self.exit_gate:
            self.check_loop_boundaries("exit_gate")
        if not is_number(self.exit_entropy_coef) or self.exit_entropy_coef < 0:
            raise ValueError(f"exit_entropy_coef: expected a finite number >= 0, got {self.exit_entropy_coef!r}")

    def fast_grad_applications(self) -> Tuple[int, ...]:
        """``hierarchical``: per cycle, how many of its last fast module applications record the gradient
        (``hrm_fast_grad_cycles`` left-padded with 1s; all of them when it is None)."""
        cycles = self.num_layers // self.hrm_cycle_length
        if self.hrm_fast_grad_cycles is None:
            return (self.hrm_period,) * cycles
        given = self.hrm_fast_grad_cycles
        return (1,) * (cycles - len(given)) + given

    def _resolve_mor(self) -> None:
        for name in ("mor_kv_sharing", "mor_threshold_routing"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: expected a bool, got {getattr(self, name)!r}")
        if self.mor_routing is None:
            for name in ("mor_capacities", "mor_kv_sharing", "mor_threshold_routing"):
                if getattr(self, name):
                    raise ValueError(f"{name}: given without mor_routing")
            return
        if self.mor_kv_sharing and self.relaxation == "circuit":
            raise ValueError("mor_kv_sharing: the QK/OV circuit's key corrections belong to their own depth; "
                             "they cannot be shared across recursions")
        check_choice("mor_routing", self.mor_routing, MOR_ROUTINGS)
        if self.sharing not in ("cycle", "middle_cycle") and self.num_blocks > 1:
            raise ValueError(
                f"mor_routing: Mixture-of-Recursions routes tokens over the loops of cycle or middle_cycle sharing "
                f"(or of one block), not over sharing={self.sharing!r} with {self.num_blocks} blocks"
            )
        for name in ("mor_router_alpha", "mor_balance_loss_coef", "mor_z_loss_coef", "mor_router_loss_coef"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < float("inf"):
                raise ValueError(f"{name}: expected a finite number >= 0, got {value!r}")
        if self.mor_routing != "expert_choice":
            if self.mor_threshold_routing:
                raise ValueError("mor_threshold_routing: token choice has no per-recursion router threshold")
            if self.mor_capacities is not None:
                raise ValueError("mor_capacities: only expert_choice routing keeps a capacity per recursion")
            return
        n = len(self.recursions()[1])
        if self.mor_capacities is None:
            self.mor_capacities = tuple((n - r) / n for r in range(n))
        self.mor_capacities = tuple(self.mor_capacities)
        if len(self.mor_capacities) != n or any(
            isinstance(c, bool) or not isinstance(c, (int, float)) or not 0 < c <= 1 for c in self.mor_capacities
        ) or any(b > a for a, b in zip(self.mor_capacities, self.mor_capacities[1:])):
            raise ValueError(
                f"mor_capacities: expected {n} non-increasing fractions in (0, 1], one per recursion, "
                f"got {self.mor_capacities!r}"
            )

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
                check_int(f"lora_rank[{target!r}]", rank, 0)
            missing = [t for t in self.lora_targets if t not in self.lora_rank]
            if missing:
                raise ValueError(f"lora_rank: no rank for the targets {missing}")
        else:
            check_int("lora_rank", self.lora_rank, 0)
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
        if self.sharing == "hierarchical":
            position, module = layer % self.hrm_cycle_length, B // 2
            fast_layers = self.hrm_period * module
            return position % module if position < fast_layers else module + position - fast_layers
        prelude, coda = self.prelude_layers, self.coda_layers
        if layer < prelude:
            return layer
        if layer >= L - coda:
            return B - (L - layer)
        return prelude + (layer - prelude) % (B - prelude - coda)

    def with_num_loops(self, num_loops: int) -> "RecursiveConfig":
        """This config with its loops run ``num_loops`` times (test-time depth): the passes over cycled blocks (the
        middle ones of middle-cycle sharing; HRM's cycles). Only for a model without per-depth parameters (each
        effective layer of a per-depth relaxation owns its own) and without Mixture-of-Recursions (its routers
        score its recursions)."""
        check_int("num_loops", num_loops, 1)
        if self.per_depth or self.mor_routing is not None:
            raise ValueError("num_loops: per-depth relaxations and Mixture-of-Recursions hold parameters per loop; "
                             "their depth is fixed")
        if self.sharing == "hierarchical":
            grad = self.hrm_fast_grad_cycles  # aligned to the last cycles (HRM-Text pads it on the left)
            return replace(self, num_layers=self.hrm_cycle_length * num_loops,
                           hrm_fast_grad_cycles=None if grad is None else grad[-num_loops:])
        if self.sharing == "sequence" and self.num_blocks > 1:
            raise ValueError("num_loops: sequence sharing with several blocks runs its layers as one loop")
        before, loops, after = self.recursions()
        return replace(self, num_layers=len(before) + len(after) + len(loops[0]) * num_loops)

    def loop_length(self) -> int:
        """Effective layers per loop: the shortest period of the block pattern. With cycle sharing the
        ``num_layers / num_blocks`` loops are the passes over the blocks; one shared block (any scheme) loops
        ``num_layers`` times over one layer; sequence sharing with several blocks, middle-cycle sharing and
        untied models run their stack as a single loop. Early exit leaves at loop boundaries."""
        plan = [self.block_of_layer(layer) for layer in range(self.num_layers)]
        L = self.num_layers
        return next(p for p in range(1, L + 1)
                    if L % p == 0 and all(plan[layer] == plan[layer % p] for layer in range(L)))

    def check_loop_boundaries(self, name: str) -> None:
        """Raise ValueError naming ``name`` unless the model runs a plain stack of layers (not hierarchical
        sharing or a Mixture-of-Recursions, whose states flow otherwise) in more than one loop, or Huginn's recurrent
        core in more than one pass: what early exit and the loss at loop boundaries need."""
        if self.sharing == "hierarchical" or self.mor_routing is not None:
            kind = ("hierarchical (HRM), whose fast and slow states flow differently" if self.sharing == "hierarchical"
                    else "a Mixture-of-Recursions, whose routers decide each token's depth")
            raise ValueError(f"{name}: early exit steps through a plain stack of layers; this model is {kind}")
        if self.loop_length() == self.num_layers and (self.injection == "none" or len(self.recursions()[1]) < 2):
            raise ValueError(
                f"{name}: early exit happens at loop boundaries, and this model (sharing={self.sharing!r}, "
                f"num_layers={self.num_layers}, num_blocks={self.num_blocks}) runs its layers as a single loop"
            )

    @property
    def kv_cacheable(self) -> bool:
        """Whether the model decodes with a KV cache: all but a Mixture-of-Recursions whose routing is
        not causal (expert choice by top-k, where a token's path depends on the tokens after it)."""
        return self.mor_routing != "expert_choice" or self.mor_threshold_routing

    @property
    def hrm_cycle_length(self) -> int:
        """``hierarchical``: effective layers per cycle, ``(hrm_period + 1) * num_blocks / 2``."""
        return (self.hrm_period + 1) * (self.num_blocks // 2)

    def recursions(self) -> Tuple[List[int], List[List[int]], List[int]]:
        """The loops over the shared blocks: ``(before, recursions, after)``, the effective layers run
        before the loops, the layers of each loop in order, and the layers after them. Cycle sharing:
        N = L / B loops of B layers; middle-cycle: the P prelude layers, (L - P - C) / (B - P - C) loops, the C coda
        layers; one
        block: L loops of one layer; otherwise one loop of every layer."""
        L, B = self.num_layers, self.num_blocks
        if self.sharing == "middle_cycle":
            prelude, coda = self.prelude_layers, self.coda_layers
            width = B - prelude - coda
            return (list(range(prelude)),
                    [list(range(prelude + r * width, prelude + (r + 1) * width))
                     for r in range((L - prelude - coda) // width)],
                    list(range(L - coda, L)))
        if B == 1 or self.sharing == "cycle":
            return [], [list(range(r * B, (r + 1) * B)) for r in range(L // B)], []
        return [], [list(range(L))], []

    def mor_tokens_kept(self, recursion: int, real_tokens: int) -> int:
        """``expert_choice``: how many of a sequence's ``real_tokens`` recursion ``recursion`` keeps:
        ``ceil(mor_capacities[recursion] * real_tokens)``, at least one of a non-empty sequence."""
        if not real_tokens:
            return 0
        return max(1, math.ceil(self.mor_capacities[recursion] * real_tokens - 1e-9))

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
        """The fields that describe the model, as saved in ``config.json``: all but ``backend``, a runtime choice
        (a saved model runs on the backend its loader picks; ``from_pretrained(..., backend=)``)."""
        values = asdict(self)
        del values["backend"]
        return values

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
