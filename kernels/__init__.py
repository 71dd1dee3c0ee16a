"""recursive-kernels: fused ops for recursive (weight-sharing) transformers, imported as ``recursive_kernels``.

Functional API; every op takes ``backend=`` ("triton", "cuda", "cpp", "torch"), else reads the
``RECURSIVE_KERNELS_BACKEND`` environment variable, else picks automatically (see
``recursive_kernels.backends``). This folder, ``kernels/``, is the package's source; ``setup.py`` installs it
under the import name ``recursive_kernels``, because the name ``kernels`` belongs to Hugging Face's hub-kernels
distribution (which transformers >= 5.25 requires).
"""

if __name__ == "kernels":
    # A source checkout's root is on sys.path (``python -m`` or pytest run from it), so ``import kernels`` found
    # this folder. That name is Hugging Face's package: load it from the rest of sys.path in our place.
    import importlib.machinery
    import importlib.util
    import os
    import sys

    _checkout = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    _path = [entry for entry in sys.path if os.path.abspath(entry or os.curdir) != _checkout]
    _spec = importlib.machinery.PathFinder.find_spec("kernels", _path)
    if _spec is None:
        # Hugging Face's is not installed. Raising here would break transformers, whose availability probe imports
        # a `kernels` that it finds without metadata; a module with neither __file__ nor __version__ is what that
        # probe reads as "not installed" (a namespace package shadowing the name). Any use says why.
        del __file__

        def __getattr__(name):
            raise AttributeError(f"module 'kernels' has no attribute {name!r}: Hugging Face's kernels is not installed "
                                 "(the folder kernels/ of this checkout is recursive-kernels' source, imported as "
                                 "recursive_kernels)")
    else:
        _module = importlib.util.module_from_spec(_spec)
        sys.modules["kernels"] = _module  # what `import kernels` returns once this file has run
        _spec.loader.exec_module(_module)
else:
    from ._shadow import free_the_name_kernels

    free_the_name_kernels()

    from .backends import BackendUnavailableError
    from .circuit_attention import circuit_attention, circuit_attention_varlen
    from .lowrank_linear import lowrank_linear
    from .reference import circuit_attention_ref, lowrank_linear_ref

    __version__ = "0.1.0"

    __all__ = [
        "BackendUnavailableError",
        "circuit_attention",
        "circuit_attention_ref",
        "circuit_attention_varlen",
        "lowrank_linear",
        "lowrank_linear_ref",
        "__version__",
    ]
