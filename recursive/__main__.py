"""Command line: ``python -m recursive {info,bench}``."""

from __future__ import annotations

import argparse
import importlib.util
import platform
import sys
from pathlib import Path

import torch


def _version(module: str) -> str:
    if importlib.util.find_spec(module) is None:
        return "not installed"
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception as exc:  # a broken install should not stop `info`
        return f"broken ({type(exc).__name__}: {exc})"


def info(args) -> None:
    import kernels
    from kernels import backends

    print(f"recursive-kernels {kernels.__version__}")
    print(f"python {platform.python_version()} on {platform.platform()}")
    for module in ("torch", "triton", "numpy"):
        print(f"{module:<8} {_version(module)}")
    print(f"cpu      {platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}")
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            print(f"cuda:{i}   {p.name}, {p.total_memory / 2**30:.0f} GiB, capability {p.major}.{p.minor}")
    else:
        print("cuda     no device")
    print("backends:")
    for name, why in backends.report().items():
        print(f"  {name:<7} {'available' if why is None else 'unavailable: ' + why}")


def _benchmarks_dir() -> Path:
    path = Path(__file__).resolve().parents[1] / "benchmarks"
    if not path.is_dir():
        sys.exit("python -m recursive bench runs the benchmarks of a source checkout; no benchmarks/ found")
    sys.path.insert(0, str(path.parent))
    return path


BENCHMARKS = ("lowrank_linear", "circuit_attention", "model")


def bench(args) -> None:
    _benchmarks_dir()
    from benchmarks.common import write_json

    argv = ["--device", args.device] if args.device else []
    if args.no_progress:
        argv.append("--no-progress")
    results = {}
    for name in args.only or BENCHMARKS:
        module = importlib.import_module(f"benchmarks.bench_{name}")
        results[name] = module.main(argv)
        print()
    if args.json:
        write_json(args.json, results)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m recursive", description="recursive-kernels command line")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and each backend's availability").set_defaults(func=info)
    p = sub.add_parser("bench", help="benchmark the fused ops and whole models on the default device")
    p.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    p.add_argument("--json", help="write the results as JSON to this path")
    p.add_argument("--no-progress", action="store_true", help="no progress indicator")
    p.add_argument("--only", action="append", choices=BENCHMARKS, help="run only these benchmarks")
    p.set_defaults(func=bench)
    from .train import add_arguments as add_train_arguments

    add_train_arguments(sub.add_parser("train", help="uptrain a small recursive LM on the built-in synthetic corpus"))
    args = parser.parse_args(argv)
    args.func(args)


if __name__ == "__main__":
    main()
