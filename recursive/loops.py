"""The loop shape as data: what :meth:`recursive.RecursiveModel.run_layers` reads to run a model's effective layers.

Each effective layer is a :class:`LayerStep`: the block it runs, the state it updates, the states added into that
state before it runs (where HRM's fast and slow states mix), whether autograd records it (HRM's one-step
gradient) and whether a loop ends after it where a decoded token may leave (early exit). A plain stack has
one state, the hidden states, starting at the embeddings; the hierarchical (HRM) flow has three: the input
embeddings, the fast state and the slow state, both starting at zero, and its output is the slow state.
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

from torch import Tensor

from .cache import VarlenPacking
from .config import RecursiveConfig

# The states of a run: the plain stack's hidden states (which start as the input), HRM's fast and slow ones.
INPUT, FAST, SLOW = 0, 1, 2


class LayerStep(NamedTuple):
    """One effective layer: ``layer``, its ``block``, the ``state`` it updates (``INPUT`` in a plain stack),
    the states added into it first, in order (``adds``), whether autograd records it (``records``) and
    whether a token may leave after it (``exit_after``: a loop boundary of a plain stack, not the last)."""

    layer: int
    block: int
    state: int = INPUT
    adds: Tuple[int, ...] = ()
    records: bool = True
    exit_after: bool = False


class LoopShape(NamedTuple):
    """``steps``: one :class:`LayerStep` per effective layer, in order; ``num_states``: the states they
    read and write (1, or 3 for HRM); ``output_state``: the one the run returns; ``loop_length``: the
    layers one step of :class:`recursive.DepthBatchingEngine` runs (a loop; HRM's whole stack, as its
    states flow through all of it)."""

    steps: Tuple[LayerStep, ...]
    num_states: int
    output_state: int
    loop_length: int


class LayerInputs(NamedTuple):
    """What a run of layers reads of its rows besides their hidden states.

    ``position_embeddings``: ``(cos, sin)``, each (B, S, head_dim); ``packing``: the real tokens and the keys
    each attends over (None: dense attention, no padding); ``depth_shift``: added to a step's layer gives the
    depth whose adapters a row uses: an int, or an int tensor (B,) (a step of
    :class:`recursive.DepthBatchingEngine` runs one loop's steps for rows at different loops);
    ``check_indices``: False trusts a tensor ``depth_shift`` to give effective layers (no host read of its
    values, a synchronisation on a GPU).
    """

    position_embeddings: Tuple[Tensor, Tensor]
    packing: Optional[VarlenPacking] = None
    depth_shift: Union[int, Tensor] = 0
    check_indices: bool = True


def loop_shape(config: RecursiveConfig) -> LoopShape:
    """The :class:`LoopShape` of ``config``'s sharing scheme (a Mixture-of-Recursions model runs its
    recursions on token subsets, each a run of its layers' steps: :meth:`RecursiveConfig.recursions`)."""
    L = config.num_layers
    if config.sharing == "hierarchical":
        module = config.num_blocks // 2
        fast_layers = config.hrm_period * module
        # One-step gradient: only the last fast and the last slow module application record.
        first_recorded = L - 2 * module if config.hrm_one_step_gradient else 0
        steps = []
        for layer in range(L):
            position = layer % config.hrm_cycle_length
            if position < fast_layers:  # z_L <- f_L(z_L + z_H + x) at the start of each fast module application
                state, adds = FAST, ((SLOW, INPUT) if position % module == 0 else ())
            else:  # z_H <- f_H(z_H + z_L)
                state, adds = SLOW, ((FAST,) if position == fast_layers else ())
            steps.append(LayerStep(layer, config.block_of_layer(layer), state, adds, layer >= first_recorded))
        return LoopShape(tuple(steps), 3, SLOW, L)
    period = config.loop_length()
    exits = config.mor_routing is None
    steps = tuple(LayerStep(layer, config.block_of_layer(layer), exit_after=exits and (layer + 1) % period == 0
                            and layer + 1 < L) for layer in range(L))
    return LoopShape(steps, 1, INPUT, period)
