"""The name ``kernels`` in a source checkout: the folder ``kernels/`` is this package's source (imported as
``recursive_kernels``), and from the checkout's root, which ``python -m`` and pytest put on ``sys.path``, it is also
findable as a top-level ``kernels``: the name of Hugging Face's hub-kernels distribution, which transformers probes
for. When that distribution is not installed, the name is marked absent (``None`` in ``sys.modules``): ``import
kernels`` then raises ModuleNotFoundError and ``importlib.util.find_spec("kernels")`` (transformers' probe) returns
None, instead of both finding this folder."""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys


def free_the_name_kernels() -> None:
    if "kernels" in sys.modules:
        return
    source = os.path.dirname(os.path.realpath(__file__))
    checkout = os.path.dirname(source)
    try:
        spec = importlib.machinery.PathFinder.find_spec("kernels")
    except (ImportError, ValueError):
        return
    if spec is None or spec.origin is None or os.path.dirname(os.path.realpath(spec.origin)) != source:
        return  # `kernels` is another package (Hugging Face's), or nothing: nothing to shadow
    rest = [entry for entry in sys.path if os.path.realpath(entry or os.curdir) != checkout]
    if importlib.machinery.PathFinder.find_spec("kernels", rest) is None:
        sys.modules["kernels"] = None
