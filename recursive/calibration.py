"""What a pretrained decoder's projections see: the (uncentred) covariance of each projection's inputs over
calibration tokens, which activation-aware initialisation weighs a low-rank approximation by.

The model is a Hugging Face causal LM of the shape :mod:`recursive.convert` reads (``model.layers[i]`` with
``input_layernorm``, ``self_attn.o_proj``, ``post_attention_layernorm`` and ``mlp.down_proj``). Four inputs
per layer, named by :data:`INPUTS`:

- ``"attention"``: the normalised residual stream before the attention, ``x / rms(x)`` without the norm's
  gain (q, k and v read it times the gain, or with the gain folded into their weights);
- ``"o"``: the attention's output before ``o_proj``;
- ``"mlp"``: the normalised residual stream before the MLP, without the gain (gate and up);
- ``"down"``: the MLP's hidden activation before ``down_proj``.
"""

from __future__ import annotations

from typing import Dict, Iterator, List, Sequence, Tuple

import torch
from torch import Tensor, nn

from recursive_kernels.backends import accumulation_dtype

INPUTS = ("attention", "o", "mlp", "down")
# The input each projection reads.
INPUT_OF_TARGET = {"q": "attention", "k": "attention", "v": "attention", "o": "o",
                   "gate": "mlp", "up": "mlp", "down": "down"}
# Covariances are held for a group of layers at a time, within this many bytes (float64): a 7B model's
# MLP input alone is 1.6 GB a layer, so large models calibrate in several passes over the data.
MEMORY_BYTES = 2 << 30
# Calibration windows per forward pass.
BATCH_ROWS = 8


def check_calibration(calibration, vocab_size: int) -> Tensor:
    """``calibration`` as a (N, S) int64 tensor of token ids, or ValueError naming it: a (N, S) or (S,) integer
    tensor of ids in [0, vocab_size), at least one token."""
    if not isinstance(calibration, Tensor) or calibration.dim() not in (1, 2) or calibration.is_floating_point() \
            or calibration.is_complex() or calibration.dtype == torch.bool or calibration.numel() == 0:
        raise ValueError(f"calibration: expected a non-empty (N, S) or (S,) tensor of token ids, got "
                         f"{getattr(calibration, 'shape', type(calibration).__name__)} "
                         f"{getattr(calibration, 'dtype', '')}".rstrip())
    low, high = int(calibration.min()), int(calibration.max())
    if low < 0 or high >= vocab_size:
        raise ValueError(f"calibration: token ids must lie in [0, {vocab_size}), got ids from {low} to {high}")
    return calibration.reshape(-1, calibration.shape[-1]).long()


def input_covariances(hf_model: nn.Module, calibration: Tensor, eps: float,
                      memory_bytes: int = MEMORY_BYTES) -> Iterator[Tuple[int, Dict[str, Tensor]]]:
    """``(layer, {input name: covariance (n, n), float64})`` for every decoder layer in order, each the mean of
    ``x x^T`` over the calibration tokens (``calibration``: (N, S) token ids, checked by
    :func:`check_calibration`). ``eps``: the model's RMSNorm epsilon. Layers are calibrated in groups that fit
    ``memory_bytes``, one pass over the data per group; a pass stops after the group's last layer."""
    layers = list(hf_model.model.layers)
    sizes = [_input_sizes(layer) for layer in layers]
    device = next(hf_model.parameters()).device
    calibration = calibration.to(device)
    training = hf_model.training
    hf_model.eval()
    try:
        start = 0
        while start < len(layers):
            stop = start + 1
            while stop < len(layers) and _bytes(sizes[start:stop + 1]) <= memory_bytes:
                stop += 1
            sums = _collect(hf_model, layers, range(start, stop), calibration, eps)
            for layer in range(start, stop):
                yield layer, sums.pop(layer)
            start = stop
    finally:
        hf_model.train(training)


def _input_sizes(layer: nn.Module) -> List[int]:
    return [layer.self_attn.q_proj.in_features, layer.self_attn.o_proj.in_features,
            layer.mlp.gate_proj.in_features, layer.mlp.down_proj.in_features]


def _bytes(sizes: Sequence[List[int]]) -> int:
    return sum(8 * n * n for layer in sizes for n in layer)


class _Hook:
    """A forward pre-hook handing one input of one layer to ``accumulate``."""

    def __init__(self, accumulate, layer: int, name: str) -> None:
        self.accumulate, self.layer, self.name = accumulate, layer, name

    def __call__(self, module: nn.Module, args) -> None:
        self.accumulate(self.layer, self.name, args[0], normalise=self.name in ("attention", "mlp"))


class _StopPass(Exception):
    """Raised by the hook on a group's last layer: the rest of the forward pass (the LM head too) is not needed."""


def _collect(hf_model: nn.Module, layers: List[nn.Module], group: range, calibration: Tensor,
             eps: float) -> Dict[int, Dict[str, Tensor]]:
    sums: Dict[int, Dict[str, Tensor]] = {layer: {} for layer in group}
    tokens = calibration.numel()

    def accumulate(layer: int, name: str, x: Tensor, normalise: bool) -> None:
        # a batch's products in float32 (or float64 for a float64 model), which is 4x faster than float64 on a
        # CPU and exact enough for a covariance that is damped anyway; the sum over batches in float64
        x = x.reshape(-1, x.shape[-1]).to(accumulation_dtype(x.dtype))
        if normalise:  # RMSNorm without its gain, as every supported family computes it
            x = x * torch.rsqrt(x.square().mean(-1, keepdim=True) + eps)
        update = (x.T @ x).to(torch.float64) / tokens
        sums[layer][name] = sums[layer][name] + update if name in sums[layer] else update

    def stop(*_):
        raise _StopPass

    handles = []
    for layer in group:
        modules = {"attention": layers[layer].input_layernorm, "o": layers[layer].self_attn.o_proj,
                   "mlp": layers[layer].post_attention_layernorm, "down": layers[layer].mlp.down_proj}
        for name, module in modules.items():
            handles.append(module.register_forward_pre_hook(_Hook(accumulate, layer, name)))
    handles.append(layers[group.stop - 1].register_forward_hook(stop))
    try:
        with torch.no_grad():
            for rows in calibration.split(BATCH_ROWS):
                try:
                    hf_model(input_ids=rows, use_cache=False)
                except _StopPass:
                    pass
    finally:
        for handle in handles:
            handle.remove()
    return sums
