"""The command line, ``python -m recursive {info,bench,train,generate,convert,export}``: argument parsing and
printing around the library's functions (the library itself neither prints nor exits)."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import sys
import time
from typing import List

import torch

import recursive_kernels
from recursive_benchmarks import runner as benchmarks
from recursive_kernels import backends

from . import smollm2
from .checks import check_int
from .config import LORA_TARGETS, RecursiveConfig
from .convert import (
    CONVERTIBLE_SHARING,
    INIT_SCHEMES,
    LORA_INITS,
    SUPPORTED_MODEL_TYPES,
    convert_hf,
    export_hf,
    load_hf,
)
from .generation import DepthBatchingEngine, calibrate_exit_threshold, generate_in_batches
from .modeling import RecursiveForCausalLM
from .progress import Progress
from .reproduce import EXPERIMENTS, run_experiments
from .training.command import add_train_arguments
from .training.corpus import stdlib_sources
from .training.data import calibration_windows
from .training.tokenizers import check_vocabulary, load_tokenizer

# Activation-aware conversion's default calibration: this many tokens in windows of this length.
CALIBRATION_TOKENS, CALIBRATION_WINDOW = 1024, 256


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as exc:  # a broken install should not stop `info`
        return f"broken ({type(exc).__name__}: {exc})"


def info(args) -> None:
    print(f"recursive-kernels {recursive_kernels.__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    for module in ("torch", "triton", "numpy", "transformers"):  # transformers: conversion and export only
        print(f"{module:<12} {_version(module)}")
    try:  # beside this package under its own name, which our source folder kernels/ would shadow on import
        print(f"{'kernels':<12} {importlib.metadata.version('kernels')} (Hugging Face's hub kernels)")
    except importlib.metadata.PackageNotFoundError:
        pass
    print(f"{'cpu':<12} {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"{f'cuda:{i}':<12} {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
    else:
        print(f"{'cuda':<12} no device")
    print("backends:")
    for name, why in backends.report().items():
        print(f"  {name:<7} {'available' if why is None else 'unavailable: ' + why}")


def convert(args) -> None:
    if importlib.util.find_spec("transformers") is None:
        sys.exit("python -m recursive convert needs transformers: pip install transformers")
    targets = tuple(t for t in args.lora_targets.split(",") if t) if args.lora_targets else LORA_TARGETS
    lora_init = "zero" if args.no_svd_init else args.lora_init
    try:
        checkpoint = smollm2.require_gguf_path() if args.checkpoint == "smollm2" else args.checkpoint
        hf_model = load_hf(checkpoint, None if args.dtype == "auto" else getattr(torch, args.dtype))
        tokenizer = load_tokenizer(args.tokenizer or checkpoint)
        calibration = None
        if lora_init == "activation" and args.lora_rank:
            if tokenizer is None:
                sys.exit("error: tokenizer: --lora-init activation reads calibration text, which needs the model's "
                         "tokenizer (--tokenizer)")
            calibration = calibration_windows(args.calibration or stdlib_sources(), tokenizer, args.calibration_tokens,
                                              CALIBRATION_WINDOW)
        model = convert_hf(hf_model, args.num_blocks, args.sharing, args.init, args.lora_rank, targets, lora_init,
                           calibration=calibration, fold_norms=not args.no_fold_norms, lora_alpha=args.lora_alpha,
                           progress=False if args.no_progress else None)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    model.save_pretrained(args.output)
    kept = ""
    if tokenizer is not None:
        check_vocabulary(tokenizer, model.config.vocab_size, "tokenizer")
        tokenizer.save_pretrained(args.output)
        kept = " with its tokenizer"
    elif args.tokenizer:
        sys.exit(f"error: tokenizer: {args.tokenizer!r} holds no tokenizer")
    count = sum(p.numel() for p in model.parameters())
    original = sum(p.numel() for p in hf_model.parameters())
    print(f"{model.config.num_layers} layers -> {model.config.num_blocks} blocks ({model.config.sharing}, "
          f"relaxation {model.config.relaxation}): {count:,} parameters ({count / original:.1%} of {original:,}), "
          f"written to {args.output}{kept}")


def export(args) -> None:
    if importlib.util.find_spec("transformers") is None:
        sys.exit("python -m recursive export needs transformers: pip install transformers")
    model = RecursiveForCausalLM.from_pretrained(args.model)
    try:
        hf_model = export_hf(model, args.model_type)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    hf_model.save_pretrained(args.output)
    print(f"{model.config.num_layers} layers over {model.config.num_blocks} blocks (relaxation "
          f"{model.config.relaxation}) -> {type(hf_model).__name__} of {hf_model.config.num_hidden_layers} layers, "
          f"written to {args.output}")


def reproduce(args) -> None:
    try:
        reports = run_experiments(args.experiments, quick=args.quick, out=args.out, device=args.device,
                                  progress=not args.no_progress)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    for report in reports:
        for claim in report.claims:
            print(f"{report.name:<12} {claim.verdict:<13} {claim.claim}: {claim.evidence}")
    print(f"tables and plots in {args.out} (summary.md)")


def default_generate_config() -> RecursiveConfig:
    """The small random model of ``python -m recursive generate`` without ``--model``: 8 layers cycling
    over 2 blocks (4 loops) with per-depth LoRA."""
    return RecursiveConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                           num_layers=8, num_blocks=2, relaxation="depth_lora", lora_rank=4)


def add_generate_arguments(parser) -> None:
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


def generate_command(args) -> None:
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


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recursive", description="recursive-kernels command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and each backend's availability").set_defaults(func=info)
    p = sub.add_parser("bench", help="benchmark the fused ops and whole models against their peers on the "
                                     "default device (a representative selection, about 2 minutes on a 2-core CPU; "
                                     "--full: every case)")
    benchmarks.add_arguments(p)
    p.set_defaults(func=benchmarks.main)
    add_train_arguments(sub.add_parser("train", help="train or uptrain a model on text files or a token file (or the "
                                                     "built-in synthetic corpus); under torchrun on every process"))
    add_generate_arguments(sub.add_parser("generate", help="generate from text or token-id prompts (plain batches or "
                                                           "the engine)"))
    p = sub.add_parser("convert", help="convert a local Hugging Face Llama/Mistral/Qwen2/Gemma checkpoint or GGUF file")
    p.add_argument("checkpoint", help="a Hugging Face checkpoint folder (read with local_files_only), a GGUF file, or "
                                      f"smollm2: the installed SmolLM2-135M-Instruct ({smollm2.INSTALL})")
    p.add_argument("output", help="directory to write the recursive model to")
    p.add_argument("--num-blocks", type=int, help="unique blocks B (default: one per layer)")
    p.add_argument("--sharing", default="cycle", choices=CONVERTIBLE_SHARING)
    p.add_argument("--init", default="stepwise", choices=INIT_SCHEMES, help="how blocks take the original layers")
    p.add_argument("--lora-rank", type=int, default=0, help="per-layer LoRA rank (0: none)")
    p.add_argument("--lora-targets", help="comma-separated LoRA targets (default: q,k,v,o,gate,up,down)")
    p.add_argument("--lora-alpha", type=float, default=RecursiveConfig.lora_alpha, help="LoRA alpha")
    p.add_argument("--lora-init", default="svd", choices=LORA_INITS,
                   help="svd: the residuals' best rank-r approximation; activation: the best one for the inputs each "
                        "layer sees on calibration text; zero: PEFT's init (default: svd)")
    p.add_argument("--no-svd-init", action="store_true", help=argparse.SUPPRESS)  # deprecated: --lora-init zero
    p.add_argument("--calibration", nargs="+", metavar="PATH",
                   help="text files or folders for --lora-init activation (default: the Python standard library's "
                        "sources)")
    p.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS,
                   help=f"calibration tokens for --lora-init activation (default: {CALIBRATION_TOKENS})")
    p.add_argument("--no-fold-norms", action="store_true",
                   help="keep each block's norm gains instead of folding every layer's into its projections")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float64", "bfloat16", "float16"),
                   help="dtype to load the checkpoint in (auto: its own)")
    p.add_argument("--tokenizer", metavar="DIR", help="the tokenizer to keep beside the model (default: the "
                                                     "checkpoint's own, when it has one; a GGUF file carries one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=convert)
    p = sub.add_parser("reproduce", help="rerun the seed papers' claims at small scale on the standard library's "
                                         "sources (tables, plots and verdicts)")
    p.add_argument("experiments", nargs="*", metavar="EXPERIMENT",
                   help=f"any of {', '.join(EXPERIMENTS)} (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="small models and budgets: every experiment in minutes (a smoke run)")
    p.add_argument("--out", default="reproduce", help="folder for the tables, plots and summary (default: ./reproduce)")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=reproduce)
    p = sub.add_parser("export", help="a saved recursive model, merged and untied, as a Hugging Face checkpoint")
    p.add_argument("model", help="directory written by save_pretrained")
    p.add_argument("output", help="directory to write the Hugging Face checkpoint to")
    p.add_argument("--model-type", choices=SUPPORTED_MODEL_TYPES, help="default: read off the architecture")
    p.set_defaults(func=export)
    args = parser.parse_args(argv)
    args.func(args)
