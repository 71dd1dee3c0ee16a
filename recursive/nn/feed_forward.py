"""The gated feed-forward modules: ``GatedFeedForward`` (SwiGLU/GeGLU with per-depth LoRA) and
``MoLFeedForward`` (a mixture of LoRA experts with a top-k router)."""

from __future__ import annotations

from typing import Mapping, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from recursive_kernels.backends import accumulation_dtype
from recursive_kernels.lowrank_linear import check_index_values

from ..config import FEED_FORWARD_TARGETS
from ..factorization import truncated_svd
from ..losses import load_balancing_loss
from .functional import activation
from .linear import AdapterIndex, LowRankLinear, target_ranks


class _GatedProjections(nn.Module):
    """The gated MLP ``down_proj(act(gate_proj(x)) * up_proj(x))`` (no biases) that both feed-forward
    modules are built on, with ``num_adapters`` LoRA adapters on each projection of nonzero rank."""

    def __init__(self, hidden_size, intermediate_size, hidden_act, num_adapters, lora_rank, lora_alpha, backend,
                 device, dtype) -> None:
        super().__init__()
        self.hidden_size, self.intermediate_size, self.lora_alpha, self.backend = (
            hidden_size, intermediate_size, lora_alpha, backend)
        self.num_adapters = num_adapters
        self.hidden_act, self.act = hidden_act, activation(hidden_act)
        ranks = target_ranks(lora_rank, FEED_FORWARD_TARGETS)
        options = {"num_adapters": num_adapters, "alpha": lora_alpha, "backend": backend, "device": device,
                   "dtype": dtype}
        self.gate_proj = LowRankLinear(hidden_size, intermediate_size, False, rank=ranks["gate"], **options)
        self.up_proj = LowRankLinear(hidden_size, intermediate_size, False, rank=ranks["up"], **options)
        self.down_proj = LowRankLinear(intermediate_size, hidden_size, False, rank=ranks["down"], **options)

    def _gated(self, x: Tensor, indices: AdapterIndex, gates: Optional[Tensor], check_indices: bool = True) -> Tensor:
        """The MLP with the same adapter selection in all three projections (a tensor ``indices`` is
        checked once here, when ``check_indices``, not by each projection)."""
        if check_indices and isinstance(indices, Tensor) and self.num_adapters:
            check_index_values(indices, self.num_adapters)
        hidden = (self.act(self.gate_proj(x, indices, gates, check_indices=False))
                  * self.up_proj(x, indices, gates, check_indices=False))
        return self.down_proj(hidden, indices, gates, check_indices=False)


class GatedFeedForward(_GatedProjections):
    """Gated MLP ``down_proj(act(gate_proj(x)) * up_proj(x))``: SwiGLU with "silu", GeGLU with "gelu" or
    "gelu_pytorch_tanh"; optional per-depth LoRA adapters on each projection. No biases.

    Args:
        hidden_size, intermediate_size: widths.
        hidden_act: the activation's Hugging Face name.
        num_adapters: E adapters on each projection with a nonzero rank.
        lora_rank: rank of every projection, or a mapping from some of "gate", "up", "down" to ranks.
        lora_alpha: LoRA alpha.
        backend: kernels backend, None for automatic.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        *,
        num_adapters: int = 0,
        lora_rank: Union[int, Mapping[str, int]] = 0,
        lora_alpha: float = 8.0,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__(hidden_size, intermediate_size, hidden_act, num_adapters, lora_rank, lora_alpha, backend,
                         device, dtype)

    def forward(self, x: Tensor, indices: AdapterIndex = None, *, check_indices: bool = True) -> Tensor:
        """x (*, hidden) -> (*, hidden); ``indices`` and ``check_indices`` as :meth:`LowRankLinear.forward`'s."""
        return self._gated(x, indices, None, check_indices)


class MoLFeedForward(_GatedProjections):
    """Gated MLP with a mixture of LoRA experts inside its shared projections (ModernALBERT).

    A router ``p = softmax(W_r x)`` keeps the top-k experts of each token, and every projection becomes
    ``W x + s * sum_{i in topk} p_i B_i A_i x`` (the probabilities are not renormalised over the top k):
    one :func:`recursive_kernels.lowrank_linear` call per projection with (*, k) indices and gates. The router is
    trained through the gates; the load-balancing loss ``E * sum_i f_i P_i`` (f_i: the fraction of
    routing slots given to expert i, P_i: its mean probability; 1 at uniform routing) keeps experts in use.

    Args:
        hidden_size, intermediate_size, hidden_act: as :class:`GatedFeedForward`.
        num_experts: E LoRA experts on each projection with a nonzero rank.
        top_k: experts per token.
        lora_rank: rank of every projection, or a mapping from some of "gate", "up", "down" to ranks.
        lora_alpha: LoRA alpha.
        backend: kernels backend, None for automatic.

    Parameters: the projections' ``weight``, ``lora_a``, ``lora_b`` and ``router.weight`` (E, hidden).
    """

    adapter_parameters = ("router.weight",)

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        hidden_act: str = "silu",
        *,
        num_experts: int = 8,
        top_k: int = 2,
        lora_rank: Union[int, Mapping[str, int]] = 8,
        lora_alpha: float = 8.0,
        backend: Optional[str] = None,
        device=None,
        dtype=None,
    ) -> None:
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts: expected an int >= 1, got {num_experts!r}")
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k: expected an int in [1, num_experts={num_experts}], got {top_k!r}")
        super().__init__(hidden_size, intermediate_size, hidden_act, num_experts, lora_rank, lora_alpha, backend,
                         device, dtype)
        self.num_experts, self.top_k = num_experts, top_k
        self.router = nn.Linear(hidden_size, num_experts, bias=False, device=device, dtype=dtype)

    def route(self, x: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """x (*, hidden) -> ``(gates, experts, probs)``: the top-k probabilities (*, k) (differentiable),
        their experts (*, k) int64 and all router probabilities (*, E), in float32 (float64 for float64)."""
        probs = torch.softmax(self.router(x).to(accumulation_dtype(x.dtype)), dim=-1)
        gates, experts = probs.topk(self.top_k, dim=-1)
        return gates, experts, probs

    def forward(self, x: Tensor, token_mask: Optional[Tensor] = None) -> Tuple[Tensor, Tensor]:
        """Args:
            x: (*, hidden).
            token_mask: (*,) bool, the tokens that count in the load-balancing loss (not padding);
                None: all.

        Returns:
            ``(output, load_balancing_loss)``: (*, hidden) and a scalar.
        """
        gates, experts, probs = self.route(x)
        output = self._gated(x, experts, gates, check_indices=False)  # top-k experts: in range by construction
        return output, load_balancing_loss(probs, experts, token_mask)

    @torch.no_grad()
    def merge_experts(self, calibration: Tensor, rank: Optional[int] = None) -> GatedFeedForward:
        """Compress the mixture into one adapter per projection, for inference.

        ``dW = sum_i pbar_i * s * B_i A_i`` with ``pbar`` the mean routing weight (gate, 0 when not
        chosen) of each expert over the ``calibration`` inputs (*, hidden), refactored to rank ``rank``
        (default: the experts' rank; clamped to the projection's size, where it is exact) by a truncated
        SVD (:func:`recursive.factorization.truncated_svd`), ``dW ~ U_r S_r V_r^T``: ``A = V_r^T``, ``B = U_r S_r / s``.

        Returns:
            A :class:`GatedFeedForward` with one adapter (call it without ``indices``) sharing this
            module's base weights; it may replace this module in a :class:`RecursiveBlock`.
        """
        if (not isinstance(calibration, Tensor) or calibration.shape[-1:] != (self.hidden_size,)
                or calibration.numel() == 0):
            raise ValueError(f"calibration: expected a non-empty tensor (*, hidden={self.hidden_size}), "
                             f"got {getattr(calibration, 'shape', type(calibration).__name__)}")
        gates, experts, probs = self.route(calibration)
        routing = torch.zeros_like(probs).scatter_add_(-1, experts, gates)
        mean_routing = routing.reshape(-1, self.num_experts).mean(0)  # pbar, (E,)
        merged = GatedFeedForward(self.hidden_size, self.intermediate_size, self.hidden_act, lora_alpha=self.lora_alpha,
                                  backend=self.backend, device="meta")  # its projections are replaced below
        for name in ("gate_proj", "up_proj", "down_proj"):
            mixture: LowRankLinear = getattr(self, name)
            target_rank = mixture.rank if rank is None else rank
            single = LowRankLinear.from_linear(mixture, 1, target_rank, self.lora_alpha, backend=self.backend)
            if single.lora_a is not None and mixture.lora_a is not None:
                compute = accumulation_dtype(mixture.weight.dtype)
                delta = mixture.scaling * torch.einsum(
                    "e,enr,erk->nk", mean_routing.to(compute), mixture.lora_b.to(compute), mixture.lora_a.to(compute)
                )
                left, right = truncated_svd(delta, single.rank)
                single.lora_a.copy_(right[None])
                single.lora_b.copy_((left / single.scaling)[None])
            setattr(merged, name, single)
        return merged

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, top_k={self.top_k}"
