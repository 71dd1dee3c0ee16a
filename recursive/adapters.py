"""Adapters, PEFT's workflow on recursive models: what a relaxation and the routers add to the shared model (per-
depth LoRA, QK/OV circuit factors, the mixture of LoRAs' experts and router, the Mixture-of-Recursions router),
saved, loaded and trained apart from the base, or merged into an untied model."""

from __future__ import annotations

import dataclasses
import os
from typing import Dict, TypeVar

import torch
from safetensors.torch import save_file
from torch import Tensor

from .nn import LowRankLinear
from .serialization import read_config, read_weights

ADAPTER_CONFIG_NAME = "adapter_config.json"


ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

Model = TypeVar("Model", bound="AdapterMixin")


class AdapterMixin:
    """The adapter methods of :class:`recursive.RecursivePreTrainedModel` (a ``torch.nn.Module`` with a
    ``config``; :meth:`merge_and_untie` also needs the model's ``model.blocks``). Each module names its own
    adapter parameters in an ``adapter_parameters`` attribute."""

    def adapter_state_dict(self) -> Dict[str, Tensor]:
        """The adapters' parameters by name: per-depth LoRA (``lora_a``, ``lora_b``), QK/OV circuit factors,
        the mixture of LoRAs' experts and routers, the Mixture-of-Recursions router; empty for a plain
        shared model. Everything else (embeddings, shared blocks, norms, heads) is the base model."""
        parameters = dict(self.named_parameters())
        state = {}
        for prefix, module in self.named_modules():
            for name in getattr(module, "adapter_parameters", ()):
                path = f"{prefix}.{name}" if prefix else name
                if path in parameters:
                    state[path] = parameters[path]
        return state

    def mark_only_adapters_trainable(self) -> int:
        """Freeze the base model: ``requires_grad`` True on the adapters' parameters only (the depth-as-
        modulation recipe, or LoRA uptraining of a converted model). Returns the trainable parameter count.
        A new task head trains beside them after ``model.classifier.requires_grad_(True)`` (PEFT's
        ``modules_to_save``); :meth:`save_adapter` saves the adapters only."""
        adapters = self.adapter_state_dict()
        if not adapters:
            raise ValueError(f"model: has no adapters to train (relaxation {self.config.relaxation!r}, "
                             f"mor_routing {self.config.mor_routing!r})")
        for name, parameter in self.named_parameters():
            parameter.requires_grad_(name in adapters)
        return sum(p.numel() for p in adapters.values())

    def save_adapter(self, save_directory: str) -> None:
        """Write the adapters alone into ``save_directory``: ``adapter_config.json`` (the model's config,
        which fixes every adapter's shape) and ``adapter_model.safetensors``. Several adapters trained on
        one base checkpoint then load into it in turn (:meth:`load_adapter`)."""
        state = self.adapter_state_dict()
        if not state:
            raise ValueError(f"model: has no adapters to save (relaxation {self.config.relaxation!r})")
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, ADAPTER_CONFIG_NAME), "w") as f:
            f.write(self.config.to_json_string())
        tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
        save_file(tensors, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})

    @torch.no_grad()
    def load_adapter(self, directory: str) -> None:
        """Copy the adapters written by :meth:`save_adapter` into this model, in its dtype and on its
        device. The adapter's config must equal this model's (the kernels backend aside)."""
        config_path = os.path.join(directory, ADAPTER_CONFIG_NAME)
        weights_path = os.path.join(directory, ADAPTER_WEIGHTS_NAME)
        for path in (config_path, weights_path):
            if not os.path.isfile(path):
                raise ValueError(f"directory: {directory!r} holds no {os.path.basename(path)}")
        saved = read_config(config_path).to_dict()
        ours = self.config.to_dict()
        differ = sorted(name for name in ours if name != "backend" and saved[name] != ours[name])
        if differ:
            raise ValueError("directory: the adapter was saved for another config; fields that differ: "
                             + ", ".join(f"{name} ({saved[name]!r} there, {ours[name]!r} here)" for name in differ))
        adapters = self.adapter_state_dict()
        state = read_weights(weights_path)
        if set(state) != set(adapters):
            raise ValueError(f"directory: the adapter's tensors do not match the model's adapters (missing "
                             f"{sorted(set(adapters) - set(state))}, unexpected {sorted(set(state) - set(adapters))})")
        for name, tensor in state.items():
            if tensor.shape != adapters[name].shape:
                raise ValueError(f"directory: {name}: shape {tuple(tensor.shape)}, the model's is "
                                 f"{tuple(adapters[name].shape)}")
        for name, tensor in state.items():
            adapters[name].copy_(tensor)

    @torch.no_grad()
    def merge_and_untie(self: Model) -> Model:
        """The untied model this one computes: every effective layer its own block, holding its block's
        weights with its LoRA merged in (``W + s B_l A_l``, :meth:`recursive.nn.LowRankLinear.merged_weight`).
        A new model of the same class in this one's dtype and on its device (``num_blocks = num_layers``,
        relaxation "none"); this one is unchanged. Serves the shared-stack schemes with relaxation
        "none", "depth_lora" or "qkov_lora"; the circuit and the mixtures act on activations, not weights,
        and HRM and Mixture-of-Recursions do not run a plain stack."""
        config = self.config
        if config.relaxation not in ("none", "depth_lora", "qkov_lora"):
            raise ValueError(f"model: relaxation {config.relaxation!r} does not merge into weights (it acts on the "
                             "activations); merge_and_untie serves 'none', 'depth_lora' and 'qkov_lora'")
        if config.sharing == "hierarchical" or config.mor_routing is not None:
            raise ValueError("model: HRM and Mixture-of-Recursions models do not run a plain stack of layers; "
                             "merge_and_untie serves cycle, sequence and middle-cycle sharing")
        untied_config = dataclasses.replace(config, num_blocks=config.num_layers, sharing="cycle", relaxation="none",
                                            lora_rank=0, lora_targets=None, start_index=0)
        # Clones: the new model shares no storage with this one.
        state = {name: t.clone() for name, t in self.state_dict().items() if not name.startswith("model.blocks.")}
        for layer in range(config.num_layers):
            block = self.model.blocks[config.block_of_layer(layer)]
            adapter = block.adapter_index(layer)
            merged = {f"{name}.weight": module.merged_weight(adapter) for name, module in block.named_modules()
                      if isinstance(module, LowRankLinear)}
            for name, tensor in block.state_dict().items():
                if name.rpartition(".")[2] not in LowRankLinear.adapter_parameters:
                    state[f"model.blocks.{layer}.{name}"] = merged[name].clone() if name in merged else tensor.clone()
        parameter = next(self.parameters())
        with torch.device("meta"):
            untied = type(self)(untied_config)
        untied.load_state_dict(state, assign=True)
        untied.tie_weights()
        for block in untied.model.blocks:  # the non-persistent layer -> adapter tables, left on the meta device
            block.adapter_of_layer = torch.tensor(block._adapter_of_layer, dtype=torch.int64)
        return untied.to(device=parameter.device, dtype=parameter.dtype).train(self.training)
