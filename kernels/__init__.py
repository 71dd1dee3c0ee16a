"""recursive-kernels: fused ops for recursive (weight-sharing) transformers.

Functional API; every op takes ``backend=`` ("triton", "cuda", "cpp", "torch"), else reads the
``RECURSIVE_KERNELS_BACKEND`` environment variable, else picks automatically (see ``kernels.backends``).
"""

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
