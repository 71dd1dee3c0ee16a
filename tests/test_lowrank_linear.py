"""``recursive_kernels.lowrank_linear``: every backend on this machine against a float64 reference.

Error rule (FlashAttention's): a backend's error against float64 is at most twice the error of the same
computation done eagerly by PyTorch in the tested dtype, plus half an ulp of the dtype relative to the
magnitude of the summed terms (the op evaluated on the inputs' absolute values): where terms cancel, the
last bits of a result are noise for every method.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import warnings
from dataclasses import dataclass
from typing import Dict, Optional

import pytest
import torch

import recursive_kernels
from recursive_kernels import BackendUnavailableError, backends
from recursive_kernels.lowrank_linear import _lowrank_linear_backward_op, _lowrank_linear_op
from tests.helpers import assert_error_rule, per_backend, relative_error, serving_backends

GRAD_NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "gates")


@dataclass(frozen=True)
class Shape:
    M: int
    K: int
    N: int
    E: int = 0  # adapters; 0: plain linear
    r: int = 0
    k: int = 1  # slots per row
    form: str = "per-row"  # "none" (indices None), "int", "per-row", "top-k"
    lead: tuple = ()  # leading dims instead of (M,)
    noncontiguous: bool = False
    bias: bool = True

    def __str__(self):
        return f"M{self.M}-K{self.K}-N{self.N}-E{self.E}-r{self.r}-k{self.k}-{self.form}" + (
            "-nc" if self.noncontiguous else ""
        )


SHAPES = [
    Shape(0, 17, 3, E=2, r=4),  # zero rows
    Shape(1, 3, 17, E=1, r=1, form="none"),  # rank 1, indices None with E = 1
    Shape(3, 17, 113, E=16, r=16),  # per-row with -1 and unused adapters
    Shape(17, 113, 17, E=16, r=16, k=2, form="top-k"),  # mixture with gates
    Shape(113, 17, 3, E=4, r=1, form="int", bias=False),  # one adapter for all rows
    Shape(17, 3, 1, E=3, r=16, k=2, form="top-k", noncontiguous=True),
    Shape(0, 5, 7, E=3, r=2, k=2, form="top-k"),
    Shape(6, 33, 40, E=5, r=8, form="per-row", lead=(2, 3), noncontiguous=True),
    Shape(5, 19, 23),  # plain linear
    Shape(4, 8, 8, E=2, r=0),  # rank 0: a plain linear
]


def make_inputs(shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0) -> Dict[str, object]:
    """Random inputs, drawn in float64 on the CPU so every dtype and device sees the same numbers."""
    gen = torch.Generator().manual_seed(seed)
    lead = shape.lead or (shape.M,)
    M = 1
    for d in lead:
        M *= d

    def rand(*s, scale=1.0):
        return torch.randn(*s, generator=gen, dtype=torch.float64) * scale

    if shape.noncontiguous:  # every other column of a wider tensor
        x = rand(*lead, 2 * shape.K)[..., ::2]
    else:
        x = rand(*lead, shape.K)
    inputs = {
        "x": x,
        "weight": rand(shape.N, shape.K, scale=shape.K**-0.5),
        "bias": rand(shape.N) if shape.bias else None,
        "lora_a": None,
        "lora_b": None,
        "indices": None,
        "gates": None,
        "scaling": 1.5,
    }
    if shape.E:
        inputs["lora_a"] = rand(shape.E, shape.r, shape.K, scale=shape.K**-0.5)
        inputs["lora_b"] = rand(shape.E, shape.N, shape.r)
        if shape.form == "int":
            inputs["indices"] = shape.E - 1
        elif shape.form in ("per-row", "top-k"):
            idx_shape = lead if shape.form == "per-row" else (*lead, shape.k)
            # -1 slots, and adapter 0 never used when E > 2
            low = 1 if shape.E > 2 else 0
            idx = torch.randint(low, shape.E, idx_shape, generator=gen)
            idx[torch.rand(idx_shape, generator=gen) < 0.2] = -1
            inputs["indices"] = idx
            if shape.form == "top-k":
                inputs["gates"] = torch.rand(idx_shape, generator=gen, dtype=torch.float64)
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.dtype == torch.float64:
            value = value.to(device=device, dtype=dtype)
        elif isinstance(value, torch.Tensor):
            value = value.to(device)
        out[name] = value
    return out


def run(inputs, backend: str, grad_out: Optional[torch.Tensor] = None):
    """Output and gradients of every differentiable input (None where not applicable)."""
    leaves = {}
    args = dict(inputs)
    for name in GRAD_NAMES:
        if isinstance(args[name], torch.Tensor):
            args[name] = args[name].detach().requires_grad_(True)
            leaves[name] = args[name]
    y = recursive_kernels.lowrank_linear(**args, backend=backend)
    if grad_out is None:
        return y, {}
    grads = torch.autograd.grad(y, list(leaves.values()), grad_out.to(y.dtype), allow_unused=True)
    return y, dict(zip(leaves, grads))


def cast(inputs, dtype, device):
    out = {}
    for name, value in inputs.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(device=device, dtype=dtype)
        elif isinstance(value, torch.Tensor):
            value = value.to(device)
        out[name] = value
    return out


def check_against_reference(shape: Shape, backend: str, device: torch.device, dtype: torch.dtype, seed=0):
    inputs64 = make_inputs(shape, torch.float64, torch.device("cpu"), seed)
    y64, _ = run(inputs64, "torch")
    gen = torch.Generator().manual_seed(seed + 1)
    if shape.noncontiguous:  # a non-contiguous upstream gradient too
        grad_out = torch.randn(*y64.shape[:-1], 2 * y64.shape[-1], generator=gen, dtype=torch.float64)[..., ::2]
    else:
        grad_out = torch.randn(y64.shape, generator=gen, dtype=torch.float64)
    y64, g64 = run(inputs64, "torch", grad_out)
    # The op and its gradients are sums of products of the inputs: evaluated on their absolute values they
    # give the magnitude of the terms, the scale of an unavoidable rounding when the terms cancel.
    magnitude = {name: value.abs() if isinstance(value, torch.Tensor) and value.is_floating_point() else value
                 for name, value in inputs64.items()}
    abs_y, abs_g = run(magnitude, "torch", grad_out.abs())

    inputs = cast(inputs64, dtype, device)
    y, g = run(inputs, backend, grad_out.to(device))
    assert y.dtype == dtype and y.shape == y64.shape and y.device.type == device.type
    if dtype == torch.float64:  # the eager float64 computation is the reference itself
        eager_y, eager_g, half_ulp = y64, g64, 1e-13
    else:
        eager_y, eager_g = run(cast(inputs64, dtype, device), "torch", grad_out.to(device))
        half_ulp = torch.finfo(dtype).eps / 2
    pairs = [("y", y, eager_y, y64, abs_y)] + [(n, g.get(n), eager_g.get(n), g64.get(n), abs_g.get(n))
                                               for n in GRAD_NAMES]
    for name, ours, eager, ref, terms in pairs:
        if ref is None:
            assert ours is None, f"{name}: gradient given where the reference has none"
            continue
        assert ours is not None, f"{name}: missing gradient"
        assert ours.dtype == dtype, f"{name}: dtype {ours.dtype}, expected {dtype}"
        floor = half_ulp * max(1.0, terms.norm().item() / max(ref.norm().item(), 1e-30))
        assert_error_rule(name, ours, ref, eager, dtype, floor)


def kernel_backends(dtype):
    """Backends other than the reference itself (comparing the reference with itself cannot fail)."""
    return [p for p in serving_backends("lowrank_linear", dtype) if p.values[0] != "torch"]


def test_reference_matches_per_row_loop():
    """The oracle against the formula written row by row and slot by slot, forward and gradients."""
    inputs = make_inputs(Shape(7, 9, 5, E=3, r=2, k=2, form="top-k"), torch.float64, torch.device("cpu"), seed=9)
    names = ["x", "weight", "bias", "lora_a", "lora_b", "gates"]
    leaves = [inputs[n].detach().requires_grad_(True) for n in names]
    x, w, b, a, bb, g = leaves
    s, idx = inputs["scaling"], inputs["indices"]
    rows = []
    for t in range(x.shape[0]):
        row = x[t] @ w.T + b
        for j in range(idx.shape[1]):
            e = int(idx[t, j])
            if e >= 0:
                row = row + s * g[t, j] * ((a[e] @ x[t]) @ bb[e].T)
        rows.append(row)
    loop = torch.stack(rows)
    gy = torch.randn_like(loop)
    loop_grads = torch.autograd.grad(loop, leaves, gy)
    y, grads = run(inputs, "torch", gy)
    torch.testing.assert_close(y, loop, rtol=1e-12, atol=1e-12)
    for n, lg in zip(names, loop_grads):
        torch.testing.assert_close(grads[n], lg, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend,device", kernel_backends(torch.float32))
def test_float32_matches_float64_reference(shape, backend, device):
    check_against_reference(shape, backend, device, torch.float32)


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("backend,device", kernel_backends(torch.bfloat16))
def test_bfloat16_error_at_most_twice_eager(shape, backend, device):
    check_against_reference(shape, backend, device, torch.bfloat16)


@pytest.mark.parametrize("backend,device", kernel_backends(torch.float64))
def test_float64_matches_reference(backend, device):
    for shape in SHAPES[:5]:
        check_against_reference(shape, backend, device, torch.float64, seed=3)


@pytest.mark.parametrize("shape", [SHAPES[2], SHAPES[3], SHAPES[4], SHAPES[1]], ids=str)
@pytest.mark.parametrize("backend,device", serving_backends("lowrank_linear", torch.float64))
def test_gradcheck_float64(shape, backend, device):
    small = Shape(min(shape.M, 4), min(shape.K, 5), min(shape.N, 6), min(shape.E, 3), min(shape.r, 2), shape.k,
                  shape.form)
    inputs = make_inputs(small, torch.float64, device, seed=7)
    names = [n for n in GRAD_NAMES if isinstance(inputs[n], torch.Tensor)]
    tensors = [inputs[n].detach().clone().requires_grad_(True) for n in names]

    def fn(*ts):
        args = dict(inputs)
        args.update(zip(names, ts))
        return recursive_kernels.lowrank_linear(**args, backend=backend)

    assert torch.autograd.gradcheck(fn, tensors, eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("backend,device", kernel_backends(torch.bfloat16))
@pytest.mark.parametrize("needs", [(1, 0, 1, 0, 1, 1), (0, 1, 0, 1, 0, 0)], ids=["some", "others"])
def test_backward_dtypes_match_the_fake_in_bfloat16(backend, device, needs):
    """Each backend's backward gives every gradient, computed or an empty placeholder, in the dtype the op's fake
    implementation gives (what torch.compile checks: a frozen weight in bf16 would break it otherwise); no rows, so
    that no kernel runs where the Triton interpreter cannot take bf16 products."""
    E, r, K, N, slots = 3, 2, 8, 6, 2
    dtype = torch.bfloat16
    x, grad_y = torch.zeros(0, K, dtype=dtype, device=device), torch.zeros(0, N, dtype=dtype, device=device)
    weight = torch.randn(N, K, dtype=dtype, device=device)
    lora_a, lora_b = (torch.randn(E, r, K, dtype=dtype, device=device),
                      torch.randn(E, N, r, dtype=dtype, device=device))
    indices = torch.zeros(0, slots, dtype=torch.long, device=device)
    gates = torch.zeros(0, slots, dtype=dtype, device=device)
    u = torch.zeros(0, slots, r, device=device)
    grads = _lowrank_linear_backward_op(grad_y, x, weight, lora_a, lora_b, indices, gates, 1.0, -1, u, list(needs),
                                        backend)
    assert [g.dtype for g in grads] == [dtype] * 6  # x, weight, bias, factors and gates are all bf16 here


@pytest.mark.parametrize("backend,device", serving_backends("lowrank_linear", torch.float32))
def test_shared_weight_gradient_is_sum_over_depths(backend, device):
    """A weight reused at 3 depths (each with its own adapter) gets the sum of the untied copies' grads."""
    gen = torch.Generator().manual_seed(11)
    K, depths, E, r = 24, 3, 3, 4
    x = torch.randn(5, K, generator=gen).to(device)
    weight = (torch.randn(K, K, generator=gen) * K**-0.5).to(device).requires_grad_(True)
    lora_a = (torch.randn(E, r, K, generator=gen) * 0.2).to(device).requires_grad_(True)
    lora_b = (torch.randn(E, K, r, generator=gen) * 0.2).to(device).requires_grad_(True)
    h = x
    for depth in range(depths):
        h = h + recursive_kernels.lowrank_linear(h, weight, None, lora_a, lora_b, depth, backend=backend)
    h.square().sum().backward()

    copies = [weight.detach().clone().requires_grad_(True) for _ in range(depths)]
    h = x
    for depth in range(depths):
        h = h + torch.nn.functional.linear(h, copies[depth]) + (h @ lora_a[depth].T) @ lora_b[depth].T
    h.square().sum().backward()
    unrolled = sum(c.grad for c in copies)
    assert relative_error(weight.grad, unrolled) < 1e-5


@pytest.mark.parametrize("backend,device", serving_backends("lowrank_linear", torch.float32))
def test_per_row_equals_single_adapter_calls(backend, device):
    """Depth-wise batching: rows at different depths in one call equal one call per depth."""
    inputs = make_inputs(Shape(12, 16, 20, E=4, r=4, form="per-row"), torch.float32, device, seed=5)
    idx = torch.tensor([0, 1, 2, 3] * 3, device=device)
    together = recursive_kernels.lowrank_linear(**{**inputs, "indices": idx}, backend=backend)
    for depth in range(4):
        rows = idx == depth
        alone = recursive_kernels.lowrank_linear(**{**inputs, "x": inputs["x"][rows], "indices": depth},
                                                 backend=backend)
        torch.testing.assert_close(together[rows], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend,device", kernel_backends(torch.float32))
def test_inference_calls_the_backend_without_autograd(backend, device, monkeypatch):
    """Under no_grad, or with no input requiring grad, the op skips autograd.Function: the same output, no graph."""
    inputs = make_inputs(Shape(12, 16, 20, E=4, r=4, k=2, form="top-k"), torch.float32, device, seed=6)
    tracked = {n: t.detach().requires_grad_() if isinstance(t, torch.Tensor) and t.is_floating_point() else t
               for n, t in inputs.items()}
    expected = recursive_kernels.lowrank_linear(**tracked, backend=backend)
    assert expected.grad_fn is not None
    module = importlib.import_module("recursive_kernels.lowrank_linear")

    def no_function(*args):
        raise AssertionError("autograd.Function used without a graph to record")

    monkeypatch.setattr(module._LowRankLinearFunction, "apply", no_function)
    with torch.no_grad():
        inferred = recursive_kernels.lowrank_linear(**tracked, backend=backend)
    untracked = recursive_kernels.lowrank_linear(**inputs, backend=backend)
    for y in (inferred, untracked):
        assert y.grad_fn is None
        torch.testing.assert_close(y, expected.detach(), rtol=0, atol=0)


# ----------------------------------------------------------------------------------- bad inputs


def _good():
    return make_inputs(Shape(4, 6, 5, E=3, r=2, k=2, form="top-k"), torch.float32, torch.device("cpu"))


@pytest.mark.parametrize(
    "change,argument",
    [
        (lambda a: a.update(weight=a["weight"][:, :-1]), "weight"),
        (lambda a: a.update(weight=a["weight"].double()), "weight"),
        (lambda a: a.update(weight=a["weight"].to("meta")), "weight"),
        (lambda a: a.update(bias=a["bias"][:-1]), "bias"),
        (lambda a: a.update(bias=a["bias"].half()), "bias"),
        (lambda a: a.update(lora_b=None), "lora_a, lora_b"),
        (lambda a: a.update(lora_a=a["lora_a"][:, :, :-1]), "lora_a"),
        (lambda a: a.update(lora_b=a["lora_b"][:2]), "lora_b"),
        (lambda a: a.update(lora_a=a["lora_a"].bfloat16()), "lora_a"),
        (lambda a: a.update(indices=a["indices"][:2]), "indices"),
        (lambda a: a.update(indices=a["indices"].float()), "indices"),
        (lambda a: a.update(indices=None, gates=None), "indices"),  # E = 3 needs indices
        (lambda a: a.update(gates=a["gates"][:, :1]), "gates"),
        (lambda a: a.update(gates=a["gates"].long()), "gates"),
        (lambda a: a.update(indices=1), "gates"),  # gates without a tensor of indices
        (lambda a: a.update(scaling="2"), "scaling"),
        (lambda a: a.update(scaling=float("nan")), "scaling"),
        (lambda a: a.update(scaling=float("inf")), "scaling"),
        (lambda a: a.update(x=a["x"].long()), "x"),
        (lambda a: a.update(lora_a=None, lora_b=None, gates=None), "indices"),
        (lambda a: a.update(lora_a=None, lora_b=None, indices=None), "gates"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(change, argument):
    args = _good()
    change(args)
    with pytest.raises(ValueError, match=f"^{argument}:"):
        recursive_kernels.lowrank_linear(**args, backend="torch")


@pytest.mark.parametrize("bad", [-2, 3, 7])
def test_index_out_of_range_raises_index_error(bad):
    args = _good()
    args["indices"][1, 0] = bad
    with pytest.raises(IndexError, match="indices"):
        recursive_kernels.lowrank_linear(**args, backend="torch")
    args = _good()
    with pytest.raises(IndexError, match="indices"):
        recursive_kernels.lowrank_linear(**{**args, "indices": bad, "gates": None}, backend="torch")


def test_trusted_indices_skip_the_host_read(monkeypatch):
    """check_indices=False gives the same result without reading the indices on the host."""
    import importlib

    # the package exports a function of that name
    op_module = importlib.import_module("recursive_kernels.lowrank_linear")
    args = _good()
    expected = recursive_kernels.lowrank_linear(**args, backend="torch")

    def no_host_read(*unused, **unused_kw):
        raise AssertionError("the indices were read on the host")

    monkeypatch.setattr(op_module, "check_index_values", no_host_read)
    torch.testing.assert_close(recursive_kernels.lowrank_linear(**args, backend="torch", check_indices=False), expected,
                               rtol=0, atol=0)
    with pytest.raises(AssertionError, match="host"):
        recursive_kernels.lowrank_linear(**args, backend="torch")


def test_explicit_backend_that_cannot_serve_raises_with_reasons():
    args = _good()
    with pytest.raises(BackendUnavailableError, match="cuda needs CUDA tensors|torch sees no CUDA device"):
        recursive_kernels.lowrank_linear(**args, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="unknown backend 'nope'"):
        recursive_kernels.lowrank_linear(**args, backend="nope")
    with pytest.raises(BackendUnavailableError, match="triton does not support torch.float64"):
        recursive_kernels.lowrank_linear(**cast(args, torch.float64, torch.device("cpu")), backend="triton")


def test_environment_variable_selects_backend(monkeypatch):
    args = _good()
    monkeypatch.setenv(backends.ENV_VAR, "nope")
    with pytest.raises(BackendUnavailableError, match=backends.ENV_VAR):
        recursive_kernels.lowrank_linear(**args)
    monkeypatch.setenv(backends.ENV_VAR, "torch")
    assert backends.select("lowrank_linear", torch.device("cpu"), dtype=torch.float32) == "torch"


def test_automatic_fallback_warns_once(monkeypatch):
    monkeypatch.setitem(backends._install_cache, "cpp", "pretend the extension is missing")
    monkeypatch.setattr(backends, "_warned", set())
    monkeypatch.setattr(backends, "_selections", {})  # choices made before the pretence
    args = _good()
    with pytest.warns(RuntimeWarning, match="falling back from the cpp backend to torch: pretend"):
        recursive_kernels.lowrank_linear(**args)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        recursive_kernels.lowrank_linear(**args)


def test_cpu_auto_order_prefers_cpp_when_built():
    chosen = backends.select("lowrank_linear", torch.device("cpu"), dtype=torch.float32)
    assert chosen == ("cpp" if backends.install_reason("cpp") is None else "torch")


# ------------------------------------------------------------- torch.library and torch.compile

@pytest.mark.parametrize("dtype,backend,device", per_backend((torch.float32, torch.bfloat16), kernel_backends))
@pytest.mark.parametrize("shape", [SHAPES[3], SHAPES[4], SHAPES[8]], ids=str)
def test_opcheck(shape, dtype, backend, device):
    """The custom ops' schema, fake (meta) results, autograd registration and compiled dispatch, in float32 and
    bfloat16 (the placeholders of gradients not computed must come in the fake's dtype)."""
    inputs = make_inputs(shape, dtype, device, seed=2)
    from recursive_kernels.lowrank_linear import _normalise

    lead, x2d, bias, lora_a, lora_b, indices, gates, adapter = _normalise(
        inputs["x"], inputs["weight"], inputs["bias"], inputs["lora_a"], inputs["lora_b"],
        inputs["indices"], inputs["gates"], inputs["scaling"], check_indices=True,
    )
    args = [t.requires_grad_(True) if isinstance(t, torch.Tensor) and t.is_floating_point() else t
            for t in (x2d.detach(), inputs["weight"], bias, lora_a, lora_b)]
    torch.library.opcheck(_lowrank_linear_op, (*args, indices, gates, 1.5, adapter, backend))


# Many assignments of few adapters: the Triton backward's weight-gradient programs (ROWS = 32 assignments each under
# the interpreter) contend for every element of dA and dB.
CONTENDED = Shape(300, 40, 24, E=2, r=8, form="per-row")


@pytest.mark.parametrize("dtype,backend,device", per_backend((torch.float32, torch.bfloat16), kernel_backends))
@pytest.mark.parametrize("deterministic", [False, True], ids=["atomic", "deterministic"])
def test_contended_weight_gradients_meet_the_error_rule(dtype, backend, device, deterministic):
    """dA and dB summed by many programs (atomically, in a varying order) or, under
    torch.use_deterministic_algorithms, by one program per adapter and column tile, meet the error rule."""
    with deterministic_algorithms(deterministic):
        check_against_reference(CONTENDED, backend, device, dtype, seed=8)


@pytest.mark.parametrize("backend,device", [p for p in kernel_backends(torch.float32) if p.values[0] == "triton"])
def test_atomic_weight_gradients_repeat_within_float32_ulps(backend, device):
    """The documented tolerance of the atomically summed dA and dB: two runs differ by at most a few float32 ulps
    of each element's summed magnitude (on a GPU the order of the additions varies; the interpreter is exact)."""
    inputs = make_inputs(CONTENDED, torch.float32, device, seed=9)
    grad_out = torch.randn(CONTENDED.M, CONTENDED.N, generator=torch.Generator().manual_seed(3)).to(device)
    _, first = run(inputs, backend, grad_out)
    _, second = run(inputs, backend, grad_out)
    magnitude = {n: v.abs() if isinstance(v, torch.Tensor) and v.is_floating_point() else v for n, v in inputs.items()}
    _, terms = run(magnitude, "torch", grad_out.abs())
    for name in ("lora_a", "lora_b"):
        tolerance = 8 * torch.finfo(torch.float32).eps * terms[name]
        assert ((first[name] - second[name]).abs() <= tolerance).all(), name


NO_TRITON = backends.install_reason("triton")


@pytest.mark.skipif(NO_TRITON is not None, reason=str(NO_TRITON))
def test_deterministic_algorithms_give_one_weight_gradient_program_per_adapter(monkeypatch):
    """Under torch.use_deterministic_algorithms the weight-gradient reduction is not split across programs."""
    from recursive_kernels import triton_lowrank_linear as module

    meta = {"ROWS": 32, "BLOCK_Q": 16}
    assert module.outer_grid(300, 40, 2, split=True)(meta) == (10 + 2, 3)
    assert module.outer_grid(300, 40, 2, split=False)(meta) == (2, 3)
    assert module.outer_grid(300, 40, 0, split=False)(meta) == (1, 3)  # single-adapter mode
    splits = []
    monkeypatch.setattr(module, "outer_grid", _recording(module.outer_grid, splits))
    inputs = make_inputs(CONTENDED, torch.float32, torch.device("cpu"), seed=1)
    grad_out = torch.randn(CONTENDED.M, CONTENDED.N)
    for deterministic in (False, True):
        with deterministic_algorithms(deterministic):
            run(inputs, "triton", grad_out)
    assert splits == [True, True, False, False]  # dA and dB, then both again


def _recording(function, calls):
    def recorded(*args):
        calls.append(args[-1])
        return function(*args)
    return recorded


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool):
    before = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(enabled, warn_only=True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn_only)


@pytest.mark.skipif(NO_TRITON is not None, reason=str(NO_TRITON))
def test_stored_tuning_choices_load_once_and_skip_stale_entries(tmp_path, monkeypatch):
    """A GPU run's autotuning choices (triton_tuning.dump) go back into the autotuners' caches at the first launch
    on a device of that model (triton_tuning.load); a configuration no longer in a kernel's space is ignored."""
    from recursive_kernels import triton_lowrank_linear, triton_tuning

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "A Test GPU")
    monkeypatch.setattr(triton_tuning, "_loaded", set())
    tuner = triton_lowrank_linear._seg_shrink_kernel
    monkeypatch.setattr(tuner, "cache", {(16, 64, 1, 16, True, "torch.bfloat16"): tuner.configs[0]})
    path = str(tmp_path / "tuning.json")
    triton_tuning.dump(torch.device("cuda", 0), path)
    table = json.load(open(path))
    entries = table[triton_tuning.device_key(torch.device("cuda", 0))]["_seg_shrink_kernel"]
    assert entries[0][0] == [16, 64, 1, 16, True, "torch.bfloat16"]
    stale = {"kwargs": {"BLOCK_M": 999, "BLOCK_K": 16}, "num_warps": 1, "num_stages": 1}
    entries.append([[32, 64, 1, 16, True, "torch.bfloat16"], stale])
    json.dump(table, open(path, "w"))
    tuner.cache = {}
    assert triton_tuning.load(torch.device("cuda", 0), path) == 1
    assert tuner.cache == {(16, 64, 1, 16, True, "torch.bfloat16"): tuner.configs[0]}
    assert triton_tuning.load(torch.device("cuda", 0), path) == 0  # once per device
    assert triton_tuning.load(torch.device("cpu"), path) == 0


@pytest.mark.parametrize("backend,device", serving_backends("lowrank_linear", torch.float32))
def test_compile_fullgraph_matches_eager(backend, device):
    inputs = make_inputs(Shape(6, 16, 12, E=4, r=4, k=2, form="top-k"), torch.float32, device, seed=4)
    params = {n: inputs[n].detach().requires_grad_(True) for n in ("x", "weight", "lora_a", "lora_b", "gates")}

    def fn(x, weight, lora_a, lora_b, gates):
        y = recursive_kernels.lowrank_linear(x, weight, inputs["bias"], lora_a, lora_b, inputs["indices"], gates,
                                   inputs["scaling"], backend=backend)
        return torch.tanh(y).sum()

    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    eager_out = fn(**params)
    eager_grads = torch.autograd.grad(eager_out, list(params.values()))
    out = compiled(**params)
    grads = torch.autograd.grad(out, list(params.values()))
    torch.testing.assert_close(out, eager_out)
    for a, b in zip(grads, eager_grads):
        torch.testing.assert_close(a, b)


@pytest.mark.skipif(backends.install_reason("cpp") is not None, reason="the cpp extension is not built")
@pytest.mark.parametrize("path", ["loops", "grouped"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=str)
def test_cpp_both_paths(path, dtype, monkeypatch):
    """The cpp backend picks hand-written loops (decode sizes) or one matmul per adapter (prefill sizes)
    by problem size; force each path on every shape so both are checked."""
    monkeypatch.setenv("RECURSIVE_KERNELS_CPU_PATH", path)
    for seed, shape in enumerate(SHAPES):
        check_against_reference(shape, "cpp", torch.device("cpu"), dtype, seed=seed)


@pytest.mark.parametrize("backend,device", serving_backends("lowrank_linear", torch.bfloat16))
def test_autocast_runs_in_the_autocast_dtype(backend, device):
    """Under torch.autocast the op equals the op on inputs cast to the autocast dtype, and the float32
    parameters get float32 gradients (autograd through the casts)."""
    gen = torch.Generator().manual_seed(5)
    x, weight, bias = (torch.randn(*s, generator=gen).to(device) for s in ((9, 16), (12, 16), (12,)))
    lora_a, lora_b = torch.randn(3, 4, 16, generator=gen).to(device), torch.randn(3, 12, 4, generator=gen).to(device)
    indices = torch.randint(-1, 3, (9, 2), generator=gen).to(device)
    gates = torch.rand(9, 2, generator=gen).to(device)
    params = [t.requires_grad_() for t in (x, weight, bias, lora_a, lora_b, gates)]
    low = [t.detach().bfloat16().requires_grad_() if t is not gates else gates.detach().requires_grad_()
           for t in params]
    grad = torch.randn(9, 12, generator=gen).to(device)

    with torch.autocast(device.type, dtype=torch.bfloat16):
        y = recursive_kernels.lowrank_linear(*params[:5], indices, params[5], 0.5, backend=backend)
    expected = recursive_kernels.lowrank_linear(*low[:5], indices, low[5], 0.5, backend=backend)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y, expected, rtol=0, atol=0)
    y.backward(grad)
    expected.backward(grad.bfloat16())
    for p, q in zip(params, low):
        assert p.grad.dtype == p.dtype
        torch.testing.assert_close(p.grad, q.grad.to(p.dtype), rtol=0, atol=0)
