"""recursive-kernels: fused ops for recursive (weight-sharing) transformers.

Functional API; every op takes ``backend=`` ("triton", "cuda", "cpp", "torch"), else reads the
``RECURSIVE_KERNELS_BACKEND`` environment variable, else picks automatically (see ``kernels.backends``).
"""

import importlib.metadata
import warnings

from .backends import BackendUnavailableError
from .circuit_attention import circuit_attention, circuit_attention_varlen
from .lowrank_linear import lowrank_linear
from .reference import circuit_attention_ref, lowrank_linear_ref

__version__ = "0.1.0"


def _warn_if_hub_kernels_installed() -> None:
    """Warn when Hugging Face's ``kernels`` distribution is installed too: it has the same import name,
    so whichever comes first on ``sys.path`` hides the other (transformers >= 5.25 requires it and
    imports it at model creation, where it would get this package instead)."""
    try:
        version = importlib.metadata.version("kernels")
    except importlib.metadata.PackageNotFoundError:
        return
    warnings.warn(
        f"the distribution `kernels` {version} (Hugging Face's hub kernels, required by transformers >= 5.25) "
        "is installed beside recursive-kernels and has the same import name `kernels`: one hides the other, and "
        "transformers fails when it imports this package in its place. Use transformers < 5.25 with "
        "recursive-kernels (`pip install 'transformers<5.25'`, then `pip uninstall kernels`), or keep the two "
        "in separate environments.",
        stacklevel=2,
    )


_warn_if_hub_kernels_installed()
__all__ = [
    "BackendUnavailableError",
    "circuit_attention",
    "circuit_attention_ref",
    "circuit_attention_varlen",
    "lowrank_linear",
    "lowrank_linear_ref",
    "__version__",
]
