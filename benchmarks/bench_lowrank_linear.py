"""Benchmark ``recursive_kernels.lowrank_linear`` against the base matmul and the best eager PyTorch way.

For one adapter for all rows, one adapter per row (8 adapters) and the top 2 of 8 experts with gates,
at a decode size (M = 16) and a prefill size (M = 4096 on GPU, 256 on CPU), K = N = 4096 on GPU (1024
on CPU), r = 16, every available backend is timed, forward and forward+backward, beside

- base: the shared matmul alone (``F.linear``), the floor the fused op aims at;
- eager: base matmul, then per adapter: gather its rows, two small matmuls, scatter-add.

Printed per row: time, GFLOP/s (useful FLOPs: base plus low-rank), ``vs base`` and ``vs eager`` (that
baseline's time over this time: above 1 is faster), ``vs bytes`` (forward: the base's time scaled by the
bytes the row must move, over its time: the byte bound where the base is memory-bound, as at decode sizes)
and the error against eager in float64. Every case runs
by default (they are quick); ``--full`` adds nothing here.

    python -m recursive bench --only lowrank_linear [--device cuda] [--json out.json]
"""

from __future__ import annotations

import importlib.util
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

FORMS = ("one-adapter", "per-row", "top-2")
OPTIONAL = ("compiled", "peft")  # peers left out of a case where they fail to build or run
PEERS = ("eager", "compiled", "peft")  # what a user would run instead
COMPILED_FORMS = ("per-row",)  # timed under torch.compile by default (``--full``: per-row and top-2)
NUM_ADAPTERS = 8
RANK = 16
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Case:
    form: str
    M: int
    K: int
    N: int
    r: int = RANK
    E: int = NUM_ADAPTERS

    @property
    def slots(self) -> int:
        return 2 if self.form == "top-2" else 1

    def flops(self, backward: bool, lowrank: bool = True) -> float:
        """Useful FLOPs; ``lowrank=False`` counts the base matmul alone."""
        base = 2.0 * self.M * self.N * self.K
        lowrank = 2.0 * self.M * self.slots * self.r * (self.K + self.N) if lowrank else 0.0
        # forward; backward: dx and dW (two more base matmuls), dx's and dA/dB's low-rank terms
        return base + lowrank + (2 * base + 2 * lowrank if backward else 0.0)

    def forward_elements(self, lowrank: bool = True) -> int:
        """Elements a forward must read and write at least: x, the weight, the bias and y, and with
        ``lowrank`` the factors of every adapter a row can use (all E but for one-adapter, each once)."""
        base = self.M * self.K + self.N * self.K + self.N + self.M * self.N
        used = 1 if self.form == "one-adapter" else min(self.E, self.M * self.slots)
        return base + (used * self.r * (self.K + self.N) if lowrank else 0)

    @property
    def label(self) -> str:
        return f"{self.form} M={self.M} K={self.K} N={self.N} r={self.r}"


def default_cases(device: torch.device, full: bool = False) -> List[Case]:
    gpu = device.type == "cuda"
    size = 4096 if gpu else 1024
    rows = (16, 4096 if gpu else 256)
    return [Case(form, M, size, size) for M in rows for form in FORMS]


def make_inputs(case: Case, device: torch.device, dtype: torch.dtype, requires_grad: bool) -> Dict[str, object]:
    """Random inputs for one case; weights at typical init scales."""
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape, scale=1.0):
        t = (torch.randn(*shape, generator=gen) * scale).to(device=device, dtype=dtype)
        return t.requires_grad_(requires_grad)

    inputs = {
        "x": rand(case.M, case.K),
        "weight": rand(case.N, case.K, scale=case.K**-0.5),
        "bias": rand(case.N, scale=0.1),
        "lora_a": rand(case.E, case.r, case.K, scale=case.K**-0.5),
        "lora_b": rand(case.E, case.N, case.r, scale=case.r**-0.5),
        "scaling": 2.0,
        "gates": None,
    }
    if case.form == "one-adapter":
        inputs["indices"] = 3
    elif case.form == "per-row":
        inputs["indices"] = torch.randint(0, case.E, (case.M,), generator=gen).to(device)
    else:
        logits = torch.randn(case.M, case.E, generator=gen)
        top = logits.softmax(-1).topk(2, dim=-1)
        inputs["indices"] = top.indices.to(device)
        inputs["gates"] = top.values.to(device=device, dtype=dtype).requires_grad_(requires_grad)
    return inputs


def eager_lowrank_linear(x, weight, bias, lora_a, lora_b, indices, gates, scaling):
    """The best eager PyTorch way: base matmul, then per adapter gather rows, two matmuls, scatter-add."""
    y = F.linear(x, weight, bias)
    if isinstance(indices, int):
        return y + scaling * F.linear(F.linear(x, lora_a[indices]), lora_b[indices])
    flat = indices.reshape(x.shape[0], -1)
    rows = torch.arange(x.shape[0], device=x.device).repeat_interleave(flat.shape[1])
    flat = flat.reshape(-1)
    gate = gates.reshape(-1) if gates is not None else None
    for e in range(lora_a.shape[0]):
        sel = (flat == e).nonzero().squeeze(1)
        if sel.numel() == 0:
            continue
        sel_rows = rows[sel]
        delta = F.linear(F.linear(x[sel_rows], lora_a[e]), lora_b[e])
        weight_e = scaling if gate is None else scaling * gate[sel].unsqueeze(1)
        y = y.index_add(0, sel_rows, delta * weight_e)
    return y


def masked_lowrank_linear(x, weight, bias, lora_a, lora_b, indices, gates, scaling):
    """What a user writes for ``torch.compile`` (no data-dependent shapes): every adapter's down-projection at
    once, masked to each row's adapters (weighted by their gates), then one up-projection over all of them. It
    does E times the low-rank arithmetic, in three dense matmuls."""
    y = F.linear(x, weight, bias)
    if isinstance(indices, int):
        return y + scaling * F.linear(F.linear(x, lora_a[indices]), lora_b[indices])
    E, r, K = lora_a.shape
    slots = indices.reshape(x.shape[0], -1)  # (M, k)
    weights = torch.ones(slots.shape, dtype=x.dtype, device=x.device) if gates is None else gates.reshape(slots.shape)
    mask = torch.zeros(x.shape[0], E, dtype=x.dtype, device=x.device).scatter_add(1, slots.clamp(min=0),
                                                                                  weights * (slots >= 0))
    h = F.linear(x, lora_a.reshape(E * r, K)).view(-1, E, r) * mask[..., None]  # (M, E, r)
    return y + scaling * F.linear(h.reshape(-1, E * r), lora_b.permute(1, 0, 2).reshape(-1, E * r))


compiled_lowrank_linear = compiled_lazily(masked_lowrank_linear)


def peft_available() -> bool:
    return importlib.util.find_spec("peft") is not None


def peft_mixed_batch(inputs: Dict[str, object]) -> Callable[[], object]:
    """PEFT's mixed-batch inference (``adapter_names``, one adapter per row) on an ``nn.Linear`` with the case's
    E adapters loaded into PEFT's LoRA layers."""
    from peft import LoraConfig, get_peft_model

    x, weight = inputs["x"], inputs["weight"]
    lora_a, lora_b = inputs["lora_a"], inputs["lora_b"]
    rank = lora_a.shape[1]
    linear = torch.nn.Linear(weight.shape[1], weight.shape[0], device=x.device, dtype=x.dtype)
    with torch.no_grad():
        linear.weight.copy_(weight)
        linear.bias.copy_(inputs["bias"])
    config = LoraConfig(r=rank, lora_alpha=inputs["scaling"] * rank, target_modules=["proj"], lora_dropout=0.0)
    model = get_peft_model(_Projection(linear), config, adapter_name="0")
    for e in range(1, lora_a.shape[0]):
        model.add_adapter(str(e), config)
    layer = model.base_model.model.proj
    with torch.no_grad():
        for e in range(lora_a.shape[0]):
            layer.lora_A[str(e)].weight.copy_(lora_a[e])
            layer.lora_B[str(e)].weight.copy_(lora_b[e])
    names = [str(e) for e in inputs["indices"].tolist()]
    model.eval()

    def forward():
        with torch.no_grad():
            return model(x, adapter_names=names)

    return forward


class _Projection(torch.nn.Module):
    """A module around one linear layer, the target PEFT adapts (its ``proj``)."""

    def __init__(self, linear: torch.nn.Linear) -> None:
        super().__init__()
        self.proj = linear

    def forward(self, x):
        return self.proj(x)


def _callable(impl: str, inputs: Dict[str, object], backward: bool) -> Callable[[], object]:
    x, w, b = inputs["x"], inputs["weight"], inputs["bias"]
    lora = (inputs["lora_a"], inputs["lora_b"], inputs["indices"], inputs["gates"], inputs["scaling"])
    if impl == "peft":
        return peft_mixed_batch(inputs)  # inference only
    if impl == "base":
        forward = lambda: F.linear(x, w, b)  # noqa: E731
        params = [x, w, b]
    elif impl == "eager":
        forward = lambda: eager_lowrank_linear(x, w, b, *lora)  # noqa: E731
    elif impl == "compiled":
        forward = lambda: compiled_lowrank_linear(x, w, b, *lora)  # noqa: E731
    else:
        forward = lambda: recursive_kernels.lowrank_linear(x, w, b, *lora, backend=impl)  # noqa: E731
    if impl != "base":
        params = [t for t in (x, w, b, inputs["lora_a"], inputs["lora_b"], inputs["gates"]) if t is not None]
    if not backward:
        return forward
    with torch.no_grad():
        grad = seeded_like(forward())

    def step():
        return torch.autograd.grad(forward(), params, grad)

    return step


def steps(cases: List[Case], modes=MODES, compiled_forms=COMPILED_FORMS) -> int:
    """Progress units of ``run``: one per case and mode, and about 20 for each compile (a form in a mode)."""
    return len(cases) * len(modes) + 20 * len(modes) * sum(form in compiled_forms for form in {c.form for c in cases})


STEP_SECONDS = 1.25  # a step's rough time on a 2-core CPU, for the run's time left


def run(
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    modes=MODES,
    impls: Optional[List[str]] = None,
    cases: Optional[List[Case]] = None,
    progress: Optional[Steps] = None,
    compiled_forms=COMPILED_FORMS,
) -> Dict[str, object]:
    """``compiled_forms``: the forms timed under ``torch.compile`` too (each costs a compile of tens of seconds
    on a CPU)."""
    device, dtype = resolve(device, dtype)
    cases = cases or default_cases(device)
    backends = list(impls or available_backends("lowrank_linear", device, dtype))

    def impls_of(case: Case, mode: str) -> List[str]:
        peers = ["eager"] + (["compiled"] if case.form in compiled_forms else [])
        if case.form == "per-row" and mode == "fwd" and peft_available():
            peers.append("peft")
        return ["base", *peers, *backends]

    def prepare(case, backward, inputs_dtype=None):
        inputs = make_inputs(case, device, inputs_dtype or dtype, requires_grad=backward)
        return lambda impl: _callable(impl, inputs, backward)

    rows = []
    checked = ["eager", "compiled", "peft", *backends]
    for case, mode, times, errors in time_cases(cases, modes, impls_of, prepare, device, progress, checked,
                                                           optional=OPTIONAL):
        backward = mode == "fwd+bwd"
        peer = min((impl for impl in PEERS if impl in times), key=times.get)
        for impl, seconds in times.items():
            rows.append(
                {
                    "case": case.form,
                    "M": case.M,
                    "K": case.K,
                    "N": case.N,
                    "r": case.r,
                    "E": case.E,
                    "mode": mode,
                    "impl": impl,
                    "ms": seconds * 1e3,
                    "GFLOP/s": case.flops(backward, lowrank=impl != "base") / seconds / 1e9,
                    "vs base": times["base"] / seconds,
                    "vs bytes": (times["base"] * case.forward_elements(impl != "base") / case.forward_elements(False)
                                 / seconds) if not backward else None,
                    "vs eager": times["eager"] / seconds,
                    "peer": peer,
                    "vs peer": times[peer] / seconds,
                    "rel err": errors.get(impl),
                }
            )
    return {"machine": machine_description(device), "dtype": str(dtype).replace("torch.", ""), "rows": rows}


COLUMNS = [
    Column("case", "", "one-adapter: adapter 3 for every row; per-row: one of E adapters per row; top-2: two of E "
                       "experts per row, with gates"),
    Column("M", "d", "rows (tokens)"),
    Column("K", "d", "input features"),
    Column("N", "d", "output features"),
    Column("r", "d", "adapter rank"),
    Column("E", "d", "adapters (experts) stacked"),
    MODE,
    Column("impl", "", "base: the shared matmul alone (F.linear, no adapter), the floor; the peers: eager (base, then "
                       "per adapter gather, two matmuls, scatter-add), compiled (every adapter's low-rank product "
                       "masked to each row's, under torch.compile), peft (PEFT's mixed-batch LoRA, adapter_names, "
                       "inference); cpp/torch/triton/cuda: recursive_kernels.lowrank_linear on that backend"),
    TIME_MS,
    Column("GFLOP/s", ".1f", "useful FLOPs (base + low-rank; base: its own) / time"),
    Column("vs base", ".2f", speedup("base") + "; the fused op aims at 1"),
    Column("vs bytes", ".2f", "forward: the byte bound (base's time scaled by the bytes this row must move: x, W, "
                              "y and the factors of the adapters in use, over the base's) / this row's time; the "
                              "bound where the base is memory-bound (decode sizes), above 1: faster than it"),
    Column("vs eager", ".2f", speedup("eager")),
    Column("peer", "", "the fastest peer of the case and mode"),
    Column("vs peer", ".2f", speedup("that peer")),
    REL_ERR,
]


def render_result(result: Dict[str, object]) -> str:
    return render(f"lowrank_linear on {result['machine']}, {result['dtype']}", result, COLUMNS)
