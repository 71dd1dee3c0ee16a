"""Timing and reporting shared by the benchmarks.

GPU: ``triton.testing.do_bench`` medians (it clears the L2 cache between repetitions). CPU: medians of
``torch.utils.benchmark`` blocked runs on all of torch's threads, the implementations of a case taking
turns over several rounds, so that a slow spell of a shared machine hits all of them rather than one.
Every figure is a median over repeats; ratios compare implementations timed in the same run.
"""

from __future__ import annotations

import json
import platform
import statistics
from typing import Callable, Dict, List, Optional

import torch

from recursive.progress import Progress


CPU_ROUNDS = 5


def median_seconds(fns: Dict[str, Callable[[], object]], device: torch.device, min_run_time: float = 0.2) -> Dict[str, float]:
    """The median time of each of ``fns`` (name -> callable), timed in turns on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return {name: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3 for name, fn in fns.items()}
    from torch.utils.benchmark import Timer

    for fn in fns.values():
        fn()  # warm-up: one-time set-up stays out of the numbers
    timers = {name: Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()) for name, fn in fns.items()}
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(CPU_ROUNDS):
        for name, timer in timers.items():
            samples[name] += timer.blocked_autorange(min_run_time=min_run_time / CPU_ROUNDS).times
    return {name: statistics.median(times) for name, times in samples.items()}


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def format_table(rows: List[Dict[str, object]], columns: List[str]) -> str:
    def cell(value):
        if isinstance(value, float):
            return f"{value:.3f}" if abs(value) < 1000 else f"{value:.0f}"
        return "" if value is None else str(value)

    cells = [[cell(row.get(c)) for c in columns] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) if cells else len(c) for i, c in enumerate(columns)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def write_json(path: str, payload: Dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


def report(title: str, result: Dict[str, object], columns: List[str], json_path: Optional[str], *notes: str) -> None:
    """A benchmark's closing output: the title, the table of ``result["rows"]``, any notes; the whole
    result as JSON to ``json_path`` when given."""
    print(title)
    print(format_table(result["rows"], columns))
    for note in notes:
        print(note)
    if json_path:
        write_json(json_path, result)


def resolve(device, dtype):
    """Default device (CUDA when present) and dtype (bfloat16 on GPU, float32 on CPU)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def available_backends(op: str, device: torch.device, dtype: torch.dtype, **inputs) -> List[str]:
    """Backends that serve ``op`` here (``inputs``: the op's other support-check arguments); the Triton
    CPU interpreter is for testing, not timing."""
    from kernels import backends

    return [
        name for name in backends.BACKENDS
        if not (name == "triton" and device.type != "cuda")
        and not backends.reasons(op, name, device, dtype=dtype, **inputs)
    ]


def time_cases(cases, modes, impls, prepare, device, progress=True):
    """Yield (case, mode, {impl: median seconds}); ``prepare(case, backward)`` builds the inputs once
    and returns a function of the implementation name that gives the callable to time."""
    bar = Progress(len(cases) * len(modes), progress)
    for case in cases:
        for mode in modes:
            make = prepare(case, mode == "fwd+bwd")
            bar.step(f"{case.label} {mode}")
            yield case, mode, median_seconds({impl: make(impl) for impl in impls}, device)


def run_benchmark(benchmark, fn, device: torch.device) -> None:
    """pytest-benchmark on ``fn``, synchronising after each call on the GPU."""
    if device.type == "cuda":
        def synced():
            fn()
            torch.cuda.synchronize()
        benchmark(synced)
    else:
        benchmark(fn)
