"""Backend registry and selection.

Every op family registers, per backend, a function that lists the reasons the backend cannot serve a
given input (an empty list means it can). Selection follows one rule for every op:

1. ``backend=`` argument, else the ``RECURSIVE_KERNELS_BACKEND`` environment variable: an explicit
   request. If that backend cannot serve the input, :class:`BackendUnavailableError` lists why.
2. Otherwise automatic: CUDA tensors try ``triton``, ``cuda``, ``torch``; CPU tensors try ``cpp``,
   ``torch``. A backend passed over for a reason warns once per (op, backend, reason).

The Triton backend serves CPU tensors only under ``TRITON_INTERPRET=1`` (the interpreter), which is how
the test suite checks the Triton code on machines without a GPU.
"""

from __future__ import annotations

import importlib
import json
import os
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

BACKENDS = ("triton", "cuda", "cpp", "torch")
ENV_VAR = "RECURSIVE_KERNELS_BACKEND"
_AUTO_ORDER = {"cuda": ("triton", "cuda", "torch"), "cpu": ("cpp", "torch")}


class BackendUnavailableError(RuntimeError):
    """Raised when an explicitly requested backend (or every candidate) cannot serve an input."""


def triton_interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def _import_reason(module: str) -> Optional[str]:
    try:
        importlib.import_module(module)
    except Exception as exc:  # an ImportError, or a broken build raising anything else
        return f"cannot import {module} ({type(exc).__name__}: {exc})"
    return None


def _left_out_at_build(extension: str) -> Optional[str]:
    """Why setup.py left ``extension`` out, from the record it writes beside the package; None if it did not."""
    try:
        with open(os.path.join(os.path.dirname(__file__), "_build.json")) as f:
            return json.load(f).get(extension)
    except (OSError, ValueError):
        return None


def _extension_reason(extension: str) -> Optional[str]:
    reason = _import_reason(extension)
    if reason is None:
        return None
    why = _left_out_at_build(extension)
    if why:
        return f"not built at install: {why}"
    return reason + "; build it with `pip install --no-build-isolation .` (or -e .) against the installed torch"


def _triton_reason() -> Optional[str]:
    return _import_reason("triton")


def _cpp_reason() -> Optional[str]:
    return _extension_reason("recursive_kernels._C")


def _cuda_reason() -> Optional[str]:
    if not torch.cuda.is_available():
        return "torch sees no CUDA device"
    return _extension_reason("recursive_kernels._C_cuda")


_INSTALL_REASON: Dict[str, Callable[[], Optional[str]]] = {
    "triton": _triton_reason,
    "cuda": _cuda_reason,
    "cpp": _cpp_reason,
    "torch": lambda: None,
}
_install_cache: Dict[str, Optional[str]] = {}


def install_reason(backend: str) -> Optional[str]:
    """Why ``backend`` is not usable on this machine at all, or None when it is (cached)."""
    if backend not in _install_cache:
        _install_cache[backend] = _INSTALL_REASON[backend]()
    return _install_cache[backend]


def device_reason(backend: str, device: torch.device) -> Optional[str]:
    """Why ``backend`` cannot run on tensors of ``device``, or None."""
    if backend == "torch":
        return None
    if backend == "triton":
        if device.type == "cuda" or (device.type == "cpu" and triton_interpreting()):
            return None
        return f"triton needs CUDA tensors (or TRITON_INTERPRET=1 for CPU tensors), got {device.type}"
    if backend == "cuda" and device.type != "cuda":
        return f"cuda needs CUDA tensors, got {device.type}"
    if backend == "cpp" and device.type != "cpu":
        return f"cpp needs CPU tensors, got {device.type}"
    return None


# op name -> backend -> function(inputs) -> reasons the backend cannot serve those inputs (op-specific).
SupportCheck = Callable[..., List[str]]
_OP_SUPPORT: Dict[str, Dict[str, SupportCheck]] = {}
# op name -> backend -> (module, forward function, backward function) of a compiled or Triton backend.
_OP_IMPLS: Dict[str, Dict[str, Tuple[str, ...]]] = {}


def autocast_dtype(tensor: torch.Tensor) -> Optional[torch.dtype]:
    """The dtype ``torch.autocast`` runs matmul-like ops in on ``tensor``'s device, or None outside autocast.
    Every op call asks, so the common device types skip building ``tensor.device.type``."""
    device_type = "cuda" if tensor.is_cuda else "cpu" if tensor.is_cpu else tensor.device.type
    return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None


def autocast_inputs(dtype: torch.dtype, *tensors):
    """The float16/bfloat16/float32 tensors among ``tensors`` cast to ``dtype``, the rest (None, integer
    indices, float64) unchanged: what autocast does to the inputs of a matmul-like op."""
    lower = (torch.float16, torch.bfloat16, torch.float32)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.dtype in lower else t for t in tensors)


def register_op(op: str, support: Dict[str, SupportCheck], impls: Dict[str, Tuple[str, ...]]) -> None:
    """Declare which backends implement ``op``, what inputs each one serves and where its functions are
    (every backend but ``torch``, whose reference the op calls itself)."""
    _OP_SUPPORT[op] = dict(support)
    _OP_IMPLS[op] = dict(impls)


_missing_cache: Dict[Tuple[str, str], Optional[str]] = {}


def _missing_reason(op: str, backend: str) -> Optional[str]:
    """Why the installed backend lacks ``op``'s functions (an extension built from older sources)."""
    key = (op, backend)
    if key not in _missing_cache:
        where = _OP_IMPLS[op][backend]
        try:
            implementation(where, 0), implementation(where, 1)
            _missing_cache[key] = None
        except (ImportError, AttributeError) as exc:
            _missing_cache[key] = (f"{op} is not in {where[0]} ({exc}); "
                                   "rebuild with `pip install --no-build-isolation -e .`")
    return _missing_cache[key]


def reasons(op: str, backend: str, device: torch.device, **inputs) -> List[str]:
    """Every reason ``backend`` cannot serve ``op`` for these inputs (empty when it can)."""
    if backend not in BACKENDS:
        return [f"unknown backend {backend!r}; choose one of {', '.join(BACKENDS)}"]
    found = []
    installed = install_reason(backend)
    if installed:
        found.append(installed)
    where = device_reason(backend, device)
    if where:
        found.append(where)
    check = _OP_SUPPORT[op].get(backend)
    if check is None:
        found.append(f"{backend} does not implement {op}")
        return found
    if not installed and backend in _OP_IMPLS[op]:
        missing = _missing_reason(op, backend)
        if missing:
            found.append(missing)
    found.extend(check(device=device, **inputs))
    return found


def dtype_check(supported: Sequence[torch.dtype], backend: str) -> SupportCheck:
    """A support check that serves the dtypes in ``supported``."""

    def check(device, dtype):
        if dtype in supported:
            return []
        return [f"{backend} does not support {dtype} (supports {', '.join(str(d) for d in supported)})"]

    return check


_implementations: Dict[Tuple[Tuple[str, ...], int], Callable] = {}


def implementation(where: Tuple[str, ...], which: int) -> Callable:
    """Function ``which`` (0 forward, 1 backward) of an op's backend, given as (module, forward, backward);
    found once, then kept (each op call asks for it)."""
    key = (where, which)
    function = _implementations.get(key)
    if function is None:
        module, *functions = where
        function = _implementations[key] = getattr(importlib.import_module(module), functions[which])
    return function


def dispatch(custom_op: Callable, function: type, impls: Dict[str, Tuple[str, ...]], args: Tuple,
             differentiable: Sequence[Optional[torch.Tensor]], outputs: int) -> Tuple:
    """Run an op on ``args`` (their last: the backend's name) the way the call needs: through its ``torch.library``
    custom op under ``torch.compile``, through its ``torch.autograd.Function`` when autograd records a call on
    ``differentiable``, else straight through the backend's forward (no autograd bookkeeping). Returns the op's
    first ``outputs`` outputs, those its ``autograd.Function`` returns."""
    if torch.compiler.is_compiling():
        return custom_op(*args)[:outputs]
    if records_graph(*differentiable):
        result = function.apply(*args)
        return result if isinstance(result, tuple) else (result,)
    return implementation(impls[args[-1]], 0)(*args[:-1])[:outputs]


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype sums, norms, softmaxes and low-rank intermediates accumulate in: float32 at least (float64 stays)."""
    return torch.promote_types(dtype, torch.float32)


def records_graph(*tensors: Optional[torch.Tensor]) -> bool:
    """Whether autograd would record a call on ``tensors``; when not (inference, ``torch.no_grad``), the ops
    call their backend directly, skipping ``autograd.Function``'s bookkeeping (a sizeable share of a small
    decode step)."""
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


_warned: set = set()


def _warn_once(op: str, backend: str, why: Sequence[str], chosen: str) -> None:
    key = (op, backend, tuple(why))
    if key in _warned:
        return
    _warned.add(key)
    warnings.warn(
        f"recursive-kernels: {op} is falling back from the {backend} backend to {chosen}: {'; '.join(why)}",
        RuntimeWarning,
        stacklevel=4,
    )


# (op, requested, environment variable, device, inputs) -> the backend chosen, or the error raised. The rest
# of what decides a choice does not change within a process (install state is cached; TRITON_INTERPRET
# counts only as Triton read it when its kernels were defined), and selecting anew costs microseconds on
# every call (a decode step makes dozens).
_selections: Dict[tuple, object] = {}


def select(op: str, device: torch.device, requested: Optional[str] = None, **inputs) -> str:
    """Pick the backend for one call of ``op`` (see the module docstring for the rule)."""
    key = (op, requested, os.environ.get(ENV_VAR), device, *inputs.items())
    chosen = _selections.get(key)
    if chosen is None:
        try:
            chosen = _select(op, device, requested, **inputs)
        except BackendUnavailableError as error:
            chosen = error
        _selections[key] = chosen
    if isinstance(chosen, BackendUnavailableError):
        raise BackendUnavailableError(*chosen.args)
    return chosen


def _select(op: str, device: torch.device, requested: Optional[str], **inputs) -> str:
    explicit = requested or os.environ.get(ENV_VAR) or None
    if explicit is not None:
        found = reasons(op, explicit, device, **inputs)
        if found:
            origin = "backend=" if requested else ENV_VAR
            raise BackendUnavailableError(
                f"{op}: backend {explicit!r} (from {origin}) cannot serve this input: " + "; ".join(found)
            )
        return explicit
    order = _AUTO_ORDER.get(device.type, ("torch",))
    passed_over = []
    for backend in order:
        found = reasons(op, backend, device, **inputs)
        if not found:
            for skipped, why in passed_over:
                _warn_once(op, skipped, why, backend)
            return backend
        passed_over.append((backend, found))
    detail = " | ".join(f"{b}: {'; '.join(w)}" for b, w in passed_over)
    raise BackendUnavailableError(f"{op}: no backend can serve this input ({detail})")


def report() -> Dict[str, Optional[str]]:
    """Backend name -> None when installed and usable on some device here, else the reason."""
    out = {}
    for backend in BACKENDS:
        why = install_reason(backend)
        if why is None and backend == "triton" and not torch.cuda.is_available() and not triton_interpreting():
            why = "installed, but no CUDA device (set TRITON_INTERPRET=1 to run it on the CPU interpreter)"
        out[backend] = why
    return out
