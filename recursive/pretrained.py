"""The base of the models: config, weight init and tying, the ``save_pretrained``/``from_pretrained`` checkpoint
format (``config.json`` plus safetensors, never pickle) and activation checkpointing."""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, Optional, Tuple, Type, TypeVar

import torch
from safetensors.torch import save_file
from torch import nn

from .adapters import AdapterMixin
from .config import RecursiveConfig
from .nn import LowRankLinear, RecursiveBlock
from .serialization import read_config, read_weights

CONFIG_NAME = "config.json"


WEIGHTS_NAME = "model.safetensors"

Model = TypeVar("Model", bound="RecursivePreTrainedModel")


class RecursivePreTrainedModel(AdapterMixin, nn.Module):
    """Config, weight init, weight tying and the ``save_pretrained``/``from_pretrained`` checkpoint format
    shared by the models; the adapter workflow comes from :class:`recursive.adapters.AdapterMixin`.

    Init (driven by ``torch.manual_seed``): projections and embeddings ``normal(0, initializer_range)``,
    biases zeros; LoRA adapters (Kaiming-uniform A, zero B), circuit factors and norms keep their
    modules' init, so a fresh relaxation changes nothing.
    """

    def __init__(self, config: RecursiveConfig) -> None:
        super().__init__()
        if not isinstance(config, RecursiveConfig):
            raise ValueError(f"config: expected a RecursiveConfig, got {type(config).__name__}")
        self.config = config

    def tied_weights(self) -> Tuple[Tuple[str, str], ...]:
        """``(name, source)`` pairs of parameters that are the same tensor; the checkpoint stores the source."""
        return ()

    def tie_weights(self) -> None:
        """Make each parameter of :meth:`tied_weights` its source (again, after ``to_empty`` or a
        ``load_state_dict(assign=True)`` gave them separate storage)."""
        for name, source in self.tied_weights():
            module_name, _, attribute = name.rpartition(".")
            setattr(self.get_submodule(module_name), attribute, self.get_parameter(source))

    @classmethod
    def empty(cls: Type[Model], config: RecursiveConfig, dtype: torch.dtype, device=None) -> Model:
        """The model with uninitialised parameters and persistent buffers, in ``dtype`` on ``device``, for a loader
        that writes all of them: built on the meta device, so a large model is neither randomly initialised nor
        held in float32 on the way."""
        with torch.device("meta"):
            model = cls(config)
        device = torch.device(device or "cpu")
        model = model.to(dtype=dtype).to_empty(device=device)
        model.tie_weights()  # to_empty gave the tied parameters separate storage
        for module in model.modules():
            if isinstance(module, RecursiveBlock):
                module.reset_buffers(device)
        return model

    def with_num_loops(self: Model, num_loops: int) -> Model:
        """This model with its loops run ``num_loops`` times (:meth:`RecursiveConfig.with_num_loops`: Huginn's
        ``num_steps``, Ouro's ``total_ut_steps``, HRM's cycles), sharing this model's parameters and buffers (no
        copy), in its mode."""
        config = self.config.with_num_loops(num_loops)
        with torch.device("meta"):
            model = type(self)(config)
        model.load_state_dict(self.state_dict(), assign=True)
        model.tie_weights()
        device = next(self.parameters()).device
        for module in model.modules():  # the per-layer tables are not in the state dict
            if isinstance(module, RecursiveBlock):
                module.reset_buffers(device)
        return model.train(self.training)

    def _tie_and_init(self) -> None:
        self.tie_weights()
        std = self.config.initializer_range
        for module in self.modules():
            if isinstance(module, (nn.Linear, LowRankLinear)):
                nn.init.normal_(module.weight, mean=0.0, std=std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, mean=0.0, std=std)

    def save_pretrained(self, save_directory: str, state_dict: Optional[Dict[str, torch.Tensor]] = None) -> None:
        """Write ``config.json`` and ``model.safetensors`` (tied parameters once) into ``save_directory``;
        ``state_dict``: the weights to write instead of this module's own (a gathered sharded model's)."""
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, CONFIG_NAME), "w") as f:
            f.write(self.config.to_json_string())
        tied = {name for name, _ in self.tied_weights()}
        state = self.state_dict() if state_dict is None else state_dict
        state = {name: tensor.contiguous() for name, tensor in state.items() if name not in tied}
        save_file(state, os.path.join(save_directory, WEIGHTS_NAME), metadata={"format": "pt"})

    @classmethod
    def from_pretrained(cls: Type[Model], directory: str, device=None, dtype: Optional[torch.dtype] = None,
                        backend: Optional[str] = None) -> Model:
        """Load a model written by :meth:`save_pretrained`, in the checkpoint's dtype unless ``dtype`` is
        given, on ``device`` (default CPU), with the kernels ``backend`` (default: chosen per call), in eval
        mode."""
        config_path, weights_path = os.path.join(directory, CONFIG_NAME), os.path.join(directory, WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise ValueError(f"directory: {directory!r} holds no {os.path.basename(path)}")
        config = dataclasses.replace(read_config(config_path), backend=backend)
        state = read_weights(weights_path, device)
        if dtype is None:
            dtype = next(t.dtype for t in state.values() if t.is_floating_point())
        model = cls(config).to(device=device, dtype=dtype)
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = set(missing) - {name for name, _ in model.tied_weights()}
        if missing or unexpected:
            raise ValueError(f"directory: the checkpoint does not match the config (missing {sorted(missing)}, "
                             f"unexpected {sorted(unexpected)})")
        return model.eval()

    def gradient_checkpointing_enable(self) -> None:
        """Activation checkpointing per effective layer, as Hugging Face's: in training, each block call
        keeps only its input and runs again in the backward (``torch.utils.checkpoint``, non-reentrant).
        Activation memory then grows with the depth by one hidden state per layer instead of every
        intermediate of the block: what lets a deep loop of a small block train."""
        self.model.gradient_checkpointing = True

    def gradient_checkpointing_disable(self) -> None:
        self.model.gradient_checkpointing = False

    @property
    def is_gradient_checkpointing(self) -> bool:
        return self.model.gradient_checkpointing
