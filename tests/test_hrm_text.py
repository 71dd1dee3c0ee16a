"""HRM-Text loaded exactly: against transformers' own ``HrmTextForCausalLM`` (tiny configs, float64).

transformers computes the weightless norms and the rotary tables in float32 whatever the model's dtype, so its float64
model is itself off by float32 roundings: as in test_convert_hf, ours must be within twice what separates its float64
and float32 models (a wrong norm, gate, flow, mask or gradient route is O(1))."""

from __future__ import annotations

import copy
import dataclasses
import json
import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from recursive import DepthBatchingEngine, RecursiveConfig, RecursiveForCausalLM, convert_hf, export_hf
from recursive.__main__ import main as cli_main
from recursive.looped import convert_looped
from tests.helpers import max_relative_error, sampled_by_recompute

transformers = pytest.importorskip("transformers")
if not hasattr(transformers, "HrmTextForCausalLM"):
    pytest.skip("HRM-Text is native in transformers from 5.9", allow_module_level=True)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB = 97


def make_hrm(seed: int = 0, **options):
    """A tiny HRM-Text in float64 (2 layers per stack, 2 H cycles of 2 L cycles), its z_L_init random (zeros would
    hide a wrong start of the fast state)."""
    torch.manual_seed(seed)
    settings = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                    head_dim=8, H_cycles=2, L_cycles=2, L_bp_cycles=[1], initializer_range=0.1)
    settings.update(options)
    hf = transformers.HrmTextForCausalLM(transformers.HrmTextConfig(**settings)).double().eval()
    with torch.no_grad():
        hf.model.z_L_init.normal_()
    return hf


def inputs(seed: int = 1):
    """Token ids (3, 10), a left-padding mask (row 1 by 2, row 2 by 4) and types with a bidirectional span (tokens
    0-3, 2-4 (the first real ones, or after two causal ones unpadded) and none)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (3, 10), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :2] = mask[2, :4] = 0
    types = torch.zeros_like(ids)
    types[0, :4] = types[1, 2:5] = 1
    return ids, mask, types


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.mark.parametrize("case", ["causal", "prefix", "padded prefix"])
def test_logits_match_transformers(case):
    hf = make_hrm()
    ours = convert_hf(hf)
    ids, mask, types = inputs()
    kwargs = {"causal": {}, "prefix": {"token_type_ids": types}}.get(
        case, {"token_type_ids": types, "attention_mask": mask})
    real = kwargs.get("attention_mask")
    expected = logits(hf, ids, **kwargs)
    float32_gap = max_relative_error(logits(copy.deepcopy(hf).float(), ids, **kwargs).double(), expected, real)
    assert float32_gap < 1e-4
    assert max_relative_error(logits(ours, ids, **kwargs), expected, real) <= 2 * float32_gap
    if case != "causal":  # the prefix changes the logits, so the comparison above sees the mask
        assert max_relative_error(logits(ours, ids, attention_mask=real), expected, real) > 1e-3


def test_config_and_layout():
    hf = make_hrm(L_bp_cycles=[2, 1, 1])  # longer than H_cycles: transformers reads the first H_cycles entries
    config = convert_hf(hf).config
    assert (config.num_blocks, config.num_layers, config.hrm_period) == (4, 12, 2)
    assert config.hrm_fast_grad_cycles == (2, 1)
    assert not config.norm_weight and config.attention_output_gate and config.prefix_lm
    assert config.embed_scale == pytest.approx(10.0)  # 1 / initializer_range
    assert convert_hf(make_hrm(L_bp_cycles=[5])).config.hrm_fast_grad_cycles == (1, 2)  # clamped to L_cycles


def test_greedy_generation_and_the_engine_match_transformers():
    hf, ids = make_hrm(), inputs()[0][:2]
    ours = convert_hf(hf)
    types = torch.zeros_like(ids)
    types[:, :4] = 1
    for kwargs in ({}, {"token_type_ids": types}):
        expected = hf.generate(ids, max_new_tokens=6, do_sample=False, **kwargs)
        assert torch.equal(ours.generate(ids, 6, **kwargs), expected)
    prompts = [ids[0].tolist(), ids[1, 3:].tolist(), ids[1, :5].tolist()]
    outputs = DepthBatchingEngine(ours, max_batch_size=2).generate(prompts, 5)
    for prompt, output in zip(prompts, outputs):
        assert output == hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False)[0].tolist()


def test_the_engine_serves_the_prefix_mask_as_transformers_generates():
    """Prompts with a bidirectional span (at the start, in the middle, none, the whole prompt) ride in the engine's
    steps, each span token attending up to the span's end: every output equals transformers' generate with those
    token_type_ids."""
    hf, ids = make_hrm(), inputs()[0][1]
    ours = convert_hf(hf)
    prompts = [ids.tolist(), ids[3:].tolist(), ids[:5].tolist(), ids[:4].tolist()]
    types = [[1] * 4 + [0] * 6, [0, 0, 1, 1, 1, 0, 0], None, [1] * 4]
    outputs = DepthBatchingEngine(ours, max_batch_size=2).generate(prompts, 5, token_type_ids=types)
    for prompt, kinds, output in zip(prompts, types, outputs):
        kwargs = {} if kinds is None else {"token_type_ids": torch.tensor([kinds])}
        expected = hf.generate(torch.tensor([prompt]), max_new_tokens=5, do_sample=False, **kwargs)[0].tolist()
        assert output == expected
    causal = DepthBatchingEngine(ours, max_batch_size=2).generate(prompts[:1], 5)[0]
    assert causal != outputs[0], "the first span changes the greedy tokens, so the comparison above sees the mask"


@pytest.mark.parametrize("types, match", [
    ([[1, 0, 1]], "one contiguous span"),
    ([[1, 0]], "expected 3 values of 0 or 1"),
    ([[]], "expected 3 values of 0 or 1"),
    ([[0, 2, 0]], "expected 3 values of 0 or 1"),
    ([[1, 1, 0], None], "one list \\(or None\\) per prompt \\(1\\)"),
])
def test_engine_token_type_ids_are_checked(types, match):
    engine = DepthBatchingEngine(convert_hf(make_hrm()), max_batch_size=2)
    with pytest.raises(ValueError, match=f"token_type_ids.*{match}"):
        engine.generate([[1, 2, 3]], 2, token_type_ids=types)


def test_the_engine_refuses_token_type_ids_for_a_model_without_the_prefix_mask():
    config = dataclasses.replace(convert_hf(make_hrm()).config, prefix_lm=False)
    engine = DepthBatchingEngine(RecursiveForCausalLM(config).double(), max_batch_size=1)
    with pytest.raises(ValueError, match="token_type_ids: this model is no prefix LM"):
        engine.generate([[1, 2, 3]], 2, token_type_ids=[[1, 1, 0]])


def test_sampled_generation_equals_recomputation():
    """Each sampled token's distribution, from the cache per (cycle, layer), is the full forward's over the tokens so
    far: the same seed draws the same tokens."""
    ours, ids = convert_hf(make_hrm()), inputs()[0][:2, :6]
    torch.manual_seed(3)
    cached = ours.generate(ids, 5, do_sample=True, top_k=20)
    assert torch.equal(cached, sampled_by_recompute(ours, ids, 5, seed=3, top_k=20))


def gradients(model, ids):
    model.zero_grad()
    model(ids, labels=ids).loss.backward()
    return {name: parameter.grad for name, parameter in model.named_parameters()}


@pytest.mark.parametrize("bp_cycles", [[1], [2], [0, 1]])
def test_gradients_follow_L_bp_cycles(bp_cycles):
    hf = make_hrm(L_bp_cycles=bp_cycles).train()
    ours = convert_hf(hf)
    names = {}  # ours -> transformers'
    for name, _ in ours.named_parameters():
        theirs = name
        if name.startswith("model.blocks."):
            block, rest = name[len("model.blocks."):].split(".", 1)
            stack = ("L_module", "H_module")[int(block) // 2]
            theirs = f"model.{stack}.layers.{int(block) % 2}.{rest}"
        names[name] = theirs
    ids = inputs()[0]
    expected = gradients(hf, ids)
    single = gradients(copy.deepcopy(hf).float(), ids)
    ours_grads = gradients(ours, ids)
    for name, theirs in names.items():
        gap = max_relative_error(single[theirs].double(), expected[theirs])
        assert gap < 1e-3, name
        assert max_relative_error(ours_grads[name], expected[theirs]) <= 2 * gap + 1e-12, name
    # Every cycle recording every fast step would give other gradients: the test sees the routing.
    everything = RecursiveForCausalLM(dataclasses.replace(ours.config, hrm_fast_grad_cycles=None)).double()
    everything.load_state_dict(ours.state_dict())
    everything.train()
    block = "model.blocks.0.self_attn.q_proj.weight"  # each list drops a fast step somewhere ([2] pads to [1, 2])
    assert max_relative_error(gradients(everything, ids)[block], expected[names[block]]) > 1e-3


def test_checkpoint_folders_round_trip(tmp_path):
    hf = make_hrm()
    ids, mask, types = inputs()
    hf.save_pretrained(tmp_path / "hf")
    from_folder = convert_hf(tmp_path / "hf")
    expected = logits(convert_hf(hf), ids, attention_mask=mask, token_type_ids=types)
    assert torch.equal(logits(from_folder, ids, attention_mask=mask, token_type_ids=types), expected)
    from_folder.save_pretrained(tmp_path / "ours")
    again = RecursiveForCausalLM.from_pretrained(tmp_path / "ours")
    assert torch.equal(logits(again, ids, attention_mask=mask, token_type_ids=types), expected)
    exported = export_hf(again)
    assert type(exported).__name__ == "HrmTextForCausalLM"
    theirs = hf.state_dict()
    assert all(torch.equal(tensor, theirs[name]) for name, tensor in exported.state_dict().items())
    assert exported.config.L_bp_cycles == [1, 1] and exported.config.num_layers_per_stack == 2


def test_convert_and_export_commands(tmp_path, capsys):
    hf = make_hrm()
    hf.save_pretrained(tmp_path / "hf")
    cli_main(["convert", str(tmp_path / "hf"), str(tmp_path / "ours"), "--no-progress"])
    assert "hrm_text: 12 effective layers over 4 blocks" in capsys.readouterr().out
    cli_main(["export", str(tmp_path / "ours"), str(tmp_path / "back")])
    back = transformers.HrmTextForCausalLM.from_pretrained(tmp_path / "back").double()
    ids = inputs()[0]
    assert torch.equal(logits(back, ids), logits(hf, ids))


def damaged(tmp_path, change):
    """A saved HRM-Text folder after ``change(config_dict, tensors)``."""
    folder = tmp_path / "hf"
    make_hrm().save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    tensors = load_file(folder / "model.safetensors")
    change(config, tensors)
    (folder / "config.json").write_text(json.dumps(config))
    save_file(tensors, folder / "model.safetensors")
    return folder


@pytest.mark.parametrize("change, message", [
    (lambda c, t: t.pop("model.L_module.layers.1.attn.o_proj.weight"),
     "no tensor model.L_module.layers.1.attn.o_proj.weight"),
    (lambda c, t: t.update({"model.H_module.layers.0.mlp.gate_up_proj.weight": torch.zeros(10, 32)}),
     "model.H_module.layers.0.mlp.gate_up_proj.weight has shape (5, 32)"),
    (lambda c, t: t.update({"model.H_module.layers.0.attn.gqkv_proj.weight": torch.zeros(10, 32)}),
     "model.H_module.layers.0.attn.gqkv_proj.weight has 10 rows, not 4 equal parts"),
    (lambda c, t: t.update({"model.H_module.final_norm.weight": torch.ones(32)}),
     "does not know: ['model.H_module.final_norm.weight']"),
    (lambda c, t: c.update(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}),
     "rope_parameters"),
    (lambda c, t: c.update(attention_bias=True), "attention_bias"),
    (lambda c, t: c.update(hidden_act="relu"), "hidden_act"),
])
def test_unsupported_checkpoints_are_named(tmp_path, change, message):
    with pytest.raises(ValueError, match="model_or_path") as error:
        convert_looped(damaged(tmp_path, change))
    assert message in str(error.value)


def test_tying_arguments_do_not_apply(tmp_path):
    with pytest.raises(ValueError, match="num_blocks: hrm_text is a looped model already"):
        convert_hf(make_hrm(), num_blocks=2)
    folder = tmp_path / "other"
    os.makedirs(folder)
    (folder / "config.json").write_text(json.dumps({"model_type": "mamba"}))
    with pytest.raises(ValueError, match="model_type 'mamba'"):
        convert_looped(folder)


def test_prefix_lm_errors():
    ours = convert_hf(make_hrm())
    ids, mask, types = inputs()
    late = types.clone()
    late[1, 7] = 1  # a second span
    with pytest.raises(ValueError, match="token_type_ids: the tokens of type 1 .* one contiguous span"):
        ours(ids, attention_mask=mask, token_type_ids=late)
    past = ours(ids, use_cache=True).past_key_values
    with pytest.raises(ValueError, match="token_type_ids: the prefix attends both ways in the first forward"):
        ours(ids[:, :1], past_key_values=past, token_type_ids=types[:, :1])
    with pytest.raises(ValueError, match="token_type_ids: expected an int tensor"):
        ours(ids, token_type_ids=types[:, :3])
    plain = RecursiveForCausalLM(dataclasses.replace(ours.config, prefix_lm=False))
    with pytest.raises(ValueError, match="token_type_ids: this model is no prefix LM"):
        plain(ids, token_type_ids=types)


@pytest.mark.parametrize("options, field", [
    (dict(hrm_fast_grad_cycles=(1, 1, 1)), "hrm_fast_grad_cycles"),
    (dict(hrm_fast_grad_cycles=(3,)), "hrm_fast_grad_cycles"),
    (dict(hrm_fast_grad_cycles=(1,), hrm_one_step_gradient=True), "hrm_fast_grad_cycles"),
    (dict(sharing="cycle", hrm_flow="hrm_text"), "hrm_flow"),
    (dict(sharing="cycle", hrm_fast_grad_cycles=(1,)), "hrm_fast_grad_cycles"),
    (dict(hrm_flow="hrm_x"), "hrm_flow"),
    (dict(norm_weight=False, norm_unit_offset=True), "norm_unit_offset"),
])
def test_config_checks(options, field):
    settings = dict(vocab_size=VOCAB, hidden_size=16, intermediate_size=24, num_attention_heads=2, num_blocks=2,
                    num_layers=6, sharing="hierarchical", hrm_period=2)
    settings.update(options)
    with pytest.raises(ValueError, match=f"^{field}:"):
        RecursiveConfig(**settings)


def test_more_cycles_on_a_loaded_model():
    hf = make_hrm()
    ours = convert_hf(hf).with_num_loops(3)
    deeper = transformers.HrmTextForCausalLM(transformers.HrmTextConfig(**{
        **{k: v for k, v in hf.config.to_dict().items() if k in ("vocab_size", "hidden_size", "intermediate_size",
                                                              "num_attention_heads", "head_dim", "L_cycles",
                                                              "L_bp_cycles", "initializer_range")},
        "num_hidden_layers": 2, "H_cycles": 3})).double().eval()
    deeper.load_state_dict(hf.state_dict())
    ids = inputs()[0]
    expected = logits(deeper, ids)
    float32_gap = max_relative_error(logits(copy.deepcopy(deeper).float(), ids).double(), expected)
    assert max_relative_error(logits(ours, ids), expected) <= 2 * float32_gap
    assert ours.config.num_layers == 18 and ours.config.fast_grad_applications() == (1, 1, 1)
