"""recursive: the torch.nn layer of recursive-kernels (modules, models, command line).

- ``recursive.nn``: drop-in modules (``LowRankLinear``, ``CircuitAttention``, ``GatedFeedForward``,
  ``MoLFeedForward``, ``RecursiveBlock``).
- ``recursive.RecursiveConfig``, ``recursive.RecursiveForCausalLM``, ``recursive.RecursiveEncoder``: the
  model family, saved and loaded as ``config.json`` plus safetensors.
- ``recursive.convert_hf``: a Hugging Face Llama, Mistral, Qwen2 or Gemma causal LM as a recursive model;
  ``recursive.export_hf``: back, merged and untied.
- ``RecursiveForCausalLM.generate`` and ``recursive.DepthBatchingEngine``: generation with early exit and
  continuous depth-wise batching (``recursive.generation``).
- ``recursive.flops``: FLOP counts (forward, training step) and parameter counts from a config.
- ``recursive.train``: uptraining on a generated corpus (``python -m recursive train``).
"""

import kernels as _kernels

if not hasattr(_kernels, "lowrank_linear"):
    raise ImportError(
        f"`import kernels` found {getattr(_kernels, '__file__', None) or _kernels}, not recursive-kernels' ops: another "
        "package named `kernels` (Hugging Face's hub kernels, which transformers >= 5.25 requires) comes first "
        "on sys.path. Use transformers < 5.25 with recursive-kernels and `pip uninstall kernels`, or keep the "
        "two in separate environments."
    )

from . import flops, nn, train  # noqa: E402
from .config import RecursiveConfig  # noqa: E402
from .convert import convert_hf, export_hf  # noqa: E402
from .generation import DepthBatchingEngine  # noqa: E402
from .modeling import (  # noqa: E402
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
    "DepthBatchingEngine",
    "EncoderOutput",
    "RecursiveConfig",
    "RecursiveEncoder",
    "RecursiveForCausalLM",
    "RecursiveModel",
    "RecursiveModelOutput",
    "RecursivePreTrainedModel",
    "convert_hf",
    "export_hf",
    "flops",
    "nn",
    "train",
]
