"""The command line, ``python -m recursive {info,bench,train,generate,convert,reproduce,export}``: one sub-parser per
command, handed to the command's module beside its library (the library itself neither prints nor exits)."""

from __future__ import annotations

import argparse

from recursive_benchmarks import runner as benchmarks

from .convert_command import add_convert_arguments, add_export_arguments
from .generation.command import add_generate_arguments
from .info import add_info_arguments
from .reproduce.command import add_reproduce_arguments
from .training.command import add_train_arguments


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recursive", description="recursive-kernels command line")
    sub = parser.add_subparsers(dest="command", required=True)
    add_info_arguments(sub.add_parser("info", help="versions, devices and each backend's availability"))
    p = sub.add_parser("bench", help="benchmark the fused ops and whole models against their peers on the "
                                     "default device (a representative selection, about 2 minutes on a 2-core CPU; "
                                     "--full: every case)")
    benchmarks.add_arguments(p)
    p.set_defaults(func=benchmarks.main)
    add_train_arguments(sub.add_parser("train", help="train or uptrain a model on text files or a token file (or the "
                                                     "built-in synthetic corpus); under torchrun on every process"))
    add_generate_arguments(sub.add_parser("generate", help="generate from text or token-id prompts (plain batches or "
                                                           "the engine)"))
    add_convert_arguments(sub.add_parser("convert", help="convert a local Hugging Face Llama/Mistral/Qwen2/Gemma "
                                                         "checkpoint or GGUF file"))
    add_reproduce_arguments(sub.add_parser("reproduce", help="rerun the seed papers' claims at small scale on the "
                                                             "standard library's sources (tables, plots and verdicts)"))
    add_export_arguments(sub.add_parser("export", help="a saved recursive model, merged and untied, as a Hugging Face "
                                                       "checkpoint"))
    args = parser.parse_args(argv)
    args.func(args)
