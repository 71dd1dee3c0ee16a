"""Stored autotuning choices of the Triton kernels: a table per GPU model and Triton version.

Triton's autotuner times every configuration of a kernel the first time it meets a key (the kernels key on
power-of-two buckets of the varying sizes), about a second each time, in every new process: a decode loop whose
cache grows crosses a new bucket every doubling. The table ``triton_tuning.json`` beside this file holds the
choices a GPU run made, and the first launch on a device puts the entries of that device's model and this
Triton version into the autotuners' caches, so those keys are never timed again. Entries whose configuration
is no longer in a kernel's tuning space are ignored.

Writing: a process with ``RECURSIVE_KERNELS_TRITON_TUNING_OUT=PATH`` merges its autotuners' choices into the
table at PATH when it exits (``benchmarks/gpu_run.sh`` sets it for its benchmark runs); copying that file over
``kernels/triton_tuning.json`` keeps them.

    {"NVIDIA H100 80GB HBM3 | triton 3.6": {"_linear_kernel": [[key, {"kwargs": {...}, "num_warps": 4,
     "num_stages": 3}], ...], ...}, ...}
"""

from __future__ import annotations

import atexit
import importlib
import json
import os
from typing import Dict, Iterator, Optional, Tuple

import torch
import triton
from triton.runtime.autotuner import Autotuner

TABLE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "triton_tuning.json")
OUT_ENV = "RECURSIVE_KERNELS_TRITON_TUNING_OUT"
_MODULES = ("recursive_kernels.triton_lowrank_linear", "recursive_kernels.triton_circuit_attention")
_loaded = set()  # device indices whose table entries are in the caches


def device_key(device: torch.device) -> str:
    """The table's key of a GPU: its model name and Triton's major.minor version."""
    version = ".".join(triton.__version__.split(".")[:2])
    return f"{torch.cuda.get_device_name(device)} | triton {version}"


def _autotuners() -> Iterator[Tuple[str, Autotuner]]:
    for module in _MODULES:
        for name, obj in vars(importlib.import_module(module)).items():
            if isinstance(obj, Autotuner):
                yield name, obj


def _read(path: str) -> Dict[str, dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        return {}


def _in_space(tuner: Autotuner, entry: dict) -> Optional[triton.Config]:
    """The configuration of the kernel's space that ``entry`` names (None: since dropped from the space). Matched
    by value: triton.Config's equality depends on the order of its keywords, which the JSON file sorts."""
    for config in tuner.configs:
        if (config.kwargs == entry["kwargs"] and config.num_warps == entry["num_warps"]
                and config.num_stages == entry["num_stages"]):
            return config
    return None


def load(device: torch.device, path: str = TABLE) -> int:
    """Put the table's entries for ``device`` into the autotuners' caches, once per device; returns how many."""
    if not device.type == "cuda" or device.index in _loaded:
        return 0
    _loaded.add(device.index)
    kernels = _read(path).get(device_key(device), {})
    count = 0
    for name, tuner in _autotuners():
        for key, entry in kernels.get(name, []):
            config = _in_space(tuner, entry)
            if config is not None:
                tuner.cache.setdefault(tuple(key), config)
                count += 1
    return count


def dump(device: torch.device, path: str) -> None:
    """Merge the autotuners' current choices into the table at ``path`` (created if absent)."""
    table = _read(path)
    kernels = table.setdefault(device_key(device), {})
    for name, tuner in _autotuners():
        entries = {json.dumps(key): entry for key, entry in kernels.get(name, [])}
        for key, config in tuner.cache.items():
            entries[json.dumps(list(key))] = {"kwargs": dict(config.kwargs), "num_warps": config.num_warps,
                                              "num_stages": config.num_stages}
        if entries:
            kernels[name] = [[json.loads(key), entry] for key, entry in sorted(entries.items())]
    with open(path, "w") as f:
        json.dump(table, f, indent=1, sort_keys=True)
        f.write("\n")


def _dump_at_exit() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        dump(torch.device("cuda", torch.cuda.current_device()), os.environ[OUT_ENV])


if os.environ.get(OUT_ENV):
    atexit.register(_dump_at_exit)
