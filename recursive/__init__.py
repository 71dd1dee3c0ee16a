"""recursive: the torch.nn layer of recursive-kernels (modules, models, command line).

- ``recursive.nn``: drop-in modules (``LowRankLinear``, ``CircuitAttention``, ``GatedFeedForward``,
  ``MoLFeedForward``, ``RecursiveBlock``).
- ``recursive.RecursiveConfig``, ``recursive.RecursiveForCausalLM``, ``recursive.RecursiveEncoder``: the
  model family, saved and loaded as ``config.json`` plus safetensors.
"""

from . import nn
from .config import RecursiveConfig
from .modeling import (
    CausalLMOutput,
    EncoderOutput,
    RecursiveEncoder,
    RecursiveForCausalLM,
    RecursiveModel,
    RecursiveModelOutput,
    RecursivePreTrainedModel,
)

__all__ = [
    "CausalLMOutput",
    "EncoderOutput",
    "RecursiveConfig",
    "RecursiveEncoder",
    "RecursiveForCausalLM",
    "RecursiveModel",
    "RecursiveModelOutput",
    "RecursivePreTrainedModel",
    "nn",
]
