"""Pure-PyTorch references: the spec of every op, the test oracle and the last-resort ``torch`` backend.

Written for clarity, differentiable by autograd, float64-capable. They take the normalised inputs that
the public ops hand to every backend (see ``kernels/lowrank_linear.py``).
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor


def lowrank_linear_ref(
    x: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    lora_a: Optional[Tensor],
    lora_b: Optional[Tensor],
    indices: Optional[Tensor],
    gates: Optional[Tensor],
    scaling: float,
    adapter: int,
) -> Tensor:
    """``y[t] = x[t] W^T + b + s * sum_j g[t, j] (x[t] A_e^T) B_e^T`` with ``e = indices[t, j]``.

    Shapes: x (M, K), weight (N, K), bias (N,), lora_a (E, r, K), lora_b (E, N, r), indices (M, k)
    int64 with -1 for an empty slot, gates (M, k) or None (= 1). With ``indices`` None every row uses
    adapter ``adapter``. Returns (M, N).

    Each adapter's update is computed for all rows and weighted by the rows' summed gates for it, so
    the reference needs no data-dependent shapes (and no host synchronisation).
    """
    y = F.linear(x, weight, bias)
    if lora_a is None:
        return y
    if indices is None:
        return y + scaling * F.linear(F.linear(x, lora_a[adapter]), lora_b[adapter])
    g = torch.ones(indices.shape, dtype=x.dtype, device=x.device) if gates is None else gates.to(x.dtype)
    for e in range(lora_a.shape[0]):
        row_weight = (g * (indices == e)).sum(-1, keepdim=True)  # (M, 1)
        y = y + scaling * row_weight * F.linear(F.linear(x, lora_a[e]), lora_b[e])
    return y
