"""Benchmark ``kernels.circuit_attention`` against plain SDPA and the eager way.

For D in (64, 128), causal and not, R = Rv = 16, S from 512 to 8192 on GPU (512 to 2048 on CPU), every
available backend is timed, forward and forward+backward, beside

- sdpa: ``scaled_dot_product_attention`` without corrections (the floor the fused op aims at);
- eager: the corrections concatenated onto the head dims ([q, q_c / scale], [k, k_c], [v, v_c]), then SDPA.

Printed: time, TFLOP/s (useful FLOPs of the corrected attention; FlashAttention's convention: causal
halves the work, backward counts 2.5x forward), ``x sdpa`` (throughput relative to SDPA's on its own,
smaller, FLOP count: above 1 is better) and ``vs eager`` (eager time over this time). ``--memory`` adds
the peak extra memory of one forward at S = 4096 (GPU: allocator peak; CPU: peak RSS of a child process).

    python benchmarks/bench_circuit_attention.py [--device cuda] [--json out.json] [--memory]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # run as a script
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kernels  # noqa: E402
from benchmarks.common import (  # noqa: E402
    available_backends, machine_description, report, resolve, seeded_like, time_cases,
)

MODES = ("fwd", "fwd+bwd")
RANK = 16


@dataclass(frozen=True)
class Case:
    S: int
    D: int
    causal: bool
    B: int = 1
    H: int = 8
    R: int = RANK

    def flops(self, backward: bool, corrections: bool = True) -> float:
        width = 2 * self.D + (2 * self.R if corrections else 0)  # q.k (+ q_c.k_c) and P.v (+ P.v_c)
        forward = 2.0 * self.B * self.H * self.S * self.S * width / (2 if self.causal else 1)
        return forward * (3.5 if backward else 1.0)

    @property
    def label(self) -> str:
        return f"S={self.S} D={self.D} {'causal' if self.causal else 'full'}"


def default_cases(device: torch.device) -> List[Case]:
    lengths = (512, 1024, 2048, 4096, 8192) if device.type == "cuda" else (512, 1024, 2048)
    batch, heads = (4, 16) if device.type == "cuda" else (1, 4)
    return [Case(S, D, causal, batch, heads) for D in (64, 128) for causal in (False, True) for S in lengths]


def make_inputs(case: Case, device, dtype, requires_grad: bool) -> Dict[str, torch.Tensor]:
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype).requires_grad_(requires_grad)

    B, H, S = case.B, case.H, case.S
    return {
        "q": rand(B, H, S, case.D), "k": rand(B, H, S, case.D), "v": rand(B, H, S, case.D),
        "q_c": rand(B, H, S, case.R), "k_c": rand(B, H, S, case.R), "v_c": rand(B, H, S, case.R),
    }


def eager_circuit_attention(q, k, v, q_c, k_c, v_c, causal, scale):
    """Corrections as extra head dims: softmax(scale [q, q_c/scale] [k, k_c]^T) [v, v_c]."""
    both = F.scaled_dot_product_attention(
        torch.cat([q, q_c / scale], -1), torch.cat([k, k_c], -1), torch.cat([v, v_c], -1), is_causal=causal, scale=scale
    )
    return both[..., : v.shape[-1]], both[..., v.shape[-1]:]


def _callable(impl: str, t: Dict[str, torch.Tensor], case: Case, backward: bool) -> Callable[[], object]:
    scale = case.D**-0.5
    if impl == "sdpa":
        params = [t["q"], t["k"], t["v"]]
        forward = lambda: (F.scaled_dot_product_attention(*params, is_causal=case.causal),)  # noqa: E731
    else:
        params = [t[n] for n in ("q", "k", "v", "q_c", "k_c", "v_c")]
        if impl == "eager":
            forward = lambda: eager_circuit_attention(*params, case.causal, scale)  # noqa: E731
        else:
            forward = lambda: kernels.circuit_attention(*params, causal=case.causal, backend=impl)  # noqa: E731
    if not backward:
        return forward
    with torch.no_grad():
        grads = [seeded_like(o, seed) for seed, o in enumerate(forward(), 1)]
    return lambda: torch.autograd.grad(forward(), params, grads)


def peak_forward_memory(impl: str, case: Case, device: torch.device, dtype: torch.dtype) -> float:
    """Extra peak memory (MiB) of one forward beyond its inputs."""
    if device.type == "cuda":
        inputs = make_inputs(case, device, dtype, False)
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        _callable(impl, inputs, case, False)()
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # CPU (Linux): a child process. Its high-water mark (VmHWM) is reset after the set-up (writing 5 to
    # /proc/self/clear_refs), so the figure is the forward's peak RSS minus the RSS just before it.
    code = (
        "import torch, benchmarks.bench_circuit_attention as b\n"
        f"case = b.Case({case.S}, {case.D}, {case.causal}, {case.B}, {case.H}, {case.R})\n"
        f"t = b.make_inputs(case, torch.device('cpu'), torch.{str(dtype).split('.')[1]}, False)\n"
        f"fn = b._callable({impl!r}, t, case, False)\n"
        "def status_kib(key):\n"
        "    line = next(l for l in open('/proc/self/status') if l.startswith(key))\n"
        "    return int(line.split()[1])\n"
        "open('/proc/self/clear_refs', 'w').write('5')\n"
        "before = status_kib('VmRSS:')\n"
        "out = fn()\n"
        "print((status_kib('VmHWM:') - before) / 1024)\n"
    )
    root = str(Path(__file__).resolve().parents[1])
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def run(device=None, dtype=None, modes=MODES, impls=None, cases=None, memory=False, progress=True):
    device, dtype = resolve(device, dtype)
    cases = cases or default_cases(device)
    impls = ["sdpa", "eager", *(impls or available_backends("circuit_attention", device, dtype, head_dim=64))]

    def prepare(case, backward, inputs_dtype=None):
        inputs = make_inputs(case, device, inputs_dtype or dtype, backward)
        return lambda impl: _callable(impl, inputs, case, backward)

    rows = []
    checked = [impl for impl in impls if impl != "sdpa"]
    for case, mode, times, errors in time_cases(cases, modes, impls, prepare, device, progress, checked):
        backward = mode == "fwd+bwd"
        sdpa_rate = case.flops(backward, corrections=False) / times["sdpa"]
        for impl, seconds in times.items():
            rate = case.flops(backward, corrections=impl != "sdpa") / seconds
            rows.append({
                "S": case.S, "D": case.D, "causal": case.causal, "mode": mode, "impl": impl,
                "ms": seconds * 1e3, "TFLOP/s": rate / 1e12, "x sdpa": rate / sdpa_rate,
                "vs eager": times["eager"] / seconds, "rel err": errors.get(impl),
            })
    result = {"machine": machine_description(device), "dtype": str(dtype).replace("torch.", ""), "rows": rows}
    if memory:
        mem_case = Case(4096, 64, True, 1, 4 if device.type == "cpu" else 16)
        result["peak_memory_MiB_at_S4096"] = {
            impl: peak_forward_memory(impl, mem_case, device, dtype) for impl in impls
        }
    return result


COLUMNS = ["S", "D", "causal", "mode", "impl", "ms", "TFLOP/s", "x sdpa", "vs eager", "rel err"]


def main(argv=None) -> Dict[str, object]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--mode", choices=MODES, action="append")
    parser.add_argument("--backend", action="append")
    parser.add_argument("--memory", action="store_true", help="also the peak memory of a forward at S = 4096")
    parser.add_argument("--json")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    result = run(
        device=torch.device(args.device) if args.device else None,
        dtype=getattr(torch, args.dtype) if args.dtype else None,
        modes=tuple(args.mode or MODES), impls=args.backend, memory=args.memory, progress=not args.no_progress,
    )
    memory = result.get("peak_memory_MiB_at_S4096")
    notes = ["peak extra memory of one forward at S = 4096 (MiB): "
             + ", ".join(f"{k} {v:.0f}" for k, v in memory.items())] if memory else []
    report(f"circuit_attention on {result['machine']}, {result['dtype']}", result, COLUMNS, args.json, *notes)
    return result


if __name__ == "__main__":
    main()
