"""FLOP and parameter counts of the recursive model family, from the config alone.

The convention is ``torch.utils.flop_counter``'s: a matmul of (M, K) by (K, N) costs ``2 * M * N * K``
(an ``addmm``'s bias is free), attention costs its two matmuls ``QK^T`` and ``PV`` over the full
(Sq, Sk) score matrix (causal masking is not discounted, as FlopCounterMode counts SDPA), and
everything else (norms, RoPE, softmax, activations, the embedding lookup, the loss) costs nothing.
With ``backend="torch"`` every op decomposes into aten matmuls that FlopCounterMode sees, and the
counts here equal its counts exactly, with one documented exception:

- A mixture of LoRAs (relaxation "mol") is counted as routed: each token pays for its top
  ``num_experts_per_tok`` experts, as the fused backends compute it. The torch reference evaluates
  every expert on every token and masks the unchosen ones, so FlopCounterMode on it reports
  ``num_experts / num_experts_per_tok`` times the experts' low-rank FLOPs (equal when top-k = all).

A Mixture-of-Recursions model (``mor_routing``) runs each recursion's layers on its selected tokens
only, gathered into a compact batch as wide as the sequence with the most of them: the projections
cost that width times the batch, attention each sequence's selected tokens squared. Expert choice keeps
``config.mor_tokens_kept`` tokens per sequence and recursion; token choice and threshold routing depend
on the data, so their counts are given (``recursion_tokens``, from the output's ``recursion_depths``).
The routers add one matmul over every position: (hidden, 1) per recursion for expert choice,
(hidden, N) once for token choice. With ``mor_kv_sharing`` the later recursions project no keys or
values, and their queries, spread over the first recursion's tokens, attend in that recursion's layout
(its selected tokens squared per sequence). Hierarchical (HRM) sharing adds only additions to a plain stack of its
effective layers. HRM-Text's attention output gate is one more projection (hidden -> heads * head_dim) per layer; Ouro's
exit gate one (hidden -> 1) per loop, and its training objective reads the LM head after every loop; Huginn's adapter
one (2 hidden -> hidden) per pass of the core.

The fused backends (cpp, triton, cuda) run their own kernels, which FlopCounterMode sees only in part
(the cpp backend's base matmuls go through aten and are counted; its attention and low-rank loops, and
the GPU kernels, are not), so it undercounts them; these counts are the model's, whatever the backend.

A backward pass in this convention costs twice the forward: each matmul ``Y = X W`` needs ``dX`` and
``dW``, each one matmul of the same size (attention likewise: dP, dV, dQ, dK). That holds when every
parameter is trainable, as :func:`training_step_flops` assumes; FlopCounterMode counts a frozen
weight's backward as ``dX`` alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

from .checks import check_int
from .config import ATTENTION_TARGETS, FEED_FORWARD_TARGETS, RecursiveConfig
from .loops import loop_shape

MODEL_TYPES = ("causal_lm", "encoder")


@dataclass(frozen=True)
class ParameterCounts:
    """Parameter counts of a model, by role (tied tensors counted once).

    Attributes:
        embedding: the token embedding (and the factorised embedding's projection).
        shared: the blocks' base weights (projections, biases, norms): each block serves every
            effective layer of its sharing scheme; and Huginn's adapter.
        adapter: the relaxation's parameters: per-depth LoRA, the QK/OV circuit factors, or the
            mixture's LoRA experts and router; and the Mixture-of-Recursions router.
        head: the final norm and the output head (an untied LM head, or the encoder's head); Ouro's exit gate.
    """

    embedding: int
    shared: int
    adapter: int
    head: int

    @property
    def total(self) -> int:
        """Equals ``sum(p.numel() for p in model.parameters())``."""
        return self.embedding + self.shared + self.adapter + self.head


def forward_flops(
    config: RecursiveConfig,
    batch_size: int,
    seq_len: int,
    *,
    lengths: Optional[Sequence[int]] = None,
    model_type: str = "causal_lm",
    recursion_tokens: Optional[Sequence[Sequence[int]]] = None,
) -> int:
    """FLOPs of one forward pass of ``batch_size`` sequences of ``seq_len`` tokens (see the module docstring).

    Args:
        config: the model's config.
        batch_size, seq_len: the shape (B, S) of ``input_ids``.
        lengths: for a padded batch, the real tokens of each sequence (B ints in [0, S]). The projections
            run over all B * S positions; attention runs over the real tokens only (the models pack a
            padded batch). None: no padding.
        model_type: "causal_lm" (:class:`recursive.RecursiveForCausalLM`) or "encoder"
            (:class:`recursive.RecursiveEncoder` with ``config.encoder_head``).
        recursion_tokens: token-choice or threshold-routed Mixture-of-Recursions only (and required
            there): for each recursion, the tokens of each sequence that run it (N lists of B ints),
            e.g. ``[(out.recursion_depths > r).sum(1).tolist() for r in range(N)]``.

    Returns:
        The count, an int.
    """
    _check_config(config, model_type)
    check_int("batch_size", batch_size, 1)
    check_int("seq_len", seq_len, 1)
    if lengths is None:
        lengths = [seq_len] * batch_size
    else:
        lengths = list(lengths)
        if len(lengths) != batch_size or any(
            isinstance(n, bool) or not isinstance(n, int) or not 0 <= n <= seq_len for n in lengths
        ):
            raise ValueError(f"lengths: expected {batch_size} ints in [0, seq_len={seq_len}], got {lengths!r}")
    tokens = batch_size * seq_len
    score_entries = sum(n * n for n in lengths)  # attention's (Sq, Sk) entries over the batch
    if config.mor_routing is None:
        if recursion_tokens is not None:
            raise ValueError("recursion_tokens: only a token-choice Mixture-of-Recursions model takes them")
        total = sum(_layer_flops(config, layer, tokens, score_entries) for layer in range(config.num_layers))
        return total + _injection_flops(config, tokens) + _outside_blocks_flops(config, batch_size, tokens, model_type)
    before, recursions, after = config.recursions()
    counts = _recursion_tokens(config, lengths, len(recursions), recursion_tokens)
    total = sum(_layer_flops(config, layer, tokens, score_entries) for layer in before + after)
    first_entries = sum(n * n for n in counts[0])
    for r, (layers, selected) in enumerate(zip(recursions, counts)):
        width, entries = batch_size * max(selected), sum(n * n for n in selected)
        if config.mor_kv_sharing and r > 0:  # no keys of their own; queries attend in the first recursion's layout
            total += sum(_layer_flops(config, layer, width, first_entries, key_value_tokens=0) for layer in layers)
        else:
            total += sum(_layer_flops(config, layer, width, entries) for layer in layers)
    total += 2 * tokens * config.hidden_size * len(recursions)  # the router: (hidden, 1) N times, or (hidden, N) once
    return total + _outside_blocks_flops(config, batch_size, tokens, model_type)


def training_step_flops(
    config: RecursiveConfig,
    batch_size: int,
    seq_len: int,
    *,
    lengths: Optional[Sequence[int]] = None,
    model_type: str = "causal_lm",
    recursion_tokens: Optional[Sequence[Sequence[int]]] = None,
    gradient_checkpointing: bool = False,
) -> int:
    """FLOPs of a forward and backward pass with every parameter trainable: three times
    :func:`forward_flops` (the backward computes an input and a weight gradient per matmul, each as
    costly as the forward matmul), except that the layers HRM's gradient routing leaves unrecorded
    (``hrm_one_step_gradient``, ``hrm_fast_grad_cycles``) run forward only, and that Ouro's objective (``exit_gate``)
    reads the LM head after every loop. ``gradient_checkpointing``
    (:meth:`recursive.RecursivePreTrainedModel.gradient_checkpointing_enable`): the backward also runs the
    forward of every block call that autograd records once more. Other arguments as :func:`forward_flops`."""
    if not isinstance(gradient_checkpointing, bool):
        raise ValueError(f"gradient_checkpointing: expected a bool, got {gradient_checkpointing!r}")
    forward = forward_flops(config, batch_size, seq_len, lengths=lengths, model_type=model_type,
                            recursion_tokens=recursion_tokens)
    tokens = batch_size * seq_len
    blocks = forward - _outside_blocks_flops(config, batch_size, tokens, model_type) - _injection_flops(config, tokens)
    if config.mor_routing is not None:
        blocks -= 2 * tokens * config.hidden_size * len(config.recursions()[1])  # the routers
    unrecorded = 0
    if config.sharing == "hierarchical":
        score_entries = sum(n * n for n in lengths) if lengths is not None else batch_size * seq_len * seq_len
        unrecorded = sum(_layer_flops(config, step.layer, tokens, score_entries)
                         for step in loop_shape(config).steps if not step.records)
    if config.exit_gate and model_type == "causal_lm":  # the LM head of every loop but the last, too
        forward += (config.num_layers // config.loop_length() - 1) * 2 * tokens * config.hidden_size * config.vocab_size
    recomputed = blocks - unrecorded if gradient_checkpointing else 0
    return 3 * forward - 2 * unrecorded + recomputed


def parameter_counts(config: RecursiveConfig, model_type: str = "causal_lm") -> ParameterCounts:
    """The parameters of the model ``config`` builds, by role (see :class:`ParameterCounts`).

    Args:
        config: the model's config.
        model_type: "causal_lm" or "encoder", as for :func:`forward_flops`.
    """
    _check_config(config, model_type)
    hidden, vocab = config.hidden_size, config.vocab_size
    width = config.embedding_size or hidden
    embedding = vocab * width + (width * hidden if config.embedding_size is not None else 0)

    shared = adapter = 0
    for block in range(config.num_blocks):
        num_adapters = config.num_experts if config.relaxation == "mol" else len(config.depth_layers_of_block(block))
        shared += _norms_per_block(config) * hidden if config.norm_weight else 0
        if config.attention_output_gate:
            gate_width = config.num_attention_heads * config.head_dim
            shared += hidden * gate_width + (gate_width if config.qkv_bias else 0)
        for target, (fan_in, fan_out) in _projection_shapes(config).items():
            biased = target in ("q", "k", "v") if config.qkv_bias else config.qk_bias and target in ("q", "k")
            shared += fan_in * fan_out + (fan_out if biased else 0)
            rank = _lora_rank(config, target, fan_in, fan_out) if num_adapters else 0
            adapter += num_adapters * rank * (fan_in + fan_out)
        if config.relaxation == "circuit" and num_adapters:
            adapter += num_adapters * _circuit_width(config) * config.circuit_rank * hidden  # qk_u, qk_v, ov_c
            adapter += num_adapters * config.num_attention_heads * config.head_dim * config.circuit_rank  # ov_d
        if config.relaxation == "mol":
            adapter += config.num_experts * hidden  # the router
    if config.mor_routing is not None:
        adapter += len(config.recursions()[1]) * hidden  # the recursions' router
    if config.injection != "none":
        shared += 2 * hidden * hidden  # Huginn's adapter

    head = hidden if config.norm_weight else 0  # the final norm
    head += hidden + 1 if config.exit_gate else 0
    if model_type == "causal_lm":
        head += 0 if config.tie_word_embeddings else vocab * hidden
    elif config.encoder_head == "mlm":
        head += hidden * width + width + width  # head_dense (with bias), head_norm
        head += (0 if config.tie_word_embeddings else vocab * width) + vocab  # decoder (its bias is never tied)
    else:
        head += hidden * hidden + hidden + hidden  # head_dense (with bias), head_norm
        head += hidden * config.num_labels + config.num_labels  # classifier
    return ParameterCounts(embedding=embedding, shared=shared, adapter=adapter, head=head)


# The count, piece by piece.


def _projection_shapes(config: RecursiveConfig):
    """(fan_in, fan_out) of every projection of a block, by LoRA target name."""
    hidden, inter = config.hidden_size, config.intermediate_size
    q_width = config.num_attention_heads * config.head_dim
    kv_width = config.num_key_value_heads * config.head_dim
    return {
        "q": (hidden, q_width), "k": (hidden, kv_width), "v": (hidden, kv_width), "o": (q_width, hidden),
        "gate": (hidden, inter), "up": (hidden, inter), "down": (inter, hidden),
    }


def _norms_per_block(config: RecursiveConfig) -> int:
    """Two norms, one before each sublayer; four with a second norm per sublayer (``block_norms``)."""
    return 2 if config.block_norms == "pre" else 4


def _lora_rank(config: RecursiveConfig, target: str, fan_in: int, fan_out: int) -> int:
    """The rank a projection's adapters get: LowRankLinear clamps it to the projection's size."""
    return min(config.lora_rank_of(target), fan_in, fan_out)


def _circuit_width(config: RecursiveConfig) -> int:
    """Heads projected on the circuit's hidden-side factors: U per query head, V and C per key/value head."""
    return config.num_attention_heads + 2 * config.num_key_value_heads


def _layer_flops(config: RecursiveConfig, layer: int, tokens: int, score_entries: int,
                 key_value_tokens: Optional[int] = None) -> int:
    """One effective layer: its block's projections, the active relaxation's terms and attention; the k and
    v projections run over ``key_value_tokens`` (default ``tokens``)."""
    relaxed = config.per_depth and layer >= config.start_index  # per-depth parameters modify this layer
    mol = config.relaxation == "mol"
    heads, head_dim, hidden = config.num_attention_heads, config.head_dim, config.hidden_size
    flops = 0
    for target, (fan_in, fan_out) in _projection_shapes(config).items():
        rows = tokens if key_value_tokens is None or target not in ("k", "v") else key_value_tokens
        flops += 2 * rows * fan_in * fan_out
        adapters_here = (relaxed and target in ATTENTION_TARGETS) or (
            (relaxed or mol) and target in FEED_FORWARD_TARGETS)
        if adapters_here:
            slots = config.num_experts_per_tok if mol else 1
            flops += slots * 2 * rows * _lora_rank(config, target, fan_in, fan_out) * (fan_in + fan_out)
    if mol:
        flops += 2 * tokens * hidden * config.num_experts  # the router
    if config.attention_output_gate:
        flops += 2 * tokens * hidden * heads * head_dim
    score_width = head_dim  # the contraction width of QK^T (and of PV: value width)
    value_width = head_dim
    if config.relaxation == "circuit" and relaxed:
        rank = config.circuit_rank
        flops += 2 * tokens * hidden * _circuit_width(config) * rank  # q_c, k_c, v_c
        flops += 2 * tokens * heads * rank * head_dim  # out_c through D
        score_width += rank
        value_width += rank
    flops += 2 * heads * score_entries * (score_width + value_width)
    return flops


def _injection_flops(config: RecursiveConfig, tokens: int) -> int:
    """Huginn's adapter before each pass of the core: (2 hidden -> hidden)."""
    if config.injection == "none":
        return 0
    return len(config.recursions()[1]) * 2 * tokens * 2 * config.hidden_size ** 2


def _outside_blocks_flops(config: RecursiveConfig, batch_size: int, tokens: int, model_type: str) -> int:
    """The factorised embedding's projection, Ouro's exit gate and the output head."""
    hidden, vocab = config.hidden_size, config.vocab_size
    width = config.embedding_size or hidden
    flops = 2 * tokens * width * hidden if config.embedding_size is not None else 0
    if config.exit_gate:
        flops += 2 * tokens * hidden * (config.num_layers // config.loop_length())
    if model_type == "causal_lm":
        return flops + 2 * tokens * hidden * vocab
    if config.encoder_head == "mlm":
        return flops + 2 * tokens * hidden * width + 2 * tokens * width * vocab
    return flops + 2 * batch_size * hidden * (hidden + config.num_labels)  # on the pooled rows


def _recursion_tokens(config: RecursiveConfig, lengths: Sequence[int], num_recursions: int,
                      given: Optional[Sequence[Sequence[int]]]) -> Sequence[Sequence[int]]:
    """The tokens of each sequence that run each recursion (see :func:`forward_flops`)."""
    if config.mor_routing == "expert_choice" and not config.mor_threshold_routing:
        if given is not None:
            raise ValueError("recursion_tokens: expert choice keeps config.mor_tokens_kept tokens; give none")
        return [[config.mor_tokens_kept(r, n) for n in lengths] for r in range(num_recursions)]
    if given is None:
        raise ValueError("recursion_tokens: token choice and threshold routing pick each token's depth from the "
                         "data; give the tokens of each sequence that run each recursion")
    given = [list(counts) for counts in given]
    if len(given) != num_recursions or any(
        len(counts) != len(lengths) or any(isinstance(c, bool) or not isinstance(c, int) or not 0 <= c <= n
                                           for c, n in zip(counts, lengths))
        for counts in given
    ):
        raise ValueError(f"recursion_tokens: expected {num_recursions} lists of {len(lengths)} ints, each at most its "
                         f"sequence's length, got {given!r}")
    return given


def _check_config(config: RecursiveConfig, model_type: str) -> None:
    if not isinstance(config, RecursiveConfig):
        raise ValueError(f"config: expected a RecursiveConfig, got {type(config).__name__}")
    if model_type not in MODEL_TYPES:
        raise ValueError(f"model_type: expected one of {MODEL_TYPES}, got {model_type!r}")
    if model_type == "causal_lm" and config.embedding_size is not None:
        raise ValueError("config: embedding_size (factorised embeddings) is an encoder option; "
                         "use model_type='encoder'")
