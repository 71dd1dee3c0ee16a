"""``LowRankLinear``: ``nn.Linear`` with stacked PEFT-style LoRA adapters, run by one fused op."""

from __future__ import annotations

import math
from typing import Mapping, Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

import recursive_kernels
from recursive_kernels.backends import accumulation_dtype

from ..checks import check_int

AdapterIndex = Union[None, int, Tensor]


def target_ranks(lora_rank: Union[int, Mapping[str, int]], targets: Tuple[str, ...]) -> Mapping[str, int]:
    """One rank per target from an int (every target) or a mapping (a missing target: 0)."""
    if isinstance(lora_rank, Mapping):
        unknown = sorted(set(lora_rank) - set(targets))
        if unknown:
            raise ValueError(f"lora_rank: unknown targets {unknown}; expected some of {targets}")
        return {t: lora_rank.get(t, 0) for t in targets}
    return {t: lora_rank for t in targets}


class LowRankLinear(nn.Module):
    """``nn.Linear`` with ``num_adapters`` stacked LoRA adapters on the same weight.

    ``y = x W^T + b + scaling * sum_j g_j (x A_e^T) B_e^T`` over the adapters ``e`` selected for the
    row, computed by one :func:`recursive_kernels.lowrank_linear` call. With one adapter selected it equals PEFT's
    ``lora.Linear`` holding ``lora_A.weight = lora_a[e]``, ``lora_B.weight = lora_b[e]``.

    Args:
        in_features, out_features, bias, device, dtype: as for ``nn.Linear``.
        num_adapters: E, the number of stacked adapters.
        rank: r, clamped to ``min(in_features, out_features)`` (a higher rank adds nothing).
        alpha: PEFT's ``lora_alpha``; ``scaling = alpha / rank`` with the clamped rank.
        backend: kernels backend, None for automatic.

    With ``num_adapters`` or ``rank`` 0 the layer holds no adapters (both attributes read 0, ``scaling``
    0): a plain linear.

    Parameters: ``weight`` (N, K), ``bias`` (N,) or None, ``lora_a`` (E, r, K) and ``lora_b`` (E, N, r),
    both None without adapters. Initialised like ``nn.Linear`` and PEFT (``lora_a`` Kaiming-uniform,
    ``lora_b`` zeros, so a fresh adapter changes nothing).
    """

    # The parameters a relaxation adds to the shared model (RecursivePreTrainedModel.adapter_state_dict).
    adapter_parameters = ("lora_a", "lora_b")

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        device=None,
        dtype=None,
        *,
        num_adapters: int = 1,
        rank: int = 8,
        alpha: float = 8.0,
        backend: Optional[str] = None,
    ) -> None:
        super().__init__()
        for name, value in (("in_features", in_features), ("out_features", out_features),
                            ("num_adapters", num_adapters), ("rank", rank)):
            check_int(name, value, 0)
        self.in_features, self.out_features = in_features, out_features
        self.backend = backend
        self.weight = nn.Parameter(torch.empty(out_features, in_features, device=device, dtype=dtype))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)
        self._create_adapters(num_adapters, rank, alpha, device=device, dtype=dtype)
        self.reset_parameters()

    def _create_adapters(self, num_adapters: int, rank: int, alpha: float, device, dtype) -> None:
        rank = min(rank, self.in_features, self.out_features) if num_adapters else 0
        self.num_adapters = num_adapters if rank else 0  # both 0 when the layer holds no adapters
        self.rank = rank
        self.alpha = alpha
        self.scaling = alpha / self.rank if self.rank else 0.0
        if self.rank:
            self.lora_a = nn.Parameter(torch.empty(num_adapters, self.rank, self.in_features, device=device,
                                                   dtype=dtype))
            self.lora_b = nn.Parameter(torch.empty(num_adapters, self.out_features, self.rank, device=device,
                                                   dtype=dtype))
        else:
            self.register_parameter("lora_a", None)
            self.register_parameter("lora_b", None)

    def reset_parameters(self) -> None:
        """``nn.Linear``'s init of the weight and bias, then :meth:`reset_adapters`."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1.0 / math.sqrt(self.in_features) if self.in_features else 0.0
            nn.init.uniform_(self.bias, -bound, bound)
        self.reset_adapters()

    def reset_adapters(self) -> None:
        """PEFT's LoRA init: each ``lora_a[e]`` Kaiming-uniform (fan-in K), ``lora_b`` zeros."""
        if self.lora_a is None:
            return
        for lora_a in self.lora_a:  # one (r, K) matrix at a time, so the fan-in is K
            nn.init.kaiming_uniform_(lora_a, a=math.sqrt(5))
        nn.init.zeros_(self.lora_b)

    @classmethod
    def from_linear(
        cls, linear: nn.Module, num_adapters: int = 1, rank: int = 8, alpha: float = 8.0, backend: Optional[str] = None
    ) -> "LowRankLinear":
        """A layer whose ``weight`` and ``bias`` are ``linear``'s own parameters (shared, not copied),
        with fresh adapters on the same device and dtype."""
        weight = linear.weight
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta",
                    num_adapters=0, rank=0, backend=backend)
        layer.weight, layer.bias = linear.weight, linear.bias
        layer._create_adapters(num_adapters, rank, alpha, device=weight.device, dtype=weight.dtype)
        layer.reset_adapters()
        return layer

    @torch.no_grad()
    def merged_weight(self, adapter: int) -> Tensor:
        """``weight + scaling * lora_b[adapter] @ lora_a[adapter]`` (N, K), the weight of a plain linear that
        computes what this layer does with ``adapter`` selected; ``weight`` itself (not a copy) for -1 or
        a layer without adapters. Formed in at least float32 and rounded once to the weight's dtype."""
        if isinstance(adapter, bool) or not isinstance(adapter, int):
            raise ValueError(f"adapter: expected an int, got {adapter!r}")
        if self.lora_a is None or adapter == -1:
            return self.weight
        if not 0 <= adapter < self.num_adapters:
            raise IndexError(f"adapter: {adapter} is outside [-1, {self.num_adapters})")
        compute = accumulation_dtype(self.weight.dtype)
        delta = self.lora_b[adapter].to(compute) @ self.lora_a[adapter].to(compute)
        return (self.weight.to(compute) + self.scaling * delta).to(self.weight.dtype)

    def forward(self, x: Tensor, indices: AdapterIndex = None, gates: Optional[Tensor] = None, *,
                check_indices: bool = True) -> Tensor:
        """Args:
            x: (*, in_features).
            indices: None (adapter 0; E must be 1), an int in [-1, E) for every row, an int tensor (*,)
                (one adapter per row) or (*, k) (k adapters per row); -1: no adapter. A layer without
                adapters is a plain linear and ignores ``indices`` and ``gates``.
            gates: None (1 per slot) or a float tensor shaped like a tensor ``indices``.
            check_indices: as :func:`recursive_kernels.lowrank_linear` (False: a tensor ``indices`` is trusted to
                lie in [-1, E), saving a host synchronisation).

        Returns:
            (*, out_features).
        """
        plain = self.lora_a is None or (isinstance(indices, int) and not isinstance(indices, bool) and indices == -1)
        if plain:  # torch's own on every backend (as the op's plain path), without the op's per-call checks
            return F.linear(x, self.weight, self.bias)
        return recursive_kernels.lowrank_linear(
            x, self.weight, self.bias, self.lora_a, self.lora_b, indices, gates, self.scaling, backend=self.backend,
            check_indices=check_indices,
        )

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"num_adapters={self.num_adapters}, rank={self.rank}, scaling={self.scaling:g}")
