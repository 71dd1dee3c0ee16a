"""Training checkpoints that resume exactly, on any number of processes.

A checkpoint is a folder ``checkpoint-<step>`` under the run's save folder, written whole under a temporary
name and renamed into place (an interrupted write never leaves a half checkpoint under that name):

- ``config.json``, ``model.safetensors``: the model as ``save_pretrained`` writes it (a usable model folder),
  with the tokenizer beside it when the run has one;
- ``optimizer.pt``: the optimizer's state keyed by parameter name, whole (``torch.distributed.checkpoint``'s
  full state dict: DDP's and FSDP2's load it on any world size); read with ``torch.load(weights_only=True)``;
- ``trainer_state.json``: step, tokens seen, the sampler, the arguments a resume must share (the learning rate is
  a function of the step and the arguments);
- ``rng_state.pt``: each rank's random number generators (torch, CUDA, Python).
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from typing import List, Optional

import torch
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..pretrained import CONFIG_NAME, WEIGHTS_NAME
from ..serialization import read_config, read_weights
from .distributed import World, barrier, unwrapped
from .tokenizers import Tokenizer

OPTIMIZER_FILE, STATE_FILE, RNG_FILE = "optimizer.pt", "trainer_state.json", "rng_state.pt"


_CHECKPOINT = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"checkpoint-{step}"


def list_checkpoints(directory: str) -> List[str]:
    """The checkpoint folders in ``directory``, oldest step first."""
    if not os.path.isdir(directory):
        return []
    found = [(int(m.group(1)), name) for name in os.listdir(directory) if (m := _CHECKPOINT.match(name))]
    return [os.path.join(directory, name) for _, name in sorted(found)]


def resolve_checkpoint(path: str) -> str:
    """``path`` itself when it is a checkpoint, else the newest checkpoint in it; ValueError naming ``resume``
    when there is none."""
    if os.path.isfile(os.path.join(path, STATE_FILE)):
        return path
    found = list_checkpoints(path)
    if not found:
        raise ValueError(f"resume: {path!r} is neither a checkpoint (no {STATE_FILE}) nor a folder holding "
                         "checkpoint-<step> folders")
    return found[-1]


def save_model(directory: str, model: nn.Module, world: World, tokenizer: Optional[Tokenizer] = None) -> None:
    """The (wrapped) model as ``save_pretrained`` writes it, with ``tokenizer``, into ``directory``: the whole
    state gathered on the CPU (a collective under FSDP2: every rank calls this), written by rank 0."""
    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if world.is_main:
        unwrapped(model).save_pretrained(directory, state_dict=state)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


def save_checkpoint(directory: str, step: int, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict,
                    world: World, tokenizer: Optional[Tokenizer] = None, keep: int = 0) -> str:
    """Write ``checkpoint-<step>`` into ``directory`` (every rank calls it; rank 0 writes) and remove the
    oldest beyond ``keep`` (0: keep all). ``state``: the trainer's JSON-able state. Returns the folder."""
    final = os.path.join(directory, checkpoint_name(step))
    partial = os.path.join(directory, f".{checkpoint_name(step)}.partial")
    if world.is_main:
        shutil.rmtree(partial, ignore_errors=True)
    save_model(partial, model, world, tokenizer)
    optimizer_state = get_optimizer_state_dict(model, optimizer,
                                               options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    rng = _rng_state()
    if world.distributed:
        rngs: List[dict] = [None] * world.size
        torch.distributed.all_gather_object(rngs, rng)
    else:
        rngs = [rng]
    if world.is_main:
        torch.save(optimizer_state, os.path.join(partial, OPTIMIZER_FILE))
        torch.save(rngs, os.path.join(partial, RNG_FILE))
        with open(os.path.join(partial, STATE_FILE), "w") as f:
            json.dump({**state, "world_size": world.size}, f, indent=1, sort_keys=True)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(partial, final)
        if keep > 0:
            for old in list_checkpoints(directory)[:-keep]:
                shutil.rmtree(old, ignore_errors=True)
    barrier(world)
    return final


def read_trainer_state(checkpoint: str) -> dict:
    with open(os.path.join(checkpoint, STATE_FILE)) as f:
        return json.load(f)


def load_checkpoint(checkpoint: str, model: nn.Module, optimizer: torch.optim.Optimizer, world: World) -> dict:
    """Load ``checkpoint``'s weights, optimizer state and this rank's random state into the (wrapped) ``model``
    and ``optimizer`` on every rank; returns the trainer state. Raises ValueError naming ``resume`` when the
    checkpoint's model is not ``model``'s."""
    config = read_config(os.path.join(checkpoint, CONFIG_NAME), "resume")
    ours, theirs = unwrapped(model).config.to_dict(), config.to_dict()
    if ours != theirs:
        differ = sorted(key for key in ours if ours[key] != theirs.get(key))
        raise ValueError(f"resume: {checkpoint!r} holds a model of another config (differs in {differ})")
    weights = read_weights(os.path.join(checkpoint, WEIGHTS_NAME), argument="resume")
    for name, source in unwrapped(model).tied_weights():
        weights.setdefault(name, weights[source])
    set_model_state_dict(model, weights, options=StateDictOptions(full_state_dict=True))
    optimizer_state = torch.load(os.path.join(checkpoint, OPTIMIZER_FILE), map_location="cpu", weights_only=True)
    saved = {name for group in optimizer_state["param_groups"] for name in group["params"]}
    trained = {name for name, p in unwrapped(model).named_parameters() if p.requires_grad}
    if saved != trained:
        raise ValueError(f"resume: {checkpoint!r} trained other parameters ({len(saved)} against this run's "
                         f"{len(trained)}, for example {sorted(saved ^ trained)[:3]}): --adapters-only differs?")
    set_optimizer_state_dict(model, optimizer, optimizer_state, options=StateDictOptions(full_state_dict=True))
    rngs = torch.load(os.path.join(checkpoint, RNG_FILE), weights_only=True)
    _set_rng_state(rngs[world.rank] if len(rngs) == world.size else rngs[0])
    return read_trainer_state(checkpoint)


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
