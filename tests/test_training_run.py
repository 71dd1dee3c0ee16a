"""recursive.training's loop and ``python -m recursive train`` on real text: exact resume (also after Ctrl-C),
gradient accumulation, checkpoints, metrics, plots, the errors for bad input, and the path from a converted
Hugging Face model with its tokenizer to generated text."""

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from recursive import RecursiveForCausalLM
from recursive.__main__ import main as cli
from recursive.training import (
    ByteTokenizer,
    TokenStream,
    TrainingArguments,
    list_checkpoints,
    stdlib_sources,
    tokenize_files,
    train,
    write_token_file,
)
from tests.helpers import make_hf, make_model, save_hf_tokenizer, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def stdlib_bytes(limit: int = 2) -> torch.Tensor:
    """The standard library's first source files as byte ids."""
    text = "".join(open(path, encoding="utf-8").read() for path in stdlib_sources(limit=limit))
    return torch.tensor(list(text.encode("utf-8")))


def byte_model(seed: int = 0, **overrides) -> RecursiveForCausalLM:
    return make_model(seed=seed, vocab_size=256, relaxation="depth_lora", **overrides)


def parameters(model):
    return {name: p.detach().clone() for name, p in model.named_parameters()}


def read_rows(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


def test_resume_continues_exactly(tmp_path):
    """Six steps straight equal three, a checkpoint, and three more from it in a model of other weights (float64,
    with accumulation and evaluation), and the metrics of the resumed run replace the rows past its checkpoint."""
    data, held_out = stdlib_bytes(), stdlib_bytes(4)[-3000:]
    args = TrainingArguments(steps=6, batch_size=4, seq_len=16, grad_accum=2, eval_every=2, save_every=3,
                             keep_checkpoints=0)
    straight_model = byte_model()
    straight = train(straight_model, args, data, held_out, save_dir=str(tmp_path / "a"),
                     metrics_path=str(tmp_path / "a" / "metrics.jsonl"), progress=False)
    assert [c.rsplit("-", 1)[1] for c in list_checkpoints(str(tmp_path / "a"))] == ["3", "6"]

    shutil.copytree(tmp_path / "a", tmp_path / "b")  # as if a run stopped after step 6 had written rows 4-6
    resumed_model = byte_model(seed=1)
    resumed = train(resumed_model, args, data, held_out, save_dir=str(tmp_path / "b"),
                    resume_from=str(tmp_path / "b" / "checkpoint-3"),
                    metrics_path=str(tmp_path / "b" / "metrics.jsonl"), progress=False)
    assert resumed.losses == straight.losses[3:] and resumed.step == 6
    assert resumed.eval_losses == [e for e in straight.eval_losses if e[0] > 3]
    for name, value in parameters(straight_model).items():
        assert torch.equal(value, resumed_model.get_parameter(name)), name
    rows = read_rows(tmp_path / "b" / "metrics.jsonl")
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert [row["loss"] for row in rows] == straight.losses and "eval_loss" in rows[3] and "eval_loss" not in rows[2]
    assert rows[5]["tokens"] == 6 * 4 * 16 and rows[5]["eval_perplexity"] == pytest.approx(
        torch.tensor(rows[5]["eval_loss"]).exp().item())


def test_gradient_accumulation_computes_the_same_steps():
    data = stdlib_bytes()
    models = []
    for grad_accum in (1, 2, 4):
        model = byte_model()
        losses = train(model, TrainingArguments(steps=3, batch_size=4, seq_len=16, grad_accum=grad_accum), data,
                       progress=False).losses
        models.append((losses, parameters(model)))
    for losses, params in models[1:]:
        assert losses == pytest.approx(models[0][0], rel=1e-12)
        for name, value in params.items():
            torch.testing.assert_close(value, models[0][1][name], rtol=1e-10, atol=1e-12, msg=name)


def test_checkpoints_rotate_and_are_model_folders(tmp_path):
    model = byte_model()
    result = train(model, TrainingArguments(steps=4, batch_size=2, seq_len=16, save_every=1, keep_checkpoints=2),
                   stdlib_bytes(), save_dir=str(tmp_path), tokenizer=ByteTokenizer(), progress=False)
    assert [os.path.basename(c) for c in list_checkpoints(str(tmp_path))] == ["checkpoint-3", "checkpoint-4"]
    assert result.checkpoint == str(tmp_path / "checkpoint-4")
    assert not [name for name in os.listdir(tmp_path) if name.endswith(".partial")]
    for folder in (tmp_path, tmp_path / "checkpoint-4"):
        loaded = RecursiveForCausalLM.from_pretrained(str(folder))
        for name, value in parameters(model).items():
            assert torch.equal(value, loaded.get_parameter(name)), name
        assert (folder / "bytes_tokenizer.json").exists()


def test_resume_with_more_steps_extends_the_run(tmp_path, capsys):
    """A run of 4 steps resumed with 7: 3 more steps, each at the learning rate of a cosine decay re-planned over 7
    steps (the warm-up of 1 step kept), said once; fewer steps than the checkpoint has done are refused."""
    data = stdlib_bytes()
    args = TrainingArguments(steps=4, batch_size=2, seq_len=16, lr=1e-3, warmup_steps=1)
    train(byte_model(), args, data, save_dir=str(tmp_path), progress=False)
    capsys.readouterr()
    longer = TrainingArguments(steps=7, batch_size=2, seq_len=16, lr=1e-3)  # its own warm-up would be 1 as well
    result = train(byte_model(), longer, data, save_dir=str(tmp_path), resume_from=str(tmp_path),
                   metrics_path=str(tmp_path / "metrics.jsonl"), progress=False)
    assert result.step == 7 and len(result.losses) == 3
    assert capsys.readouterr().err.count("re-planned over 7 steps") == 1
    rates = [row["lr"] for row in read_rows(tmp_path / "metrics.jsonl")]
    # after one warm-up step, 0.5 (1 + cos(pi (step - 1) / 6)) for steps 4, 5, 6 (0-based)
    assert rates == pytest.approx([1e-3 * 0.5 * (1 + math.cos(math.pi * (step - 1) / 6)) for step in (4, 5, 6)])
    with pytest.raises(ValueError, match="^steps: .* at step 7"):
        train(byte_model(), TrainingArguments(steps=5, batch_size=2, seq_len=16, lr=1e-3), data,
              resume_from=str(tmp_path), progress=False)


def test_resume_refuses_what_would_not_continue_the_run(tmp_path):
    data, args = stdlib_bytes(), TrainingArguments(steps=2, batch_size=2, seq_len=16)
    train(byte_model(), args, data, save_dir=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match=r"resume: .*--seq-len 16 there, 32 here"):
        train(byte_model(), TrainingArguments(steps=2, batch_size=2, seq_len=32), data, resume_from=str(tmp_path),
              progress=False)
    with pytest.raises(ValueError, match="resume: .*another config .*hidden_size"):
        train(byte_model(hidden_size=48), args, data, resume_from=str(tmp_path), progress=False)
    adapters_only = byte_model()
    adapters_only.mark_only_adapters_trainable()
    with pytest.raises(ValueError, match="resume: .*other parameters"):
        train(adapters_only, args, data, resume_from=str(tmp_path), progress=False)
    with pytest.raises(ValueError, match="resume: .*neither a checkpoint"):
        train(byte_model(), args, data, resume_from=str(tmp_path / "nothing"), progress=False)


def test_from_pretrained_names_malformed_files(tmp_path):
    byte_model().save_pretrained(str(tmp_path))
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])
    with pytest.raises(ValueError, match="model.safetensors.* truncated or damaged"):
        RecursiveForCausalLM.from_pretrained(str(tmp_path))
    config = tmp_path / "config.json"
    config.write_text('{"vocab_size": 256,')
    with pytest.raises(ValueError, match="config.json.* is not valid JSON"):
        RecursiveForCausalLM.from_pretrained(str(tmp_path))
    config.write_text('{"vocab_size": 256, "colour": "red"}')
    with pytest.raises(ValueError, match="config.json.* is not a valid config .*colour"):
        RecursiveForCausalLM.from_pretrained(str(tmp_path))
    config.write_text("[1, 2]")
    with pytest.raises(ValueError, match="config.json.* holds a list"):
        RecursiveForCausalLM.from_pretrained(str(tmp_path))


def _train_command(config_path, save, *extra):
    return [sys.executable, "-m", "recursive", "train", "--config", str(config_path), "--steps", "400",
            "--batch-size", "4", "--seq-len", "16", "--save", str(save), "--no-progress", *extra]


def test_ctrl_c_saves_a_checkpoint_that_resumes_exactly(tmp_path):
    config_path = tmp_path / "config.json"
    config_path.write_text(tiny_config(vocab_size=128).to_json_string())
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.Popen(_train_command(config_path, tmp_path / "stopped"), stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True, env=env)
    metrics = tmp_path / "stopped" / "metrics.jsonl"
    deadline = time.monotonic() + 120
    while not (metrics.exists() and len(metrics.read_text().splitlines()) >= 3):
        assert run.poll() is None and time.monotonic() < deadline, run.stdout.read() if run.poll() is not None else ""
        time.sleep(0.05)
    run.send_signal(signal.SIGINT)
    out, _ = run.communicate(timeout=120)
    assert run.returncode == 0, out
    checkpoints = list_checkpoints(str(tmp_path / "stopped"))
    assert len(checkpoints) == 1 and f"--resume {checkpoints[0]}" in out
    step = int(checkpoints[0].rsplit("-", 1)[1])
    assert 3 <= step < 400

    subprocess.run(_train_command(config_path, tmp_path / "stopped", "--resume", str(tmp_path / "stopped")),
                   check=True, env=env, capture_output=True)
    subprocess.run(_train_command(config_path, tmp_path / "straight"), check=True, env=env, capture_output=True)
    resumed = RecursiveForCausalLM.from_pretrained(str(tmp_path / "stopped"))
    straight = RecursiveForCausalLM.from_pretrained(str(tmp_path / "straight"))
    for name, value in parameters(straight).items():
        assert torch.equal(value, resumed.get_parameter(name)), name
    losses = [row["loss"] for row in read_rows(tmp_path / "stopped" / "metrics.jsonl")]
    assert losses == [row["loss"] for row in read_rows(tmp_path / "straight" / "metrics.jsonl")] and len(losses) == 400


def test_cli_trains_on_text_files_with_evaluation_and_a_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    paths = stdlib_sources(limit=4)
    cli(["train", "--data", *paths, "--steps", "4", "--batch-size", "2", "--seq-len", "32", "--eval-every", "2",
         "--eval-fraction", "0.3", "--save", str(tmp_path / "run"), "--cache-dir", str(tmp_path / "cache"),
         "--plot", str(tmp_path / "curve.png"), "--no-progress"])
    out = capsys.readouterr().out
    assert "held out" in out and "held-out" in out and "perplexity" in out
    rows = read_rows(tmp_path / "run" / "metrics.jsonl")
    assert len(rows) == 4 and ["eval_loss" in row for row in rows] == [False, True, False, True]
    assert (tmp_path / "curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert RecursiveForCausalLM.from_pretrained(str(tmp_path / "run")).config.vocab_size == 256  # bytes


def test_cli_rejects_bad_data_before_training(tmp_path, capsys):
    small = tmp_path / "small"
    make_model(vocab_size=97).save_pretrained(str(small))
    token_file = str(tmp_path / "wide.tokens")
    write_token_file(token_file, iter([[200] * 100, [1] * 100]), 256, {})
    bytes_file = tokenize_files(stdlib_sources(limit=2), ByteTokenizer(), str(tmp_path / "cache"), progress=False).path
    tokenizer = tmp_path / "tok"
    pytest.importorskip("transformers")
    save_hf_tokenizer(str(tokenizer), vocab_size=300)
    for argv, message in [
        (["--data", str(tmp_path / "missing*.txt")], "data: .*matches no file"),
        (["--model", str(small), "--data", token_file, "--eval-fraction", "0"], "data: holds token id 200"),
        (["--model", str(small), "--tokenizer", str(tokenizer), "--data", token_file],
         "tokenizer: .*produces ids up to 299"),
        (["--data", token_file, stdlib_sources(limit=1)[0]], "data: a token file .* must be the only"),
        (["--data", token_file, "--eval-fraction", "0.2", "--seq-len", "512"], "seq_len: 512 is longer"),
        (["--resume", str(tmp_path)], "resume: .*neither a checkpoint"),
        (["--plot", str(tmp_path / "curve.png")], "plot: .*(--save DIR or --metrics FILE|matplotlib)"),
        (["--model", str(small), "--data", stdlib_sources(limit=1)[0]], "tokenizer: .*small.* holds no tokenizer"),
        (["--tokenizer", str(tokenizer), "--data", bytes_file], "data: .* was tokenised by bytes"),
    ]:
        with pytest.raises(SystemExit, match=message):
            cli(["train", "--steps", "1", "--no-progress", "--cache-dir", str(tmp_path / "cache"), *argv])


def test_uptraining_a_converted_model_end_to_end(tmp_path, capsys):
    """A Hugging Face checkpoint with its tokenizer -> convert (keeps the tokenizer) -> train the adapters on
    text -> generate from text prompts -> export."""
    pytest.importorskip("transformers")
    hf = tmp_path / "hf"
    make_hf("llama", vocab_size=300).save_pretrained(str(hf))
    save_hf_tokenizer(str(hf), vocab_size=300)
    cli(["convert", str(hf), str(tmp_path / "recursive"), "--num-blocks", "2", "--lora-rank", "4", "--no-progress"])
    assert "with its tokenizer" in capsys.readouterr().out
    cli(["train", "--model", str(tmp_path / "recursive"), "--data", *stdlib_sources(limit=3), "--adapters-only",
         "--steps", "3", "--batch-size", "2", "--seq-len", "32", "--save", str(tmp_path / "trained"),
         "--cache-dir", str(tmp_path / "cache"), "--no-progress"])
    trained = RecursiveForCausalLM.from_pretrained(str(tmp_path / "trained"))
    converted = RecursiveForCausalLM.from_pretrained(str(tmp_path / "recursive"))
    changed = {name for name, p in trained.named_parameters() if not torch.equal(p, converted.get_parameter(name))}
    assert changed and all("lora" in name for name in changed)  # adapters only
    capsys.readouterr()
    cli(["generate", "--model", str(tmp_path / "trained"), "--prompt-text", "def main(", "--prompt-text", "import os",
         "--max-new-tokens", "5", "--no-progress"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("[0] 'def main(' -> '") and lines[1].startswith("[1] 'import os' -> '")
    cli(["export", str(tmp_path / "trained"), str(tmp_path / "exported")])
    assert (tmp_path / "exported" / "config.json").exists()
    with pytest.raises(SystemExit, match="prompt-text: .*has no tokenizer"):
        cli(["generate", "--prompt-text", "hello", "--no-progress"])


def test_token_files_train_like_their_text(tmp_path):
    """``--data`` of a token file trains on the same windows as the text it was made from."""
    paths = stdlib_sources(limit=2)
    token_file = tokenize_files(paths, ByteTokenizer(), str(tmp_path), progress=False)
    args = TrainingArguments(steps=2, batch_size=2, seq_len=16)
    from_file = train(byte_model(), args, TokenStream(token_file.tokens), progress=False).losses
    from_tensor = train(byte_model(), args, stdlib_bytes(), progress=False).losses
    assert from_file == from_tensor
