"""Conversion of a Hugging Face Llama, Mistral, Qwen2 or Gemma causal LM into a recursive model, and back.

:func:`convert_hf` ties the L layers of a pretrained model into B shared blocks (Relaxed Recursive
Transformers): it picks each block's weights from the original layers by an init scheme and, with
``lora_rank > 0``, gives every effective layer a LoRA on its projections, initialised from what the sharing
took away from that layer. :func:`export_hf` goes the other way: a recursive model,
merged and untied, as a Hugging Face model of the same family.

Only :func:`export_hf` and loading a model from a path (:func:`load_hf`) import ``transformers``: any
``nn.Module`` shaped like transformers' ``*ForCausalLM`` (``config.model_type``, ``model.embed_tokens``,
``model.layers[i]`` with ``self_attn.{q,k,v,o}_proj``, ``mlp.{gate,up,down}_proj`` and the two norms,
``model.norm``, ``lm_head``) of a supported type converts.
"""

from __future__ import annotations

import importlib.util
import os
import re
import warnings
from fractions import Fraction
from typing import Dict, List, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from recursive_kernels.backends import accumulation_dtype

from .calibration import INPUT_OF_TARGET, check_calibration, input_covariances
from .config import ACTIVATIONS, LORA_TARGETS, SHARING_SCHEMES, RecursiveConfig
from .factorization import input_whitening, weighted_truncated_svd
from .looped import convert_looped, hrm_text, looped_model_type
from .modeling import RecursiveForCausalLM
from .nn import LowRankLinear, activation
from .progress import Progress

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "gemma")
# What export_hf writes: the plain stacks it unrolls, and HRM-Text (a loop transformers runs itself).
EXPORT_MODEL_TYPES = SUPPORTED_MODEL_TYPES + (hrm_text.MODEL_TYPE,)
INIT_SCHEMES = ("stepwise", "average", "lower", "upper")
LORA_INITS = ("svd", "activation", "zero")
# Hierarchical sharing changes the data flow (the fast and slow states), so no init reproduces the original.
CONVERTIBLE_SHARING = tuple(scheme for scheme in SHARING_SCHEMES if scheme != "hierarchical")
# The module of each LoRA target, in Hugging Face's decoder layer and in a recursive block alike.
TARGET_MODULES = {
    "q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj", "o": "self_attn.o_proj",
    "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj",
}
# The norm whose output each target projection reads (the others read no norm).
NORM_OF_TARGET = {"q": "input_layernorm", "k": "input_layernorm", "v": "input_layernorm",
                  "gate": "post_attention_layernorm", "up": "post_attention_layernorm"}
# The progress bar shows by default from this many parameters on (a small model converts in a blink).
PROGRESS_MIN_PARAMETERS = 100_000_000


def convert_hf(
    model_or_path: Union[nn.Module, str, os.PathLike],
    num_blocks: Optional[int] = None,
    sharing: str = "cycle",
    init: str = "stepwise",
    lora_rank: Union[int, Mapping[str, int]] = 0,
    lora_targets: Sequence[str] = LORA_TARGETS,
    lora_init: str = "svd",
    *,
    calibration: Optional[Tensor] = None,
    fold_norms: bool = True,
    lora_alpha: float = RecursiveConfig.lora_alpha,
    dtype: Optional[torch.dtype] = None,
    progress: Optional[bool] = None,
    svd_init: Optional[bool] = None,
) -> RecursiveForCausalLM:
    """A :class:`recursive.RecursiveForCausalLM` with ``num_blocks`` shared blocks run over the L layers of a
    Hugging Face causal LM (``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM`` or
    ``GemmaForCausalLM``), on the device and in the dtype of that model, in its train/eval mode.

    A published looped model (a model or folder whose ``model_type`` is one of
    :data:`recursive.looped.LOOPED_MODEL_TYPES`: HRM-Text) converts as it is, its loops kept
    (:func:`recursive.looped.convert_looped`); the tying and adapter arguments do not apply to it.

    ``model_or_path`` is the model itself, a checkpoint folder (``config.json`` and weights, read with
    ``local_files_only``) or a GGUF file (dequantised by transformers; needs the ``gguf`` package), loaded in
    ``dtype`` (default: a folder's own dtype, float32 for GGUF).

    **Norm folding** (``fold_norms``, the default): each layer's RMSNorm gains are first folded into the
    projections they feed (``W_q diag(g)`` and so on; Gemma's gain is ``1 + w``), and the norms become unit
    gains. That leaves every layer's function unchanged, and makes the layers' norms all alike, so sharing them
    loses nothing: without the fold a block's norms replace each layer's own (SmolLM2-135M's gains spread with a
    standard deviation of 0.12 around 0.30), which no LoRA on the projections can undo.

    Shared block b takes every parameter of a decoder layer (projection weights, q/k/v biases, both norms) from
    the original layers ``sources(b)`` of ``init`` (their mean when there are several):

    - ``"stepwise"``: layer ``round(linspace(0, L - 1, B))[b]`` (halves round to even, as
      ``torch.round``; computed exactly);
    - ``"average"``: the layers tied to block b by ``sharing`` (``RecursiveConfig.layers_of_block``);
    - ``"lower"``: layer b; ``"upper"``: layer ``L - B + b``.

    Embeddings, the final norm and the LM head are copied (tied when they are tied in the original).

    With ``lora_rank > 0`` the relaxation is ``"depth_lora"``: effective layer l owns a LoRA on each of
    ``lora_targets`` with ``W_eff(l) = W_b + s B_l A_l`` (``s = lora_alpha / r``), initialised by ``lora_init``
    from the residual ``R_l = W_orig(l) - W_b`` (folded weights, computed in float32, float64 for float64
    models):

    - ``"svd"`` (the default): the best rank-r approximation of ``R_l``, ``U S V^T = svd(R_l)``,
      ``A_l = V_r^T``, ``B_l = U_r S_r / s``; a randomised SVD finds it when r is at most a quarter of the
      projection's smaller side (:func:`recursive.factorization.truncated_svd`), the full SVD otherwise;
    - ``"activation"``: the rank-r approximation that is best for the inputs the layer sees (SVD-LLM's
      whitening): it minimises the mean output error ``E ||(R_l - s B_l A_l) x||^2`` over the inputs x of that
      projection in the original model on the ``calibration`` tokens ((N, S) ids; a few thousand tokens of text
      like the model's are enough);
    - ``"zero"``: PEFT's init (A Kaiming-uniform, B zero: ``W_eff(l) = W_b``, the vanilla model at first).

    The defaults follow ``python -m recursive reproduce pretrained`` (SmolLM2-135M, 10 blocks x 3 loops, rank 64,
    held-out nats per token on the standard library's sources; original 2.47): folding makes full rank exact
    (2.47, against 16.19 unfolded) and starts and ends the rank-64 SVD lower (17.87 and 5.40 after 40 adapter
    steps, against 18.46 and 5.55); ``"svd"`` ended lowest, ``"activation"`` started far lower (12.91) but ended
    at 5.44, and ``"zero"`` (13.95 at the start, the vanilla model) at 7.38.

    Ranks above ``min(in_features, out_features)`` of a projection are clamped to it. At full rank with every
    projection a target, the converted model computes the original function (to the rounding of the SVD)
    whenever the layers' biases (Qwen2's q/k/v) are alike; with ``num_blocks == L`` it always does.

    Args:
        model_or_path: the Hugging Face causal LM, a checkpoint folder or a ``.gguf`` file.
        num_blocks: B unique blocks, 1 <= B <= L (default L: one block per layer, the untied model); L must suit
            ``sharing`` (see ``RecursiveConfig``).
        sharing: ``"cycle"``, ``"sequence"`` or ``"middle_cycle"`` (not ``"hierarchical"``).
        init: ``"stepwise"``, ``"average"``, ``"lower"`` or ``"upper"``.
        lora_rank: rank of every target (0: no relaxation), or a mapping from target to rank.
        lora_targets: projections carrying the per-layer LoRA, among "q", "k", "v", "o", "gate",
            "up", "down".
        lora_init: ``"svd"``, ``"activation"`` or ``"zero"``.
        calibration: token ids ((N, S) or (S,)) run through the original model for ``lora_init="activation"``.
        fold_norms: fold the norm gains into the projections first.
        lora_alpha: LoRA alpha (scaling ``lora_alpha / r``).
        dtype: the dtype to load ``model_or_path`` in when it is a path.
        progress: show a progress bar (unit: layer) on stderr; None: only for models of
            :data:`PROGRESS_MIN_PARAMETERS` parameters or more.
        svd_init: deprecated; ``lora_init="svd"`` (True) or ``"zero"`` (False).

    Raises:
        ValueError: naming ``model_or_path`` for an unsupported model type or a configuration this
            package cannot reproduce (RoPE scaling, partial rotary embeddings, a sliding window
            shorter than ``max_position_embeddings``, bidirectional attention, biases or extra
            parameters a recursive block has no place for) or a path that holds no model, or naming the
            argument that is invalid.
    """
    looped = looped_model_type(model_or_path)
    if looped is not None:
        given = [name for name, value, default in (
            ("num_blocks", num_blocks, None), ("sharing", sharing, "cycle"), ("init", init, "stepwise"),
            ("lora_rank", lora_rank, 0), ("lora_init", lora_init, "svd"), ("calibration", calibration, None),
            ("svd_init", svd_init, None)) if value is not default and value != default]
        if given:
            raise ValueError(f"{given[0]}: {looped} is a looped model already; it converts as it is (no ties, no "
                             f"adapters: relax or train it afterwards)")
        return convert_looped(model_or_path, dtype)
    if svd_init is not None:
        if not isinstance(svd_init, bool):
            raise ValueError(f"svd_init: expected a bool, got {svd_init!r}")
        warnings.warn("convert_hf: svd_init is deprecated; use lora_init='svd' or 'zero'", DeprecationWarning,
                      stacklevel=2)
        lora_init = "svd" if svd_init else "zero"
    hf_model = load_hf(model_or_path, dtype) if isinstance(model_or_path, (str, os.PathLike)) else model_or_path
    layers = _decoder_layers(hf_model)
    num_layers = len(layers)
    if num_blocks is None:
        num_blocks = num_layers
    if isinstance(num_blocks, bool) or not isinstance(num_blocks, int) or not 1 <= num_blocks <= num_layers:
        raise ValueError(f"num_blocks: expected an int in [1, {num_layers}] (the model's layers), got {num_blocks!r}")
    for name, value, choices in (("sharing", sharing, CONVERTIBLE_SHARING), ("init", init, INIT_SCHEMES),
                                 ("lora_init", lora_init, LORA_INITS)):
        if value not in choices:
            raise ValueError(f"{name}: expected one of {choices}, got {value!r}")
    lora_targets = _check_targets(lora_targets)
    if not isinstance(fold_norms, bool):
        raise ValueError(f"fold_norms: expected a bool, got {fold_norms!r}")
    if isinstance(lora_rank, bool) or not isinstance(lora_rank, (int, Mapping)):
        raise ValueError(f"lora_rank: expected an int >= 0 or a mapping from target to rank, got {lora_rank!r}")
    ranks = dict(lora_rank) if isinstance(lora_rank, Mapping) else lora_rank
    relaxed = any(ranks.values()) if isinstance(ranks, dict) else ranks != 0
    config = RecursiveConfig(
        **_architecture(hf_model, layers), num_layers=num_layers, num_blocks=num_blocks, sharing=sharing,
        relaxation="depth_lora" if relaxed else "none", lora_rank=ranks if relaxed else 0, lora_alpha=lora_alpha,
        lora_targets=lora_targets if relaxed else None,
    )
    activation_aware = relaxed and lora_init == "activation"
    if activation_aware:
        if calibration is None:
            raise ValueError("calibration: lora_init='activation' needs calibration token ids")
        calibration = check_calibration(calibration, config.vocab_size)
    elif calibration is not None:
        raise ValueError(f"calibration: only used with lora_init='activation' and lora_rank > 0 (lora_init is "
                         f"{lora_init!r}, relaxed: {relaxed})")

    reference = hf_model.get_input_embeddings().weight
    model = RecursiveForCausalLM.empty(config, reference.dtype, reference.device)
    sources = _source_layers(config, init)
    if progress is None:
        progress = sum(p.numel() for p in hf_model.parameters()) >= PROGRESS_MIN_PARAMETERS

    def parameters(layer: int) -> Dict[str, Tensor]:
        return _layer_parameters(layers[layer], fold_norms, config.norm_unit_offset)

    factorised = relaxed and lora_init != "zero"
    with torch.no_grad(), Progress(num_blocks + (num_layers if factorised else 0), enabled=progress,
                                   unit="layer") as bar:
        _copy_outer(model, hf_model)
        for block, block_sources in zip(model.model.blocks, sources):
            _initialise_block(block, [parameters(i) for i in block_sources])
            for module in block.modules():  # PEFT's init, which the factorisations below overwrite
                if isinstance(module, LowRankLinear):
                    module.reset_adapters()
            bar.step(f"block {block.block_index} from layers {block_sources}")
        if factorised:
            if activation_aware:
                statistics = input_covariances(hf_model, calibration, config.rms_norm_eps)
            else:
                statistics = ((layer, None) for layer in range(num_layers))
            for layer, covariances in statistics:
                _initialise_adapters(model, layer, parameters(layer), covariances)
                bar.step(f"adapters of layer {layer}")
    return model.train(hf_model.training)


def load_hf(path: Union[str, os.PathLike], dtype: Optional[torch.dtype] = None) -> nn.Module:
    """The Hugging Face causal LM in a checkpoint folder (local files only) or a GGUF file (dequantised), in
    ``dtype`` (default: the folder's own dtype; float32 for GGUF). Needs transformers (and gguf for GGUF)."""
    path = os.fspath(path)
    if importlib.util.find_spec("transformers") is None:
        raise ValueError(f"model_or_path: loading {path!r} needs transformers (pip install transformers)")
    import transformers

    if os.path.isfile(path) and path.lower().endswith(".gguf"):
        if importlib.util.find_spec("gguf") is None:
            raise ValueError(f"model_or_path: reading the GGUF file {path!r} needs the gguf package (pip install gguf)")
        folder, options = os.path.dirname(os.path.abspath(path)), dict(gguf_file=os.path.basename(path))
        dtype = dtype or torch.float32
    elif os.path.isfile(os.path.join(path, "config.json")):
        folder, options = path, dict(local_files_only=True)
    else:
        raise ValueError(f"model_or_path: {path!r} is neither a checkpoint folder (with config.json) nor a .gguf file")
    # transformers renamed torch_dtype to dtype in 4.56
    major, minor = (int(part) for part in re.findall(r"\d+", transformers.__version__)[:2])
    options["dtype" if (major, minor) >= (4, 56) else "torch_dtype"] = dtype or "auto"
    try:
        return transformers.AutoModelForCausalLM.from_pretrained(folder, **options)
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"model_or_path: transformers cannot load {path!r} ({type(exc).__name__}: {exc})") from None


def _decoder_layers(hf_model: nn.Module) -> List[nn.Module]:
    """The decoder layers of a supported Hugging Face causal LM."""
    model_type = getattr(getattr(hf_model, "config", None), "model_type", None)
    body = getattr(hf_model, "model", None)
    shaped = isinstance(getattr(body, "layers", None), nn.ModuleList) and getattr(hf_model, "lm_head", None) is not None
    if not isinstance(hf_model, nn.Module) or model_type not in SUPPORTED_MODEL_TYPES or not shaped:
        raise ValueError(
            f"model_or_path: expected a Hugging Face causal LM of model type {SUPPORTED_MODEL_TYPES} (for example "
            f"LlamaForCausalLM), got {type(hf_model).__name__} of model type {model_type!r}"
        )
    return list(body.layers)


def _check_targets(lora_targets: Sequence[str]) -> tuple:
    if isinstance(lora_targets, str) or not isinstance(lora_targets, Sequence):
        raise ValueError(f"lora_targets: expected a sequence of targets among {LORA_TARGETS}, got {lora_targets!r}")
    unknown = [t for t in lora_targets if t not in LORA_TARGETS]
    if unknown or not lora_targets or len(set(lora_targets)) != len(lora_targets):
        raise ValueError(
            f"lora_targets: expected distinct targets among {LORA_TARGETS}, at least one, got {tuple(lora_targets)!r}"
        )
    return tuple(lora_targets)


def _architecture(hf_model: nn.Module, layers: List[nn.Module]) -> Dict[str, object]:
    """The ``RecursiveConfig`` fields that describe ``hf_model``'s architecture; raises for what the
    recursive model cannot reproduce."""
    hf_config = hf_model.config
    gemma = hf_config.model_type == "gemma"
    if getattr(hf_config, "use_bidirectional_attention", False):
        raise ValueError("model_or_path: bidirectional attention (use_bidirectional_attention) is not supported")
    _check_sliding_window(hf_config)
    heads = hf_config.num_attention_heads
    tied = hf_model.get_output_embeddings().weight is hf_model.get_input_embeddings().weight
    return dict(
        vocab_size=hf_model.get_input_embeddings().weight.shape[0],
        hidden_size=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        num_attention_heads=heads,
        num_key_value_heads=getattr(hf_config, "num_key_value_heads", None) or heads,
        head_dim=getattr(hf_config, "head_dim", None) or hf_config.hidden_size // heads,
        hidden_act=_activation_name(layers[0].mlp.act_fn),
        rms_norm_eps=hf_config.rms_norm_eps,
        norm_unit_offset=gemma,
        rope_theta=_rope_theta(hf_config),
        qkv_bias=layers[0].self_attn.q_proj.bias is not None,
        tie_word_embeddings=tied,
        embed_scale=hf_config.hidden_size ** 0.5 if gemma else 1.0,
        initializer_range=hf_config.initializer_range,
    )


def _rope_theta(hf_config) -> float:
    """The RoPE base; raises for scaled or partial rotary embeddings, which the recursive model lacks."""
    parameters = getattr(hf_config, "rope_parameters", None)  # transformers >= 5
    if parameters is None:  # transformers 4: rope_theta beside an optional rope_scaling
        parameters = dict(getattr(hf_config, "rope_scaling", None) or {}, rope_theta=hf_config.rope_theta)
    rope_type = parameters.get("rope_type", parameters.get("type", "default"))
    if rope_type != "default":
        raise ValueError(f"model_or_path: RoPE scaling of type {rope_type!r} is not supported (only the default RoPE)")
    partial = parameters.get("partial_rotary_factor", getattr(hf_config, "partial_rotary_factor", 1.0))
    if partial != 1.0:
        raise ValueError(f"model_or_path: partial rotary embeddings (partial_rotary_factor={partial}) are not "
                         "supported")
    return float(parameters["rope_theta"])


def _check_sliding_window(hf_config) -> None:
    """Raise when some layer attends through a sliding window that a sequence can outgrow: the recursive
    model's attention is full causal, which equals the windowed one only while sequences fit the window."""
    window = getattr(hf_config, "sliding_window", None)
    if getattr(hf_config, "use_sliding_window", True) is False:  # Qwen2 keeps a window it does not use
        window = None
    layer_types = getattr(hf_config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        window = None
    limit = getattr(hf_config, "max_position_embeddings", None)
    if window is not None and (limit is None or window < limit):
        raise ValueError(
            f"model_or_path: sliding-window attention (sliding_window={window} < max_position_embeddings={limit}) is "
            f"not supported; full attention equals it on sequences of at most {window} tokens: set "
            f"config.sliding_window = None on the model to convert with full attention"
        )


def _activation_name(act_fn: nn.Module) -> str:
    """Which of the recursive model's activations ``act_fn`` computes. Probed rather than read from the
    config, where transformers versions differ (Gemma's ``hidden_act`` / ``hidden_activation``)."""
    probe = torch.linspace(-6.0, 6.0, 97, dtype=torch.float64)
    values = act_fn(probe)
    for name in ACTIVATIONS:
        if torch.allclose(values, activation(name)(probe), rtol=1e-9, atol=1e-12):
            return name
    raise ValueError(f"model_or_path: the MLP activation {type(act_fn).__name__} is none of {ACTIVATIONS}")


def _source_layers(config: RecursiveConfig, init: str) -> List[List[int]]:
    """The original layers each block takes its parameters from (their mean when several)."""
    L, B = config.num_layers, config.num_blocks
    if init == "stepwise":
        return [[round(Fraction(b * (L - 1), B - 1)) if B > 1 else 0] for b in range(B)]
    if init == "average":
        return [config.layers_of_block(b) for b in range(B)]
    if init == "lower":
        return [[b] for b in range(B)]
    return [[L - B + b] for b in range(B)]


def _copy(target: Tensor, source: Tensor, name: str) -> None:
    if target.shape != source.shape:
        raise ValueError(f"model_or_path: {name} has shape {tuple(source.shape)}, its config implies "
                         f"{tuple(target.shape)}")
    target.copy_(source)


def _copy_outer(model: RecursiveForCausalLM, hf_model: nn.Module) -> None:
    """The parameters outside the blocks (embeddings, final norm, untied LM head), which have the same
    names in both models."""
    ours = {name: p for name, p in model.named_parameters() if not name.startswith("model.blocks.")}
    theirs = {name: p for name, p in hf_model.named_parameters() if not name.startswith("model.layers.")}
    if set(ours) != set(theirs):
        raise ValueError(f"model_or_path: parameters outside the decoder layers {sorted(theirs)} do not match a "
                         f"recursive model's {sorted(ours)}")
    for name, parameter in ours.items():
        _copy(parameter, theirs[name], name)


def _layer_parameters(layer: nn.Module, fold: bool, unit_offset: bool) -> Dict[str, Tensor]:
    """``layer``'s parameters by name; with ``fold``, each norm's gain folded into the projections it feeds and
    the norm made a unit gain (weight 1, or 0 for ``unit_offset`` norms, whose gain is ``1 + weight``)."""
    parameters = dict(layer.named_parameters())
    if not fold:
        return parameters
    for norm in dict.fromkeys(NORM_OF_TARGET.values()):
        weight = parameters[f"{norm}.weight"]
        compute = accumulation_dtype(weight.dtype)
        gain = weight.to(compute) + 1 if unit_offset else weight.to(compute)
        parameters[f"{norm}.weight"] = torch.zeros_like(weight) if unit_offset else torch.ones_like(weight)
        for target in (t for t, fed_by in NORM_OF_TARGET.items() if fed_by == norm):
            name = f"{TARGET_MODULES[target]}.weight"
            projection = parameters[name]
            parameters[name] = (projection.to(compute) * gain).to(projection.dtype)
    return parameters


def _initialise_block(block: nn.Module, sources: List[Dict[str, Tensor]]) -> None:
    """Every parameter of ``block`` but its adapters: the mean of the same parameter over the ``sources`` (the
    parameters of the layers it takes, by name)."""
    shared = {name: p for name, p in block.named_parameters() if not name.endswith((".lora_a", ".lora_b"))}
    for carried in sources:
        if set(carried) != set(shared):
            raise ValueError(
                f"model_or_path: its decoder layers do not match a recursive block: parameters with no place in one "
                f"{sorted(set(carried) - set(shared))}, missing {sorted(set(shared) - set(carried))}"
            )
    for name, parameter in shared.items():
        values = [carried[name] for carried in sources]
        if len(values) > 1:
            compute = accumulation_dtype(parameter.dtype)
            values = [torch.stack([v.to(compute) for v in values]).mean(0)]
        _copy(parameter, values[0], name)


def _initialise_adapters(model: RecursiveForCausalLM, layer: int, original: Dict[str, Tensor],
                         covariances: Optional[Dict[str, Tensor]]) -> None:
    """Layer ``layer``'s adapters: the best rank-r approximation of what sharing took from each target projection
    (``original``: the layer's parameters), weighted by its inputs' ``covariances`` when given."""
    block = model.model.blocks[model.config.block_of_layer(layer)]
    whitening: Dict[str, Tensor] = {}
    for target in model.config.lora_targets:
        projection: LowRankLinear = block.get_submodule(TARGET_MODULES[target])
        if projection.lora_a is None:  # rank 0 in a mapping
            continue
        compute = accumulation_dtype(projection.weight.dtype)
        residual = original[f"{TARGET_MODULES[target]}.weight"].to(compute) - projection.weight.to(compute)
        if not residual.any():  # the block's own layer: PEFT's init (B = 0) is exact and leaves A trainable
            continue
        factor = None
        if covariances is not None:
            source = INPUT_OF_TARGET[target]
            if source not in whitening:
                covariance = covariances[source]
                norm = NORM_OF_TARGET.get(target)
                if norm is not None:  # the block's own gain (a unit gain once folded) scales what it reads
                    gain = block.get_submodule(norm).weight.to(torch.float64)
                    gain = gain + 1 if model.config.norm_unit_offset else gain
                    covariance = covariance * gain[:, None] * gain[None, :]
                whitening[source] = input_whitening(covariance)
            factor = whitening[source]
        left, right = weighted_truncated_svd(residual, projection.rank, factor)
        adapter = block.adapter_index(layer)
        projection.lora_a[adapter] = right
        projection.lora_b[adapter] = left / projection.scaling


def export_hf(model: RecursiveForCausalLM, model_type: Optional[str] = None) -> nn.Module:
    """The Hugging Face causal LM that computes what ``model`` computes: the inverse of :func:`convert_hf`.

    The model is first merged and untied (:meth:`RecursiveForCausalLM.merge_and_untie`, a copy); each
    effective layer then becomes one Hugging Face decoder layer. Needs ``transformers`` (imported here only).

    Args:
        model: a :class:`RecursiveForCausalLM` that :meth:`~RecursiveForCausalLM.merge_and_untie` serves
            (relaxation "none", "depth_lora" or "qkov_lora"; not HRM or Mixture-of-Recursions).
        model_type: "llama", "mistral", "qwen2", "gemma" or "hrm_text"; default: read off the architecture
            (HRM-Text's flow, else Gemma's unit-offset norms and embedding scale, else Qwen2 for q/k/v biases, else
            Llama).

    Returns:
        A ``transformers`` ``*ForCausalLM`` in ``model``'s dtype and on its device, in eval mode; its
        ``save_pretrained`` writes a checkpoint that any Hugging Face tool loads.

    Raises:
        ValueError: naming ``model`` when the architecture has no counterpart of ``model_type`` (for example
            q/k/v biases in Llama, or Gemma's norms elsewhere), naming ``model_type`` when it is unknown.
    """
    import transformers

    if not isinstance(model, RecursiveForCausalLM):
        raise ValueError(f"model: expected a RecursiveForCausalLM, got {type(model).__name__}")
    config = model.config
    if model_type == hrm_text.MODEL_TYPE or (model_type is None and config.hrm_flow == "hrm_text"):
        return hrm_text.to_hf(model)
    gemma_like = config.norm_unit_offset or config.embed_scale != 1.0
    if model_type is None:
        model_type = "gemma" if gemma_like else "qwen2" if config.qkv_bias else "llama"
    if model_type not in EXPORT_MODEL_TYPES:
        raise ValueError(f"model_type: expected one of {EXPORT_MODEL_TYPES}, got {model_type!r}")
    gemma = model_type == "gemma"
    if gemma_like != gemma or (gemma and (not config.norm_unit_offset
                                          or config.embed_scale != config.hidden_size ** 0.5)):
        raise ValueError(f"model: norm_unit_offset={config.norm_unit_offset} and embed_scale={config.embed_scale} are "
                         f"{'not ' if gemma else ''}Gemma's (unit-offset norms and sqrt(hidden_size)); model_type "
                         f"{model_type!r} cannot carry them")
    if config.qkv_bias and model_type != "qwen2":
        raise ValueError(f"model: q/k/v biases (qkv_bias) have no place in a {model_type} model; "
                         "use model_type 'qwen2'")
    model = model.merge_and_untie()  # also checks that the model has a plain-stack counterpart
    options = dict(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_attention_heads,
        num_key_value_heads=config.num_key_value_heads, head_dim=config.head_dim, hidden_act=config.hidden_act,
        rms_norm_eps=config.rms_norm_eps, rope_theta=config.rope_theta, tie_word_embeddings=config.tie_word_embeddings,
        initializer_range=config.initializer_range,
    )
    if gemma:
        options["hidden_activation"] = config.hidden_act
    if model_type in ("mistral", "qwen2"):
        options.update(sliding_window=None, use_sliding_window=False)
    hf_config = transformers.AutoConfig.for_model(model_type, **options)
    parameter = next(model.parameters())
    hf_model = transformers.AutoModelForCausalLM.from_config(hf_config).to(device=parameter.device,
                                                                          dtype=parameter.dtype)
    layers = _decoder_layers(hf_model)
    # The options went through transformers' own config handling, which differs between versions: check.
    if _activation_name(layers[0].mlp.act_fn) != config.hidden_act or _rope_theta(hf_model.config) != config.rope_theta:
        raise ValueError(f"model: this transformers version builds {model_type} with another activation or RoPE base "
                         f"than hidden_act={config.hidden_act!r}, rope_theta={config.rope_theta}")
    state = {name.replace("model.blocks.", "model.layers.", 1): tensor for name, tensor in model.state_dict().items()}
    theirs = hf_model.state_dict()
    for name in theirs:  # Qwen2 always has q/k/v biases: zeros stand for a model without them
        if name not in state and name.endswith(("q_proj.bias", "k_proj.bias", "v_proj.bias")):
            state[name] = torch.zeros_like(theirs[name])
    if set(state) != set(theirs) or any(state[name].shape != theirs[name].shape for name in theirs):
        wrong = sorted(n for n in set(state) & set(theirs) if state[n].shape != theirs[n].shape)
        raise ValueError(f"model: its parameters do not map onto {type(hf_model).__name__}'s (missing "
                         f"{sorted(set(theirs) - set(state))}, unexpected {sorted(set(state) - set(theirs))}, "
                         f"shapes differ: {wrong})")
    hf_model.load_state_dict(state)
    return hf_model.eval()
