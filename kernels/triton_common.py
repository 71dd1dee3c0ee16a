"""Helpers shared by the Triton backends: interpreter detection, autotuning keys, dots and casts that
stay exact under ``TRITON_INTERPRET=1``, launch guards.

Under the interpreter (CPU tensors) ``tl.dot`` multiplies the raw bits of bfloat16 operands, rounds
float32 products by the tile's shape, and float32 -> bfloat16 conversions truncate; the ``UPCAST`` paths
below work around all three, so the kernels stay testable on machines without a GPU.
"""

from __future__ import annotations

import contextlib
import math
import os
from typing import List

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import triton_tuning

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# RECURSIVE_KERNELS_TRITON_AUTOTUNE=0: every kernel runs one default configuration, its smallest tiles (they
# fit the shared memory of every shape), so a first launch compiles one variant and times
# nothing (a test suite on a GPU: minutes less, the same choice every run).
AUTOTUNE = os.environ.get("RECURSIVE_KERNELS_TRITON_AUTOTUNE", "1") != "0"


def config(num_warps: int, num_stages: int, **meta) -> triton.Config:
    return triton.Config(meta, num_warps=num_warps, num_stages=num_stages)


def tuning_space(configs: List[triton.Config]) -> List[triton.Config]:
    """A kernel's autotuning space, or only its smallest configuration (fewest tile elements, then fewest
    pipeline stages) when autotuning is off."""
    if AUTOTUNE:
        return configs
    return [min(configs, key=lambda c: (math.prod(c.kwargs[k] for k in c.kwargs if k.startswith("BLOCK_")),
                                        c.num_stages))]


def bucket(n: int) -> int:
    """Autotuning key of a size that varies freely (rows, sequence length): its power-of-two bucket, capped."""
    return min(triton.next_power_of_2(max(int(n), 1)), 8192)


def block_width(width: int) -> int:
    """Register-tile width of a head dim or rank (tl.dot needs >= 16)."""
    return max(16, triton.next_power_of_2(max(int(width), 1)))


def dot_precision(dtype: torch.dtype):
    """input_precision of dots whose operands are in the input dtype: float32 stays exact (no TF32)."""
    return "ieee" if dtype == torch.float32 else None


def device_guard(x: Tensor):
    """Launch on x's GPU (Triton launches on the current device), its stored tuning choices loaded first."""
    if not x.is_cuda:
        return contextlib.nullcontext()
    triton_tuning.load(x.device)
    return torch.cuda.device(x.device)


@triton.jit
def mma(a, b, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    """acc += a @ b with fp32 accumulation.

    UPCAST (the interpreter): the product in float64, rounded once to acc's dtype. The interpreter's
    float32 dot is numpy's sgemm, whose rounding depends on the tile shape, so a kernel recomputing a
    product on other tiles (attention's backward, its scores) would get other bits than the forward; a
    GPU's dot sums each element in one order whatever the tile. Float64 also keeps bfloat16 operands
    off the interpreter's bfloat16 dot (it multiplies their raw bits)."""
    if UPCAST:
        acc = (tl.dot(a.to(tl.float64), b.to(tl.float64)) + acc.to(tl.float64)).to(acc.dtype)
    else:
        acc = tl.dot(a, b, acc, input_precision=PREC)
    return acc


@triton.jit
def cast(x, dtype: tl.constexpr, UPCAST: tl.constexpr):
    """x.to(dtype), rounding to nearest even. Under the interpreter (UPCAST) float32 -> bfloat16 is
    rounded by hand: the interpreter truncates that conversion, the GPU rounds it."""
    if UPCAST and dtype == tl.bfloat16:
        bits = x.to(tl.float32).to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF).to(tl.uint32)
        out = (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        out = x.to(dtype)
    return out
