"""``python -m recursive train``: its options, and the command that builds or loads the model, reads the
data, trains (one process, or every rank under torchrun: ``torchrun --nproc-per-node N -m recursive train``),
summarises and saves."""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
import typing
from typing import Any, Dict

import torch

from ..config import RecursiveConfig
from ..modeling import RecursiveForCausalLM
from ..pretrained import CONFIG_NAME
from ..serialization import read_config
from .checkpoint import resolve_checkpoint
from .corpus import CORPUS_VOCAB_SIZE
from .data import TokenFile, TokenStream, default_cache_dir, is_token_file, split_documents, tokenize_files
from .distributed import barrier, init_from_environment, shutdown
from .plots import plot_metrics, require_matplotlib
from .tokenizers import ByteTokenizer, check_vocabulary, load_tokenizer
from .trainer import TrainingArguments, TrainingResult, train


def default_train_config(vocab_size: int = CORPUS_VOCAB_SIZE) -> RecursiveConfig:
    """The small model ``python -m recursive train`` builds by default: 6 effective layers over 2 shared
    blocks with a depth-wise LoRA, for a vocabulary of ``vocab_size`` (the synthetic corpus's bytes, or the
    data's tokenizer's)."""
    return RecursiveConfig(
        vocab_size=vocab_size, hidden_size=64, intermediate_size=176, num_attention_heads=4,
        num_key_value_heads=2, num_layers=6, num_blocks=2, relaxation="depth_lora", lora_rank=8, lora_alpha=16.0,
    )


def add_train_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m recursive train``: one per :class:`TrainingArguments` field, and those of the
    model, the data and the output."""
    model = parser.add_argument_group("model")
    source = model.add_mutually_exclusive_group()
    source.add_argument("--config",
                        help="a JSON RecursiveConfig to build the model from (default: a small built-in one)")
    source.add_argument("--model", help="a model folder (save_pretrained, convert) to train further")
    model.add_argument("--adapters-only", action="store_true",
                       help="freeze the base model and train the adapters (LoRA, circuit factors, routers) only")
    model.add_argument("--gradient-checkpointing", action="store_true",
                       help="recompute each layer in the backward instead of keeping its activations")
    data = parser.add_argument_group("data")
    data.add_argument("--data", nargs="+", metavar="PATH",
                      help="text files, folders, glob patterns, or one token file (default: the built-in "
                           "synthetic corpus)")
    data.add_argument("--tokenizer", metavar="DIR",
                      help="tokenizer folder, or 'bytes' (default: the one saved with --model; bytes for a new model)")
    data.add_argument("--eval-fraction", type=float, default=0.05,
                      help="share of the documents (files, or 64 KiB pieces of them) held out for evaluation")
    data.add_argument("--cache-dir", help=f"where tokenised text is kept (default: {default_cache_dir()})")
    groups = _add_training_options(parser)
    groups["optimisation"].add_argument("--device", help="cpu or cuda (default: cuda when available; under torchrun: "
                                                         "cuda:LOCAL_RANK)")
    out = groups["evaluation and output"]
    out.add_argument("--save", metavar="DIR", help="checkpoints and the final model (with its tokenizer) go here")
    out.add_argument("--resume", metavar="DIR", help="a checkpoint, or a --save folder (its newest), to continue from")
    out.add_argument("--metrics", metavar="FILE", help="JSON lines per step (default: DIR/metrics.jsonl with --save)")
    out.add_argument("--plot", metavar="PNG", help="the loss curves as a PNG at the end (needs matplotlib)")
    out.add_argument("--save-adapter", metavar="DIR", help="save the adapters alone here at the end (save_adapter)")
    out.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=train_command)


def _add_training_options(parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """A flag per :class:`TrainingArguments` field (``--batch-size`` of ``batch_size``) with the field's type,
    default, help and argument group (a bool field: ``store_true``); returns the argument groups by name."""
    groups = {}
    types = typing.get_type_hints(TrainingArguments)
    for option in dataclasses.fields(TrainingArguments):
        group_name = option.metadata["group"]
        if group_name not in groups:
            groups[group_name] = parser.add_argument_group(group_name)
        flag = "--" + option.name.replace("_", "-")
        if types[option.name] is bool:
            groups[group_name].add_argument(flag, action="store_true", default=option.default,
                                            help=option.metadata["help"])
        else:
            groups[group_name].add_argument(flag, type=_value_type(types[option.name]), default=option.default,
                                            choices=option.metadata.get("choices"), help=option.metadata["help"])
    return groups


def _value_type(hint: Any) -> type:
    """The type an option parses its value to: ``int`` of ``int`` and of ``Optional[int]``."""
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


INTERRUPT_DIR = "train-interrupted"  # where Ctrl-C saves a run that has no --save


def _train_data(args, tokenizer, model, world):
    """(train stream, held-out stream or None, tokenizer) of ``--data`` (rank 0 tokenises, the others wait);
    no ``--data``: (None, None, tokenizer), and ``train`` reads its synthetic corpus."""
    if not args.data:
        return None, None, tokenizer
    token_files = [path for path in args.data if os.path.isfile(path) and is_token_file(path)]
    if token_files and len(args.data) > 1:
        raise ValueError(f"data: a token file ({token_files[0]!r}) must be the only --data")
    if token_files:
        token_file = TokenFile.open(token_files[0])
        made_by = token_file.metadata.get("tokenizer")
        if tokenizer is not None and made_by not in (None, tokenizer.fingerprint):
            raise ValueError(f"data: {token_files[0]!r} was tokenised by {made_by}, not by this run's tokenizer "
                             f"({tokenizer!r})")
        if tokenizer is None and made_by == ByteTokenizer.fingerprint:
            tokenizer = ByteTokenizer()
    else:
        if tokenizer is None:
            if (args.model or args.resume) and model.config.vocab_size != ByteTokenizer.vocab_size:
                raise ValueError(f"tokenizer: {args.resume or args.model!r} holds no tokenizer, and its vocabulary of "
                                 f"{model.config.vocab_size} is not bytes' {ByteTokenizer.vocab_size}: pass "
                                 "--tokenizer DIR (or --tokenizer bytes to train on bytes anyway)")
            tokenizer = ByteTokenizer()
        if world.is_main:
            token_file = tokenize_files(args.data, tokenizer, args.cache_dir, progress=not args.no_progress)
        barrier(world)
        if not world.is_main:
            token_file = tokenize_files(args.data, tokenizer, args.cache_dir, progress=False)
    train_docs, eval_docs = split_documents(token_file.num_documents, args.eval_fraction)
    held_out = TokenStream.of_documents(token_file, eval_docs) if eval_docs else None
    return TokenStream.of_documents(token_file, train_docs), held_out, tokenizer


def _model_and_tokenizer(args, device):
    """The model to train (from --resume, --model, --config or the default) and the tokenizer of the run
    (--tokenizer, else the one saved with the model; None: bytes or the token file's)."""
    folder = resolve_checkpoint(args.resume) if args.resume else args.model
    if args.tokenizer == "bytes":
        tokenizer = ByteTokenizer()
    elif args.tokenizer:
        tokenizer = load_tokenizer(args.tokenizer)
        if tokenizer is None:
            raise ValueError(f"tokenizer: {args.tokenizer!r} holds no tokenizer")
    else:
        tokenizer = load_tokenizer(folder) if folder else None
    if folder:
        model = RecursiveForCausalLM.from_pretrained(folder, device=device)
        if next(model.parameters()).dtype not in (torch.float32, torch.float64):
            model = model.float()  # trains in float32 (--bf16: autocast), whatever dtype it was saved in
        if args.resume and (args.model or args.config):
            wanted = (read_config(os.path.join(args.model, CONFIG_NAME), "model") if args.model
                      else read_config(args.config, "config"))
            if wanted != model.config:
                raise ValueError(f"resume: {args.resume!r} holds a model of another config than "
                                 f"{'--model' if args.model else '--config'}")
    else:
        vocab_size = (tokenizer.vocab_size if tokenizer
                      else (ByteTokenizer.vocab_size if args.data else CORPUS_VOCAB_SIZE))
        config = read_config(args.config, "config") if args.config else default_train_config(vocab_size)
        model = RecursiveForCausalLM(config).to(device)
    if tokenizer is not None:
        check_vocabulary(tokenizer, model.config.vocab_size, "tokenizer")
    return model, tokenizer


def train_command(args: argparse.Namespace) -> TrainingResult:
    """``python -m recursive train``: build or load the model, read the data, train (one process, or every
    rank under torchrun), summarise and save; returns the result."""
    world = init_from_environment(args.device)
    try:
        return _train(args, world)
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    finally:
        shutdown(world)


def _train(args: argparse.Namespace, world) -> TrainingResult:
    say = print if world.is_main else (lambda *a, **k: None)
    if args.plot:
        require_matplotlib("plot")
        if not (args.save or args.metrics):
            raise ValueError("plot: draws the metrics file: pass --save DIR or --metrics FILE too")
    if args.save_adapter and args.fsdp and world.distributed:
        raise ValueError("save-adapter: the adapters of an FSDP2-sharded model are not gathered here: save the whole "
                         "model with --save (save_adapter on the loaded model gives the adapters)")
    training_args = TrainingArguments(**{option.name: getattr(args, option.name)
                                         for option in dataclasses.fields(TrainingArguments)})
    torch.manual_seed(args.seed)
    model, tokenizer = _model_and_tokenizer(args, world.device)
    data, held_out, tokenizer = _train_data(args, tokenizer, model, world)
    if args.adapters_only:
        model.mark_only_adapters_trainable()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    num_parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.config
    source = f"{len(data):,} tokens of {' '.join(args.data)}" if args.data else "the synthetic corpus"
    say(f"training {trainable / 1e6:.2f}M of {num_parameters / 1e6:.2f}M parameters ({config.num_layers} layers over "
        f"{config.num_blocks} blocks, {config.relaxation}) on {world.size} x {world.device}, {args.steps} steps of "
        f"{args.batch_size} x {args.seq_len} tokens, on {source}"
        + (f" ({len(held_out):,} held out)" if held_out is not None else ""))
    metrics = args.metrics or (os.path.join(args.save, "metrics.jsonl") if args.save else None)
    result = train(model, training_args, data, held_out, save_dir=args.save, resume_from=args.resume,
                   metrics_path=metrics, tokenizer=tokenizer, interrupt_dir=INTERRUPT_DIR,
                   progress=not args.no_progress)
    if result.interrupted:
        where = result.checkpoint or "nowhere"
        say(f"interrupted after step {result.step}: checkpoint {where}; continue with --resume {where}")
        return result
    window = min(10, len(result.losses))
    if window:
        say(f"loss: first {sum(result.losses[:window]) / window:.3f}, last {sum(result.losses[-window:]) / window:.3f} "
            f"(means of {window} steps)"
            + (f"; held-out {result.eval_losses[-1][1]:.3f} (perplexity {math.exp(result.eval_losses[-1][1]):.2f})"
               if result.eval_losses else ""))
    say(f"{result.tokens_per_second:,.0f} tokens/s over {result.seconds:.1f} s on {world.size} process(es)")
    if args.save:
        say(f"saved to {args.save} (checkpoint {result.checkpoint})")
    if args.plot and world.is_main:
        plot_metrics(metrics, args.plot, title=f"{config.num_layers} layers over {config.num_blocks} blocks "
                                               f"({config.relaxation}), {args.batch_size} x {args.seq_len} tokens "
                                               f"per step, on {source}")
        say(f"plotted to {args.plot}")
    if args.save_adapter and world.is_main:
        model.save_adapter(args.save_adapter)
        say(f"saved the adapters to {args.save_adapter}")
    return result
