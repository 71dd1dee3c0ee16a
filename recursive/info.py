"""``python -m recursive info``: versions, devices and each backend's availability."""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import platform

import torch

import recursive_kernels
from recursive_kernels import backends


def add_info_arguments(parser: argparse.ArgumentParser) -> None:
    """``python -m recursive info`` on ``parser`` (an argparse sub-parser): it takes no options."""
    parser.set_defaults(func=info_command)


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as exc:  # a broken install should not stop `info`
        return f"broken ({type(exc).__name__}: {exc})"


def info_command(args: argparse.Namespace) -> None:
    """``python -m recursive info``: print the versions, the devices and each backend's availability."""
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
