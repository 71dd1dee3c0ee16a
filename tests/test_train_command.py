"""``python -m recursive train`` end to end: it trains, saves and continues; trains on text files with
evaluation and a plot; refuses bad data before training; a Ctrl-C checkpoint resumes exactly; a converted Hugging
Face model with its tokenizer is uptrained to generated text; and its options are TrainingArguments' fields."""

import argparse
import dataclasses
import os
import signal
import subprocess
import sys
import time
import typing

import pytest
import torch

from recursive import RecursiveForCausalLM
from recursive.__main__ import main as cli
from recursive.training import (
    SCHEDULES,
    ByteTokenizer,
    TrainingArguments,
    list_checkpoints,
    stdlib_sources,
    tokenize_files,
    write_token_file,
)
from recursive.training.command import add_train_arguments
from tests.helpers import corpus_model, make_hf, make_model, read_rows, save_hf_tokenizer, tiny_config

pytestmark = pytest.mark.usefixtures("one_thread")


def test_cli_trains_saves_and_continues(tmp_path, capsys):
    config = corpus_model().config
    config_path = tmp_path / "config.json"
    config_path.write_text(config.to_json_string())
    saved = tmp_path / "trained"
    common = ["--steps", "6", "--batch-size", "2", "--seq-len", "16", "--no-progress"]
    cli(["train", "--config", str(config_path), "--save", str(saved), *common])
    printed = capsys.readouterr().out
    assert "loss: first" in printed and "tokens/s" in printed and str(saved) in printed

    loaded = RecursiveForCausalLM.from_pretrained(str(saved))
    assert loaded.config == config
    fresh = corpus_model()  # the CLI seeds the init with --seed 0, as here
    changed = [name for name, p in fresh.state_dict().items() if not torch.equal(p, loaded.state_dict()[name])]
    assert "model.blocks.0.self_attn.q_proj.weight" in changed and "model.blocks.0.mlp.down_proj.lora_b" in changed

    cli(["train", "--model", str(saved), *common])  # continue training the saved model
    assert "loss: first" in capsys.readouterr().out


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
    for name, value in straight.named_parameters():
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


def test_every_training_argument_is_a_flag_with_its_default_and_help():
    parser = argparse.ArgumentParser()
    add_train_arguments(parser)
    actions = {action.dest: action for action in parser._actions}
    types = typing.get_type_hints(TrainingArguments)
    for field in dataclasses.fields(TrainingArguments):
        action = actions[field.name]
        assert action.option_strings == ["--" + field.name.replace("_", "-")], field.name
        assert action.default == field.default and action.help == field.metadata["help"], field.name
        if types[field.name] is bool:
            assert isinstance(action, argparse._StoreTrueAction), field.name
        else:
            assert action.type in (int, float, str) and action.nargs is None, field.name
    assert actions["warmup_steps"].type is int and actions["warmup_steps"].default is None  # Optional[int]
    assert actions["schedule"].choices == SCHEDULES
    defaults = parser.parse_args([])
    assert TrainingArguments(**{f.name: getattr(defaults, f.name) for f in dataclasses.fields(TrainingArguments)}) == (
        TrainingArguments())
    parsed = parser.parse_args(["--batch-size", "4", "--warmup-steps", "3", "--bf16", "--lr", "0.1"])
    assert (parsed.batch_size, parsed.warmup_steps, parsed.bf16, parsed.lr, parsed.fsdp) == (4, 3, True, 0.1, False)
