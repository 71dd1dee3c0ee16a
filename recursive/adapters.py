"""Adapters, PEFT's workflow on recursive models: what a relaxation and the routers add to the shared model (per-
depth LoRA, QK/OV circuit factors, the mixture of LoRAs' experts and router, the Mixture-of-Recursions router),
saved, loaded and trained apart from the base, or merged into an untied model."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Dict, TypeVar

import torch
from safetensors.torch import save_file
from torch import Tensor

from .config import RecursiveConfig
from .nn import LowRankLinear
from .serialization import read_json, read_weights

ADAPTER_CONFIG_NAME = "adapter_config.json"
ADAPTER_WEIGHTS_NAME = "adapter_model.safetensors"

# The config fields an adapter is made of: the relaxation (its kind, ranks, scaling, targets and first depth, the
# mixture's experts) and the routers (the mixture's load balancing, Mixture-of-Recursions). The others describe
# the base architecture the adapter was trained on, but ``backend``, a runtime choice, and
# ``initializer_range``, which only initialises a new model.
ADAPTER_FIELDS = ("relaxation", "lora_rank", "lora_alpha", "lora_targets", "start_index", "circuit_rank",
                  "num_experts", "num_experts_per_tok", "router_aux_loss_coef", "mor_routing", "mor_capacities",
                  "mor_router_alpha", "mor_balance_loss_coef", "mor_z_loss_coef", "mor_router_loss_coef",
                  "mor_threshold_routing", "mor_kv_sharing")
_NOT_BASE = ADAPTER_FIELDS + ("initializer_range",)

Model = TypeVar("Model", bound="AdapterMixin")


@dataclasses.dataclass(frozen=True)
class AdapterConfig:
    """An adapter's config, apart from the model's (as PEFT keeps a ``LoraConfig``): ``settings``, the
    :data:`ADAPTER_FIELDS` of the model it was trained on, and ``base``, that model's architecture (every other
    config field but the runtime ``backend`` and ``initializer_range``). ``adapter_config.json`` holds it alone:
    ``{"base": {...}, <settings>}``."""

    settings: Dict[str, Any]
    base: Dict[str, Any]

    @classmethod
    def of(cls, config: RecursiveConfig) -> "AdapterConfig":
        values = json.loads(config.to_json_string())  # as saved (tuples as lists), so that configs compare so
        return cls({name: values[name] for name in ADAPTER_FIELDS},
                   {name: value for name, value in values.items() if name not in _NOT_BASE})

    @classmethod
    def read(cls, path: str) -> "AdapterConfig":
        """The adapter config in ``path``; a folder saved before adapters had their own config holds the whole
        model config there, which reads as its adapter config."""
        values = read_json(path)
        if "base" not in values:  # the whole model config
            try:
                return cls.of(RecursiveConfig.from_dict(values))
            except (TypeError, ValueError) as exc:
                raise ValueError(f"directory: {path!r} is not a valid adapter config ({exc})") from None
        base = values.pop("base")
        unknown = sorted(set(values) - set(ADAPTER_FIELDS))
        if unknown or not isinstance(base, dict):
            raise ValueError(f"directory: {path!r} is not a valid adapter config (unknown settings {unknown})")
        defaults = cls.of(RecursiveConfig())  # fields added after it was saved keep their defaults
        return cls({**defaults.settings, **values}, {**defaults.base, **base})

    def to_json_string(self) -> str:
        return json.dumps({"base": self.base, **self.settings}, indent=2, sort_keys=True) + "\n"

    def model_config(self, config: RecursiveConfig) -> RecursiveConfig:
        """``config`` with this adapter's settings: the config of a model of that base carrying this adapter."""
        return dataclasses.replace(config, **self.settings)

    def check_base(self, config: RecursiveConfig, argument: str = "directory") -> None:
        """Raise ValueError naming ``argument`` and the fields that differ unless ``config``'s architecture is
        this adapter's base."""
        ours = AdapterConfig.of(config).base
        differ = _differences(self.base, ours)
        if differ:
            raise ValueError(f"{argument}: the adapter was trained on another base architecture; fields that differ: "
                             + differ)


def _differences(theirs: Dict[str, Any], ours: Dict[str, Any]) -> str:
    """The fields whose values differ, as ``name (theirs there, ours here)``, comma-separated ('' when none)."""
    names = sorted(name for name in set(theirs) | set(ours) if theirs.get(name) != ours.get(name))
    return ", ".join(f"{name} ({theirs.get(name)!r} there, {ours.get(name)!r} here)" for name in names)


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
        """Write the adapters alone into ``save_directory``: ``adapter_config.json`` (their
        :class:`AdapterConfig`: the relaxation's and routers' settings, and the base architecture) and
        ``adapter_model.safetensors``. Several adapters trained on one base checkpoint then load into it in turn
        (:meth:`load_adapter`), or into the base without adapters (:meth:`with_adapter`)."""
        state = self.adapter_state_dict()
        if not state:
            raise ValueError(f"model: has no adapters to save (relaxation {self.config.relaxation!r})")
        os.makedirs(save_directory, exist_ok=True)
        with open(os.path.join(save_directory, ADAPTER_CONFIG_NAME), "w") as f:
            f.write(AdapterConfig.of(self.config).to_json_string())
        tensors = {name: tensor.detach().contiguous() for name, tensor in state.items()}
        save_file(tensors, os.path.join(save_directory, ADAPTER_WEIGHTS_NAME), metadata={"format": "pt"})

    @torch.no_grad()
    def load_adapter(self, directory: str) -> None:
        """Copy the adapters written by :meth:`save_adapter` into this model, in its dtype and on its device.
        This model must be of the adapter's base architecture and carry adapters of its settings (else
        :meth:`with_adapter` gives one that does); ValueError names the fields that differ."""
        adapter = self._read_adapter_config(directory)
        ours = AdapterConfig.of(self.config).settings
        differ = _differences(adapter.settings, ours)
        if differ:
            raise ValueError("directory: the adapter's settings are not this model's (with_adapter builds a model "
                             "with them); fields that differ: " + differ)
        adapters = self.adapter_state_dict()
        state = read_weights(os.path.join(directory, ADAPTER_WEIGHTS_NAME))
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
    def with_adapter(self: Model, directory: str) -> Model:
        """A new model of this class: this one's base weights (cloned) with the adapters written by
        :meth:`save_adapter` (PEFT's ``PeftModel.from_pretrained(base, directory)``). This model may carry
        other adapters, or none (a plain shared model of the same architecture); it is unchanged."""
        adapter = self._read_adapter_config(directory)
        parameter = next(self.parameters())
        model = type(self)(adapter.model_config(self.config)).to(device=parameter.device, dtype=parameter.dtype)
        ours = self.adapter_state_dict()
        base = {name: tensor.clone() for name, tensor in self.state_dict().items() if name not in ours}
        missing, unexpected = model.load_state_dict(base, strict=False)
        missing = set(missing) - set(model.adapter_state_dict()) - {name for name, _ in model.tied_weights()}
        if missing or unexpected:
            raise ValueError(f"directory: the adapter's model does not take this base's weights (missing "
                             f"{sorted(missing)}, unexpected {sorted(unexpected)})")
        model.load_adapter(directory)
        return model.train(self.training)

    def _read_adapter_config(self, directory: str) -> AdapterConfig:
        """The adapter config in ``directory``, checked against this model's base architecture."""
        for name in (ADAPTER_CONFIG_NAME, ADAPTER_WEIGHTS_NAME):
            if not os.path.isfile(os.path.join(directory, name)):
                raise ValueError(f"directory: {directory!r} holds no {name}")
        adapter = AdapterConfig.read(os.path.join(directory, ADAPTER_CONFIG_NAME))
        adapter.check_base(self.config)
        return adapter

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
