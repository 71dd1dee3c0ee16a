"""Reading the files a saved model or adapter is made of (a config as JSON, tensors as safetensors), with a
ValueError that names the argument, the file and what is wrong with it instead of the parsers' own errors."""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

import torch
from safetensors.torch import load_file

from .config import RecursiveConfig


def read_json(path: str, argument: str = "directory") -> Dict[str, Any]:
    """The JSON object in the file ``path``; a missing or malformed file, or one that holds no object, raises
    ValueError naming ``argument`` and the file."""
    try:
        with open(path) as f:
            values = json.load(f)
    except OSError as exc:
        raise ValueError(f"{argument}: cannot read {path!r} ({exc})") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{argument}: {path!r} is not valid JSON ({exc})") from None
    if not isinstance(values, dict):
        raise ValueError(f"{argument}: {path!r} holds a {type(values).__name__}, not a config object")
    return values


def read_config(path: str, argument: str = "directory") -> RecursiveConfig:
    """The config in the JSON file ``path``; a missing, malformed or invalid one raises ValueError naming
    ``argument`` and the file."""
    values = read_json(path, argument)
    try:
        return RecursiveConfig.from_dict(values)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{argument}: {path!r} is not a valid config ({exc})") from None


def read_weights(path: str, device: Optional[torch.device] = None,
                 argument: str = "directory") -> Dict[str, torch.Tensor]:
    """The tensors of the safetensors file ``path`` on ``device`` (default CPU); a truncated or damaged file
    raises ValueError naming ``argument`` and the file."""
    try:
        return load_file(path, device=str(torch.device(device or "cpu")))
    except Exception as exc:  # safetensors raises its own SafetensorError, or OSError
        raise ValueError(f"{argument}: {path!r} is not a readable safetensors file, truncated or damaged "
                         f"({type(exc).__name__}: {exc})") from None
