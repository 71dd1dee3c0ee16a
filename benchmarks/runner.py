"""``python -m recursive bench``: the benchmarks, their shared options and one progress bar over all of them.

Each benchmark module offers ``default_cases(device, full)``, ``steps(...)`` and ``STEP_SECONDS`` (how many
progress steps its run takes and roughly how long each takes on a 2-core CPU: the bar's time left),
``run(..., progress=Steps)`` (the result: machine, dtype and table rows) and ``render_result(result)`` (the
table, its sizes and a legend). By default each runs a representative selection (about 1.5 minutes in all on a
2-core CPU) and ``pretrained`` (SmolLM2-135M at real size) is left out; ``--full`` runs every case of every
benchmark, ``--only model`` adds ``pretrained`` when SmolLM2 is installed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Dict, List, Optional

import torch

from recursive.progress import Progress, format_duration

from . import (
    bench_circuit_attention,
    bench_generation,
    bench_looped,
    bench_lowrank_linear,
    bench_model,
    bench_pretrained,
)
from .common import Steps, resolve, write_json

BENCHMARKS = {
    "lowrank_linear": bench_lowrank_linear,
    "circuit_attention": bench_circuit_attention,
    "model": bench_model,
    "generation": bench_generation,
    "looped": bench_looped,
    "pretrained": bench_pretrained,
}
# Run only when asked for by name or by --full: SmolLM2 at real size takes minutes. Asking for ``model`` asks for it
# too when SmolLM2 is installed (the whole-model figures at real size).
ON_REQUEST = ("pretrained",)
DTYPES = ("float32", "bfloat16", "float16")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=DTYPES, help="default: bfloat16 on CUDA, float32 on the CPU")
    parser.add_argument("--only", action="append", choices=list(BENCHMARKS), help="run only these benchmarks")
    parser.add_argument("--full", action="store_true", help="every case, not the representative selection")
    parser.add_argument("--json", help="also write the results as JSON to this path")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--memory", action="store_true",
                        help="circuit_attention: also the peak memory of one forward at S = 4096")
    parser.add_argument("--train-steps", type=int, default=0,
                        help="generation: first train the recursive model this many steps (with the exit loss)")
    parser.add_argument("--exit-threshold", type=float,
                        help="generation: a fixed exit threshold (default: 0.9 after training, else calibrated)")


def selected(only: Optional[List[str]], full: bool) -> List[str]:
    """The benchmarks a run runs, in order: ``only`` (with ``pretrained`` after ``model`` when SmolLM2 is
    installed), else all but :data:`ON_REQUEST` (all with ``full``)."""
    if not only:
        return [name for name in BENCHMARKS if full or name not in ON_REQUEST]
    names = list(dict.fromkeys(only))
    if "model" in names and "pretrained" not in names and bench_pretrained.available():
        names.insert(names.index("model") + 1, "pretrained")
    return names


def _plans(names: List[str], device: torch.device, full: bool) -> Dict[str, dict]:
    """Per benchmark: its ``run`` keyword arguments and its progress steps."""
    plans = {}
    for name in names:
        module = BENCHMARKS[name]
        if name == "generation":
            methods = bench_generation.METHODS if full else bench_generation.DEFAULT_METHODS
            plans[name] = {"kwargs": {"methods": methods}, "steps": module.steps(methods)}
        elif name == "lowrank_linear":
            cases = module.default_cases(device, full)
            forms = ("per-row", "top-2") if full else module.COMPILED_FORMS
            plans[name] = {"kwargs": {"cases": cases, "compiled_forms": forms},
                           "steps": module.steps(cases, compiled_forms=forms)}
        elif name == "circuit_attention":
            cases = module.default_cases(device, full)
            compiled = len(cases) if full else 1
            plans[name] = {"kwargs": {"cases": cases, "compiled_cases": compiled},
                           "steps": module.steps(cases, compiled_cases=compiled)}
        else:
            cases = module.default_cases(device, full)
            plans[name] = {"kwargs": {"cases": cases}, "steps": module.steps(cases)}
    return plans


def main(args: argparse.Namespace) -> Dict[str, object]:
    device, dtype = resolve(torch.device(args.device) if args.device else None,
                            getattr(torch, args.dtype) if args.dtype else None)
    names = selected(args.only, args.full)
    plans = _plans(names, device, args.full)
    expected = sum(plan["steps"] * BENCHMARKS[name].STEP_SECONDS for name, plan in plans.items())
    if device.type == "cpu":
        print(f"benchmarks {', '.join(names)} on the CPU ({'every case' if args.full else 'a representative selection'}"
              f"): about {format_duration(expected)} on a 2-core machine", file=sys.stderr)
    results = {}
    with Progress(expected, enabled=not args.no_progress) as bar:
        for name, plan in plans.items():
            module = BENCHMARKS[name]
            steps = Steps(bar, name, module.STEP_SECONDS, plan["steps"])
            extra = _options(name, args)
            results[name] = module.run(device=device, dtype=dtype, progress=steps, **plan["kwargs"], **extra)
            steps.close()
            bar.write(module.render_result(results[name]) + "\n")
    if args.json:
        write_json(args.json, results)
    return results


def _options(name: str, args: argparse.Namespace) -> Dict[str, object]:
    if name == "circuit_attention":
        return {"memory": args.memory}
    if name == "generation":
        return {"train_steps": args.train_steps, "exit_threshold": args.exit_threshold}
    return {}

