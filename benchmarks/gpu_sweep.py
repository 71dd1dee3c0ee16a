"""Every autotuning configuration of every Triton kernel, checked at production shapes (a GPU run's step 2).

The autotuner picks one configuration per shape by speed, so a configuration that computes a wrong result
is used only where it happens to win: the test suite (which runs the smallest configurations) never sees
it. This sweep forces each configuration of each kernel in turn (the other kernels of the op run their
smallest configuration) and runs the public op, forward and backward, on the ``triton`` backend:

* lowrank_linear: M in (1, 16, 333, 8192) rows, K = N = 4096, r 16 and 64; one adapter, and 8 adapters
  gathered top-2 with gates (a plain linear is ``F.linear`` on every backend); M = 333 with strided weights,
  factors and a column-major x;
* circuit_attention: D 64 and 128 (and 256 once), S up to 4096, grouped-query heads, decode (one query
  against 4096 keys), R = Rv = 16, causal and not, one case with token-major (B, S, H, D) inputs;

each in bfloat16, float16 and float32 (in that order: a sweep cut short has the 16-bit results). Each
result is compared with the float64 reference by relative norm, ||out - ref|| / ||ref||, output by output
and gradient by gradient, against the project's error rule: at most twice the error of the same op run by
PyTorch in the same dtype (the ``torch`` backend). Inputs are drawn afresh per case and dtype; outputs land
in memory poisoned with NaN first, so an element a kernel never writes fails the check. A configuration the
kernel's pruning drops for a shape is recorded as pruned, not run. Each record also holds the compiled
kernel's registers and spills, read from the kernel Triton launched.

    python -m recursive_benchmarks.gpu_sweep --out sweep.jsonl [--seconds 80] [--jobs 12] [--small]

The float64 references are computed once, before the workers start (each worker process takes every
``jobs``-th configuration); records are appended to ``--out`` as they come (JSON lines); the workers stop
starting cases after ``--seconds``. ``--small``: a few small shapes (for the CPU, under TRITON_INTERPRET=1).
The last line printed is the summary.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import multiprocessing
import os
import sys
import tempfile
import time
from typing import Dict, List, Optional, Tuple

import torch

DTYPES = (torch.bfloat16, torch.float16, torch.float32)
MODULES = {"lowrank_linear": "recursive_kernels.triton_lowrank_linear",
           "circuit_attention": "recursive_kernels.triton_circuit_attention"}
# the lowrank kernels and the forms that launch them (the attention kernels run in every attention case)
LOWRANK_FORMS = {"_linear_kernel": ("single", "gathered"), "_seg_shrink_kernel": ("gathered",),
                 "_seg_outer_kernel": ("single", "gathered")}


@dataclasses.dataclass(frozen=True)
class LowrankCase:
    form: str  # single (one adapter for every row) or gathered (top-2 of E, gated); a plain linear is F.linear
    M: int
    K: int
    N: int
    r: int
    E: int = 8
    strided: bool = False

    op = "lowrank_linear"

    @property
    def label(self) -> str:
        return f"{self.form} M={self.M} K={self.K} N={self.N} r={self.r}" + (" strided" if self.strided else "")


@dataclasses.dataclass(frozen=True)
class AttentionCase:
    B: int
    H: int
    Hkv: int
    Sq: int
    Sk: int
    D: int
    causal: bool
    R: int = 16
    token_major: bool = False

    op = "circuit_attention"

    @property
    def label(self) -> str:
        return (f"B={self.B} H={self.H}/{self.Hkv} Sq={self.Sq} Sk={self.Sk} D={self.D}"
                f"{' causal' if self.causal else ''}{' token-major' if self.token_major else ''}")


def cases(small: bool) -> List[object]:
    if small:
        return [LowrankCase(form, M, 64, 48, 8, E=3, strided=M == 7) for M in (1, 7, 40)
                for form in ("single", "gathered")] + [
            AttentionCase(2, 4, 2, 33, 33, 16, True), AttentionCase(1, 2, 2, 1, 40, 32, True, token_major=True),
            AttentionCase(1, 2, 1, 20, 24, 64, False)]
    lowrank = [LowrankCase(form, M, 4096, 4096, r, strided=M == 333) for M in (8192, 16, 1, 333) for r in (16, 64)
               for form in ("single", "gathered")]
    attention = [AttentionCase(1, 16, 16, 4096, 4096, 128, True), AttentionCase(2, 16, 4, 333, 333, 64, False),
                 AttentionCase(8, 16, 4, 1, 4096, 128, True), AttentionCase(1, 16, 16, 2048, 2048, 64, False),
                 AttentionCase(2, 8, 8, 1000, 1000, 128, True, token_major=True),
                 AttentionCase(1, 8, 2, 512, 512, 256, True)]
    return lowrank + attention


# ------------------------------------------------------------------------------------------------
# inputs, the op, references
# ------------------------------------------------------------------------------------------------


def draw(case, seed: int) -> Dict[str, torch.Tensor]:
    """Float32 CPU draws of the case's inputs and upstream gradients (indices int64)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return torch.randn(*shape, generator=gen) * scale

    if isinstance(case, LowrankCase):
        t = {"x": rand(case.M, case.K), "weight": rand(case.N, case.K, scale=case.K ** -0.5),
             "grad_y": rand(case.M, case.N), "lora_a": rand(case.E, case.r, case.K, scale=case.K ** -0.5),
             "lora_b": rand(case.E, case.N, case.r, scale=case.r ** -0.5)}
        if case.form == "gathered":
            t["indices"] = torch.randint(-1, case.E, (case.M, 2), generator=gen)
            t["gates"] = torch.rand(case.M, 2, generator=gen)
        return t
    q_shape, kv_shape = (case.B, case.H, case.Sq), (case.B, case.Hkv, case.Sk)
    return {"q": rand(*q_shape, case.D), "k": rand(*kv_shape, case.D), "v": rand(*kv_shape, case.D),
            "q_c": rand(*q_shape, case.R, scale=0.3), "k_c": rand(*kv_shape, case.R, scale=0.3),
            "v_c": rand(*kv_shape, case.R), "grad_out": rand(*q_shape, case.D), "grad_out_c": rand(*q_shape, case.R)}


def _padded(t: torch.Tensor) -> torch.Tensor:
    """t's values with a row stride 32 elements longer than its width (a view into a wider buffer)."""
    wide = t.new_zeros(*t.shape[:-1], t.shape[-1] + 32)
    return wide[..., :t.shape[-1]].copy_(t)


def _token_major(t: torch.Tensor) -> torch.Tensor:
    """(B, H, S, d) values in (B, S, H, d) memory, as the model's projections give them."""
    return t.transpose(1, 2).contiguous().transpose(1, 2)


def run_op(case, inputs: Dict[str, torch.Tensor], dtype, device, backend: str) -> List[torch.Tensor]:
    """Outputs and input gradients of the op on ``backend``: (y, dx, dA, dB, dgates) or (out, out_c, dq, dk,
    dv, dq_c, dk_c, dv_c)."""
    import recursive_kernels

    def place(name):
        t = inputs[name].to(device)
        return t if t.dtype == torch.int64 else t.to(dtype)

    if isinstance(case, LowrankCase):
        x, weight, grad_y = place("x"), place("weight"), place("grad_y")
        lora = [place(n) for n in ("lora_a", "lora_b")]
        indices = place("indices") if case.form == "gathered" else (case.E - 1 if case.form == "single" else None)
        gates = place("gates").to(torch.float64 if dtype == torch.float64 else torch.float32) \
            if case.form == "gathered" else None
        if case.strided:
            x = x.t().contiguous().t()  # column-major
            weight, lora = _padded(weight), [_padded(t) for t in lora]
        leaves = [x, *lora] + ([gates] if gates is not None else [])
        for t in leaves:
            t.requires_grad_(True)
        y = recursive_kernels.lowrank_linear(x, weight, None, *lora, indices=indices, gates=gates, scaling=0.5,
                                             backend=backend)
        return [y.detach(), *torch.autograd.grad(y, leaves, grad_y)]
    names = ("q", "k", "v", "q_c", "k_c", "v_c")
    leaves = [place(n) for n in names]
    if case.token_major:
        leaves = [_token_major(t) for t in leaves]
    for t in leaves:
        t.requires_grad_(True)
    out, out_c = recursive_kernels.circuit_attention(*leaves, causal=case.causal, backend=backend)
    grads = torch.autograd.grad((out, out_c), leaves, (place("grad_out"), place("grad_out_c")))
    return [out.detach(), out_c.detach(), *grads]


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    diff = (out.double() - ref.double()).norm()
    norm = ref.double().norm()
    return float(diff / norm) if norm else float(diff)


def sampled(t: torch.Tensor) -> torch.Tensor:
    """The rows (dim -2) a large result is compared on: the first and last 64 and 384 drawn between (the same
    for every tensor of that shape); every element is still checked to be finite (the NaN poison)."""
    rows = t.shape[-2] if t.dim() >= 2 else 0
    if t.numel() <= 1 << 22 or rows <= 512:
        return t
    middle = torch.randperm(rows - 128, generator=torch.Generator().manual_seed(rows))[:384] + 64
    index = torch.cat([torch.arange(64), middle.sort().values, torch.arange(rows - 64, rows)])
    return t.index_select(-2, index.to(t.device))


def prepare_references(all_cases, device, folder: str) -> None:
    """Per case and dtype: the float64 results (sampled, stored as float32) and the errors of the same op run in
    that dtype by the ``torch`` backend (the yardstick of the error rule), saved for the workers."""
    for n, case in enumerate(all_cases):
        for d, dtype in enumerate(DTYPES):
            inputs = draw(case, seed=1000 * n + d)
            # the reference sees the inputs as rounded to the dtype: only the computation's error is measured
            exact_inputs = {k: v if v.dtype == torch.int64 else v.to(dtype).double() for k, v in inputs.items()}
            reference = [sampled(t) for t in run_op(case, exact_inputs, torch.float64, device, "torch")]
            same = [sampled(t) for t in run_op(case, inputs, dtype, device, "torch")]
            torch.save({"reference": [t.float().cpu() for t in reference],
                        "torch_errors": [relative_error(s, r) for s, r in zip(same, reference)]},
                       os.path.join(folder, f"{n}-{d}.pt"))
            del reference, same
            if device.type == "cuda":
                torch.cuda.empty_cache()


# ------------------------------------------------------------------------------------------------
# forcing one configuration
# ------------------------------------------------------------------------------------------------


class Pruned(Exception):
    """The forced configuration is not among those the kernel's pruning keeps for this launch."""


class ConfigForcer:
    """Runs ``target`` with one configuration and every other autotuned kernel with its smallest pruned one,
    recording the compiled target's registers and spills."""

    def __init__(self):
        from triton.runtime.autotuner import Autotuner

        self.target, self.config, self.launched = None, None, []
        forcer = self

        def run(tuner, *args, **kwargs):
            tuner.nargs = dict(zip(tuner.arg_names, args))
            pruned = tuner.prune_configs(kwargs)
            if tuner is forcer.target:
                if forcer.config not in pruned:
                    raise Pruned()
                config = forcer.config
            else:
                config = min(pruned, key=_tile_size)
            kernel = tuner.fn.run(*args, **kwargs, **config.all_kwargs())
            tuner.nargs = None
            if tuner is forcer.target:
                forcer.launched.append(kernel)
            return kernel

        Autotuner.run = run

    def resources(self) -> Dict[str, Optional[int]]:
        regs = [getattr(k, "n_regs", None) for k in self.launched]
        spills = [getattr(k, "n_spills", None) for k in self.launched]
        known = [r for r in regs if r is not None]
        return {"regs": max(known) if known else None,
                "spills": max((s for s in spills if s is not None), default=None)}


def _tile_size(config) -> Tuple[int, int]:
    return (math.prod(v for k, v in config.kwargs.items() if k.startswith("BLOCK_")), config.num_stages)


def _poison(device) -> None:
    """Fill the allocator's free blocks with NaN, so that an output element nothing writes shows."""
    if device.type != "cuda":
        return
    blocks = [torch.full((n,), float("nan"), device=device) for n in (1 << 28, *(1 << 16,) * 32)]
    del blocks


def items() -> List[Tuple[str, str, int]]:
    """(op, kernel, configuration index) for every configuration of every autotuned kernel."""
    import importlib

    from triton.runtime.autotuner import Autotuner

    found = []
    for op, module in MODULES.items():
        for name, obj in vars(importlib.import_module(module)).items():
            if isinstance(obj, Autotuner):
                found += [(op, name, i) for i in range(len(obj.configs))]
    return found


def check(results: List[torch.Tensor], saved: dict, device) -> dict:
    """The error rule over every output and gradient: finite everywhere, error at most twice torch's (plus half an
    ulp); ``worst_ratio``: the largest (error - half an ulp) / torch's error."""
    if not all(bool(torch.isfinite(t).all()) for t in results):
        return {"status": "fail", "error": "a non-finite element (unwritten: the NaN poison, or an overflow)"}
    errors = [relative_error(sampled(t), r.to(device)) for t, r in zip(results, saved["reference"])]
    floor = torch.finfo(results[0].dtype).eps / 2  # the project's rule (tests/helpers.py): half an ulp of slack
    ratios = [(e - floor) / t if t else (0.0 if e <= floor else math.inf)
              for e, t in zip(errors, saved["torch_errors"])]
    return {"status": "ok" if max(ratios) <= 2.0 else "fail", "worst_ratio": max(ratios),
            "errors": [[e, t] for e, t in zip(errors, saved["torch_errors"])]}


def worker(jobs: int, index: int, all_cases, folder: str, out: str, deadline: float) -> None:
    """Runs every ``jobs``-th configuration from ``index`` on the cases that launch its kernel, dtype by dtype."""
    import importlib

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    forcer = ConfigForcer()
    mine = [(op, getattr(importlib.import_module(MODULES[op]), kernel), kernel, i) for op, kernel, i in items()]
    mine = mine[index::jobs]
    for d, dtype in enumerate(DTYPES):
        for n, case in enumerate(all_cases):
            runs = [m for m in mine if m[0] == case.op and (case.op != "lowrank_linear" or
                                                           case.form in LOWRANK_FORMS[m[2]])]
            if not runs:
                continue
            saved = torch.load(os.path.join(folder, f"{n}-{d}.pt"))
            inputs = draw(case, seed=1000 * n + d)
            for _, tuner, kernel, config_index in runs:
                if time.time() > deadline:
                    return
                forcer.target, forcer.config, forcer.launched = tuner, tuner.configs[config_index], []
                record = {"kernel": kernel, "config": str(forcer.config), "case": case.label,
                          "dtype": str(dtype).removeprefix("torch.")}
                start = time.perf_counter()
                try:
                    _poison(device)
                    record.update(check(run_op(case, inputs, dtype, device, "triton"), saved, device))
                except Pruned:
                    record["status"] = "pruned"
                except Exception as error:  # a launch or compile failure is this configuration's result
                    record.update(status="error", error=f"{type(error).__name__}: {str(error)[:300]}")
                if record["status"] in ("ok", "fail") and not forcer.launched:
                    record["status"] = "not launched"
                record.update(forcer.resources(), seconds=round(time.perf_counter() - start, 3))
                with open(out, "a") as f:
                    f.write(json.dumps(record) + "\n")


def summarise(out: str) -> str:
    records = [json.loads(line) for line in open(out)] if os.path.exists(out) else []
    by_status: Dict[str, int] = {}
    for r in records:
        by_status[r["status"]] = by_status.get(r["status"], 0) + 1
    lines = [f"{r['kernel']} {r['config']} {r['case']} {r['dtype']}: {r['status']} "
             f"{r.get('worst_ratio', r.get('error', ''))}" for r in records if r["status"] in ("fail", "error")]
    spills = sorted({(r["kernel"], r["config"], r["spills"]) for r in records if r.get("spills")})
    lines += [f"spills: {kernel} {config}: {n} bytes" for kernel, config, n in spills]
    counts = ", ".join(f"{n} {status}" for status, n in sorted(by_status.items()))
    lines.append(f"sweep: {len(records)} records ({counts or 'none'})")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="JSON lines, appended as records come")
    parser.add_argument("--seconds", type=float, default=80.0, help="start no case after this many seconds")
    parser.add_argument("--jobs", type=int, default=12, help="worker processes (configurations dealt out)")
    parser.add_argument("--small", action="store_true", help="a few small shapes (the CPU, under the interpreter)")
    args = parser.parse_args(argv)
    deadline = time.time() + args.seconds
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    all_cases = cases(args.small)
    with tempfile.TemporaryDirectory() as folder:
        prepare_references(all_cases, device, folder)
        if args.jobs == 1:
            worker(1, 0, all_cases, folder, args.out, deadline)
        else:
            context = multiprocessing.get_context("spawn")  # CUDA in the workers
            processes = [context.Process(target=worker, args=(args.jobs, i, all_cases, folder, args.out, deadline))
                         for i in range(args.jobs)]
            for p in processes:
                p.start()
            for p in processes:
                p.join()
    print(summarise(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
