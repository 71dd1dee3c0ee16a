"""Command line: ``python -m recursive {info,bench,train,convert,export,generate}``."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform
import sys

import torch
from recursive_benchmarks import runner as benchmarks

from .config import LORA_TARGETS, RecursiveConfig
from .convert import CONVERTIBLE_SHARING, INIT_SCHEMES, SUPPORTED_MODEL_TYPES, convert_hf, export_hf


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as exc:  # a broken install should not stop `info`
        return f"broken ({type(exc).__name__}: {exc})"


def info(args) -> None:
    import recursive_kernels
    from recursive_kernels import backends

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


def bench(args) -> None:
    benchmarks.main(args)


def convert(args) -> None:
    if importlib.util.find_spec("transformers") is None:
        sys.exit("python -m recursive convert needs transformers: pip install transformers")
    from transformers import AutoModelForCausalLM

    targets = tuple(t for t in args.lora_targets.split(",") if t) if args.lora_targets else LORA_TARGETS
    dtype = "auto" if args.dtype == "auto" else getattr(torch, args.dtype)
    hf_model = AutoModelForCausalLM.from_pretrained(args.checkpoint, local_files_only=True, torch_dtype=dtype)
    model = convert_hf(hf_model, args.num_blocks, args.sharing, args.init, args.lora_rank, targets,
                       svd_init=not args.no_svd_init, lora_alpha=args.lora_alpha,
                       progress=False if args.no_progress else None)
    model.save_pretrained(args.output)
    count = sum(p.numel() for p in model.parameters())
    original = sum(p.numel() for p in hf_model.parameters())
    print(f"{model.config.num_layers} layers -> {model.config.num_blocks} blocks ({model.config.sharing}, "
          f"relaxation {model.config.relaxation}): {count:,} parameters ({count / original:.1%} of {original:,}), "
          f"written to {args.output}")


def export(args) -> None:
    if importlib.util.find_spec("transformers") is None:
        sys.exit("python -m recursive export needs transformers: pip install transformers")
    from .modeling import RecursiveForCausalLM

    model = RecursiveForCausalLM.from_pretrained(args.model)
    try:
        hf_model = export_hf(model, args.model_type)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    hf_model.save_pretrained(args.output)
    print(f"{model.config.num_layers} layers over {model.config.num_blocks} blocks (relaxation "
          f"{model.config.relaxation}) -> {type(hf_model).__name__} of {hf_model.config.num_hidden_layers} layers, "
          f"written to {args.output}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recursive", description="recursive-kernels command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and each backend's availability").set_defaults(func=info)
    p = sub.add_parser("bench", help="benchmark the fused ops and whole models on the default device (a "
                                     "representative selection, about 2 minutes on a 2-core CPU; --full: every case)")
    benchmarks.add_arguments(p)
    p.set_defaults(func=bench)
    from .train import add_arguments as add_train_arguments

    add_train_arguments(sub.add_parser("train", help="uptrain a small recursive LM on the built-in synthetic corpus"))
    from .generation import add_arguments as add_generate_arguments

    add_generate_arguments(sub.add_parser("generate", help="generate from token-id prompts (plain batches or the engine)"))
    p = sub.add_parser("convert", help="convert a local Hugging Face Llama/Mistral/Qwen2/Gemma checkpoint")
    p.add_argument("checkpoint", help="directory of the Hugging Face checkpoint (read with local_files_only)")
    p.add_argument("output", help="directory to write the recursive model to")
    p.add_argument("--num-blocks", type=int, required=True, help="unique blocks B")
    p.add_argument("--sharing", default="cycle", choices=CONVERTIBLE_SHARING)
    p.add_argument("--init", default="stepwise", choices=INIT_SCHEMES, help="how blocks take the original layers")
    p.add_argument("--lora-rank", type=int, default=0, help="per-layer LoRA rank (0: none)")
    p.add_argument("--lora-targets", help="comma-separated LoRA targets (default: q,k,v,o,gate,up,down)")
    p.add_argument("--lora-alpha", type=float, default=RecursiveConfig.lora_alpha, help="LoRA alpha")
    p.add_argument("--no-svd-init", action="store_true", help="PEFT's LoRA init instead of the SVD of the residuals")
    p.add_argument("--dtype", default="auto", choices=("auto", "float32", "float64", "bfloat16", "float16"),
                   help="dtype to load the checkpoint in (auto: its own)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=convert)
    p = sub.add_parser("export", help="a saved recursive model, merged and untied, as a Hugging Face checkpoint")
    p.add_argument("model", help="directory written by save_pretrained")
    p.add_argument("output", help="directory to write the Hugging Face checkpoint to")
    p.add_argument("--model-type", choices=SUPPORTED_MODEL_TYPES, help="default: read off the architecture")
    p.set_defaults(func=export)
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
