"""Compile every Triton kernel of the package for a CUDA GPU on a machine without one.

The interpreter (``TRITON_INTERPRET=1``, how the tests run the Triton backends on the CPU) never lowers
a kernel: an error that only the compiler sees (a type the lowering rejects, a tile that does not fit in
shared memory, an API another Triton version lacks) would first show on a GPU. This script runs the
backends' own launchers on CPU tensors with a compile-only driver: every launch compiles its kernel for
the target (Triton's bundled ptxas; nothing runs) and every configuration the autotuner would try is
compiled too. For each compiled variant it reads the resources off the cubin (registers, spills, shared
memory) and whether the dots became tensor-core instructions.

    python tests/triton_compile_check.py [--arch 90] [--quick] [--jobs 2] [--report FILE] [--verbose]

Exit status 0 when every launch compiled and had at least one configuration within the target's shared
memory; 1 otherwise, with the failures listed. ``tests/test_triton_compile.py`` runs it in a subprocess
(TRITON_INTERPRET must be unset before Triton is imported, and the test session sets it).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Dict, List

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("triton_compile_check: unset TRITON_INTERPRET (the interpreter compiles nothing)")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.runtime import driver  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

# Opt-in shared memory per block (CUDA programming guide, compute capabilities table).
MAX_SHARED_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}


class CompileOnlyDriver:
    """Stands in for Triton's CUDA driver: names the target, launches nothing."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self):
        return self.target

    def get_current_device(self):
        return 0

    def get_current_stream(self, device=None):
        return 0

    def get_active_torch_device(self):
        return torch.device("cpu")


@dataclasses.dataclass
class Variant:
    kernel: str
    meta: Dict[str, object]  # the operands' dtypes, the constexprs and the launch configuration
    shared: int
    registers: int
    local_bytes: int  # spill stores go to local memory (the cubin's LOCAL / STACK)
    tensor_cores: str  # "wgmma", "mma" or "-"


@dataclasses.dataclass
class Launch:
    case: str
    kernel: str
    variants: List[Variant]


class Recorder:
    """Turns every launch into compilation: an autotuned kernel compiles each configuration its pruning
    keeps (what the autotuner would benchmark), a plain kernel its one variant."""

    def __init__(self, target: GPUTarget):
        self.target = target
        self.case = ""
        self.launches: List[Launch] = []
        self._in_autotuner = False

    def install(self):
        driver.set_active(CompileOnlyDriver(self.target))
        jit_run = JITFunction.run
        recorder = self

        def run(fn, *args, grid, warmup, **kwargs):
            kernel = jit_run(fn, *args, grid=grid, warmup=True, **kwargs)
            dtypes = sorted({str(a.dtype).removeprefix("torch.") for a in args if isinstance(a, torch.Tensor)})
            variant = recorder.variant(fn.__name__, "+".join(dtypes), kwargs, kernel)
            if recorder._in_autotuner:
                recorder.launches[-1].variants.append(variant)
            else:
                recorder.launches.append(Launch(recorder.case, fn.__name__, [variant]))
            return kernel

        def autotuned(tuner, *args, **kwargs):
            kwargs.pop("warmup", None)
            self.launches.append(Launch(self.case, tuner.fn.__name__, []))
            self._in_autotuner = True
            try:
                return tuner.warmup(*args, **kwargs)
            finally:
                self._in_autotuner = False

        JITFunction.run = run
        Autotuner.run = autotuned

    def variant(self, name: str, dtypes: str, kwargs: Dict[str, object], kernel) -> Variant:
        meta = {"dtypes": dtypes,
                **{k: v for k, v in kwargs.items()
                   if k.isupper() and k not in ("PREC", "UPCAST") or k in ("num_warps", "num_stages")}}
        ptx = kernel.asm["ptx"]
        tensor_cores = "wgmma" if "wgmma" in ptx else ("mma" if re.search(r"\bmma\.sync", ptx) else "-")
        registers, local_bytes = _cubin_resources(kernel.asm["cubin"])
        return Variant(name, meta, int(kernel.metadata.shared), registers, local_bytes, tensor_cores)


def _cubin_resources(cubin: bytes):
    """(registers, local + stack bytes) of the cubin's kernel, read with the cuobjdump Triton ships."""
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "-res-usage", f.name], capture_output=True, text=True, check=True).stdout
    found = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", out)
    if found is None:
        raise RuntimeError(f"cuobjdump -res-usage printed no resource line:\n{out}")
    return int(found.group(1)), int(found.group(2)) + int(found.group(3))


# --------------------------------------------------------------------------------------------------
# the cases: each calls a backend's launchers the way the ops do
# --------------------------------------------------------------------------------------------------

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _lowrank_cases() -> Dict[str, Callable[[], None]]:
    from recursive_kernels import triton_lowrank_linear as T

    def run(dtype, M, r, mode, bias):
        g = torch.Generator().manual_seed(0)
        K = N = 1024
        E = 8
        x = torch.randn(M, K, generator=g).to(dtype)
        weight = torch.randn(N, K, generator=g).to(dtype)
        b = torch.randn(N, generator=g).to(dtype) if bias else None
        lora_a = lora_b = indices = gates = None
        if mode != "plain":
            lora_a = torch.randn(E, r, K, generator=g).to(dtype)
            lora_b = torch.randn(E, N, r, generator=g).to(dtype)
        if mode == "per_row":
            indices = torch.randint(-1, E, (M, 1), generator=g)
        elif mode == "top2":
            indices = torch.randint(0, E, (M, 2), generator=g)
            gates = torch.rand(M, 2, generator=g)
        y, u = T.forward(x, weight, b, lora_a, lora_b, indices, gates, 2.0, 3)
        T.backward(torch.randn_like(y), x, weight, lora_a, lora_b, indices, gates, 2.0, 3, u, [True] * 6)
        if mode == "single":  # dA without dx: the unsorted shrink
            T.backward(torch.randn_like(y), x, weight, lora_a, lora_b, indices, gates, 2.0, 3, u,
                       [False, False, False, True, True, False])

    cases = {}
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        for M in (16, 4096):  # decode (pruned to small row tiles) and prefill (every configuration)
            for mode in ("plain", "single", "per_row", "top2"):
                cases[f"lowrank_linear {name} M={M} {mode}"] = (
                    lambda d=dtype, m=M, mo=mode: run(d, m, 16, mo, bias=mo == "single"))
        cases[f"lowrank_linear {name} M=4096 top2 r=64"] = lambda d=dtype: run(d, 4096, 64, "top2", bias=True)
    return cases


def _attention_cases() -> Dict[str, Callable[[], None]]:
    from recursive_kernels import triton_circuit_attention as T

    def run(dtype, D, R, RV, causal, varlen, S=1024, token_major=False):
        g = torch.Generator().manual_seed(0)
        B, H, Hkv = 2, 4, 2

        def rand(*shape):
            return torch.randn(*shape, generator=g).to(dtype)

        if varlen:
            lengths = torch.tensor([S // 2, S])
            cu = torch.zeros(B + 1, dtype=torch.int32)
            cu[1:] = lengths.cumsum(0)
            total = int(cu[-1])
            q, k, v = rand(total, H, D), rand(total, Hkv, D), rand(total, Hkv, D)
            q_c, k_c = (rand(total, H, R), rand(total, Hkv, R)) if R else (None, None)
            v_c = rand(total, Hkv, RV) if RV else None
            offsets = (cu, cu, S, S)
        else:
            def dense(heads, width):  # token-major: a (B, S, heads, width) tensor seen as models pass it
                return rand(B, S, heads, width).transpose(1, 2) if token_major else rand(B, heads, S, width)

            q, k, v = dense(H, D), dense(Hkv, D), dense(Hkv, D)
            q_c, k_c = (dense(H, R), dense(Hkv, R)) if R else (None, None)
            v_c = dense(Hkv, RV) if RV else None
            offsets = (None, None, S, S)
        out, out_c, lse = T.forward(q, k, v, q_c, k_c, v_c, *offsets, causal, D ** -0.5)
        T.backward(torch.randn_like(out), torch.randn_like(out_c) if RV else out_c, q, k, v, q_c, k_c, v_c,
                   out, out_c, lse, *offsets, causal, D ** -0.5)

    cases = {}
    for dtype in DTYPES:
        name = str(dtype).removeprefix("torch.")
        for D in (64, 128):
            for causal in (False, True):
                cases[f"circuit_attention {name} D={D} R=Rv=16 causal={causal}"] = (
                    lambda d=dtype, hd=D, c=causal: run(d, hd, 16, 16, c, varlen=False))
        cases[f"circuit_attention {name} D=128 R=Rv=16 causal=True token-major"] = (
            lambda d=dtype: run(d, 128, 16, 16, True, varlen=False, token_major=True))
        cases[f"circuit_attention {name} D=128 plain"] = lambda d=dtype: run(d, 128, 0, 0, False, varlen=False)
        cases[f"circuit_attention {name} D=80 R=64 Rv=0 varlen causal"] = (
            lambda d=dtype: run(d, 80, 64, 0, True, varlen=True))
        cases[f"circuit_attention {name} D=256 R=0 Rv=64"] = lambda d=dtype: run(d, 256, 0, 64, False, varlen=False)
    return cases


# --------------------------------------------------------------------------------------------------


def all_cases() -> Dict[str, Callable[[], None]]:
    return {**_lowrank_cases(), **_attention_cases()}


def quick(name: str) -> bool:
    """The subset the test suite compiles: every case in bfloat16, lowrank_linear in every dtype, and one
    float32 attention (its float64 statistics take over a minute a case to compile)."""
    return ("bfloat16" in name or name.startswith("lowrank_linear")
            or name == "circuit_attention float32 D=128 R=Rv=16 causal=True")


def _compile_cases(arch: int, names: List[str], verbose: bool):
    """Compile the cases ``names`` for sm_``arch`` in this process; returns (launches, failures)."""
    recorder = Recorder(GPUTarget("cuda", arch, 32))
    recorder.install()
    cases = all_cases()
    failures = []
    for name in names:
        recorder.case = name
        start = time.perf_counter()
        try:
            cases[name]()
        except Exception as exc:  # a compile error names the kernel and the line
            failures.append(f"{name}: {type(exc).__name__}: {exc}")
        if verbose:
            print(f"{time.perf_counter() - start:6.1f} s  {name}", flush=True)
    return recorder.launches, failures


def check(arch: int, names: List[str], jobs: int = 1, verbose: bool = False):
    """Compile the cases ``names`` for sm_``arch`` over ``jobs`` processes; returns (launches, failures)."""
    if jobs > 1:
        shares = [names[i::jobs] for i in range(jobs)]
        with concurrent.futures.ProcessPoolExecutor(jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            results = list(pool.map(_compile_cases, [arch] * jobs, shares, [verbose] * jobs))
    else:
        results = [_compile_cases(arch, names, verbose)]
    launches = [launch for result in results for launch in result[0]]
    failures = [failure for result in results for failure in result[1]]
    limit = MAX_SHARED_BYTES.get(arch)
    for launch in launches:
        if limit is not None and not any(v.shared <= limit for v in launch.variants):
            fewest = min(v.shared for v in launch.variants)
            failures.append(f"{launch.case}: {launch.kernel}: every configuration needs more shared memory "
                            f"than sm_{arch} has ({fewest} > {limit} bytes)")
    return launches, failures


def report(launches: List[Launch], arch: int) -> str:
    """One line per distinct compiled variant (kernel, constexprs, configuration)."""
    limit = MAX_SHARED_BYTES.get(arch)
    seen = {}
    for launch in launches:
        for v in launch.variants:
            key = (v.kernel, tuple(sorted(v.meta.items())))
            seen.setdefault(key, (v, launch.case))
    lines = [f"# Triton kernels compiled for sm_{arch} (Triton {triton.__version__}; compile only, nothing ran)",
             "", "kernel | variant | regs | spill bytes | shared KiB | tensor cores | first case",
             "--- | --- | --- | --- | --- | --- | ---"]
    for (kernel, meta), (v, case) in sorted(seen.items(), key=lambda kv: (kv[0][0], str(kv[0][1]))):
        fits = "" if limit is None or v.shared <= limit else " (too large)"
        variant = " ".join(f"{k}={val}" for k, val in meta)
        lines.append(f"{kernel} | {variant} | {v.registers} | {v.local_bytes} | {v.shared / 1024:.1f}{fits} | "
                     f"{v.tensor_cores} | {case}")
    spilling = sum(1 for v, _ in seen.values() if v.local_bytes)
    lines += ["", f"{len(seen)} variants, {spilling} with spills"]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="compute capability times ten (default 90)")
    parser.add_argument("--only", default=None, help="only the cases whose name contains this text")
    parser.add_argument("--quick", action="store_true", help="only the test suite's subset (see quick())")
    parser.add_argument("--jobs", type=int, default=1, help="compile in this many processes")
    parser.add_argument("--report", default=None, help="write the resource table to this file")
    parser.add_argument("--verbose", action="store_true", help="print each case's compile time")
    args = parser.parse_args(argv)
    names = [name for name in all_cases()
             if (args.only is None or args.only in name) and (not args.quick or quick(name))]
    start = time.perf_counter()
    launches, failures = check(args.arch, names, args.jobs, args.verbose)
    table = report(launches, args.arch)
    if args.report:
        with open(args.report, "w") as f:
            f.write(table + "\n")
    seconds = time.perf_counter() - start
    print(table.splitlines()[-1], f"({len(names)} cases, {len(launches)} launches, {seconds:.0f} s)")
    for failure in failures:
        print("FAILED", failure)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
