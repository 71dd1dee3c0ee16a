"""Test set-up: on machines without a GPU, run the Triton backend in its CPU interpreter.

TRITON_INTERPRET must be set before triton is first imported (triton reads it when kernels are
decorated), hence here, before any test module imports the package.
"""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from recursive_kernels import backends  # noqa: E402


@pytest.fixture(autouse=True)
def _no_backend_env(monkeypatch):
    """Tests choose backends explicitly; a developer's RECURSIVE_KERNELS_BACKEND must not leak in."""
    monkeypatch.delenv(backends.ENV_VAR, raising=False)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models: intra-op threads only add synchronisation, and stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
