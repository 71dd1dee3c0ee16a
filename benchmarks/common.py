"""Timing and reporting shared by the benchmarks.

GPU: ``triton.testing.do_bench`` medians (it clears the L2 cache between repetitions). CPU: medians of
``torch.utils.benchmark`` blocked runs on all of torch's threads, the implementations of a case taking
turns over several rounds, so that a slow spell of a shared machine hits all of them rather than one.
Every figure is a median over repeats; ratios compare implementations timed in the same run.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence

import torch

from recursive.progress import Progress

CPU_ROUNDS = 5


def median_seconds(fns: Dict[str, Callable[[], object]], device: torch.device,
                   min_run_time: float = 0.2) -> Dict[str, float]:
    """The median time of each of ``fns`` (name -> callable), timed in turns on the CPU."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return {name: do_bench(fn, warmup=25, rep=100, return_mode="median") * 1e-3 for name, fn in fns.items()}
    # torch.utils.benchmark imports torch.utils.cpp_extension, whose CUDA builds log a warning on a machine
    # without a GPU ("No CUDA runtime is found"): nothing here builds an extension.
    logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)
    from torch.utils.benchmark import Timer

    slow = set()
    for name, fn in fns.items():
        start = time.perf_counter()
        fn()  # warm-up: one-time set-up stays out of the numbers
        if time.perf_counter() - start >= min_run_time / CPU_ROUNDS:
            slow.add(name)
    timers = {name: Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
              for name, fn in fns.items()}
    samples: Dict[str, List[float]] = {name: [] for name in fns}
    for _ in range(CPU_ROUNDS):
        for name, timer in timers.items():
            if name in slow:  # one call fills a round: time it alone (a blocked range would first run it to size one)
                start = time.perf_counter()
                fns[name]()
                samples[name].append(time.perf_counter() - start)
            else:
                samples[name] += timer.blocked_autorange(min_run_time=min_run_time / CPU_ROUNDS).times
    return {name: statistics.median(times) for name, times in samples.items()}


def machine_description(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (torch {torch.__version__})"
    return (f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads "
            f"(torch {torch.__version__})")


@dataclass(frozen=True)
class Column:
    """A table column: the row key, its one number format (``format`` spec; "" for text) and its meaning (the
    printed legend)."""

    name: str
    format: str
    meaning: str


# Columns the kernel benchmarks share.
MODE = Column("mode", "", "fwd: forward; fwd+bwd: forward and the gradients of every input")
TIME_MS = Column("ms", ".3f", "median time of one call")
REL_ERR = Column("rel err", ".1e", "||out - ref|| / ||ref|| against eager in float64 (GPU: float32) on the same inputs")


def format_table(rows: List[Dict[str, object]], columns: Sequence[Column]) -> str:
    def cell(value, column):
        if value is None:
            return ""
        if isinstance(value, float) and not math.isfinite(value):
            return str(value)
        return format(value, column.format) if column.format and not isinstance(value, (str, bool)) else str(value)

    cells = [[cell(row.get(c.name), c) for c in columns] for row in rows]
    widths = [max(len(c.name), *(len(r[i]) for r in cells)) if cells else len(c.name) for i, c in enumerate(columns)]
    lines = ["  ".join(c.name.ljust(w) for c, w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(v.rjust(w) for v, w in zip(r, widths)) for r in cells]
    return "\n".join(lines)


def render(title: str, result: Dict[str, object], columns: Sequence[Column], *notes: str) -> str:
    """A benchmark's table: the title, the rows of ``result["rows"]``, a legend of the columns, any notes."""
    legend = [f"  {c.name}: {c.meaning}" for c in columns if c.meaning]
    return "\n".join([title, format_table(result["rows"], columns), "legend:", *legend, *notes])


def speedup(baseline: str) -> str:
    """The legend of a ``vs <baseline>`` column: every ratio in the tables reads this way."""
    return f"{baseline}'s time / this row's time, timed in the same rounds (>1: this row is faster)"


def write_json(path: str, payload: Dict[str, object]) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=2)


class Steps:
    """A benchmark's share of the run's one progress bar: ``units`` steps planned, each weighing the seconds it is
    expected to take (so that the time left holds across benchmarks). A step counts as done once the next one
    starts; ``close()`` completes the share, also the planned units no step took (a compile the plan counted
    apart, a case a compile pass skipped), so that the bar ends at 100%. ``Steps(None)`` shows nothing."""

    def __init__(self, bar: Optional[Progress], name: str = "", seconds: float = 1.0, units: float = 0.0) -> None:
        self.bar, self.name, self.seconds, self.units = bar, name, seconds, units
        self._running = 0.0
        self._used = 0.0

    def step(self, label: str, count: int = 1) -> None:
        """A step of ``count`` units (``count`` times the expected seconds) starts."""
        if self.bar is not None:
            self.bar.step(f"{self.name} {label}", self._running)
            self._running = count * self.seconds
            self._used += count

    def close(self) -> None:
        if self.bar is not None:
            self.bar.step(f"{self.name} done", self._running + max(0.0, self.units - self._used) * self.seconds)
            self._running = 0.0


def resolve(device, dtype):
    """Default device (CUDA when present) and dtype (bfloat16 on GPU, float32 on CPU)."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return device, dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)


def available_backends(op: str, device: torch.device, dtype: torch.dtype, **inputs) -> List[str]:
    """Backends that serve ``op`` here (``inputs``: the op's other support-check arguments); the Triton
    CPU interpreter is for testing, not timing."""
    from recursive_kernels import backends

    return [
        name for name in backends.BACKENDS
        if not (name == "triton" and device.type != "cuda")
        and not backends.reasons(op, name, device, dtype=dtype, **inputs)
    ]


def compiled_lazily(fn: Callable) -> Callable:
    """``fn`` under ``torch.compile`` (dynamic shapes), set up at its first call, so that importing a benchmark
    does not bring in the compiler."""
    compiled: Optional[Callable] = None

    def call(*args):
        nonlocal compiled
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True)
        return compiled(*args)

    return call


def seeded_like(t: torch.Tensor, seed: int = 1) -> torch.Tensor:
    """Standard normal numbers shaped like ``t`` in its dtype and device, the same draws for every dtype
    and device (a seeded CPU generator): upstream gradients that the reference run sees too."""
    return torch.randn(t.shape, generator=torch.Generator().manual_seed(seed)).to(t)


def relative_error(out, ref) -> float:
    """||out - ref|| / ||ref|| in float64 over every tensor of ``out`` and ``ref`` (a tensor or a
    sequence of tensors, matched in order)."""
    outs, refs = ([t] if isinstance(t, torch.Tensor) else list(t) for t in (out, ref))
    if len(outs) != len(refs):
        raise ValueError(f"out: {len(outs)} tensors against {len(refs)} in ref")
    diff = sum(float((o.double() - r.double()).square().sum()) for o, r in zip(outs, refs))
    norm = sum(float(r.double().square().sum()) for r in refs)
    return (diff / norm) ** 0.5 if norm else float(diff > 0)


def time_cases(cases, modes, impls, prepare, device, steps: Optional[Steps] = None, checked=(), optional=()):
    """Yield (case, mode, {impl: median seconds}, {impl: relative error}). ``impls``: the implementations to
    time, or a function of (case, mode) that names them (a peer may serve some cases only). ``prepare(case, backward,
    dtype=None)`` builds the inputs once (in ``dtype``, default the benchmark's) and returns a function of
    the implementation name that gives the callable to time. Before timing, each of ``checked`` runs once
    and its result (outputs, or gradients with backward) is compared with the eager implementation run on
    the same draws in higher precision (float32 on the GPU, float64 on the CPU): a wrongly tuned kernel
    shows here, and the eager row's own error is the yardstick. An implementation of ``optional`` (a peer from
    another package, or torch.compile) that fails to build or run is left out of the case, with a line on stderr
    saying why, instead of ending the benchmark."""
    reference_dtype = torch.float32 if device.type == "cuda" else torch.float64
    steps = steps or Steps(None)
    for case in cases:
        for mode in modes:
            backward = mode == "fwd+bwd"
            names = impls(case, mode) if callable(impls) else impls
            make = prepare(case, backward)
            steps.step(f"{case.label} {mode}")
            names = [impl for impl in names if impl not in optional or _runs(impl, make, f"{case.label} {mode}")]
            errors = {}
            if checked:
                reference = prepare(case, backward, reference_dtype)("eager")()
                errors = {impl: relative_error(make(impl)(), reference) for impl in checked if impl in names}
                del reference
            yield case, mode, median_seconds({impl: make(impl) for impl in names}, device), errors


def _runs(impl: str, make: Callable[[str], Callable[[], object]], where: str) -> bool:
    try:
        make(impl)()
    except Exception as error:  # a peer's failure (an import, a compile) is its own, not the benchmark's
        print(f"{impl} left out of {where}: {type(error).__name__}: {str(error)[:200]}", file=sys.stderr)
        return False
    return True


def run_benchmark(benchmark, fn, device: torch.device):
    """pytest-benchmark on ``fn``, synchronising after each call on the GPU; ``fn``'s result, for the test to check."""
    if device.type == "cuda":
        def synced():
            result = fn()
            torch.cuda.synchronize()
            return result
        return benchmark(synced)
    return benchmark(fn)
