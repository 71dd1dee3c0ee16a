"""Adapters, PEFT's workflow on recursive models: which parameters are adapters, training them alone,
saving and loading them apart from the base model, and merging per-depth LoRA into an untied model.

Float64, seeded, tiny sizes (the models of tests/helpers.py).
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from recursive import RecursiveConfig, RecursiveEncoder, RecursiveForCausalLM
from recursive.__main__ import main as cli
from recursive.adapters import ADAPTER_FIELDS
from recursive.nn import LowRankLinear
from recursive.training import CORPUS_VOCAB_SIZE, TrainingArguments, train
from tests.helpers import RELAXATIONS, VOCAB, make_model

pytestmark = pytest.mark.usefixtures("one_thread")

ADAPTER_KINDS = {
    "none": set(),
    "depth_lora": {"lora_a", "lora_b"},
    "qkov_lora": {"lora_a", "lora_b"},
    "circuit": {"qk_u", "qk_v", "ov_c", "ov_d"},
    "mol": {"lora_a", "lora_b", "router.weight"},
}


def ids(batch=2, length=7, seed=1):
    return torch.randint(0, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("relaxation", list(RELAXATIONS))
def test_adapter_state_dict_holds_the_relaxations_parameters(relaxation):
    model = make_model(**RELAXATIONS[relaxation])
    adapters = model.adapter_state_dict()
    kinds = {"router.weight" if name.endswith("router.weight") else name.rsplit(".", 1)[-1] for name in adapters}
    assert kinds == ADAPTER_KINDS[relaxation]
    parameters = dict(model.named_parameters())
    assert all(adapters[name] is parameters[name] for name in adapters)
    # The base: every parameter that is not an adapter is one of the plain model's (same names and shapes).
    plain = make_model(**{**RELAXATIONS[relaxation], "relaxation": "none", "lora_targets": None, "lora_rank": 0})
    base = {name: tuple(p.shape) for name, p in model.named_parameters() if name not in adapters}
    assert base == {name: tuple(p.shape) for name, p in plain.named_parameters()}


def test_mixture_of_recursions_router_is_an_adapter():
    model = make_model(mor_routing="token_choice")
    assert set(model.adapter_state_dict()) == {"model.mor_router.weight"}


def test_training_adapters_only_leaves_the_base_unchanged():
    torch.manual_seed(0)
    config = RecursiveConfig(vocab_size=CORPUS_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                             num_layers=4, num_blocks=2, relaxation="depth_lora", lora_rank=4)
    model = RecursiveForCausalLM(config)
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    adapters = model.adapter_state_dict()
    trainable = model.mark_only_adapters_trainable()
    assert trainable == sum(p.numel() for p in adapters.values())
    assert {name for name, p in model.named_parameters() if p.requires_grad} == set(adapters)
    losses = train(model, TrainingArguments(steps=8, batch_size=2, seq_len=16), progress=False).losses
    assert losses[-1] < losses[0]
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert changed and changed <= set(adapters)
    assert any(name.endswith("lora_b") for name in changed)


def test_a_model_without_adapters_says_so():
    model = make_model(relaxation="none")
    assert model.adapter_state_dict() == {}
    with pytest.raises(ValueError, match="no adapters"):
        model.mark_only_adapters_trainable()
    with pytest.raises(ValueError, match="no adapters"):
        model.save_adapter("unused")


@pytest.mark.parametrize("options", [RELAXATIONS["depth_lora"], RELAXATIONS["circuit"], RELAXATIONS["mol"],
                                     dict(relaxation="depth_lora", mor_routing="expert_choice")],
                         ids=["depth_lora", "circuit", "mol", "mor"])
def test_saved_adapter_loads_into_the_base_model(tmp_path, options):
    tuned = make_model(seed=0, **options)
    other = make_model(seed=0, **options)
    with torch.no_grad():  # same base, other adapters
        for parameter in other.adapter_state_dict().values():
            parameter.normal_(0.0, 0.1)
    assert not torch.allclose(tuned(ids()).logits, other(ids()).logits)
    tuned.save_adapter(str(tmp_path))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    other.load_adapter(str(tmp_path))
    torch.testing.assert_close(other(ids()).logits, tuned(ids()).logits, rtol=0, atol=0)

    single = make_model(seed=0, **options).float()  # loads in the model's own dtype
    single.load_adapter(str(tmp_path))
    assert all(p.dtype == torch.float32 for p in single.adapter_state_dict().values())
    torch.testing.assert_close(single(ids()).logits.double(), tuned(ids()).logits, rtol=1e-4, atol=1e-4)


def test_load_adapter_rejects_another_config_and_missing_files(tmp_path):
    make_model(**RELAXATIONS["depth_lora"]).save_adapter(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match=r"lora_rank .*start_index"):
        make_model(**{**RELAXATIONS["depth_lora"], "lora_rank": 2, "start_index": 1}).load_adapter(
            str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="adapter_model.safetensors"):
        (tmp_path / "adapter" / "adapter_model.safetensors").unlink()
        make_model(**RELAXATIONS["depth_lora"]).load_adapter(str(tmp_path / "adapter"))
    with pytest.raises(ValueError, match="adapter_config.json"):
        make_model(**RELAXATIONS["depth_lora"]).load_adapter(str(tmp_path / "empty"))


def test_adapter_config_holds_the_adapter_and_its_base_only(tmp_path):
    model = make_model(**{**RELAXATIONS["depth_lora"], "backend": "torch"})
    model.save_adapter(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert set(saved) == {"base", *ADAPTER_FIELDS}
    assert saved["relaxation"] == "depth_lora" and saved["lora_rank"]["q"] == 4
    assert saved["base"]["hidden_size"] == model.config.hidden_size and saved["base"]["sharing"] == "sequence"
    assert not {"backend", "initializer_range"} & set(saved["base"])  # runtime and initialisation: not the base
    assert not set(ADAPTER_FIELDS) & set(saved["base"])
    model.save_pretrained(str(tmp_path / "model"))
    assert "backend" not in json.loads((tmp_path / "model" / "config.json").read_text())
    assert RecursiveForCausalLM.from_pretrained(str(tmp_path / "model"), backend="cpp").config.backend == "cpp"


@pytest.mark.parametrize("relaxation", ["depth_lora", "circuit", "mol"])
def test_with_adapter_adds_the_adapter_to_a_base_without_one(tmp_path, relaxation):
    tuned = make_model(seed=3, **RELAXATIONS[relaxation])
    with torch.no_grad():
        for parameter in tuned.adapter_state_dict().values():
            parameter.normal_(0.0, 0.1)
    tuned.save_adapter(str(tmp_path))
    plain = {**RELAXATIONS[relaxation], "relaxation": "none", "lora_targets": None, "lora_rank": 0}
    base = make_model(seed=5, **plain)
    with torch.no_grad():  # the tuned model's base weights, no adapters
        base.load_state_dict({name: t for name, t in tuned.state_dict().items() if name in base.state_dict()})
    with pytest.raises(ValueError, match="relaxation .*with_adapter|with_adapter.*relaxation"):
        base.load_adapter(str(tmp_path))
    before = base(ids()).logits
    adapted = base.with_adapter(str(tmp_path))
    assert adapted.config.relaxation == relaxation and adapted is not base
    torch.testing.assert_close(adapted(ids()).logits, tuned(ids()).logits, rtol=0, atol=0)
    torch.testing.assert_close(base(ids()).logits, before, rtol=0, atol=0)  # the base is unchanged
    with pytest.raises(ValueError, match=r"another base architecture; fields that differ: .*hidden_size \(32 there"):
        make_model(**{**plain, "hidden_size": 48}).with_adapter(str(tmp_path))


def test_an_adapter_saved_with_the_whole_model_config_still_loads(tmp_path):
    """Folders written before adapters had their own config hold the whole model config."""
    tuned = make_model(seed=0, **RELAXATIONS["circuit"])
    with torch.no_grad():
        for parameter in tuned.adapter_state_dict().values():
            parameter.normal_(0.0, 0.1)
    tuned.save_adapter(str(tmp_path))
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({**tuned.config.to_dict(), "backend": None}, indent=2))  # the old format
    other = make_model(seed=0, **RELAXATIONS["circuit"])
    other.load_adapter(str(tmp_path))
    torch.testing.assert_close(other(ids()).logits, tuned(ids()).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match="num_layers"):
        make_model(**{**RELAXATIONS["circuit"], "num_layers": 8}).load_adapter(str(tmp_path))


def test_merged_weight_is_the_weight_plus_its_lora():
    torch.manual_seed(0)
    layer = LowRankLinear(6, 5, num_adapters=3, rank=2, alpha=3.0).double()
    torch.nn.init.normal_(layer.lora_b)
    x = torch.randn(4, 6, dtype=torch.float64)
    for adapter in (-1, 0, 2):
        plain = torch.nn.functional.linear(x, layer.merged_weight(adapter), layer.bias)
        torch.testing.assert_close(plain, layer(x, adapter))
    assert layer.merged_weight(-1) is layer.weight
    with pytest.raises(IndexError, match="adapter"):
        layer.merged_weight(3)
    with pytest.raises(ValueError, match="adapter"):
        layer.merged_weight(torch.tensor(0))
    plain_layer = LowRankLinear(6, 5, num_adapters=0)
    assert plain_layer.merged_weight(1) is plain_layer.weight


@pytest.mark.parametrize("cls, relaxation", [(RecursiveForCausalLM, "none"), (RecursiveForCausalLM, "depth_lora"),
                                             (RecursiveForCausalLM, "qkov_lora"), (RecursiveEncoder, "depth_lora")])
def test_merge_and_untie_computes_the_same_model(cls, relaxation):
    options = dict(RELAXATIONS[relaxation])
    if cls is RecursiveEncoder:
        options.update(hidden_act="gelu", tie_word_embeddings=True, embedding_size=16, start_index=1)
    model = make_model(cls, **options)
    untied = model.merge_and_untie()
    assert type(untied) is cls and untied.config.num_blocks == model.config.num_layers
    assert untied.config.relaxation == "none" and untied.adapter_state_dict() == {}
    assert dataclasses.replace(untied.config, num_blocks=model.config.num_blocks, sharing=model.config.sharing,
                               relaxation=model.config.relaxation, lora_rank=model.config.lora_rank,
                               lora_targets=model.config.lora_targets,
                               start_index=model.config.start_index) == model.config
    assert all(p.dtype == torch.float64 for p in untied.parameters())
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[1, :3] = 0
    torch.testing.assert_close(untied(ids(), mask).logits, model(ids(), mask).logits)
    if model.config.tie_word_embeddings and cls is RecursiveForCausalLM:
        assert untied.lm_head.weight is untied.model.embed_tokens.weight
    # Independent storage: changing the untied model leaves the original as it was.
    reference = model(ids()).logits
    with torch.no_grad():
        for parameter in untied.parameters():
            parameter.add_(1.0)
    torch.testing.assert_close(model(ids()).logits, reference, rtol=0, atol=0)


def test_untied_model_saves_loads_and_generates_as_a_plain_model(tmp_path):
    """The untied model is a plain model: it saves, loads, and caches as one."""
    model = make_model(**RELAXATIONS["depth_lora"])
    untied = model.merge_and_untie()
    untied.save_pretrained(str(tmp_path))
    loaded = RecursiveForCausalLM.from_pretrained(str(tmp_path))
    torch.testing.assert_close(loaded(ids()).logits, model(ids()).logits)
    prompt = ids(batch=1, length=4)
    torch.testing.assert_close(loaded.generate(prompt, 5), model.generate(prompt, 5), rtol=0, atol=0)


@pytest.mark.parametrize("options, message", [
    (RELAXATIONS["circuit"], "circuit"),
    (RELAXATIONS["mol"], "mol"),
    (dict(sharing="hierarchical", num_layers=6), "HRM"),
    (dict(relaxation="depth_lora", mor_routing="token_choice"), "Mixture-of-Recursions"),
])
def test_merge_and_untie_rejects_what_does_not_merge(options, message):
    model = make_model(**options)
    with pytest.raises(ValueError, match=message):
        model.merge_and_untie()


def test_cli_trains_adapters_alone_and_generates_with_them(tmp_path, capsys):
    torch.manual_seed(0)
    config = RecursiveConfig(vocab_size=CORPUS_VOCAB_SIZE, hidden_size=32, intermediate_size=64, num_attention_heads=2,
                             num_layers=2, num_blocks=1, relaxation="depth_lora", lora_rank=4)
    (tmp_path / "config.json").write_text(config.to_json_string())
    base = tmp_path / "base"
    common = ["--batch-size", "2", "--seq-len", "16", "--no-progress"]
    cli(["train", "--config", str(tmp_path / "config.json"), "--steps", "2", "--save", str(base), *common])
    cli(["train", "--model", str(base), "--steps", "4", "--adapters-only", "--gradient-checkpointing",
         "--save-adapter", str(tmp_path / "adapter"), *common])
    printed = capsys.readouterr().out
    trainable = sum(p.numel() for p in RecursiveForCausalLM(config).adapter_state_dict().values())
    assert f"training {trainable / 1e6:.2f}M of" in printed and "saved the adapters" in printed

    tuned = RecursiveForCausalLM.from_pretrained(str(base))
    tuned.load_adapter(str(tmp_path / "adapter"))
    expected = tuned.generate(torch.tensor([[1, 2, 3]]), 4)[0, 3:].tolist()
    cli(["generate", "--model", str(base), "--adapter", str(tmp_path / "adapter"), "--prompt", "1,2,3",
         "--max-new-tokens", "4", "--no-progress"])
    assert f"[0] 1,2,3 -> {','.join(map(str, expected))}" in capsys.readouterr().out
