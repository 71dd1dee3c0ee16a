"""recursive: the torch.nn layer of recursive-kernels (modules, models, command line).

- ``recursive.nn``: drop-in modules (``LowRankLinear``, ``CircuitAttention``, ``GatedFeedForward``,
  ``MoLFeedForward``, ``RecursiveBlock``).
- ``recursive.RecursiveConfig``, ``recursive.RecursiveForCausalLM``, ``recursive.RecursiveEncoder``: the
  model family, saved and loaded as ``config.json`` plus safetensors.
- ``recursive.convert_hf``: a Hugging Face Llama, Mistral, Qwen2 or Gemma causal LM as a recursive model, or a
  published looped model (HRM-Text) with its loops (``recursive.looped``); ``recursive.export_hf``: back.
- ``RecursiveForCausalLM.generate`` and ``recursive.DepthBatchingEngine``: generation with early exit and
  continuous depth-wise batching (``recursive.generation``).
- ``recursive.flops``: FLOP counts (forward, training step) and parameter counts from a config.
- ``recursive.training``: training on text files or token files, evaluation, checkpoints, DDP and FSDP2
  (``python -m recursive train``).
"""

from . import flops, looped, nn, training
from .config import RecursiveConfig
from .convert import convert_hf, export_hf
from .generation import DepthBatchingEngine
from .modeling import RecursiveEncoder, RecursiveForCausalLM, RecursiveModel, RecursivePreTrainedModel
from .outputs import CausalLMOutput, EncoderOutput, RecursiveModelOutput

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
    "looped",
    "nn",
    "training",
]
