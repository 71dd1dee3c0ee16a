"""What the test modules share; a helper module, not a test module: it imports no test module.

* the backends this machine can serve (:func:`serving_backends`) and the one error rule they are held to
  (:func:`assert_error_rule`, on :func:`relative_error`);
* plain-PyTorch references written from the math (``ref_*``, no kernels), float64 at ``TOL``;
* tiny seeded float64 models (:func:`make_model`, one configuration per relaxation in ``RELAXATIONS``, the
  other data flows in ``HIERARCHICAL`` and ``MIXTURE_OF_RECURSIONS``), the parameter copies an unrolled
  reference runs on (:func:`copies`) and the checks of a model against that reference;
* tiny float64 Hugging Face models of the families the converter takes (:func:`make_hf`; ``transformers``
  is imported only when one is built: the tests that build them skip without it);
* checks of the generation engines: every request completes, synchronisations per engine step;
* training runs: an untrained float32 model for the synthetic corpus (:func:`corpus_model`), the rows of a
  metrics file (:func:`read_rows`).
"""

from __future__ import annotations

import json
import math
import warnings
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recursive import RecursiveConfig, RecursiveForCausalLM
from recursive.generation import next_tokens
from recursive_kernels import backends

# Backends and the error rule.


def serving_backends(op: str, dtype: torch.dtype, **inputs):
    """(backend, device) pairs that can serve ``op`` in ``dtype`` (and the op's other ``inputs`` of its
    support checks) on this machine."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    pairs = []
    for device in devices:
        for name in backends.BACKENDS:
            if not backends.reasons(op, name, device, dtype=dtype, **inputs):
                pairs.append(pytest.param(name, device, id=f"{name}-{device.type}"))
    return pairs


def per_backend(dtypes, pairs_of):
    """pytest params ``(dtype, backend, device)``: each dtype with each (backend, device) pair that ``pairs_of(dtype)``
    returns (as :func:`serving_backends` does), so that a test's id names its backend (``-k triton`` selects it)."""
    return [pytest.param(dtype, *p.values, id=f"{dtype}-{p.id}") for dtype in dtypes for p in pairs_of(dtype)]


def relative_error(ours: Tensor, ref: Tensor) -> float:
    """``||ours - ref|| / ||ref||`` (Frobenius norms, float64 on the CPU; a zero ``ref`` counts as 1e-30)."""
    ours, ref = ours.detach().double().cpu(), ref.detach().double().cpu()
    assert ours.shape == ref.shape, f"shape {tuple(ours.shape)} != reference's {tuple(ref.shape)}"
    return ((ours - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def assert_error_rule(name: str, ours: Tensor, ref: Tensor, eager: Tensor, dtype: torch.dtype,
                      floor: Optional[float] = None) -> None:
    """The error rule (FlashAttention's): ``ours``, a backend's result computed in ``dtype``, is finite, and
    its :func:`relative_error` against ``ref``, the float64 reference, is at most twice that of ``eager``, the
    same computation done eagerly by PyTorch in ``dtype``, plus ``floor`` (by default half an ulp of
    ``dtype``, ``torch.finfo(dtype).eps / 2``)."""
    floor = torch.finfo(dtype).eps / 2 if floor is None else floor
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err, eager_err = relative_error(ours, ref), relative_error(eager, ref)
    assert err <= 2 * eager_err + floor, (f"{name}: error {err:.3e} > 2 x eager {dtype} error {eager_err:.3e} "
                                          f"+ {floor:.1e}")


# References, from the formulas.

def max_relative_error(actual: Tensor, expected: Tensor, mask: Optional[Tensor] = None) -> float:
    """The largest difference (at the real tokens of ``mask`` (B, S), when given) relative to the largest expected
    value there."""
    if mask is not None:
        actual, expected = actual[mask.bool()], expected[mask.bool()]
    return ((actual - expected).abs().max() / expected.abs().max()).item()


@torch.no_grad()
def sampled_by_recompute(model, ids: Tensor, new_tokens: int, seed: int, **sampling) -> Tensor:
    """``ids`` followed by ``new_tokens`` tokens, each drawn (``next_tokens`` with ``sampling``, after
    ``torch.manual_seed(seed)``) from a full forward without cache: what cached sampled ``generate`` must equal."""
    torch.manual_seed(seed)
    for _ in range(new_tokens):
        drawn = next_tokens(model(ids).logits[:, -1], do_sample=True, **sampling)
        ids = torch.cat((ids, drawn[:, None]), 1)
    return ids


DTYPE = torch.float64
TOL = {"rtol": 1e-9, "atol": 1e-10}


def ref_activation(name: str, x: Tensor) -> Tensor:
    if name == "silu":
        return x * torch.sigmoid(x)
    if name == "gelu":
        return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x**3)))


def ref_rms_norm(x: Tensor, weight: Tensor, eps: float, unit_offset: bool) -> Tensor:
    normed = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return normed * (1.0 + weight) if unit_offset else normed * weight


def ref_rope(x: Tensor, positions: Tensor, theta: float) -> Tensor:
    """x (B, S, heads, D): dims i and i + D/2 rotate together by ``position * theta ** (-2i / D)``."""
    half = x.shape[-1] // 2
    angles = positions[..., None].to(x.dtype) * theta ** (-torch.arange(half, dtype=x.dtype) * 2 / x.shape[-1])
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def sub(params: Dict[str, Tensor], prefix: str) -> Dict[str, Tensor]:
    """The entries under ``prefix`` with the prefix removed."""
    return {name[len(prefix):]: t for name, t in params.items() if name.startswith(prefix)}


def ref_linear(x: Tensor, params: Dict[str, Tensor], name: str, adapter: int, alpha: float) -> Tensor:
    """PEFT's LoRA as a merged weight: ``x (W + alpha / r * B_e A_e)^T + b`` (no adapter when -1)."""
    weight = params[f"{name}.weight"]
    if adapter >= 0 and f"{name}.lora_a" in params:
        lora_a, lora_b = params[f"{name}.lora_a"][adapter], params[f"{name}.lora_b"][adapter]
        weight = weight + alpha / lora_a.shape[0] * lora_b @ lora_a
    y = x @ weight.T
    return y + params[f"{name}.bias"] if f"{name}.bias" in params else y


def ref_attention(
    x: Tensor, params: Dict[str, Tensor], adapter: int, *, heads: int, kv_heads: int, head_dim: int,
    positions: Tensor, theta: float, causal: bool, alpha: float, key_mask: Optional[Tensor] = None,
) -> Tensor:
    """Grouped-query attention with per-depth LoRA and the QK/OV circuit of depth ``adapter``."""
    B, S, _ = x.shape
    group = heads // kv_heads
    q = ref_rope(ref_linear(x, params, "q_proj", adapter, alpha).view(B, S, heads, head_dim), positions, theta)
    k = ref_rope(ref_linear(x, params, "k_proj", adapter, alpha).view(B, S, kv_heads, head_dim), positions, theta)
    v = ref_linear(x, params, "v_proj", adapter, alpha).view(B, S, kv_heads, head_dim)
    q = q.transpose(1, 2)
    k, v = k.transpose(1, 2).repeat_interleave(group, 1), v.transpose(1, 2).repeat_interleave(group, 1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    circuit = adapter >= 0 and "qk_u" in params
    if circuit:
        q_c = torch.einsum("bsk,hrk->bhsr", x, params["qk_u"][adapter])
        k_c = torch.einsum("bsk,grk->bgsr", x, params["qk_v"][adapter]).repeat_interleave(group, 1)
        scores = scores + q_c @ k_c.transpose(-1, -2)
    allowed = torch.ones(S, S, dtype=torch.bool)
    if causal:
        allowed = allowed.tril()
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    probs = torch.softmax(scores.masked_fill(~allowed, float("-inf")), dim=-1).nan_to_num(0.0)
    out = probs @ v
    if circuit:
        v_c = torch.einsum("bsk,grk->bgsr", x, params["ov_c"][adapter]).repeat_interleave(group, 1)
        out = out + torch.einsum("bhsr,hdr->bhsd", probs @ v_c, params["ov_d"][adapter])
    return ref_linear(out.transpose(1, 2).reshape(B, S, heads * head_dim), params, "o_proj", adapter, alpha)


def ref_feed_forward(x: Tensor, params: Dict[str, Tensor], adapter: int, act: str, alpha: float) -> Tensor:
    hidden = (ref_activation(act, ref_linear(x, params, "gate_proj", adapter, alpha))
              * ref_linear(x, params, "up_proj", adapter, alpha))
    return ref_linear(hidden, params, "down_proj", adapter, alpha)


def ref_mixture(x: Tensor, params: Dict[str, Tensor], top_k: int, act: str, alpha: float,
                token_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
    """Mixture of LoRAs: per token ``W + s * sum_{i in topk} p_i B_i A_i``; and the load-balancing loss."""
    probs = torch.softmax(x @ params["router.weight"].T, dim=-1)
    gates, experts = probs.topk(top_k, dim=-1)
    routing = torch.zeros_like(probs).scatter_add(-1, experts, gates)  # (*, E): each expert's gate, 0 if unchosen

    def projection(h: Tensor, name: str) -> Tensor:
        y = h @ params[f"{name}.weight"].T
        if f"{name}.lora_a" in params:
            lora_a, lora_b = params[f"{name}.lora_a"], params[f"{name}.lora_b"]
            for e in range(lora_a.shape[0]):
                y = y + alpha / lora_a.shape[1] * routing[..., e:e + 1] * (h @ (lora_b[e] @ lora_a[e]).T)
        return y

    out = projection(ref_activation(act, projection(x, "gate_proj")) * projection(x, "up_proj"), "down_proj")
    num_experts = probs.shape[-1]
    weight = torch.ones(probs.shape[:-1], dtype=probs.dtype) if token_mask is None else token_mask.to(probs.dtype)
    chosen = F.one_hot(experts, num_experts).sum(-2).to(probs.dtype)
    fraction = (chosen * weight[..., None]).sum(tuple(range(chosen.dim() - 1))) / (weight.sum() * top_k)
    mean_prob = (probs * weight[..., None]).sum(tuple(range(probs.dim() - 1))) / weight.sum()
    return out, num_experts * (fraction * mean_prob).sum()


def ref_block(h: Tensor, params: Dict[str, Tensor], adapter: int, config: RecursiveConfig, positions: Tensor,
              causal: bool, key_mask: Optional[Tensor] = None) -> Tuple[Tensor, Optional[Tensor]]:
    """A pre-norm block on its own parameter copies; returns the new hidden states and the MoL loss."""
    norm = {"eps": config.rms_norm_eps, "unit_offset": config.norm_unit_offset}
    x = ref_rms_norm(h, params["input_layernorm.weight"], **norm)
    h = h + ref_attention(
        x, sub(params, "self_attn."), adapter, heads=config.num_attention_heads, kv_heads=config.num_key_value_heads,
        head_dim=config.head_dim, positions=positions, theta=config.rope_theta, causal=causal,
        alpha=config.lora_alpha, key_mask=key_mask,
    )
    x = ref_rms_norm(h, params["post_attention_layernorm.weight"], **norm)
    if config.relaxation == "mol":
        out, aux = ref_mixture(x, sub(params, "mlp."), config.num_experts_per_tok, config.hidden_act, config.lora_alpha,
                               None if key_mask is None else key_mask.bool())
        return h + out, aux
    return h + ref_feed_forward(x, sub(params, "mlp."), adapter, config.hidden_act, config.lora_alpha), None


# Tiny models.

VOCAB = 97


def randomize_(module: nn.Module, scale: float = 0.2) -> nn.Module:
    """Perturb every parameter (fresh LoRA B and circuit U, D are zero: the relaxations would do nothing)."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(scale * torch.randn_like(p))
    return module


def tiny_config(**kwargs) -> RecursiveConfig:
    options = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_attention_heads=4, num_key_value_heads=2,
                   num_layers=4, num_blocks=2, lora_rank=3, lora_alpha=6.0, circuit_rank=3, num_experts=4,
                   num_experts_per_tok=2, router_aux_loss_coef=0.1)
    options.update(kwargs)
    return RecursiveConfig(**options)


# One configuration per relaxation, spread over the sharing schemes and the Hugging Face model options.
RELAXATIONS = {
    "none": dict(relaxation="none", qkv_bias=True, tie_word_embeddings=True),  # Qwen2-like
    "depth_lora": dict(relaxation="depth_lora", sharing="sequence",
                       lora_rank={"q": 4, "k": 2, "v": 3, "o": 4, "gate": 2, "up": 4, "down": 3}),
    "qkov_lora": dict(relaxation="qkov_lora", sharing="middle_cycle", num_layers=5, num_blocks=3, start_index=2,
                      head_dim=12, norm_unit_offset=True, embed_scale=math.sqrt(32), hidden_act="gelu_pytorch_tanh",
                      tie_word_embeddings=True),  # Gemma-like
    "circuit": dict(relaxation="circuit", num_layers=6, start_index=1),
    "mol": dict(relaxation="mol", num_blocks=1, hidden_act="gelu", lora_targets=("gate", "down")),
}


def make_model(cls=RecursiveForCausalLM, seed: int = 0, **kwargs):
    torch.manual_seed(seed)
    return randomize_(cls(tiny_config(**kwargs)).to(DTYPE), scale=0.1)


LayerCopy = Tuple[int, Dict[str, Tensor], int]  # (block, parameters, adapter)


def copies(model) -> Tuple[Dict[str, Tensor], List[LayerCopy]]:
    """Copies of the parameters outside the blocks, and one copy of its block per effective layer."""
    config = model.config
    top = {name: p.detach().clone().requires_grad_() for name, p in model.named_parameters() if ".blocks." not in name}
    layers = []
    for layer in range(config.num_layers):
        block = config.block_of_layer(layer)
        params = {name: p.detach().clone().requires_grad_() for name, p in model.model.blocks[block].named_parameters()}
        depth_layers = config.depth_layers_of_block(block)
        layers.append((block, params, depth_layers.index(layer) if layer in depth_layers else -1))
    return top, layers


def assert_grads_are_sums_over_depths(model, top, layers: List[LayerCopy]) -> None:
    """Each parameter's gradient equals its copy's (outside the blocks) or the sum of its copies' over the
    effective layers that run its block."""
    for name, param in model.named_parameters():
        if ".blocks." in name:
            block, local = int(name.split(".")[2]), name.split(".", 3)[3]
            grads = [params[local].grad for b, params, _ in layers if b == block and params[local].grad is not None]
            expected = torch.stack(grads).sum(0) if grads else torch.zeros_like(param)
        else:
            expected = top[name].grad
        got = torch.zeros_like(param) if param.grad is None else param.grad
        torch.testing.assert_close(got, expected, **TOL, msg=lambda m: f"{name}: {m}")


def check_against_reference(model, out, ref_logits, ref_loss, top, layers, real: Optional[Tensor] = None) -> None:
    """Backpropagates ``ref_loss``, an unrolled reference's loss on the copies ``top, layers`` (:func:`copies`),
    and checks ``out``, the model's output (its loss backpropagated), against it: the logits at the ``real``
    tokens (all by default), the loss, and every parameter's gradient."""
    ref_loss.backward()
    real = torch.ones(out.logits.shape[:2], dtype=torch.bool) if real is None else real
    torch.testing.assert_close(out.logits[real], ref_logits[real], **TOL)
    torch.testing.assert_close(out.loss, ref_loss, **TOL)
    assert_grads_are_sums_over_depths(model, top, layers)


# make_model options of the other data flows: hierarchical recurrence (HRM-LM) and Mixture-of-Recursions.
HIERARCHICAL = {
    "two_blocks": dict(sharing="hierarchical", num_layers=6, num_blocks=2, hrm_period=2, relaxation="none"),
    "modules_of_two": dict(sharing="hierarchical", num_layers=8, num_blocks=4, hrm_period=3, relaxation="depth_lora"),
    "one_step": dict(sharing="hierarchical", num_layers=6, num_blocks=2, hrm_period=2, relaxation="qkov_lora",
                     hrm_one_step_gradient=True),
}

MIXTURE_OF_RECURSIONS = {
    "expert_cycle": dict(mor_routing="expert_choice", num_layers=6, num_blocks=2, relaxation="depth_lora",
                         mor_router_alpha=0.7, mor_z_loss_coef=0.05, mor_router_loss_coef=0.3),
    "expert_middle_cycle": dict(mor_routing="expert_choice", sharing="middle_cycle", num_layers=8, num_blocks=4,
                                mor_capacities=(1.0, 0.6, 0.3), relaxation="qkov_lora", start_index=2),
    "token_cycle": dict(mor_routing="token_choice", num_layers=3, num_blocks=1, relaxation="circuit",
                        mor_balance_loss_coef=0.2, mor_z_loss_coef=0.05),
    "expert_kv_sharing": dict(mor_routing="expert_choice", num_layers=6, num_blocks=2, relaxation="depth_lora",
                              mor_kv_sharing=True, mor_capacities=(0.8, 0.6, 0.3)),
    "token_kv_sharing": dict(mor_routing="token_choice", sharing="middle_cycle", num_layers=8, num_blocks=4,
                             relaxation="qkov_lora", mor_kv_sharing=True, mor_balance_loss_coef=0.2),
    "expert_threshold": dict(mor_routing="expert_choice", num_layers=6, num_blocks=2, relaxation="circuit",
                             mor_threshold_routing=True, mor_capacities=(0.7, 0.5, 0.3), mor_router_loss_coef=0.3),
    "expert_threshold_kv_sharing": dict(mor_routing="expert_choice", sharing="middle_cycle", num_layers=8, num_blocks=4,
                                        relaxation="depth_lora", mor_threshold_routing=True, mor_kv_sharing=True,
                                        mor_router_loss_coef=0.3),
}


# Tiny Hugging Face models, of the tiny models' vocabulary.

HIDDEN, HEADS, KV_HEADS, INTERMEDIATE = 64, 4, 2, 96
THETA, EPS = 5000.0, 1e-5

# Per family: the Hugging Face classes, config options, and what the reference needs to know about it.
FAMILIES = {
    "llama": dict(cls="Llama", options={}, unit_offset=False, embed_scale=1.0, act="silu"),
    # Mistral's default window (4096) is below max_position_embeddings; full attention is what converts.
    "mistral": dict(cls="Mistral", options={"sliding_window": None}, unit_offset=False, embed_scale=1.0, act="silu"),
    "qwen2": dict(cls="Qwen2", options={"tie_word_embeddings": True}, unit_offset=False, embed_scale=1.0, act="silu"),
    "gemma": dict(cls="Gemma", options={"head_dim": 24}, unit_offset=True, embed_scale=HIDDEN ** 0.5,
                  act="gelu_pytorch_tanh"),
}


def hf_config(family: str, num_layers: int = 4, **options):
    import transformers

    spec = FAMILIES[family]
    values = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE, num_hidden_layers=num_layers,
                  num_attention_heads=HEADS, num_key_value_heads=KV_HEADS, rope_theta=THETA, rms_norm_eps=EPS,
                  max_position_embeddings=64, attn_implementation="eager")
    values.update(spec["options"])
    values.update(options)
    return getattr(transformers, f"{spec['cls']}Config")(**values)


def make_hf(family: str, num_layers: int = 4, seed: int = 0, uniform: bool = False, **options):
    """A float64 Hugging Face model with random norm weights and biases; ``uniform``: every layer's norms
    and biases equal layer 0's (the condition under which fewer blocks can be exact)."""
    import transformers

    torch.manual_seed(seed)
    config = hf_config(family, num_layers, **options)
    model = getattr(transformers, f"{FAMILIES[family]['cls']}ForCausalLM")(config).to(DTYPE).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith(".bias"):
                p.add_(0.3 * torch.randn_like(p))
        if uniform:
            first = model.model.layers[0]
            for layer in model.model.layers[1:]:
                for name, p in layer.named_parameters():
                    if "norm" in name or name.endswith(".bias"):
                        p.copy_(first.get_parameter(name))
    return model


# Generation engines.


def assert_every_request_completes(engine, outputs, prompts, counts, eos) -> None:
    """Each output is its prompt and then ``counts`` new tokens, or fewer ending at the first ``eos``; the
    engine's stats count them all."""
    assert len(outputs) == len(prompts)
    for output, prompt, count in zip(outputs, prompts, counts):
        new = output[len(prompt):]
        assert output[:len(prompt)] == prompt
        assert len(new) == count or (0 < len(new) < count and new[-1] == eos)
        assert eos not in new[:-1]
    assert engine.stats.new_tokens == sum(len(o) - len(p) for o, p in zip(outputs, prompts))


def synchronisations_per_step(engine, run_class, prompts, monkeypatch) -> List[int]:
    """The synchronising CUDA calls (torch's sync debug mode names each) of every ``run_class._step`` of
    ``engine.generate(prompts, 5)``, after a run of the same shapes that compiles and autotunes outside
    the count."""
    engine.generate(prompts, 5)
    counts = []
    step = run_class._step

    def counted(run):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                step(run)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        counts.append(sum("synchronizing" in str(w.message) for w in caught))

    monkeypatch.setattr(run_class, "_step", counted)
    engine.generate(prompts, 5)
    return counts


# Tokenizers and text, without downloads.


def save_hf_tokenizer(directory: str, vocab_size: int = 300, eos: bool = True) -> None:
    """A byte-level BPE tokenizer of ``vocab_size`` ids trained on a slice of the standard library's sources,
    saved as a Hugging Face fast tokenizer into ``directory`` (with ``<eos>`` as its end-of-text token)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    from recursive.training import stdlib_sources

    texts = [open(path, encoding="utf-8").read() for path in stdlib_sources(limit=5)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    special = ["<eos>"] if eos else []
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tokenizer.train_from_iterator(texts, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>" if eos else None).save_pretrained(directory)


# Training runs.


def corpus_model(seed: int = 0, **kwargs) -> RecursiveForCausalLM:
    """An untrained float32 model of :func:`tiny_config` for the synthetic corpus's byte ids, seeded and initialised
    as ``RecursiveForCausalLM`` does (not perturbed): 2 layers over one block with depth LoRA (``kwargs``
    override)."""
    from recursive.training import CORPUS_VOCAB_SIZE

    options = dict(vocab_size=CORPUS_VOCAB_SIZE, intermediate_size=64, num_attention_heads=2, num_layers=2,
                   num_blocks=1, relaxation="depth_lora", lora_rank=4, lora_alpha=RecursiveConfig.lora_alpha)
    torch.manual_seed(seed)
    return RecursiveForCausalLM(tiny_config(**{**options, **kwargs}))


def read_rows(path) -> List[dict]:
    """The rows of a metrics file (JSON lines)."""
    with open(path) as f:
        return [json.loads(line) for line in f]
