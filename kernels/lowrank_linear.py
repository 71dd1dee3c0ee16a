"""``lowrank_linear``: a shared-weight matmul fused with gathered low-rank (LoRA) updates.

    y[t] = x[t] @ weight.T + bias + scaling * sum_j gates[t, j] * (x[t] @ lora_a[e].T) @ lora_b[e].T,
    e = indices[t, j]

One op serves every recursive-transformer variant: one adapter for all rows (a depth's LoRA), one
adapter per row (tokens of different depths in one batch) and k adapters per row with gates (a mixture
of LoRA experts). A plain linear (no adapters, or rank 0) is ``torch.nn.functional.linear`` whatever the
backend: nothing to fuse, and the vendor GEMM with native autograd costs least per call. This file
validates and normalises the inputs, picks a backend (see
``recursive_kernels.backends``) and wires the compiled backends into autograd: eager calls through a
``torch.autograd.Function``, and ``torch.compile`` through ``torch.library`` custom ops with fake
implementations (so ``fullgraph=True`` works and ``torch.library.opcheck`` passes).

Backend interface. Every backend module provides two functions over the normalised inputs
(``kernels/reference.py`` is their spec; the ``torch`` backend runs it directly under autograd):

``forward(x, weight, bias, lora_a, lora_b, indices, gates, scaling, adapter) -> (y, u)``
    x (M, K) with any strides, M may be 0; weight (N, K); bias (N,) or None; lora_a (E, r, K) and
    lora_b (E, N, r), both None for a plain linear (r >= 1 otherwise); indices None (every row uses
    adapter ``adapter``) or int64 (M, k) validated in [-1, E); gates None or (M, k) float32 (float64 for
    float64 x), only with tensor indices. Returns y (M, N) in x's dtype and u (M, k, r) = x @ A_e^T,
    unscaled and ungated, in the accumulator dtype (float32; float64 for float64 x), zero in -1 slots;
    u is empty when there is no adapter.

``backward(grad_y, x, weight, lora_a, lora_b, indices, gates, scaling, adapter, u, needs)``
    -> gradients of (x, weight, bias, lora_a, lora_b, gates), each in its input's dtype, a distinct
    empty tensor where ``needs`` (six bools) is False. With v[t, j] = grad_y[t] @ B_e:
    dx = grad_y @ W + s * sum_j g v_j @ A_e; dW = grad_y^T @ x; dbias = sum_t grad_y[t];
    dA_e = s * sum over the slots of e of g v^T x[t]; dB_e = s * sum over the slots of e of g grad_y[t]^T u;
    dgates = s * <u, v> (0 in -1 slots).
"""

from __future__ import annotations

import math
from typing import List, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from . import backends
from .reference import lowrank_linear_ref

OP = "lowrank_linear"
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


# backend name -> (module, forward function, backward function), all with the normalised interface.
_IMPLS = {
    "triton": ("recursive_kernels.triton_lowrank_linear", "forward", "backward"),
    "cpp": ("recursive_kernels._C", "lowrank_linear_forward", "lowrank_linear_backward"),
    "cuda": ("recursive_kernels._C_cuda", "lowrank_linear_forward", "lowrank_linear_backward"),
}
backends.register_op(
    OP,
    {
        "torch": lambda device, dtype: [],
        "cpp": backends.dtype_check((torch.float32, torch.float64, torch.bfloat16, torch.float16), "cpp"),
        "triton": backends.dtype_check(_GPU_DTYPES, "triton"),
        "cuda": backends.dtype_check(_GPU_DTYPES, "cuda"),
    },
    _IMPLS,
)


@torch.library.custom_op("recursive_kernels::lowrank_linear", mutates_args=())
def _lowrank_linear_op(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    indices: Optional[Tensor],
    gates: Optional[Tensor],
    scaling: float,
    adapter: int,
    backend: str,
) -> Tuple[Tensor, Tensor]:
    """Returns ``y`` (M, N) and ``u = x @ A_e^T`` (M, k, r) in the accumulator dtype, kept for backward."""
    return tuple(backends.implementation(_IMPLS[backend], 0)(x, weight, bias, lora_a, lora_b, indices, gates, scaling,
                                                             adapter))


@_lowrank_linear_op.register_fake
def _(x, weight, bias, lora_a, lora_b, indices, gates, scaling, adapter, backend):
    y = x.new_empty(x.shape[0], weight.shape[0])
    acc = backends.accumulation_dtype(x.dtype)
    if lora_a is None:
        return y, x.new_empty(0, dtype=acc)
    slots = 1 if indices is None else indices.shape[1]
    return y, x.new_empty(x.shape[0], slots, lora_a.shape[1], dtype=acc)


@torch.library.custom_op("recursive_kernels::lowrank_linear_backward", mutates_args=())
def _lowrank_linear_backward_op(
    grad_y: Tensor,
    x: Tensor,
    weight: Tensor,
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    indices: Optional[Tensor],
    gates: Optional[Tensor],
    scaling: float,
    adapter: int,
    u: Tensor,
    needs: List[bool],
    backend: str,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Gradients for (x, weight, bias, lora_a, lora_b, gates); an empty tensor where ``needs`` is False."""
    return tuple(_backend_backward(grad_y, x, weight, lora_a, lora_b, indices, gates, scaling, adapter, u, list(needs),
                                   backend))


@_lowrank_linear_backward_op.register_fake
def _(grad_y, x, weight, lora_a, lora_b, indices, gates, scaling, adapter, u, needs, backend):
    shapes = [
        x.shape,
        weight.shape,
        (weight.shape[0],),
        None if lora_a is None else lora_a.shape,
        None if lora_b is None else lora_b.shape,
        None if gates is None else gates.shape,
    ]
    dtypes = [x.dtype, weight.dtype, x.dtype, x.dtype, x.dtype, None if gates is None else gates.dtype]
    out = []
    for need, shape, dtype in zip(needs, shapes, dtypes):
        if need and shape is not None:
            out.append(x.new_empty(shape, dtype=dtype))
        else:
            out.append(x.new_empty(0))
    return tuple(out)


def _save(ctx, inputs, u):
    x, weight, bias, lora_a, lora_b, indices, gates, scaling, adapter, backend = inputs
    ctx.save_for_backward(x, weight, lora_a, lora_b, indices, gates, u)
    ctx.scaling, ctx.adapter, ctx.backend, ctx.has_bias = scaling, adapter, backend, bias is not None


def _grads(ctx, grad_y, backward):
    """The ten input gradients from ``backward`` (the backward custom op, or the backend's function)."""
    x, weight, lora_a, lora_b, indices, gates, u = ctx.saved_tensors
    needs = [
        ctx.needs_input_grad[0],
        ctx.needs_input_grad[1],
        ctx.has_bias and ctx.needs_input_grad[2],
        lora_a is not None and ctx.needs_input_grad[3],
        lora_b is not None and ctx.needs_input_grad[4],
        gates is not None and ctx.needs_input_grad[6],
    ]
    if not any(needs):
        return (None,) * 10
    grads = backward(grad_y, x, weight, lora_a, lora_b, indices, gates, ctx.scaling, ctx.adapter, u, needs, ctx.backend)
    dx, dweight, dbias, dlora_a, dlora_b, dgates = (g if need else None for g, need in zip(grads, needs))
    return dx, dweight, dbias, dlora_a, dlora_b, None, dgates, None, None, None


def _op_setup_context(ctx, inputs, output):
    ctx.mark_non_differentiable(output[1])  # u is kept for backward, never a result for users
    _save(ctx, inputs, output[1])


_lowrank_linear_op.register_autograd(
    lambda ctx, grad_y, grad_u: _grads(ctx, grad_y, _lowrank_linear_backward_op), setup_context=_op_setup_context
)


def _backend_backward(grad_y, x, weight, lora_a, lora_b, indices, gates, scaling, adapter, u, needs, backend):
    return backends.implementation(_IMPLS[backend], 1)(grad_y, x, weight, lora_a, lora_b, indices, gates, scaling,
                                                       adapter, u, needs)


class _LowRankLinearFunction(torch.autograd.Function):
    """The eager path: the same backend functions as the custom ops, without the custom-op dispatch
    (tens of microseconds a call, which is most of a decode step's budget on the CPU)."""

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, indices, gates, scaling, adapter, backend):
        y, u = backends.implementation(_IMPLS[backend], 0)(x, weight, bias, lora_a, lora_b, indices, gates, scaling,
                                                           adapter)
        _save(ctx, (x, weight, bias, lora_a, lora_b, indices, gates, scaling, adapter, backend), u)
        return y

    @staticmethod
    def backward(ctx, grad_y):
        return _grads(ctx, grad_y, _backend_backward)


def _mismatch(name: str, tensor: Tensor, x: Tensor) -> None:
    """Raise for ``tensor`` not on x's device or not of x's dtype (the caller found one or the other)."""
    if tensor.device != x.device:
        raise ValueError(f"{name}: expected a tensor on {x.device} (like x), got {tensor.device}")
    raise ValueError(f"{name}: expected dtype {x.dtype} (like x), got {tensor.dtype}")


def check_index_values(indices: Tensor, num_adapters: int, name: str = "indices") -> None:
    """Raise IndexError for adapter indices outside [-1, E) (one host read); skipped where reading a value
    would need a host synchronisation that is not allowed (torch.compile tracing, CUDA graph capture)."""
    if indices.numel() == 0 or torch.compiler.is_compiling():
        return
    if indices.is_cuda and torch.cuda.is_current_stream_capturing():
        return
    low, high = torch.aminmax(indices)
    low, high = int(low), int(high)
    if low < -1 or high >= num_adapters:
        bad = low if low < -1 else high
        raise IndexError(f"{name}: value {bad} is outside [-1, {num_adapters}) (E = {num_adapters} adapters)")


def _normalise(x, weight, bias, lora_a, lora_b, indices, gates, scaling, check_indices):
    """Validate the public arguments (x: a tensor, checked by the caller); return the backend form (see the
    module docstring), x as (M, K) (a plain linear, which no backend sees: x as given)."""
    dtype, device = x.dtype, x.device
    if dtype not in _FLOAT_DTYPES:
        raise ValueError(f"x: expected a floating dtype (float16, bfloat16, float32, float64), got {dtype}")
    shape = x.shape
    if not shape:
        raise ValueError("x: expected at least one dimension (*, K), got a scalar")
    K = shape[-1]
    if not isinstance(weight, Tensor) or weight.dim() != 2 or weight.shape[1] != K:
        got = tuple(weight.shape) if isinstance(weight, Tensor) else type(weight).__name__
        raise ValueError(f"weight: expected shape (N, K={K}), got {got}")
    N = weight.shape[0]
    if bias is not None:
        if not isinstance(bias, Tensor) or bias.shape != (N,):
            raise ValueError(f"bias: expected shape (N={N},), got {tuple(getattr(bias, 'shape', ()))}")
    # dtype and device like x: one test per tensor on this path, which runs on every call
    if weight.dtype is not dtype or weight.device != device:
        _mismatch("weight", weight, x)
    if bias is not None and (bias.dtype is not dtype or bias.device != device):
        _mismatch("bias", bias, x)
    if isinstance(scaling, bool) or not isinstance(scaling, (int, float)) or not math.isfinite(scaling):
        raise ValueError(f"scaling: expected a finite Python number, got {scaling!r}")

    lead = shape[:-1]
    if (lora_a is None) != (lora_b is None):
        raise ValueError("lora_a, lora_b: give both low-rank factors or neither")
    if lora_a is None:
        if indices is not None:
            raise ValueError("indices: given without lora_a/lora_b")
        if gates is not None:
            raise ValueError("gates: given without lora_a/lora_b")
        return lead, x, bias, None, None, None, None, 0  # a plain linear takes x as it is
    x2d = x if len(shape) == 2 else x.reshape(-1, K)
    M = x2d.shape[0]

    a_shape = lora_a.shape
    if len(a_shape) != 3 or a_shape[2] != K:
        raise ValueError(f"lora_a: expected shape (E, r, K={K}), got {tuple(a_shape)}")
    E, r = a_shape[0], a_shape[1]
    if lora_b.shape != (E, N, r):
        raise ValueError(f"lora_b: expected shape (E={E}, N={N}, r={r}) to match lora_a and weight, "
                         f"got {tuple(lora_b.shape)}")
    if lora_a.dtype is not dtype or lora_a.device != device:
        _mismatch("lora_a", lora_a, x)
    if lora_b.dtype is not dtype or lora_b.device != device:
        _mismatch("lora_b", lora_b, x)

    adapter = 0
    if indices is None or isinstance(indices, int) and not isinstance(indices, bool):
        if gates is not None:
            raise ValueError("gates: per-slot gates need a tensor of indices shaped like them")
        if indices is None:
            if E != 1:
                raise ValueError(f"indices: required when lora_a holds E={E} adapters (None means adapter 0 of 1)")
        else:
            if not 0 <= indices < E:
                raise IndexError(f"indices: adapter {indices} is outside [0, {E})")
            adapter = indices
        indices = None
    elif isinstance(indices, Tensor):
        if indices.dtype.is_floating_point or indices.dtype.is_complex or indices.dtype == torch.bool:
            raise ValueError(f"indices: expected an integer tensor, got {indices.dtype}")
        if indices.device != device:
            raise ValueError(f"indices: expected a tensor on {device} (like x), got {indices.device}")
        if indices.shape == lead:
            slots = 1
        elif indices.dim() == len(lead) + 1 and indices.shape[:-1] == lead:
            slots = indices.shape[-1]
        else:
            raise ValueError(
                f"indices: expected shape {tuple(lead)} (one adapter per row) or {tuple(lead)} + (k,), "
                f"got {tuple(indices.shape)}"
            )
        if gates is not None:
            if not isinstance(gates, Tensor) or gates.shape != indices.shape:
                raise ValueError(f"gates: expected shape {tuple(indices.shape)} (like indices), "
                                 f"got {tuple(getattr(gates, 'shape', ()))}")
            if not gates.dtype.is_floating_point:
                raise ValueError(f"gates: expected a floating dtype, got {gates.dtype}")
            if gates.device != device:
                raise ValueError(f"gates: expected a tensor on {device} (like x), got {gates.device}")
            gates = gates.reshape(M, slots).to(backends.accumulation_dtype(dtype)).contiguous()
        if check_indices:
            check_index_values(indices, E)
        if indices.dtype != torch.int64:
            indices = indices.long()
        if indices.shape != (M, slots):
            indices = indices.reshape(M, slots)
        indices = indices.contiguous()
    else:
        raise ValueError(f"indices: expected None, an int or an integer tensor, got {type(indices).__name__}")

    if r == 0:  # a rank-0 update is zero: a plain linear
        return lead, x, bias, None, None, None, None, 0
    return lead, x2d, bias, lora_a, lora_b, indices, gates, adapter


def lowrank_linear(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor] = None,
    lora_a: Optional[Tensor] = None,
    lora_b: Optional[Tensor] = None,
    indices: Union[None, int, Tensor] = None,
    gates: Optional[Tensor] = None,
    scaling: float = 1.0,
    *,
    backend: Optional[str] = None,
    check_indices: bool = True,
) -> Tensor:
    """Shared-weight linear fused with gathered low-rank updates.

    Args:
        x: (*, K) float16, bfloat16, float32 (float64 on CPU backends); any leading dims, any strides.
        weight: (N, K), shared by every row, depth and expert.
        bias: (N,) or None.
        lora_a: (E, r, K) or None, PEFT's ``lora_A.weight`` of each adapter, stacked.
        lora_b: (E, N, r) or None, PEFT's ``lora_B.weight`` of each adapter, stacked.
        indices: None (adapter 0, E must be 1), an int (one adapter for every row), an integer tensor
            (*,) (one adapter per row) or (*, k) (k adapters per row); -1 leaves a slot empty.
        gates: None (all 1) or a float tensor shaped like ``indices``: the weight of each slot.
        scaling: PEFT's ``lora_alpha / r``.
        backend: "triton", "cuda", "cpp" or "torch"; default: ``RECURSIVE_KERNELS_BACKEND`` or automatic.
        check_indices: False skips reading a tensor ``indices`` on the host to check its values (one host
            synchronisation per call on the GPU); only for indices in range by construction, such as a
            router's top-k or indices a module checked once for several calls. Their dtype, shape and
            device are always checked.

    Returns:
        (*, N) in x's dtype. Differentiable in x, weight, bias, lora_a, lora_b and gates.

    Raises:
        IndexError: an index outside [-1, E).
        ValueError: a mismatched shape, dtype or device (the message names the argument).
        recursive_kernels.BackendUnavailableError: the requested backend cannot serve this input.

    Under ``torch.autocast`` the op is matmul-like: x, weight, bias, lora_a and lora_b run in the autocast
    dtype (gates keep theirs; they are summed in the accumulator dtype anyway).
    """
    if not isinstance(x, Tensor):
        raise ValueError(f"x: expected a tensor, got {type(x).__name__}")
    cast_to = backends.autocast_dtype(x)
    if cast_to is not None:
        x, weight, bias, lora_a, lora_b = backends.autocast_inputs(cast_to, x, weight, bias, lora_a, lora_b)
        with torch.autocast(x.device.type, enabled=False):  # the backends' own ATen calls stay as written
            return lowrank_linear(x, weight, bias, lora_a, lora_b, indices, gates, scaling, backend=backend,
                                  check_indices=check_indices)
    lead, x2d, bias, lora_a, lora_b, indices, gates, adapter = _normalise(
        x, weight, bias, lora_a, lora_b, indices, gates, scaling, check_indices
    )
    chosen = backends.select(OP, x.device, backend, dtype=x.dtype)  # also checks an explicit request
    if lora_a is None:  # a plain linear is torch's own on every backend: the vendor GEMM, native autograd
        return F.linear(x, weight, bias)
    scaling = float(scaling)
    if chosen == "torch":
        y = lowrank_linear_ref(x2d, weight, bias, lora_a, lora_b, indices, gates, scaling, adapter)
    else:
        y, = backends.dispatch(_lowrank_linear_op, _LowRankLinearFunction, _IMPLS,
                               (x2d, weight, bias, lora_a, lora_b, indices, gates, scaling, adapter, chosen),
                               (x2d, weight, bias, lora_a, lora_b, gates), outputs=1)
    return y if len(lead) == 1 else y.reshape(*lead, y.shape[1])
