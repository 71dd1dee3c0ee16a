"""Benchmark ``recursive_kernels.circuit_attention`` against plain SDPA and the eager way.

With ``--full``: D in (64, 128), causal and not, R = Rv = 16, S from 512 to 8192 on GPU (512 to 2048 on CPU);
by default a representative three of these (four on GPU). Every available backend is timed, forward and
forward+backward, beside

- sdpa: ``scaled_dot_product_attention`` without corrections (the floor the fused op aims at);
- eager: the corrections concatenated onto the head dims ([q, q_c / scale], [k, k_c], [v, v_c]), then SDPA;
- compiled: the eager way under ``torch.compile`` (by default for the first case only: a compile takes tens of
  seconds on a CPU; ``--full``: every case).

Printed: time, TFLOP/s (useful FLOPs of the corrected attention; FlashAttention's convention: causal
halves the work, backward counts 2.5x forward), ``vs sdpa``, ``vs eager`` and ``vs peer`` (that baseline's
time over this time: above 1 is faster; the peer is the faster of eager and compiled). ``--memory`` adds the
peak extra memory of one forward at S = 4096 (GPU: allocator peak; CPU: peak RSS of a child process).

    python -m recursive bench --only circuit_attention [--full] [--device cuda] [--json out.json] [--memory]
"""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F

import recursive_kernels

from .common import (
    MODE,
    REL_ERR,
    TIME_MS,
    Column,
    Steps,
    available_backends,
    compiled_lazily,
    machine_description,
    render,
    resolve,
    seeded_like,
    speedup,
    time_cases,
)

MODES = ("fwd", "fwd+bwd")
RANK = 16
OPTIONAL = ("compiled",)  # peers left out of a case where they fail to build or run
PEERS = ("eager", "compiled")  # what a user would run instead
# the torch backend (the reference) materialises the (B, H, S, S) scores: about 40 GB in float32 at S = 8192
REFERENCE_MAX_S = 4096


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


def default_cases(device: torch.device, full: bool = False) -> List[Case]:
    """``full``: D 64 and 128, causal and not, over the lengths; else a representative three (GPU: four)."""
    gpu = device.type == "cuda"
    batch, heads = (4, 16) if gpu else (1, 4)
    if not full:
        shapes = [(4096, 128, False), (4096, 128, True), (1024, 64, True)] if gpu else \
            [(1024, 64, False), (1024, 64, True), (2048, 128, False)]
        return [Case(S, D, causal, batch, heads) for S, D, causal in shapes]
    lengths = (512, 1024, 2048, 4096, 8192) if gpu else (512, 1024, 2048)
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


compiled_circuit_attention = compiled_lazily(eager_circuit_attention)


def _callable(impl: str, t: Dict[str, torch.Tensor], case: Case, backward: bool) -> Callable[[], object]:
    scale = case.D**-0.5
    if impl == "sdpa":
        params = [t["q"], t["k"], t["v"]]
        forward = lambda: (F.scaled_dot_product_attention(*params, is_causal=case.causal),)  # noqa: E731
    else:
        params = [t[n] for n in ("q", "k", "v", "q_c", "k_c", "v_c")]
        if impl in PEERS:
            way = eager_circuit_attention if impl == "eager" else compiled_circuit_attention
            forward = lambda: way(*params, case.causal, scale)  # noqa: E731
        else:
            forward = lambda: recursive_kernels.circuit_attention(*params, causal=case.causal, backend=impl)  # noqa: E731
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
        "import torch, recursive_benchmarks.bench_circuit_attention as b\n"
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
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def steps(cases: List[Case], modes=MODES, compiled_cases: int = 1) -> int:
    """Progress steps of ``run``: one per case and mode, and about 5 for each compiled case and mode."""
    return len(cases) * len(modes) + 5 * len(modes) * min(compiled_cases, len(cases))


STEP_SECONDS = 4.0  # a step's rough time on a 2-core CPU, for the run's time left


def run(device=None, dtype=None, modes=MODES, impls=None, cases=None, memory=False, progress: Optional[Steps] = None,
        compiled_cases: int = 1):
    """``compiled_cases``: how many of the cases (the first ones) the compiled peer is timed on."""
    device, dtype = resolve(device, dtype)
    cases = cases or default_cases(device)
    backends = list(impls or available_backends("circuit_attention", device, dtype, head_dim=64))
    impls = ["sdpa", *PEERS, *backends]

    def impls_of(case: Case, mode: str) -> List[str]:
        too_long = device.type == "cuda" and case.S > REFERENCE_MAX_S
        return [impl for impl in impls if (impl != "compiled" or case in cases[:compiled_cases])
                and (impl != "torch" or not too_long)]

    def prepare(case, backward, inputs_dtype=None):
        inputs = make_inputs(case, device, inputs_dtype or dtype, backward)
        return lambda impl: _callable(impl, inputs, case, backward)

    rows = []
    checked = [impl for impl in impls if impl != "sdpa"]
    for case, mode, times, errors in time_cases(cases, modes, impls_of, prepare, device, progress, checked,
                                                           optional=OPTIONAL):
        backward = mode == "fwd+bwd"
        peer = min((impl for impl in PEERS if impl in times), key=times.get)
        for impl, seconds in times.items():
            rows.append({
                "B": case.B, "H": case.H, "S": case.S, "D": case.D, "R": case.R, "causal": case.causal, "mode": mode,
                "impl": impl, "ms": seconds * 1e3,
                "TFLOP/s": case.flops(backward, corrections=impl != "sdpa") / seconds / 1e12,
                "vs sdpa": times["sdpa"] / seconds, "vs eager": times["eager"] / seconds, "peer": peer,
                "vs peer": times[peer] / seconds, "rel err": errors.get(impl),
            })
    result = {"machine": machine_description(device), "dtype": str(dtype).replace("torch.", ""), "rows": rows}
    if memory:
        mem_case = Case(4096, 64, True, 1, 4 if device.type == "cpu" else 16)
        result["peak_memory_MiB_at_S4096"] = {
            impl: peak_forward_memory(impl, mem_case, device, dtype) for impl in impls
        }
    return result


COLUMNS = [
    Column("B", "d", "batch"),
    Column("H", "d", "query heads (as many key/value heads)"),
    Column("S", "d", "sequence length (queries = keys)"),
    Column("D", "d", "head dim"),
    Column("R", "d", "rank of the logit (q_c, k_c) and value (v_c) corrections"),
    Column("causal", "", "causal mask or none"),
    MODE,
    Column("impl", "", "sdpa: scaled_dot_product_attention without corrections, the floor; eager: the corrections "
                       "concatenated onto the head dims, then sdpa; compiled: eager under torch.compile; "
                       "cpp/torch/triton/cuda: recursive_kernels.circuit_attention on that backend"),
    TIME_MS,
    Column("TFLOP/s", ".4f", "useful FLOPs (with the corrections; sdpa: without) / time, FlashAttention's count "
                             "(causal halves it, backward 2.5x forward); the GPU target compares it with sdpa's"),
    Column("vs sdpa", ".2f", speedup("sdpa") + "; it does less work, so below 1"),
    Column("vs eager", ".2f", speedup("eager")),
    Column("peer", "", "the faster of eager and compiled (compiled where it was timed)"),
    Column("vs peer", ".2f", speedup("that peer")),
    REL_ERR,
]


def render_result(result: Dict[str, object]) -> str:
    memory = result.get("peak_memory_MiB_at_S4096")
    notes = ["peak extra memory of one forward at S = 4096 (MiB): "
             + ", ".join(f"{k} {v:.0f}" for k, v in memory.items())] if memory else []
    return render(f"circuit_attention on {result['machine']}, {result['dtype']}", result, COLUMNS, *notes)
