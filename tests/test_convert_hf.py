"""``recursive.convert_hf`` and ``python -m recursive convert`` on tiny Hugging Face models built from configs.

The oracle is an unrolled float64 reference of the Hugging Face decoder computed from the Hugging Face
model's own parameters (the reference functions of ``tests.helpers``). Hugging Face's float64
models run their norms and rotary tables in float32, so they are not an exact oracle themselves;
``test_reference_is_the_hf_model`` shows that the reference computes what they compute, up to that
float32 rounding. Norm weights and biases are randomised so that a norm or bias taken from the wrong
layer shows.
"""

from __future__ import annotations

import copy
import dataclasses
from typing import Dict, Optional

import pytest
import torch
from torch import Tensor

from recursive import RecursiveForCausalLM, convert_hf, export_hf
from recursive.__main__ import main as cli_main
from tests.helpers import (
    DTYPE,
    EPS,
    FAMILIES,
    HEADS,
    KV_HEADS,
    THETA,
    VOCAB,
    hf_config,
    make_hf,
    max_relative_error,
    ref_attention,
    ref_feed_forward,
    ref_rms_norm,
    sub,
)

transformers = pytest.importorskip("transformers")

TIGHT = 1e-10  # relative to the largest logit


pytestmark = pytest.mark.usefixtures("one_thread")


def reference_logits(hf_model, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    """The Hugging Face decoder unrolled in float64 from ``hf_model``'s parameters: (B, S, vocab)."""
    spec, config = FAMILIES[hf_model.config.model_type], hf_model.config
    params: Dict[str, Tensor] = {name: p.detach() for name, p in hf_model.named_parameters()}
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    B, S = input_ids.shape
    positions = torch.arange(S).expand(B, S) if attention_mask is None else (attention_mask.cumsum(-1) - 1).clamp(min=0)

    def norm(x: Tensor, weight: Tensor) -> Tensor:
        return ref_rms_norm(x, weight, EPS, spec["unit_offset"])

    h = params["model.embed_tokens.weight"][input_ids] * spec["embed_scale"]
    for layer in range(config.num_hidden_layers):
        p = sub(params, f"model.layers.{layer}.")
        h = h + ref_attention(norm(h, p["input_layernorm.weight"]), sub(p, "self_attn."), -1, heads=HEADS,
                              kv_heads=KV_HEADS, head_dim=head_dim, positions=positions, theta=THETA, causal=True,
                              alpha=1.0, key_mask=attention_mask)
        h = h + ref_feed_forward(norm(h, p["post_attention_layernorm.weight"]), sub(p, "mlp."), -1, spec["act"], 1.0)
    head = params.get("lm_head.weight", params["model.embed_tokens.weight"])
    return norm(h, params["model.norm.weight"]) @ head.T


def inputs(seed: int = 1, batch: int = 3, length: int = 9):
    """Token ids and a left-padding mask (row 0 unpadded, rows 1.. padded by 2, 4, ...)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(0, VOCAB, (batch, length), generator=generator)
    mask = torch.ones(batch, length, dtype=torch.long)
    for row in range(1, batch):
        mask[row, : 2 * row] = 0
    return input_ids, mask


def logits(model, input_ids: Tensor, attention_mask: Optional[Tensor] = None) -> Tensor:
    with torch.no_grad():
        return model(input_ids, attention_mask=attention_mask).logits


# The Hugging Face models and the reference.

@pytest.mark.parametrize("family", FAMILIES)
def test_reference_is_the_hf_model(family):
    """The float64 reference differs from Hugging Face's float64 model by no more than twice what
    separates Hugging Face's float64 and float32 models (its float32 norms and rotary tables); a wrong
    norm, scale, activation, rotary convention or bias would be O(1). With left padding, each row of
    the reference against Hugging Face on that row's real tokens alone (Hugging Face's float64 eager
    attention turns fully padded query rows into NaN, which then reach the real tokens)."""
    hf64 = make_hf(family)
    hf32 = copy.deepcopy(hf64).float()
    input_ids, mask = inputs()
    padded = reference_logits(hf64, input_ids, mask)
    for row in range(len(input_ids)):
        real_ids = input_ids[row:row + 1, mask[row].bool()]
        with torch.no_grad():
            out64, out32 = hf64(real_ids).logits, hf32(real_ids).logits
        float32_gap = max_relative_error(out32.to(DTYPE), out64)
        assert float32_gap < 1e-4
        assert max_relative_error(out64, reference_logits(hf64, real_ids)) <= 2 * float32_gap
        assert max_relative_error(out64[0], padded[row, mask[row].bool()]) <= 2 * float32_gap


# Exactness.

@pytest.mark.parametrize("sharing", ["cycle", "sequence", "middle_cycle"])
@pytest.mark.parametrize("family", FAMILIES)
def test_one_block_per_layer_reproduces_the_model(family, sharing):
    hf = make_hf(family)
    model = convert_hf(hf, num_blocks=4, sharing=sharing)
    assert model.config.relaxation == "none" and not model.training
    input_ids, mask = inputs()
    for attention_mask in (None, mask):
        expected = reference_logits(hf, input_ids, attention_mask)
        error = max_relative_error(logits(model, input_ids, attention_mask), expected, attention_mask)
        assert error < TIGHT, f"{family} {sharing} mask={attention_mask is not None}: {error:.3g}"


# The norm whose gain each projection reads, folded into it by convert_hf.
NORM_OF = {"self_attn.q_proj": "input_layernorm", "self_attn.k_proj": "input_layernorm",
           "self_attn.v_proj": "input_layernorm", "mlp.gate_proj": "post_attention_layernorm",
           "mlp.up_proj": "post_attention_layernorm"}


def folded_weight(hf, layer: int, path: str) -> Tensor:
    """The projection's weight times the gain of the norm it reads (``1 + w`` for Gemma), written out here."""
    hf_layer = hf.model.layers[layer]
    weight = hf_layer.get_submodule(path).weight
    if path not in NORM_OF:
        return weight
    gain = hf_layer.get_submodule(NORM_OF[path]).weight
    return weight * (gain + 1 if FAMILIES[hf.config.model_type]["unit_offset"] else gain)


def check_full_rank_adapters(hf, model) -> None:
    """Every layer's effective weight ``W_b + s B_l A_l`` on every target equals its original (folded) weight."""
    config = model.config
    for layer in range(config.num_layers):
        block = model.model.blocks[config.block_of_layer(layer)]
        adapter = config.depth_layers_of_block(config.block_of_layer(layer)).index(layer)
        for path in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                     "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            projection = block.get_submodule(path)
            assert projection.rank == min(projection.weight.shape)  # 10**6 clamped
            effective = projection.weight + projection.scaling * projection.lora_b[adapter] @ projection.lora_a[adapter]
            original = folded_weight(hf, layer, path)
            assert torch.allclose(effective, original, rtol=0, atol=1e-12), (layer, path)


# (init, sharing, num_layers, num_blocks): each init scheme once, over the three sharing schemes.
FEWER_BLOCKS = [("stepwise", "cycle", 6, 3), ("average", "sequence", 4, 2), ("lower", "middle_cycle", 6, 4),
                ("upper", "cycle", 4, 2)]


@pytest.mark.parametrize("init, sharing, num_layers, num_blocks", FEWER_BLOCKS)
@pytest.mark.parametrize("family", FAMILIES)
def test_fewer_blocks_with_full_rank_svd_reproduce_the_model(family, init, sharing, num_layers, num_blocks):
    """Norms and biases equal in every layer (the documented exactness condition); LoRA of full rank."""
    hf = make_hf(family, num_layers, uniform=True)
    model = convert_hf(hf, num_blocks, sharing, init, lora_rank=10**6, lora_alpha=3.0)
    assert model.config.relaxation == "depth_lora" and model.config.num_blocks == num_blocks
    check_full_rank_adapters(hf, model)
    input_ids, mask = inputs()
    for attention_mask in (None, mask):
        expected = reference_logits(hf, input_ids, attention_mask)
        error = max_relative_error(logits(model, input_ids, attention_mask), expected, attention_mask)
        assert error < TIGHT, f"mask={attention_mask is not None}: {error:.3g}"


@pytest.mark.parametrize("family", FAMILIES)
def test_folded_norms_make_full_rank_exact_whatever_the_norms(family):
    """Per-layer norm gains (randomised in every layer): folded into the projections, full rank reproduces the
    model; without the fold the blocks' norms replace the layers' own, which no LoRA on a projection undoes."""
    hf = make_hf(family, 4)
    if family == "qwen2":  # the layers' q/k/v biases are shared too: make them alike, as the exactness needs
        with torch.no_grad():
            for layer in hf.model.layers[1:]:
                for name in ("q_proj", "k_proj", "v_proj"):
                    getattr(layer.self_attn, name).bias.copy_(getattr(hf.model.layers[0].self_attn, name).bias)
    input_ids, mask = inputs()
    expected = reference_logits(hf, input_ids, mask)
    model = convert_hf(hf, 2, lora_rank=10**6)
    check_full_rank_adapters(hf, model)
    unit = 0.0 if FAMILIES[family]["unit_offset"] else 1.0
    for block in model.model.blocks:
        for norm in ("input_layernorm", "post_attention_layernorm"):
            assert torch.equal(block.get_submodule(norm).weight,
                               torch.full_like(block.get_submodule(norm).weight, unit))
    assert max_relative_error(logits(model, input_ids, mask), expected, mask) < TIGHT
    unfolded = convert_hf(hf, 2, lora_rank=10**6, fold_norms=False)
    assert max_relative_error(logits(unfolded, input_ids, mask), expected, mask) > 1e-3


def relate_layers_(hf_model) -> None:
    """Make every layer's projections layer 0's plus a small perturbation with a decaying spectrum
    (singular values 0.1 * 0.7^i), as neighbouring layers of a trained model are related: each rank
    then captures a clear share of the residual, and an init that picks the wrong singular directions
    shows."""
    generator = torch.Generator().manual_seed(2)
    first = hf_model.model.layers[0]
    with torch.no_grad():
        for layer in hf_model.model.layers[1:]:
            for name, p in layer.named_parameters():
                if name.endswith("proj.weight"):
                    rank = min(p.shape)
                    u = torch.linalg.qr(torch.randn(p.shape[0], rank, generator=generator, dtype=DTYPE))[0]
                    v = torch.linalg.qr(torch.randn(p.shape[1], rank, generator=generator, dtype=DTYPE))[0]
                    spectrum = 0.1 * 0.7 ** torch.arange(rank, dtype=DTYPE)
                    p.copy_(first.get_parameter(name) + (u * spectrum) @ v.T)


@pytest.mark.parametrize("family", FAMILIES)
def test_error_falls_as_the_svd_rank_grows(family):
    hf = make_hf(family, 4, uniform=True)
    relate_layers_(hf)
    input_ids, _ = inputs()
    expected = reference_logits(hf, input_ids)
    # The error of all logits together (relative Frobenius norm): the largest single logit is noisier.
    errors = [((logits(convert_hf(hf, 2, lora_rank=rank), input_ids) - expected).norm() / expected.norm()).item()
              for rank in (0, 1, 4, 16, 10**6)]
    assert all(a > b for a, b in zip(errors, errors[1:])), errors
    assert errors[0] > 1e-2 and errors[-1] < TIGHT, errors


# Init schemes: the shared parameters against the Hugging Face layers.

# (init, sharing, num_layers, num_blocks) -> the original layers of each block, worked out by hand.
SOURCES = {
    ("stepwise", "cycle", 6, 3): [[0], [2], [5]],  # round(linspace(0, 5, 3)) = round(0, 2.5, 5), half to even
    ("stepwise", "sequence", 6, 2): [[0], [5]],
    ("stepwise", "cycle", 6, 1): [[0]],
    ("average", "cycle", 6, 3): [[0, 3], [1, 4], [2, 5]],
    ("average", "sequence", 6, 3): [[0, 1], [2, 3], [4, 5]],
    ("average", "middle_cycle", 6, 4): [[0], [1, 3], [2, 4], [5]],
    ("lower", "sequence", 6, 3): [[0], [1], [2]],
    ("upper", "cycle", 6, 3): [[3], [4], [5]],
}


@pytest.mark.parametrize("init, sharing, num_layers, num_blocks", SOURCES)
def test_init_schemes_take_the_right_layers(init, sharing, num_layers, num_blocks):
    hf = make_hf("qwen2", num_layers)  # q/k/v biases
    model = convert_hf(hf, num_blocks, sharing, init, lora_rank=4, lora_init="zero", fold_norms=False)
    expected_linspace = torch.linspace(0, num_layers - 1, num_blocks, dtype=DTYPE).round().long().tolist()
    if init == "stepwise":
        assert [s[0] for s in SOURCES[init, sharing, num_layers, num_blocks]] == expected_linspace
    for block, sources in zip(model.model.blocks, SOURCES[init, sharing, num_layers, num_blocks]):
        for name, p in block.named_parameters():
            if name.endswith("lora_a"):  # PEFT's init: A random, B zero, so each layer runs the shared block
                assert p.abs().min() > 0
                continue
            if name.endswith("lora_b"):
                assert not p.any()
                continue
            originals = torch.stack([hf.model.layers[i].get_parameter(name) for i in sources])
            assert torch.allclose(p, originals.mean(0), rtol=0, atol=1e-15), (name, sources)
    assert torch.equal(model.model.embed_tokens.weight, hf.model.embed_tokens.weight)
    assert torch.equal(model.model.norm.weight, hf.model.norm.weight)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # Qwen2 options: tied


def test_untied_head_dtype_mode_and_rank_clamping():
    hf = make_hf("llama").to(torch.bfloat16).train()
    model = convert_hf(hf, 2, lora_rank=48, lora_targets=("k", "down"))
    assert model.training
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert torch.equal(model.lm_head.weight, hf.lm_head.weight)
    attention, mlp = model.model.blocks[0].self_attn, model.model.blocks[0].mlp
    assert attention.k_proj.rank == 32 and mlp.down_proj.rank == 48  # k: 64 -> 2 heads * 16, clamped
    assert attention.q_proj.lora_a is None and mlp.up_proj.lora_a is None
    assert model.config.lora_targets == ("k", "down") and model.config.lora_alpha == 8.0
    input_ids, _ = inputs()
    assert torch.isfinite(logits(model, input_ids)).all()


def test_lora_rank_mapping():
    hf = make_hf("mistral")
    model = convert_hf(hf, 2, lora_rank={"q": 2, "v": 0}, lora_targets=("q", "v"))
    attention = model.model.blocks[1].self_attn
    assert attention.q_proj.rank == 2 and attention.v_proj.lora_a is None and attention.k_proj.lora_a is None
    assert convert_hf(hf, 2, lora_rank={"q": 0}, lora_targets=("q",)).config.relaxation == "none"


# Errors.

BAD_ARGUMENTS = [
    (dict(num_blocks=0), "num_blocks"),
    (dict(num_blocks=5), "num_blocks"),
    (dict(num_blocks=2.0), "num_blocks"),
    (dict(num_blocks=3), "num_blocks"),  # 4 layers are no multiple of 3
    (dict(num_blocks=2, sharing="middle_cycle"), "num_blocks"),
    (dict(num_blocks=2, sharing="spiral"), "sharing"),
    (dict(num_blocks=2, sharing="hierarchical"), "sharing"),
    (dict(num_blocks=2, init="random"), "init"),
    (dict(num_blocks=2, lora_rank=-1), "lora_rank"),
    (dict(num_blocks=2, lora_rank=2.5), "lora_rank"),
    (dict(num_blocks=2, lora_rank={"gate": 2}, lora_targets=("q",)), "lora_rank"),
    (dict(num_blocks=2, lora_rank=2, lora_targets="q"), "lora_targets"),
    (dict(num_blocks=2, lora_rank=2, lora_targets=("q", "w")), "lora_targets"),
    (dict(num_blocks=2, lora_rank=2, lora_targets=()), "lora_targets"),
    (dict(num_blocks=2, lora_rank=2, lora_targets=("q", "q")), "lora_targets"),
    (dict(num_blocks=2, svd_init="yes"), "svd_init"),
    (dict(num_blocks=2, lora_rank=2, lora_init="random"), "lora_init"),
    (dict(num_blocks=2, fold_norms=1), "fold_norms"),
    (dict(num_blocks=2, lora_rank=2, lora_init="activation"), "calibration"),
    (dict(num_blocks=2, lora_rank=2, calibration=torch.zeros(1, 4, dtype=torch.long)), "calibration"),
    (dict(num_blocks=2, lora_rank=2, lora_init="activation", calibration=torch.zeros(1, 4)), "calibration"),
    (dict(num_blocks=2, lora_rank=2, lora_init="activation", calibration=torch.full((1, 4), VOCAB)), "calibration"),
]


@pytest.mark.parametrize("kwargs, argument", BAD_ARGUMENTS, ids=[f"{a}-{i}" for i, (_, a) in enumerate(BAD_ARGUMENTS)])
def test_bad_arguments_raise(kwargs, argument):
    hf = make_hf("llama")
    with pytest.raises(ValueError, match=f"^{argument}"):
        convert_hf(hf, **kwargs)


UNSUPPORTED = {
    "not a model": lambda: torch.nn.Linear(2, 2),
    "gpt2": lambda: transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=2,
                                                                         n_head=2)),
    "base model without head": lambda: transformers.LlamaModel(hf_config("llama")),
    "rope scaling": lambda: make_hf("llama", rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "sliding window": lambda: make_hf("mistral", sliding_window=16),
    "o_proj bias": lambda: make_hf("llama", attention_bias=True),
    "mlp bias": lambda: make_hf("llama", mlp_bias=True),
}


@pytest.mark.parametrize("case", UNSUPPORTED)
def test_unsupported_models_raise(case):
    with pytest.raises(ValueError, match="^model_or_path"):
        convert_hf(UNSUPPORTED[case](), 2)


# Export back to Hugging Face.

@pytest.mark.parametrize("family", FAMILIES)
def test_export_inverts_conversion(family):
    """Fewer blocks with full-rank SVD LoRA, exported: the original's parameters (its norm gains folded into the
    projections they feed, the norms unit gains), its class and its logits."""
    hf = make_hf(family, 4, uniform=True)
    model = convert_hf(hf, 2, "cycle", lora_rank=10**6, lora_alpha=3.0)
    exported = export_hf(model, "mistral" if family == "mistral" else None)
    assert type(exported) is type(hf) and not exported.training
    theirs = dict(exported.named_parameters())
    unit = 0.0 if FAMILIES[family]["unit_offset"] else 1.0
    for name, parameter in hf.named_parameters():
        layer, _, path = name.removeprefix("model.layers.").partition(".")
        if path.removesuffix(".weight") in NORM_OF:
            parameter = folded_weight(hf, int(layer), path.removesuffix(".weight"))
        elif path in ("input_layernorm.weight", "post_attention_layernorm.weight"):
            parameter = torch.full_like(parameter, unit)
        assert torch.allclose(theirs[name], parameter, rtol=0, atol=1e-12), name
    input_ids, mask = inputs()
    expected = reference_logits(hf, input_ids, mask)
    assert max_relative_error(reference_logits(exported, input_ids, mask), expected, mask) < TIGHT


@pytest.mark.parametrize("family", FAMILIES)
def test_export_computes_the_recursive_model(family):
    """A recursive model that never was a Hugging Face one (per-depth LoRA from a Start Index, random
    weights): the export's float64 reference equals its logits, and the Hugging Face forward agrees up to
    its float32 norms and rotary tables; converting it back, one block per layer, gives the same logits."""
    model = convert_hf(make_hf(family, 4), 2, "sequence", lora_rank=3)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("lora_b"):
                parameter.normal_(0.0, 0.1)
    exported = export_hf(model, "mistral" if family == "mistral" else None)
    input_ids, mask = inputs()
    expected = logits(model, input_ids, mask)
    assert max_relative_error(reference_logits(exported, input_ids, mask), expected, mask) < TIGHT
    assert max_relative_error(logits(exported, input_ids[:1]), expected[:1]) < 1e-5
    again = convert_hf(exported, 4)
    assert max_relative_error(logits(again, input_ids, mask), expected, mask) < TIGHT


def test_export_rejects_what_hugging_face_cannot_hold():
    qwen2_like = convert_hf(make_hf("qwen2", 4), 4)
    with pytest.raises(ValueError, match="qkv_bias"):
        export_hf(qwen2_like, "llama")
    with pytest.raises(ValueError, match="Gemma"):
        export_hf(convert_hf(make_hf("gemma", 4), 4), "llama")
    with pytest.raises(ValueError, match="Gemma"):
        export_hf(convert_hf(make_hf("llama", 4), 4), "gemma")
    with pytest.raises(ValueError, match="model_type"):
        export_hf(qwen2_like, "gpt2")
    circuit = RecursiveForCausalLM(dataclasses.replace(qwen2_like.config, num_blocks=2, relaxation="circuit"))
    with pytest.raises(ValueError, match="circuit"):
        export_hf(circuit)
    with pytest.raises(ValueError, match="^model"):
        export_hf(hf_config("llama"))


# Checkpoints, command line, progress.

def test_save_and_load_round_trip(tmp_path):
    hf = make_hf("gemma", 4)
    model = convert_hf(hf, 2, sharing="sequence", init="average", lora_rank=3)
    model.save_pretrained(tmp_path)
    loaded = RecursiveForCausalLM.from_pretrained(tmp_path)
    assert loaded.config == model.config
    input_ids, mask = inputs()
    assert torch.equal(logits(loaded, input_ids, mask), logits(model, input_ids, mask))


def test_convert_command(tmp_path, capsys):
    hf = make_hf("qwen2", 4)
    hf.save_pretrained(tmp_path / "hf")
    cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "out"), "--num-blocks", "2", "--sharing", "sequence",
              "--init", "average", "--lora-rank", "5", "--lora-targets", "q,o,up", "--lora-alpha", "10",
              "--no-progress"])
    assert "4 layers -> 2 blocks" in capsys.readouterr().out
    loaded = RecursiveForCausalLM.from_pretrained(tmp_path / "out")
    assert loaded.config.lora_targets == ("q", "o", "up") and loaded.config.lora_alpha == 10.0
    expected = convert_hf(hf, 2, "sequence", "average", 5, ("q", "o", "up"), lora_alpha=10.0)
    input_ids, mask = inputs()
    assert torch.equal(logits(loaded, input_ids, mask), logits(expected, input_ids, mask))


def test_export_command(tmp_path, capsys):
    model = convert_hf(make_hf("gemma", 4), 2, "cycle", lora_rank=3)
    model.save_pretrained(tmp_path / "recursive")
    cli_main(["export", str(tmp_path / "recursive"), str(tmp_path / "hf")])
    assert "GemmaForCausalLM of 4 layers" in capsys.readouterr().out
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", local_files_only=True)
    input_ids, _ = inputs()
    assert torch.equal(logits(loaded, input_ids), logits(export_hf(model), input_ids))


def test_progress_bar_only_when_asked_or_large(capsys):
    hf = make_hf("llama")
    convert_hf(hf, 2, lora_rank=2)
    assert capsys.readouterr().err == ""
    convert_hf(hf, 2, lora_rank=2, progress=True)
    assert "[6/6] adapters of layer 3" in capsys.readouterr().err


def test_svd_init_is_a_deprecated_spelling_of_lora_init():
    hf = make_hf("llama", 4)
    with pytest.warns(DeprecationWarning, match="lora_init"):
        zero = convert_hf(hf, 2, lora_rank=2, svd_init=False)
    assert not any(p.any() for name, p in zero.named_parameters() if name.endswith("lora_b"))


def test_calibration_in_several_passes_equals_one_pass():
    """Layer groups bounded by memory: a pass per layer gives the covariances of one pass over all layers; the
    first layer's attention input is the embeddings, normalised without the gain."""
    from recursive.calibration import INPUTS, input_covariances

    hf = make_hf("llama", 4)
    ids = torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    together = dict(input_covariances(hf, ids, EPS))
    apart = dict(input_covariances(hf, ids, EPS, memory_bytes=1))
    assert list(together) == list(apart) == [0, 1, 2, 3]
    for layer in together:
        assert set(together[layer]) == set(INPUTS)
        for name in INPUTS:
            assert torch.allclose(together[layer][name], apart[layer][name], rtol=1e-12, atol=0)
    x = hf.model.embed_tokens.weight[ids].reshape(-1, hf.config.hidden_size).detach()
    x = x / torch.sqrt(x.square().mean(-1, keepdim=True) + EPS)
    assert torch.allclose(together[0]["attention"], x.T @ x / len(x), rtol=1e-10, atol=1e-14)


def test_activation_aware_full_rank_is_exact():
    hf = make_hf("llama", 4, uniform=True)
    ids = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(1))
    model = convert_hf(hf, 2, lora_rank=10**6, lora_init="activation", calibration=ids)
    check_full_rank_adapters(hf, model)


def test_a_path_that_holds_no_model_is_named(tmp_path):
    (tmp_path / "notes.gguf.txt").write_text("not a model")
    for path in (tmp_path / "missing", tmp_path, tmp_path / "notes.gguf.txt"):
        with pytest.raises(ValueError, match="^model_or_path: .*neither a checkpoint folder"):
            convert_hf(str(path), 2)


def test_a_checkpoint_folder_converts_as_its_model(tmp_path):
    hf = make_hf("llama", 4)
    hf.save_pretrained(tmp_path)
    input_ids, _ = inputs()
    expected = logits(convert_hf(hf, 2, lora_rank=3), input_ids)
    assert torch.equal(logits(convert_hf(tmp_path, 2, lora_rank=3), input_ids), expected)
