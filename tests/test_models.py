"""``RecursiveConfig``, ``RecursiveForCausalLM`` and ``RecursiveEncoder``.

Every relaxation runs forward and backward against a plain unrolled PyTorch model in which each effective
layer holds its own (untied) copy of its block's parameters: the outputs must agree, and the gradient of
every shared parameter must equal the sum of its copies' gradients over the layers tied to it. Float64,
seeded, tiny sizes.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Optional

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor

from recursive import RecursiveConfig, RecursiveEncoder, RecursiveForCausalLM
from recursive.loops import FAST, INPUT, SLOW, loop_shape
from tests.helpers import (
    DTYPE,
    RELAXATIONS,
    TOL,
    VOCAB,
    assert_grads_are_sums_over_depths,
    check_against_reference,
    copies,
    make_model,
    ref_activation,
    ref_block,
    ref_rms_norm,
    tiny_config,
)


def ref_backbone(model, input_ids: Tensor, causal: bool, attention_mask: Optional[Tensor] = None):
    """The unrolled backbone. Returns the final hidden states, the mean MoL loss (or None), the copies of
    the non-block parameters ``{name: tensor}`` and each layer's ``(block, {name: tensor}, adapter)`` copies."""
    config = model.config
    top, layers = copies(model)
    embed = top["model.embed_tokens.weight"]
    h = embed[input_ids]
    if config.embedding_size is not None:
        h = h @ top["model.embed_proj.weight"].T
    h = h * config.embed_scale
    B, S = input_ids.shape
    positions = torch.arange(S).expand(B, S) if attention_mask is None else (attention_mask.cumsum(-1) - 1).clamp(min=0)
    aux_losses = []
    for _, params, adapter in layers:
        h, aux = ref_block(h, params, adapter, config, positions, causal, attention_mask)
        if aux is not None:
            aux_losses.append(aux)
    h = ref_rms_norm(h, top["model.norm.weight"], config.rms_norm_eps, config.norm_unit_offset)
    aux = torch.stack(aux_losses).mean() if aux_losses else None
    return h, aux, top, layers


@pytest.mark.parametrize("relaxation", list(RELAXATIONS))
def test_causal_lm_matches_unrolled_reference(relaxation):
    model = make_model(seed=1, **RELAXATIONS[relaxation])
    config = model.config
    torch.manual_seed(2)
    input_ids = torch.randint(0, VOCAB, (2, 7))
    labels = input_ids.clone()
    labels[0, 3] = -100
    out = model(input_ids, labels=labels)
    out.loss.backward()

    hidden, aux, top, layers = ref_backbone(model, input_ids, causal=True)
    lm_head = top["model.embed_tokens.weight"] if config.tie_word_embeddings else top["lm_head.weight"]
    logits = hidden @ lm_head.T
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    if aux is not None:
        loss = loss + config.router_aux_loss_coef * aux
        torch.testing.assert_close(out.aux_loss, aux, **TOL)
    else:
        assert out.aux_loss is None
    loss.backward()
    torch.testing.assert_close(out.logits, logits, **TOL)
    torch.testing.assert_close(out.loss, loss, **TOL)
    assert out.past_key_values is None
    assert_grads_are_sums_over_depths(model, top, layers)


def test_per_depth_parameters_exist_only_from_start_index():
    model = make_model(**RELAXATIONS["circuit"])  # cycle over 2 blocks, 6 layers, start_index 1
    blocks = model.model.blocks
    assert blocks[0].self_attn.qk_u.shape == (2, 4, 3, 32)  # block 0: layers 0, 2, 4; adapters for 2 and 4
    assert blocks[1].self_attn.ov_d.shape == (3, 4, 8, 3)  # block 1: layers 1, 3, 5
    assert blocks[0].adapter_index(0) == -1 and blocks[0].adapter_index(4) == 1
    lora = make_model(**RELAXATIONS["depth_lora"])  # sequence: block 0 runs layers 0, 1
    assert lora.model.blocks[0].self_attn.k_proj.lora_a.shape == (2, 2, 32)
    assert lora.model.blocks[1].mlp.up_proj.lora_b.shape == (2, 48, 4)
    assert lora.model.blocks[0].self_attn.q_proj.scaling == 6.0 / 4


@pytest.mark.parametrize("relaxation", ["circuit", "depth_lora", "mol"])
def test_kv_cache_decoding_equals_full_recompute(relaxation):
    model = make_model(seed=3, **RELAXATIONS[relaxation])
    torch.manual_seed(4)
    input_ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        full = model(input_ids).logits
        out = model(input_ids[:, :5], use_cache=True)
        assert len(out.past_key_values) == model.config.num_layers
        pieces = [out.logits]
        for start, stop in ((5, 7), (7, 8), (8, 9)):
            out = model(input_ids[:, start:stop], past_key_values=out.past_key_values, use_cache=True)
            pieces.append(out.logits)
    assert out.past_key_values[0].key.shape[1] == 9
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)


@pytest.mark.parametrize("relaxation", ["circuit", "mol"])
def test_left_padded_batch_equals_unpadded_samples(relaxation):
    model = make_model(seed=5, **RELAXATIONS[relaxation])
    torch.manual_seed(6)
    prompts = [torch.randint(0, VOCAB, (6,)), torch.randint(0, VOCAB, (3,))]
    steps = torch.randint(0, VOCAB, (2, 3))  # the tokens fed while decoding
    pad = 0
    input_ids = torch.stack([F.pad(p, (6 - len(p), 0), value=pad) for p in prompts])
    attention_mask = torch.stack([F.pad(torch.ones_like(p), (6 - len(p), 0)) for p in prompts])
    with torch.no_grad():
        out = model(input_ids, attention_mask=attention_mask, use_cache=True)
        batch_logits = [out.logits]
        for t in range(steps.shape[1]):
            attention_mask = torch.cat((attention_mask, torch.ones(2, 1, dtype=attention_mask.dtype)), dim=1)
            out = model(steps[:, t:t + 1], attention_mask=attention_mask, past_key_values=out.past_key_values,
                        use_cache=True)
            batch_logits.append(out.logits)
        batch_logits = torch.cat(batch_logits, dim=1)
        for row, prompt in enumerate(prompts):
            alone = model(torch.cat((prompt, steps[row]))[None]).logits[0]
            torch.testing.assert_close(batch_logits[row, 6 - len(prompt):], alone, **TOL)


def test_padded_training_batch_matches_reference():
    model = make_model(seed=7, **RELAXATIONS["circuit"])
    input_ids = torch.randint(0, VOCAB, (2, 6))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    hidden, _, top, layers = ref_backbone(model, input_ids, causal=True, attention_mask=attention_mask)
    logits = hidden @ top["lm_head.weight"].T
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    check_against_reference(model, out, logits, loss, top, layers, attention_mask.bool())


def test_loss_follows_hugging_face_conventions():
    model = make_model(**RELAXATIONS["mol"])
    input_ids = torch.randint(0, VOCAB, (2, 5))
    out = model(input_ids)
    assert out.loss is None and out.logits.shape == (2, 5, VOCAB) and out.aux_loss.shape == ()
    labels = input_ids.clone()
    labels[:, :2] = -100
    loss = model(input_ids, labels=labels).loss
    shifted = F.cross_entropy(out.logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(loss, shifted + 0.1 * out.aux_loss, **TOL)
    with pytest.raises(ValueError, match="labels"):
        model(input_ids, labels=labels[:, :4])
    with pytest.raises(ValueError, match="attention_mask"):
        model(input_ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="input_ids"):
        model(input_ids.double())


@pytest.mark.parametrize("cls", [RecursiveForCausalLM, RecursiveEncoder])
def test_token_ids_outside_the_vocabulary_name_input_ids(cls, monkeypatch):
    model = make_model(cls, hidden_act="gelu") if cls is RecursiveEncoder else make_model()
    input_ids = torch.randint(0, VOCAB, (2, 5))
    mask = torch.ones(2, 5, dtype=torch.long)
    mask[0, :2] = 0
    for bad, shown in ((VOCAB, f"0..{VOCAB}"), (-1, "-1..")):
        wrong = input_ids.clone()
        wrong[1, 3] = bad
        wrong[0, 0] = 0
        for attention_mask in (None, mask):
            with pytest.raises(ValueError, match=rf"input_ids: token ids must lie in \[0, vocab_size={VOCAB}\), "
                                                 rf"got {shown}"):
                model(wrong, attention_mask)
    with pytest.raises(ValueError, match="input_ids"):
        model(input_ids.bool())
    # One host read serves the range and the mask; check_indices=False reads only the mask.
    reads = []
    real_tolist = torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "tolist", lambda t: reads.append(t.shape) or real_tolist(t))
    expected = model(input_ids, mask).logits
    assert reads == [(3,)]
    torch.testing.assert_close(model(input_ids, mask, check_indices=False).logits, expected, rtol=0, atol=0)
    assert reads == [(3,), (1,)]
    model(input_ids, check_indices=False)
    assert reads == [(3,), (1,)]


def test_init_is_seeded():
    first, second = make_model(seed=11, relaxation="circuit"), make_model(seed=11, relaxation="circuit")
    for (name, a), (_, b) in zip(first.state_dict().items(), second.state_dict().items()):
        assert torch.equal(a, b), name
    torch.manual_seed(0)
    fresh = RecursiveForCausalLM(tiny_config(relaxation="depth_lora"))
    assert torch.count_nonzero(fresh.model.blocks[0].self_attn.q_proj.lora_b) == 0  # a fresh relaxation is a no-op
    assert abs(fresh.model.embed_tokens.weight.std().item() - 0.02) < 0.005


# Save and load.

@pytest.mark.parametrize("cls, relaxation", [(RecursiveForCausalLM, "qkov_lora"), (RecursiveForCausalLM, "circuit"),
                                             (RecursiveEncoder, "mol")])
def test_save_load_round_trip(tmp_path, cls, relaxation):
    model = make_model(cls, seed=8, **RELAXATIONS[relaxation]).eval()
    model.save_pretrained(str(tmp_path))
    assert sorted(os.listdir(tmp_path)) == ["config.json", "model.safetensors"]  # no pickle
    stored = load_file(str(tmp_path / "model.safetensors"))
    tied = {name for name, _ in model.tied_weights()}
    assert set(stored) == set(model.state_dict()) - tied
    with open(tmp_path / "config.json") as f:
        assert RecursiveConfig.from_dict(json.load(f)) == model.config
    loaded = cls.from_pretrained(str(tmp_path))
    assert loaded.config == model.config and not loaded.training
    assert next(loaded.parameters()).dtype == DTYPE
    if model.config.tie_word_embeddings:
        assert loaded.lm_head.weight is loaded.model.embed_tokens.weight
    input_ids = torch.randint(0, VOCAB, (2, 6))
    with torch.no_grad():
        assert torch.equal(loaded(input_ids).logits, model(input_ids).logits)
    assert next(cls.from_pretrained(str(tmp_path), dtype=torch.float32).parameters()).dtype == torch.float32
    with pytest.raises(ValueError, match="directory"):
        cls.from_pretrained(str(tmp_path / "missing"))


# Config.

def test_config_json_round_trip_and_resolution():
    config = tiny_config(relaxation="depth_lora", lora_rank={"q": 2, "v": 4}, lora_targets=["q", "v"],
                         num_key_value_heads=None)
    assert config.num_key_value_heads == 4 and config.head_dim == 8 and config.lora_targets == ("q", "v")
    assert config.lora_rank_of("v") == 4 and config.lora_rank_of("o") == 0
    restored = RecursiveConfig.from_json_string(config.to_json_string())
    assert restored == config and dataclasses.asdict(restored) == dataclasses.asdict(config)
    assert tiny_config(relaxation="qkov_lora").lora_targets == ("q", "k", "v", "o")
    assert tiny_config(relaxation="mol").lora_targets == ("gate", "up", "down")
    assert tiny_config(relaxation="circuit").lora_targets == ()


@pytest.mark.parametrize("sharing, layers, blocks, expected", [
    ("cycle", 6, 2, [0, 1, 0, 1, 0, 1]),
    ("sequence", 6, 2, [0, 0, 0, 1, 1, 1]),
    ("middle_cycle", 6, 4, [0, 1, 2, 1, 2, 3]),
    ("middle_cycle", 3, 3, [0, 1, 2]),
    ("hierarchical", 6, 2, [0, 0, 1, 0, 0, 1]),  # hrm_period 2: two fast steps, one slow
    ("hierarchical", 6, 4, [0, 1, 0, 1, 2, 3]),  # modules of two blocks
])
def test_sharing_schemes(sharing, layers, blocks, expected):
    config = tiny_config(sharing=sharing, num_layers=layers, num_blocks=blocks)
    assert [config.block_of_layer(layer) for layer in range(layers)] == expected
    assert config.layers_of_block(1) == [layer for layer, b in enumerate(expected) if b == 1]
    shape = loop_shape(config)
    assert [(step.layer, step.block) for step in shape.steps] == list(enumerate(expected))


def test_loop_shape_is_the_data_flow():
    """What run_layers reads: a plain stack's one state and its loop boundaries (not after the last layer); HRM's
    fast and slow states, what mixes into each, and the one-step gradient's recorded layers."""
    plain = loop_shape(tiny_config(num_layers=6, num_blocks=2))
    assert (plain.num_states, plain.output_state, plain.loop_length) == (1, INPUT, 2)
    assert [step.exit_after for step in plain.steps] == [False, True, False, True, False, False]
    assert all(step.state == INPUT and not step.adds and step.records for step in plain.steps)
    assert not any(step.exit_after for step in loop_shape(tiny_config(num_layers=6, num_blocks=6)).steps)
    assert not any(step.exit_after for step in loop_shape(tiny_config(mor_routing="token_choice")).steps)
    hrm = loop_shape(tiny_config(sharing="hierarchical", num_layers=6, num_blocks=2, hrm_period=2))
    assert (hrm.num_states, hrm.output_state, hrm.loop_length) == (3, SLOW, 6)
    # z_L <- f_L(z_L + z_H + x) twice, then z_H <- f_H(z_H + z_L), per cycle of three layers
    assert [(step.state, step.adds) for step in hrm.steps] == [
        (FAST, (SLOW, INPUT)), (FAST, (SLOW, INPUT)), (SLOW, (FAST,))] * 2
    assert all(step.records and not step.exit_after for step in hrm.steps)
    one_step = loop_shape(tiny_config(sharing="hierarchical", num_layers=6, num_blocks=2, hrm_one_step_gradient=True))
    assert [step.records for step in one_step.steps] == [False, False, False, False, True, True]


@pytest.mark.parametrize("bad, field", [
    (dict(num_layers=5, num_blocks=2), "num_blocks"),
    (dict(sharing="middle_cycle", num_layers=5, num_blocks=2), "num_blocks"),
    (dict(sharing="stack"), "sharing"),
    (dict(relaxation="lora"), "relaxation"),
    (dict(relaxation="qkov_lora", lora_targets=("q", "up")), "lora_targets"),
    (dict(relaxation="none", lora_targets=("q",)), "lora_targets"),
    (dict(relaxation="depth_lora", lora_rank={"q": 2}), "lora_rank"),
    (dict(num_key_value_heads=3), "num_key_value_heads"),
    (dict(start_index=5), "start_index"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(num_experts_per_tok=5), "num_experts_per_tok"),
    (dict(head_dim=7), "head_dim"),
    (dict(backend="cuda2"), "backend"),
])
def test_config_rejects_bad_values(bad, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**bad)
    with pytest.raises(ValueError, match="unknown"):
        RecursiveConfig.from_dict({"hidden": 4})


# The encoder.

def encoder(**kwargs) -> RecursiveEncoder:
    options = dict(hidden_act="gelu", tie_word_embeddings=True, embedding_size=16)
    options.update(kwargs)
    return make_model(RecursiveEncoder, seed=9, **options)


def test_encoder_mlm_head_matches_reference():
    model = encoder(relaxation="depth_lora")
    config = model.config
    assert (model.model.embed_tokens.weight.shape == (VOCAB, 16)
            and model.decoder.weight is model.model.embed_tokens.weight)
    input_ids = torch.randint(0, VOCAB, (2, 6))
    attention_mask = torch.tensor([[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    labels = torch.full((2, 6), -100)
    labels[0, 1], labels[1, 2] = 5, 7
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (2, 6, VOCAB) and out.last_hidden_state.shape == (2, 6, 32)
    out.loss.backward()

    hidden, _, top, layers = ref_backbone(model, input_ids, causal=False, attention_mask=attention_mask)
    head = ref_activation("gelu", hidden @ top["head_dense.weight"].T + top["head_dense.bias"])
    head = ref_rms_norm(head, top["head_norm.weight"], config.rms_norm_eps, False)
    logits = head @ top["model.embed_tokens.weight"].T + top["decoder.bias"]
    loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1), ignore_index=-100)
    check_against_reference(model, out, logits, loss, top, layers, attention_mask.bool())


def test_encoder_is_bidirectional_and_ignores_padding():
    model = encoder()
    input_ids = torch.randint(0, VOCAB, (1, 6))
    changed = input_ids.clone()
    changed[0, 5] = (changed[0, 5] + 1) % VOCAB
    with torch.no_grad():
        first, second = model(input_ids).logits, model(changed).logits
        assert not torch.allclose(first[0, 0], second[0, 0])  # the first token sees the last
        padded = model(F.pad(input_ids, (0, 3)), attention_mask=F.pad(torch.ones(1, 6), (0, 3))).logits
    torch.testing.assert_close(padded[:, :6], first, **TOL)


@pytest.mark.parametrize("pooling", ["mean", "cls"])
def test_encoder_sequence_classification_head(pooling):
    model = encoder(encoder_head="sequence_classification", num_labels=3, classifier_pooling=pooling, relaxation="mol")
    assert not hasattr(model, "decoder")
    input_ids = torch.randint(0, VOCAB, (3, 5))
    attention_mask = torch.tensor([[1] * 5, [1, 1, 1, 0, 0], [1] * 5])
    labels = torch.tensor([0, 2, 1])
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    assert out.logits.shape == (3, 3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, labels) + 0.1 * out.aux_loss, **TOL)
    out.loss.backward()
    assert torch.count_nonzero(model.classifier.weight.grad) > 0
    hidden = out.last_hidden_state
    weight = attention_mask[..., None].to(DTYPE)
    pooled = (hidden * weight).sum(1) / weight.sum(1) if pooling == "mean" else hidden[:, 0]
    config = model.config
    head = ref_rms_norm(ref_activation("gelu", model.head_dense(pooled)), model.head_norm.weight, config.rms_norm_eps,
                        False)
    torch.testing.assert_close(out.logits, model.classifier(head), **TOL)
    with pytest.raises(ValueError, match="labels"):
        model(input_ids, labels=labels[:2])


def test_encoder_regression_head():
    model = encoder(encoder_head="sequence_classification", num_labels=1)
    input_ids = torch.randint(0, VOCAB, (2, 4))
    labels = torch.tensor([0.5, -1.0], dtype=DTYPE)
    out = model(input_ids, labels=labels)
    assert out.logits.shape == (2, 1) and out.aux_loss is None
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits[:, 0], labels), **TOL)


def test_causal_lm_rejects_factorised_embeddings():
    with pytest.raises(ValueError, match="embedding_size"):
        RecursiveForCausalLM(tiny_config(embedding_size=16))
