"""Huginn-0125 (seal-rg's recurrent-depth model; ``RavenForCausalLM``, remote code) as a recursive model.

Prelude, recurrent core and coda are middle-cycle sharing with ``prelude_layers`` and ``coda_layers``, the core run
``num_loops`` times (default ``mean_recurrence``); the core's own state, Huginn's ``adapter([state, e])`` before each
pass and ``ln_f`` after the last are ``injection="linear"``; its sandwich blocks (each norm after the residual add)
are ``block_norms="pre_and_residual"``; its ``qk_bias`` is ``qk_bias``; its ``like-init`` state is
``core_state_std``. Huginn rotates adjacent pairs of a head's dims (2i, 2i + 1) where this package rotates halves
(i, i + D/2): the conversion reorders the rows of each head's q and k (and their biases) so that the pairs become
halves, which leaves every attention score as it was (q and k reordered alike) and values untouched.
"""

from __future__ import annotations

import math
from typing import Any, Dict, Mapping, Optional, Tuple

import torch
from torch import Tensor

from ..config import RecursiveConfig
from .checkpoint import CheckpointTensors, config_value, rope_theta

MODEL_TYPE = "huginn_raven"
# Huginn's config classes and state initialisation; others are another model (config_from_hf checks them).
_EXPECTED = {"block_class_name": "SandwichBlock", "norm_class_name": "RMSNorm_llama", "mlp_class_name": "GatedMLP",
             "nonlin_name": "SiLU", "injection_type": "linear"}
_NORMS = {"norm_1": "input_layernorm", "norm_2": "input_layernorm_2", "norm_3": "post_attention_layernorm",
          "norm_4": "post_attention_layernorm_2"}


def _sizes(values: Mapping[str, Any]) -> Tuple[int, int, int, int, int]:
    """hidden, heads, prelude, core and coda layers (Huginn's names, or their Hugging Face aliases)."""
    hidden = values.get("n_embd") or config_value(values, "hidden_size")
    heads = values.get("n_heads") or config_value(values, "num_attention_heads")
    return (hidden, heads, config_value(values, "n_layers_in_prelude", 2),
            config_value(values, "n_layers_in_recurrent_block", 4), config_value(values, "n_layers_in_coda", 2))


def config_from_hf(values: Mapping[str, Any], num_loops: Optional[int] = None) -> RecursiveConfig:
    """The :class:`RecursiveConfig` of a ``huginn_raven`` config dict (its ``config.json``), its core run
    ``num_loops`` times (default: ``mean_recurrence``, Huginn's own default at evaluation)."""
    hidden, heads, prelude, core, coda = _sizes(values)
    for name, expected in _EXPECTED.items():
        if values.get(name, expected) != expected:
            raise ValueError(f"model_or_path: {name} {values[name]!r} is not supported (Huginn's is {expected!r})")
    if values.get("bias"):
        raise ValueError("model_or_path: bias=True is not supported (Huginn's projections have no biases)")
    if values.get("test_time_noise"):
        raise ValueError(f"model_or_path: test_time_noise={values['test_time_noise']} is not supported")
    kv_heads = values.get("num_key_value_heads") or heads
    if kv_heads != heads:
        raise ValueError(f"model_or_path: num_key_value_heads {kv_heads} differs from the heads ({heads}): "
                         "Huginn's attention has none")
    init = values.get("init_values") or {}
    embed_scale = float(init.get("embed_scale", math.sqrt(hidden)))
    state = values.get("state_init", "like-init")
    if state not in ("like-init", "zero"):
        raise ValueError(f"model_or_path: state_init {state!r} is not supported ('like-init' or 'zero')")
    std = float(init.get("std", math.sqrt(2 / (5 * hidden)))) if state == "like-init" else 0.0
    loops = config_value(values, "mean_recurrence", 32) if num_loops is None else num_loops
    vocab = values.get("padded_vocab_size") or config_value(values, "vocab_size")
    return RecursiveConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=config_value(values, "intermediate_size"),
        num_attention_heads=heads, num_layers=prelude + coda + core * loops, num_blocks=prelude + core + coda,
        sharing="middle_cycle", prelude_layers=prelude, coda_layers=coda, injection="linear", core_state_std=std,
        block_norms="pre_and_residual", qk_bias=bool(values.get("qk_bias", True)), hidden_act="silu",
        rms_norm_eps=config_value(values, "norm_eps", 1e-6),
        rope_theta=rope_theta(values, float(values.get("rope_base", 50000.0))), embed_scale=embed_scale,
        tie_word_embeddings=bool(values.get("tie_embeddings", True)), initializer_range=std or 0.02,
    )


def weights_from_hf(values: Mapping[str, Any], tensors: CheckpointTensors) -> Dict[str, Tuple[str, Tensor]]:
    """The recursive model's tensors by name, each with the checkpoint tensor it comes from."""
    hidden, heads, prelude, core, coda = _sizes(values)
    head_dim = hidden // heads
    weights = {"model.embed_tokens.weight": tensors.take("transformer.wte.weight"),
               "model.adapter.weight": tensors.take("transformer.adapter.weight"),
               "model.norm.weight": tensors.take("transformer.ln_f.weight")}
    weights.update(tensors.lm_head(tied=values.get("tie_embeddings", True)))
    stages = [("prelude", prelude), ("core_block", core), ("coda", coda)]
    block = 0
    for stage, count in stages:
        for i in range(count):
            weights.update(_block_weights(tensors, f"transformer.{stage}.{i}", f"model.blocks.{block}", heads,
                                          head_dim, bool(values.get("qk_bias", True))))
            block += 1
    tensors.check_all_used(ignored=("freqs_cis",))  # the rotary table, recomputed
    return weights


def _block_weights(tensors: CheckpointTensors, theirs: str, ours: str, heads: int, head_dim: int,
                   values_have_qk_bias: bool) -> Dict[str, Tuple[str, Tensor]]:
    """One sandwich block: its norms, the split and reordered Wqkv and qk_bias, the output projection, the MLP."""
    weights = {f"{ours}.{norm}.weight": tensors.take(f"{theirs}.{name}.weight") for name, norm in _NORMS.items()}
    name, wqkv = tensors.take(f"{theirs}.attn.Wqkv.weight")
    width = heads * head_dim
    if wqkv.shape[0] != 3 * width:
        raise ValueError(f"model_or_path: tensor {name} has {wqkv.shape[0]} rows, not 3 x {width} (q, k, v)")
    pairs_as_halves = torch.cat((torch.arange(0, head_dim, 2), torch.arange(1, head_dim, 2)))

    def halves(t: Tensor) -> Tensor:
        """Rows (heads * head_dim, ...) with each head's dims (2i, 2i + 1) moved to (i, i + head_dim / 2)."""
        return t.reshape(heads, head_dim, *t.shape[1:])[:, pairs_as_halves].reshape(t.shape)

    q, k, v = wqkv.split(width)
    weights[f"{ours}.self_attn.q_proj.weight"] = (name, halves(q))
    weights[f"{ours}.self_attn.k_proj.weight"] = (name, halves(k))
    weights[f"{ours}.self_attn.v_proj.weight"] = (name, v)
    if values_have_qk_bias:
        bias_name, bias = tensors.take(f"{theirs}.attn.qk_bias")
        if bias.numel() != 2 * width:
            raise ValueError(f"model_or_path: tensor {bias_name} has shape {tuple(bias.shape)}, "
                             f"not (2, 1, {heads}, {head_dim})")
        bias = bias.reshape(2, width)
        weights[f"{ours}.self_attn.q_proj.bias"] = (bias_name, halves(bias[0]))
        weights[f"{ours}.self_attn.k_proj.bias"] = (bias_name, halves(bias[1]))
    weights[f"{ours}.self_attn.o_proj.weight"] = tensors.take(f"{theirs}.attn.proj.weight")
    name, fc = tensors.take(f"{theirs}.mlp.fc.weight")
    if fc.shape[0] % 2:
        raise ValueError(f"model_or_path: tensor {name} has {fc.shape[0]} rows, not two equal halves (gate, up)")
    gate, up = fc.chunk(2)
    weights[f"{ours}.mlp.gate_proj.weight"] = (name, gate)
    weights[f"{ours}.mlp.up_proj.weight"] = (name, up)
    weights[f"{ours}.mlp.down_proj.weight"] = tensors.take(f"{theirs}.mlp.proj.weight")
    return weights
