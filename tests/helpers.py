"""What the test modules share; a helper module, not a test module: it imports no test module.

* the backends this machine can serve (:func:`serving_backends`).
"""

from __future__ import annotations

import pytest
import torch

from recursive_kernels import backends


# Backends.


def serving_backends(op: str, dtype: torch.dtype, **inputs):
    """(backend, device) pairs that can serve ``op`` in ``dtype`` (and the op's other ``inputs`` of its
    support checks) on this machine."""
    devices = [torch.device("cpu")] + ([torch.device("cuda")] if torch.cuda.is_available() else [])
    pairs = []
    for device in devices:
        for name in backends.BACKENDS:
            if not backends.reasons(op, name, device, dtype=dtype, **inputs):
                pairs.append(pytest.param(name, device, id=f"{name}-{device.type}"))
    return pairs
