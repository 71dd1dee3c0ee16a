"""The published looped language models as recursive models: HRM-Text (Sapient), Ouro (ByteDance Seed) and
Huginn-0125 (seal-rg), their checkpoints read as they are.

:func:`convert_looped` takes transformers' ``HrmTextForCausalLM`` (or any model with a Hugging Face config and a
state dict) or a checkpoint folder (``config.json`` and safetensors, one file or an index of shards) whose
``model_type`` is one of :data:`LOOPED_MODEL_TYPES`, and returns a :class:`recursive.RecursiveForCausalLM` that runs
the same loops: each model is a configuration of the one forward
path (block options and a loop shape, :mod:`recursive.loops`), not a code path of its own. Reading a folder needs no
transformers, no remote code and no network. Each family's module holds what is its own: the config's translation
(``config_from_hf``), the tensors' names (``weights_from_hf``) and the way back (``to_hf``) where transformers has
the model.
"""

from __future__ import annotations

import os
from typing import Optional, Union

import torch
from torch import nn

from ..checks import check_int
from ..modeling import RecursiveForCausalLM
from ..serialization import read_json
from . import hrm_text, huginn, ouro
from .checkpoint import CheckpointTensors, read_checkpoint

# model_type -> the family's module
FAMILIES = {hrm_text.MODEL_TYPE: hrm_text, ouro.MODEL_TYPE: ouro, huginn.MODEL_TYPE: huginn}
LOOPED_MODEL_TYPES = tuple(FAMILIES)


def looped_model_type(model_or_path: Union[nn.Module, str, os.PathLike]) -> Optional[str]:
    """The ``model_type`` of a model or checkpoint folder when it is a looped family's, else None."""
    if isinstance(model_or_path, nn.Module):
        model_type = getattr(getattr(model_or_path, "config", None), "model_type", None)
    else:
        path = os.path.join(os.fspath(model_or_path), "config.json")
        model_type = read_json(path, "model_or_path").get("model_type") if os.path.isfile(path) else None
    return model_type if model_type in FAMILIES else None


def convert_looped(model_or_path: Union[nn.Module, str, os.PathLike], dtype: Optional[torch.dtype] = None,
                   num_loops: Optional[int] = None) -> RecursiveForCausalLM:
    """The :class:`recursive.RecursiveForCausalLM` of a published looped model (the module docstring), in ``dtype``
    (default: the checkpoint's own), on the device of its tensors, in eval mode (a given model: in its mode), its
    recurrence run ``num_loops`` times (HRM-Text's H cycles, Ouro's ``total_ut_steps``, Huginn's core passes; default:
    the checkpoint's own: ``H_cycles``, ``total_ut_steps``, ``mean_recurrence``).

    Raises ValueError naming ``model_or_path`` and the field or tensor at fault: an unsupported config field (rope
    scaling, say), a missing, misshapen or unknown tensor."""
    values, state = read_checkpoint(model_or_path, LOOPED_MODEL_TYPES)
    family = FAMILIES[values["model_type"]]
    if num_loops is not None:
        check_int("num_loops", num_loops, 1)
    config = family.config_from_hf(values, num_loops)
    weights = family.weights_from_hf(values, CheckpointTensors(state))
    reference = next(iter(weights.values()))[1]
    model = RecursiveForCausalLM.empty(config, dtype or reference.dtype, reference.device)
    ours = {name: tensor for name, tensor in model.state_dict().items() if name not in dict(model.tied_weights())}
    missing = sorted(set(ours) - set(weights))
    if missing:  # a family's rule gives every tensor of its configs: this is a bug, not the checkpoint's fault
        raise RuntimeError(f"convert_looped: no checkpoint tensor gives {missing}")
    with torch.no_grad():
        for name, tensor in ours.items():
            source, value = weights[name]
            if value.shape != tensor.shape:
                raise ValueError(f"model_or_path: tensor {source} has shape {tuple(value.shape)}, its config implies "
                                 f"{tuple(tensor.shape)}")
            tensor.copy_(value)
    training = model_or_path.training if isinstance(model_or_path, nn.Module) else False
    return model.train(training)
