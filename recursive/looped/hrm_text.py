"""HRM-Text (Sapient; transformers' ``HrmTextForCausalLM``, native since transformers 5.9) as a recursive model.

Two stacks of ``num_layers_per_stack`` layers, ``L_module`` (fast) and ``H_module`` (slow), become the fast and slow
modules of hierarchical sharing with ``hrm_flow="hrm_text"`` (:mod:`recursive.config`): ``H_cycles`` cycles of
``L_cycles`` fast applications and one slow one, the slow state starting at the scaled embeddings and the fast one at
``z_L_init``; the layers' weightless norms and the stacks' final norms are ``norm_weight=False``; the attention's
sigmoid output gate is ``attention_output_gate``; its multi-head keys and values are ``num_key_value_heads`` equal to
the heads; ``L_bp_cycles`` is ``hrm_fast_grad_cycles`` and ``prefix_lm`` (``token_type_ids``) is ``prefix_lm``.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Tuple

from torch import Tensor, nn

from ..config import ACTIVATIONS, RecursiveConfig
from ..modeling import RecursiveForCausalLM
from .checkpoint import CheckpointTensors, config_value, rope_theta

MODEL_TYPE = "hrm_text"
_PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "self_attn.gate_proj",
                "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")
# Stacks in the order of the recursive model's blocks: the fast module's first.
_STACKS = ("L_module", "H_module")


def config_from_hf(values: Mapping[str, Any], num_loops: Optional[int] = None) -> RecursiveConfig:
    """The :class:`RecursiveConfig` of an ``hrm_text`` config dict (as ``HrmTextConfig.to_dict()`` or its
    ``config.json``), with ``num_loops`` H cycles (default: its ``H_cycles``)."""
    for flag in ("attention_bias", "mlp_bias"):
        if values.get(flag):
            raise ValueError(f"model_or_path: {flag}=True is not supported (no bias on o_proj or the MLP)")
    if values.get("attention_dropout"):
        raise ValueError(f"model_or_path: attention_dropout={values['attention_dropout']} is not supported")
    activation = config_value(values, "hidden_act", "silu")
    if activation not in ACTIVATIONS:
        raise ValueError(f"model_or_path: hidden_act {activation!r} is none of {ACTIVATIONS}")
    h_cycles, l_cycles = config_value(values, "H_cycles", 2), config_value(values, "L_cycles", 3)
    h_cycles = h_cycles if num_loops is None else num_loops
    # A config written before the split holds the per-stack count in num_hidden_layers (HrmTextConfig's rule).
    per_stack = values.get("num_layers_per_stack") or config_value(values, "num_hidden_layers")
    initializer_range = config_value(values, "initializer_range", 0.02)
    # HrmTextModel left-pads L_bp_cycles with 1s to H_cycles and reads one entry per cycle; a count outside
    # [0, L_cycles] acts as its nearest end.
    given = list(config_value(values, "L_bp_cycles", [2]))
    padded = ([1] * max(0, h_cycles - len(given)) + given)[:h_cycles]
    heads = config_value(values, "num_attention_heads")
    return RecursiveConfig(
        vocab_size=config_value(values, "vocab_size"), hidden_size=config_value(values, "hidden_size"),
        intermediate_size=config_value(values, "intermediate_size"), num_attention_heads=heads,
        num_key_value_heads=heads, head_dim=config_value(values, "head_dim", 128),
        num_layers=per_stack * h_cycles * (l_cycles + 1), num_blocks=2 * per_stack, sharing="hierarchical",
        hrm_period=l_cycles, hrm_flow="hrm_text",
        hrm_fast_grad_cycles=tuple(min(max(int(n), 0), l_cycles) for n in padded),
        hidden_act=activation, rms_norm_eps=config_value(values, "rms_norm_eps", 1e-6), norm_weight=False,
        rope_theta=rope_theta(values, 10000.0), attention_output_gate=True,
        prefix_lm=bool(config_value(values, "prefix_lm", True)),
        tie_word_embeddings=bool(config_value(values, "tie_word_embeddings", False)),
        embed_scale=float(config_value(values, "embedding_scale", 1.0 / initializer_range)),
        initializer_range=initializer_range,
    )


def weights_from_hf(values: Mapping[str, Any], tensors: CheckpointTensors) -> Dict[str, Tuple[str, Tensor]]:
    """The recursive model's tensors by name, each with the checkpoint tensor it comes from: the module's names
    (``HrmTextForCausalLM.state_dict()``), or the published layout that its ``save_pretrained`` writes (per layer
    ``attn.gqkv_proj`` = [gate; q; k; v] and ``mlp.gate_up_proj`` = [gate; up] along the output dim)."""
    per_stack = values.get("num_layers_per_stack") or values["num_hidden_layers"]
    weights = {"model.embed_tokens.weight": tensors.take("model.embed_tokens.weight"),
               "model.fast_init": tensors.take("model.z_L_init")}
    weights.update(tensors.lm_head(tied=values.get("tie_word_embeddings", False)))
    for stack_index, stack in enumerate(_STACKS):
        for layer in range(per_stack):
            block = stack_index * per_stack + layer
            for projection, source in _layer_weights(tensors, f"model.{stack}.layers.{layer}").items():
                weights[f"model.blocks.{block}.{projection}.weight"] = source
    tensors.check_all_used(ignored=("rotary_emb.inv_freq",))
    return weights


def _layer_weights(tensors: CheckpointTensors, prefix: str) -> Dict[str, Tuple[str, Tensor]]:
    """One layer's projections by our module names, from either layout (:func:`weights_from_hf`)."""
    if f"{prefix}.attn.gqkv_proj.weight" not in tensors.state:
        return {projection: tensors.take(f"{prefix}.{projection}.weight") for projection in _PROJECTIONS}
    weights = {}
    for fused, parts in (("attn.gqkv_proj", ("self_attn.gate_proj", "self_attn.q_proj", "self_attn.k_proj",
                                             "self_attn.v_proj")),
                         ("mlp.gate_up_proj", ("mlp.gate_proj", "mlp.up_proj"))):
        name, tensor = tensors.take(f"{prefix}.{fused}.weight")
        if tensor.shape[0] % len(parts):
            raise ValueError(f"model_or_path: tensor {name} has {tensor.shape[0]} rows, not {len(parts)} equal parts")
        weights.update((part, (name, chunk)) for part, chunk in zip(parts, tensor.chunk(len(parts))))
    weights["self_attn.o_proj"] = tensors.take(f"{prefix}.attn.o_proj.weight")
    weights["mlp.down_proj"] = tensors.take(f"{prefix}.mlp.down_proj.weight")
    return weights


def to_hf(model: RecursiveForCausalLM) -> nn.Module:
    """transformers' ``HrmTextForCausalLM`` computing what ``model`` (a converted HRM-Text, or one configured alike)
    computes, in its dtype and on its device, in eval mode."""
    import transformers

    if not hasattr(transformers, "HrmTextForCausalLM"):
        raise ValueError(f"model: HRM-Text is native in transformers from 5.9; this is {transformers.__version__}")
    config = model.config
    hrm_text_like = (config.sharing == "hierarchical" and config.hrm_flow == "hrm_text" and not config.norm_weight
                     and config.attention_output_gate and config.num_key_value_heads == config.num_attention_heads
                     and not config.qkv_bias and config.relaxation == "none" and config.embedding_size is None)
    if not hrm_text_like:
        raise ValueError("model: only an HRM-Text-shaped model exports as hrm_text (hierarchical sharing with "
                         "hrm_flow='hrm_text', weightless norms, the output gate, multi-head keys, no relaxation)")
    per_stack = config.num_blocks // 2
    cycles = config.num_layers // config.hrm_cycle_length
    hf_config = transformers.HrmTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=per_stack, num_attention_heads=config.num_attention_heads, head_dim=config.head_dim,
        hidden_act=config.hidden_act, rms_norm_eps=config.rms_norm_eps,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        tie_word_embeddings=config.tie_word_embeddings, initializer_range=config.initializer_range,
        H_cycles=cycles, L_cycles=config.hrm_period, L_bp_cycles=list(config.fast_grad_applications()),
        embedding_scale=config.embed_scale, prefix_lm=config.prefix_lm,
    )
    parameter = next(model.parameters())
    hf_model = transformers.HrmTextForCausalLM(hf_config).to(device=parameter.device, dtype=parameter.dtype)
    ours = model.state_dict()
    state = {"model.embed_tokens.weight": ours["model.embed_tokens.weight"], "model.z_L_init": ours["model.fast_init"],
             "lm_head.weight": ours["lm_head.weight"]}
    for stack_index, stack in enumerate(_STACKS):
        for layer in range(per_stack):
            for projection in _PROJECTIONS:
                state[f"model.{stack}.layers.{layer}.{projection}.weight"] = (
                    ours[f"model.blocks.{stack_index * per_stack + layer}.{projection}.weight"])
    hf_model.load_state_dict(state, strict=True)
    return hf_model.eval()
