"""``python -m recursive convert`` (a Hugging Face checkpoint or GGUF file into a recursive model) and
``python -m recursive export`` (a recursive model, merged and untied, as a Hugging Face checkpoint): their options
and the commands around :mod:`recursive.convert`."""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

from . import smollm2
from .config import LORA_TARGETS, RecursiveConfig
from .convert import (
    CONVERTIBLE_SHARING,
    EXPORT_MODEL_TYPES,
    INIT_SCHEMES,
    LORA_INITS,
    convert_hf,
    export_hf,
    load_hf,
)
from .looped import LOOPED_MODEL_TYPES, convert_looped, looped_model_type
from .modeling import RecursiveForCausalLM
from .training.corpus import stdlib_sources
from .training.data import calibration_windows
from .training.tokenizers import check_vocabulary, load_tokenizer

# Activation-aware conversion's default calibration: this many tokens in windows of this length.
CALIBRATION_TOKENS, CALIBRATION_WINDOW = 1024, 256


def add_convert_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m recursive convert`` on ``parser`` (an argparse sub-parser)."""
    parser.add_argument("checkpoint",
                        help="a Hugging Face checkpoint folder (read with local_files_only), a GGUF file, or smollm2: "
                             f"the installed SmolLM2-135M-Instruct ({smollm2.INSTALL}); a looped model's folder "
                             f"(model_type {', '.join(LOOPED_MODEL_TYPES)}) converts as it is, loops kept")
    parser.add_argument("output", help="directory to write the recursive model to")
    parser.add_argument("--num-blocks", type=int, help="unique blocks B (default: one per layer)")
    parser.add_argument("--sharing", default="cycle", choices=CONVERTIBLE_SHARING)
    parser.add_argument("--init", default="stepwise", choices=INIT_SCHEMES, help="how blocks take the original layers")
    parser.add_argument("--lora-rank", type=int, default=0, help="per-layer LoRA rank (0: none)")
    parser.add_argument("--lora-targets", help="comma-separated LoRA targets (default: q,k,v,o,gate,up,down)")
    parser.add_argument("--lora-alpha", type=float, default=RecursiveConfig.lora_alpha, help="LoRA alpha")
    parser.add_argument("--lora-init", default="svd", choices=LORA_INITS,
                        help="svd: the residuals' best rank-r approximation; activation: the best one for the inputs "
                             "each layer sees on calibration text; zero: PEFT's init (default: svd)")
    parser.add_argument("--no-svd-init", action="store_true", help=argparse.SUPPRESS)  # deprecated: --lora-init zero
    parser.add_argument("--calibration", nargs="+", metavar="PATH",
                        help="text files or folders for --lora-init activation (default: the Python standard library's "
                             "sources)")
    parser.add_argument("--calibration-tokens", type=int, default=CALIBRATION_TOKENS,
                        help=f"calibration tokens for --lora-init activation (default: {CALIBRATION_TOKENS})")
    parser.add_argument("--no-fold-norms", action="store_true",
                        help="keep each block's norm gains instead of folding every layer's into its projections")
    parser.add_argument("--dtype", default="auto", choices=("auto", "float32", "float64", "bfloat16", "float16"),
                        help="dtype to load the checkpoint in (auto: its own)")
    parser.add_argument("--tokenizer", metavar="DIR", help="the tokenizer to keep beside the model (default: the "
                                                          "checkpoint's own, when it has one; a GGUF file carries one)")
    parser.add_argument("--num-loops", type=int, help="a looped model's recurrence: HRM-Text's H cycles, Ouro's "
                        "total_ut_steps, Huginn's core passes (default: the checkpoint's own)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=convert_command)


def add_export_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m recursive export`` on ``parser`` (an argparse sub-parser)."""
    parser.add_argument("model", help="directory written by save_pretrained")
    parser.add_argument("output", help="directory to write the Hugging Face checkpoint to")
    parser.add_argument("--model-type", choices=EXPORT_MODEL_TYPES, help="default: read off the architecture")
    parser.set_defaults(func=export_command)


def convert_command(args: argparse.Namespace) -> None:
    """``python -m recursive convert``: convert the checkpoint and write the model (with its tokenizer) to
    ``args.output``."""
    if importlib.util.find_spec("transformers") is None:
        sys.exit("python -m recursive convert needs transformers: pip install transformers")
    targets = tuple(t for t in args.lora_targets.split(",") if t) if args.lora_targets else LORA_TARGETS
    lora_init = "zero" if args.no_svd_init else args.lora_init
    dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
    try:
        checkpoint = smollm2.require_gguf_path() if args.checkpoint == "smollm2" else args.checkpoint
        tokenizer = load_tokenizer(args.tokenizer or checkpoint)
        looped = looped_model_type(checkpoint)
        if looped is not None:
            model = convert_looped(checkpoint, dtype, args.num_loops)
            _save(model, tokenizer, args)
            print(f"{looped}: {model.config.num_layers} effective layers over {model.config.num_blocks} blocks "
                  f"({model.config.sharing}), {sum(p.numel() for p in model.parameters()):,} parameters, "
                  f"written to {args.output}")
            return
        if args.num_loops is not None:
            sys.exit("error: --num-loops: only a looped model (model_type "
                     f"{', '.join(LOOPED_MODEL_TYPES)}) has a recurrence to set")
        hf_model = load_hf(checkpoint, dtype)
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
    kept = _save(model, tokenizer, args)
    count = sum(p.numel() for p in model.parameters())
    original = sum(p.numel() for p in hf_model.parameters())
    print(f"{model.config.num_layers} layers -> {model.config.num_blocks} blocks ({model.config.sharing}, "
          f"relaxation {model.config.relaxation}): {count:,} parameters ({count / original:.1%} of {original:,}), "
          f"written to {args.output}{kept}")


def _save(model: RecursiveForCausalLM, tokenizer, args: argparse.Namespace) -> str:
    """Write the model and its tokenizer (when there is one) to ``args.output``; what the message adds."""
    model.save_pretrained(args.output)
    if tokenizer is not None:
        check_vocabulary(tokenizer, model.config.vocab_size, "tokenizer")
        tokenizer.save_pretrained(args.output)
        return " with its tokenizer"
    if args.tokenizer:
        sys.exit(f"error: tokenizer: {args.tokenizer!r} holds no tokenizer")
    return ""


def export_command(args: argparse.Namespace) -> None:
    """``python -m recursive export``: write the saved model as a Hugging Face checkpoint to ``args.output``."""
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
