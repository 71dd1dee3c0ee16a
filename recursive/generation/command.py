"""``python -m recursive generate``: its options, and the command that loads (or builds) the model, generates
from text or token-id prompts (plain batches or the engine) and prints the tokens and tokens/s."""

from __future__ import annotations

import argparse
import sys
import time
from typing import List

import torch

from ..checks import check_int
from ..config import RecursiveConfig
from ..modeling import RecursiveForCausalLM
from ..progress import Progress
from ..training.tokenizers import check_vocabulary, load_tokenizer
from .decode import generate_in_batches
from .early_exit import calibrate_exit_threshold
from .engine import DepthBatchingEngine


def default_generate_config() -> RecursiveConfig:
    """The small random model of ``python -m recursive generate`` without ``--model``: 8 layers cycling
    over 2 blocks (4 loops) with per-depth LoRA."""
    return RecursiveConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                           num_layers=8, num_blocks=2, relaxation="depth_lora", lora_rank=4)


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m recursive generate`` on ``parser`` (an argparse sub-parser)."""
    parser.add_argument("--model", help="directory written by save_pretrained (default: a small random model)")
    parser.add_argument("--adapter", metavar="DIR", help="adapters written by save_adapter, loaded into --model")
    prompts = parser.add_mutually_exclusive_group()
    prompts.add_argument("--prompt", action="append", help="a prompt as comma-separated token ids (repeatable)")
    prompts.add_argument("--prompt-text", action="append",
                         help="a prompt as text (repeatable), encoded and the output decoded by the tokenizer saved "
                              "with --model (or --tokenizer)")
    parser.add_argument("--tokenizer", metavar="DIR", help="tokenizer folder for --prompt-text (default: --model's)")
    parser.add_argument("--num-prompts", type=int, default=16, help="random prompts when no --prompt is given")
    parser.add_argument("--prompt-len", type=int, default=16, help="length of the random prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--engine", action="store_true", help="DepthBatchingEngine instead of plain batches")
    parser.add_argument("--max-batch-size", type=int, default=8, help="rows per batch, or the engine's slots")
    exit_options = parser.add_mutually_exclusive_group()
    exit_options.add_argument("--exit-threshold", type=float, help="early exit at loop boundaries (0, 1]")
    exit_options.add_argument("--exit-fraction", type=float,
                              help="calibrate the threshold on the prompts so this fraction of tokens would leave at "
                                   "the first loop boundary (for untrained models)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--eos-token-id", type=int)
    parser.add_argument("--seed", type=int, default=0, help="seeds the random model, prompts and sampling")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"),
                        help="default: the checkpoint's, float32 for the random model")
    parser.add_argument("--quiet", action="store_true", help="print only the summary, not the tokens")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=generate_command)


def _parse_prompt(text: str) -> List[int]:
    try:
        return [int(token) for token in text.replace(" ", "").split(",") if token]
    except ValueError:
        raise ValueError(f"--prompt: expected comma-separated token ids, got {text!r}") from None


def generate_command(args: argparse.Namespace) -> None:
    """``python -m recursive generate``: generate from token-id prompts and print tokens/s."""
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, args.dtype) if args.dtype else None
        torch.manual_seed(args.seed)
        if args.model:
            model = RecursiveForCausalLM.from_pretrained(args.model, device=device, dtype=dtype)
        else:
            model = RecursiveForCausalLM(default_generate_config())
            model = model.to(device=device, dtype=dtype or torch.float32).eval()
        if args.adapter:
            model.load_adapter(args.adapter)
        tokenizer = None
        if args.prompt_text:
            folder = args.tokenizer or args.model
            tokenizer = load_tokenizer(folder) if folder else None
            if tokenizer is None:
                raise ValueError(f"prompt-text: {folder or 'the random model'!r} has no tokenizer "
                                 "(pass --tokenizer DIR, or token ids with --prompt)")
            check_vocabulary(tokenizer, model.config.vocab_size, "tokenizer")
            prompts = [tokenizer.encode(text) for text in args.prompt_text]
            if not all(prompts):
                raise ValueError("prompt-text: an empty prompt")
        elif args.prompt:
            prompts = [_parse_prompt(text) for text in args.prompt]
        else:
            check_int("--num-prompts", args.num_prompts, 1)
            check_int("--prompt-len", args.prompt_len, 1)
            prompts = torch.randint(model.config.vocab_size, (args.num_prompts, args.prompt_len)).tolist()
        eos_token_id = (args.eos_token_id if args.eos_token_id is not None or tokenizer is None
                        else tokenizer.eos_token_id)
        exit_threshold = args.exit_threshold
        if args.exit_fraction is not None:
            width = min(map(len, prompts))
            calibration = torch.tensor([p[:width] for p in prompts], device=device)
            exit_threshold = calibrate_exit_threshold(model, calibration, args.exit_fraction)
        progress = Progress(len(prompts) * max(args.max_new_tokens, 0), enabled=not args.no_progress, unit="tok")
        start = time.perf_counter()
        with progress:
            if args.engine:
                engine = DepthBatchingEngine(model, args.max_batch_size, exit_threshold)
                outputs = engine.generate(prompts, args.max_new_tokens, eos_token_id, progress,
                                          do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                                          top_p=args.top_p)
            else:
                outputs = generate_in_batches(
                    model, prompts, args.max_new_tokens, args.max_batch_size, eos_token_id, progress,
                    do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    exit_threshold=exit_threshold)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    if not args.quiet:
        for i, (prompt, tokens) in enumerate(zip(prompts, outputs)):
            if tokenizer is not None:
                print(f"[{i}] {tokenizer.decode(prompt)!r} -> {tokenizer.decode(tokens[len(prompt):])!r}")
            else:
                print(f"[{i}] {','.join(map(str, prompt))} -> {','.join(map(str, tokens[len(prompt):]))}")
    new_tokens = sum(len(tokens) - len(prompt) for prompt, tokens in zip(prompts, outputs))
    how = "engine" if args.engine else "plain batches"
    line = (f"{new_tokens} new tokens for {len(prompts)} prompts in {seconds:.2f} s ({how}): "
            f"{new_tokens / seconds:.1f} tokens/s")
    if exit_threshold is not None:
        line += f", exit threshold {exit_threshold:.4g}"
    if args.engine:
        line += f", {engine.stats.mean_exit_loops:.2f} of {engine.stats.num_loops} loops per decoded token"
    print(line)
