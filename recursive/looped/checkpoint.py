"""Reading a Hugging Face model or checkpoint folder as a config dict and its tensors, and the checks a looped model's
conversion shares: every tensor used, plain RoPE, required config fields named when absent."""

from __future__ import annotations

import os
from typing import Any, Dict, Mapping, Tuple, Union

from torch import Tensor, nn

from ..serialization import read_json, read_weights


class CheckpointTensors:
    """A checkpoint's tensors by name: :meth:`take` marks each used, :meth:`check_all_used` names any left over."""

    def __init__(self, state: Mapping[str, Tensor]) -> None:
        self.state, self.used = state, set()

    def take(self, name: str) -> Tuple[str, Tensor]:
        """``(name, tensor)`` for the checkpoint's tensor ``name``."""
        if name not in self.state:
            raise ValueError(f"model_or_path: the checkpoint has no tensor {name}")
        self.used.add(name)
        return name, self.state[name]

    def lm_head(self, tied: bool) -> Dict[str, Tuple[str, Tensor]]:
        """The untied LM head's weight (``lm_head.weight``); a tied model's, which a state dict may list beside the
        embedding it shares, is read and left out."""
        if not tied:
            return {"lm_head.weight": self.take("lm_head.weight")}
        if "lm_head.weight" in self.state:
            self.take("lm_head.weight")
        return {}

    def check_all_used(self, ignored: Tuple[str, ...] = ()) -> None:
        """Tensors the conversion did not read mean parts of the model it would drop: an error naming them (names
        ending in one of ``ignored``, recomputed buffers such as a rotary table, excepted)."""
        left = sorted(name for name in set(self.state) - self.used if not name.endswith(ignored))
        if left:
            raise ValueError(f"model_or_path: the checkpoint has tensors this conversion does not know: {left}")


def config_value(values: Mapping[str, Any], name: str, default: Any = None) -> Any:
    """A field of a Hugging Face config dict; ``default`` None makes it required (a ValueError names it)."""
    if name in values and values[name] is not None:
        return values[name]
    if default is None:
        raise ValueError(f"model_or_path: the config has no {name}")
    return default


def rope_theta(values: Mapping[str, Any], default: float) -> float:
    """The RoPE base of a Hugging Face config dict (``rope_theta``, or ``rope_parameters`` since transformers 5);
    any scaling is an error naming the field (the loops would run with other positions than the original's)."""
    parameters = values.get("rope_parameters") or {}
    scaling = values.get("rope_scaling")
    kind = parameters.get("rope_type", "default")
    if scaling or kind != "default":
        field = "rope_scaling" if scaling else "rope_parameters"
        raise ValueError(f"model_or_path: {field} {scaling or parameters!r} is not supported (plain RoPE only)")
    return float(parameters.get("rope_theta", values.get("rope_theta", default)))


def read_checkpoint(model_or_path: Union[nn.Module, str, os.PathLike],
                    model_types: Tuple[str, ...]) -> Tuple[Dict[str, Any], Dict[str, Tensor]]:
    """The config dict and the tensors of a model or a checkpoint folder whose ``model_type`` is one of
    ``model_types`` (another is an error naming it, before any tensor is read)."""
    if isinstance(model_or_path, nn.Module):
        config = getattr(model_or_path, "config", None)
        if config is None or not hasattr(config, "to_dict"):
            raise ValueError(f"model_or_path: {type(model_or_path).__name__} has no Hugging Face config")
        values = config.to_dict()
        state = {name: tensor.detach() for name, tensor in model_or_path.state_dict().items()}
    else:
        folder = os.fspath(model_or_path)
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise ValueError(f"model_or_path: {folder!r} is no checkpoint folder (no config.json)")
        values = read_json(os.path.join(folder, "config.json"), "model_or_path")
        state = None
    if values.get("model_type") not in model_types:
        raise ValueError(f"model_or_path: model_type {values.get('model_type')!r} is none of {model_types}")
    return values, _read_tensors(folder) if state is None else state


def _read_tensors(folder: str) -> Dict[str, Tensor]:
    """The tensors of ``model.safetensors``, or of the shards ``model.safetensors.index.json`` lists."""
    single, index = os.path.join(folder, "model.safetensors"), os.path.join(folder, "model.safetensors.index.json")
    if os.path.isfile(single):
        return read_weights(single, argument="model_or_path")
    if not os.path.isfile(index):
        raise ValueError(f"model_or_path: {folder!r} holds neither model.safetensors nor model.safetensors.index.json")
    shards = sorted(set(read_json(index, "model_or_path").get("weight_map", {}).values()))
    state: Dict[str, Tensor] = {}
    for shard in shards:
        state.update(read_weights(os.path.join(folder, shard), argument="model_or_path"))
    return state
