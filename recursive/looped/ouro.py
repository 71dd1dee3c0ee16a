"""Ouro (ByteDance Seed; ``OuroForCausalLM``, remote code) as a recursive model.

Its ``num_hidden_layers`` layers are the blocks of cycle sharing, run ``total_ut_steps`` times
(``num_layers = num_hidden_layers * total_ut_steps``); its sandwich norms (the sublayer's output normed before the
residual add) are ``block_norms="pre_and_output"``; ``model.norm`` after every loop, feeding the next, is
``loop_norm``; ``model.early_exit_gate`` is ``exit_gate``. One cache entry per (loop, layer), as Ouro's
``current_ut * num_hidden_layers + layer``.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

from torch import Tensor

from ..config import ACTIVATIONS, RecursiveConfig
from .checkpoint import CheckpointTensors, config_value, rope_theta

MODEL_TYPE = "ouro"
_LAYER_TENSORS = ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
                  "self_attn.o_proj.weight", "mlp.gate_proj.weight", "mlp.up_proj.weight", "mlp.down_proj.weight",
                  "input_layernorm.weight", "input_layernorm_2.weight", "post_attention_layernorm.weight",
                  "post_attention_layernorm_2.weight")


def config_from_hf(values: Mapping[str, Any], num_loops: Optional[int] = None) -> RecursiveConfig:
    """The :class:`RecursiveConfig` of an ``ouro`` config dict (its ``config.json``), its layers run ``num_loops``
    times (default: ``total_ut_steps``)."""
    layers = config_value(values, "num_hidden_layers")
    if values.get("use_sliding_window") or "sliding_attention" in (values.get("layer_types") or ()):
        raise ValueError("model_or_path: use_sliding_window / layer_types: sliding-window attention is not supported")
    for flag in ("attention_bias", "mlp_bias"):
        if values.get(flag):
            raise ValueError(f"model_or_path: {flag}=True is not supported (Ouro's projections have no biases)")
    activation = config_value(values, "hidden_act", "silu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"model_or_path: hidden_act {activation!r} is none of {ACTIVATIONS}")
    heads = config_value(values, "num_attention_heads")
    hidden = config_value(values, "hidden_size")
    return RecursiveConfig(
        vocab_size=config_value(values, "vocab_size"), hidden_size=hidden,
        intermediate_size=config_value(values, "intermediate_size"), num_attention_heads=heads,
        num_key_value_heads=config_value(values, "num_key_value_heads", heads),
        head_dim=config_value(values, "head_dim", hidden // heads),
        num_layers=layers * (config_value(values, "total_ut_steps", 4) if num_loops is None else num_loops),
        num_blocks=layers, sharing="cycle",
        hidden_act=activation, rms_norm_eps=config_value(values, "rms_norm_eps", 1e-6),
        rope_theta=rope_theta(values, 10000.0), block_norms="pre_and_output", loop_norm=True, exit_gate=True,
        tie_word_embeddings=bool(config_value(values, "tie_word_embeddings", False)),
        initializer_range=config_value(values, "initializer_range", 0.02),
    )


def weights_from_hf(values: Mapping[str, Any], tensors: CheckpointTensors) -> Dict[str, Tuple[str, Tensor]]:
    """The recursive model's tensors by name, each with the checkpoint tensor it comes from."""
    weights = {name: tensors.take(name) for name in ("model.embed_tokens.weight", "model.norm.weight")}
    weights["model.exit_gate.weight"] = tensors.take("model.early_exit_gate.weight")
    weights["model.exit_gate.bias"] = tensors.take("model.early_exit_gate.bias")
    weights.update(tensors.lm_head(tied=values.get("tie_word_embeddings", False)))
    for layer in range(values["num_hidden_layers"]):
        for name in _LAYER_TENSORS:
            weights[f"model.blocks.{layer}.{name}"] = tensors.take(f"model.layers.{layer}.{name}")
    tensors.check_all_used(ignored=("rotary_emb.inv_freq",))
    return weights
