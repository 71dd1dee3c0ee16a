"""The loop shape as data: what :meth:`recursive.RecursiveModel.run_layers` reads to run a model's effective layers.

Each effective layer is a :class:`LayerStep`: the block it runs, the state it updates, the states added into that
state before it runs (where HRM's fast and slow states mix), whether autograd records it (HRM's one-step
gradient), whether the model's norm follows it (HRM-Text's module ends) and whether a loop ends after it where a
decoded token may leave (early exit). A plain stack has one state, the hidden states, starting at the embeddings;
the hierarchical flow of HRM-LM has three: the input embeddings, the fast state and the slow state, both starting
at zero, and its output is the slow state; HRM-Text's has two: the slow state, which starts at the embeddings
(``INPUT``), and the fast one, which starts at the model's ``fast_init``. Huginn's recurrent depth (``injection``) has
two: the prelude runs on the embeddings, the core and the coda on a state of their own (``CORE``), which the model's
adapter mixes with the prelude's output before each pass of the core (``inject``).
"""

from __future__ import annotations

from typing import NamedTuple, Optional, Tuple, Union

from torch import Tensor

from .cache import VarlenPacking
from .config import RecursiveConfig

# The states of a run: the plain stack's hidden states (which start as the input), HRM's fast and slow ones.
INPUT, FAST, SLOW = 0, 1, 2
CORE = 1  # Huginn's recurrent state


class LayerStep(NamedTuple):
    """One effective layer: ``layer``, its ``block``, the ``state`` it updates (``INPUT`` in a plain stack),
    the states added into it first, in order (``adds``), whether autograd records it (``records``), whether
    the model's norm follows it (``norm_after``), whether a token may leave after it (``exit_after``: a
    loop boundary of a plain stack, not the last) and whether the state is first ``adapter([state, INPUT])``
    (``inject``: Huginn's core)."""

    layer: int
    block: int
    state: int = INPUT
    adds: Tuple[int, ...] = ()
    records: bool = True
    exit_after: bool = False
    norm_after: bool = False
    inject: bool = False


class LoopShape(NamedTuple):
    """``steps``: one :class:`LayerStep` per effective layer, in order; ``num_states``: the states they
    read and write (1, or 3 for HRM); ``output_state``: the one the run returns; ``loop_length``: the
    layers one step of :class:`recursive.DepthBatchingEngine` runs (a loop; HRM's whole stack, as its
    states flow through all of it); ``tail``: the last steps, which a token that leaves early runs too, after the
    norm (Huginn's coda; none for a plain stack, whose last loop ends the layers)."""

    steps: Tuple[LayerStep, ...]
    num_states: int
    output_state: int
    loop_length: int
    tail: int = 0

    @property
    def ends_normed(self) -> bool:
        """Whether the last step leaves the output normed, so that no final norm follows (HRM-Text); a shape that norms
        after its last step norms after every loop's last."""
        return self.steps[-1].norm_after


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
        return _hierarchical_shape(config)
    if config.injection != "none":
        return _injected_core_shape(config)
    period = config.loop_length()
    exits = config.mor_routing is None
    steps = tuple(LayerStep(layer, config.block_of_layer(layer), exit_after=exits and (layer + 1) % period == 0
                            and layer + 1 < L, norm_after=config.loop_norm and (layer + 1) % period == 0)
                  for layer in range(L))
    return LoopShape(steps, 1, INPUT, period)


def _hierarchical_shape(config: RecursiveConfig) -> LoopShape:
    """HRM's cycles: ``hrm_period`` fast module applications, then one slow; the data flow of ``config.hrm_flow``
    (the module docstring), the gradient of ``hrm_one_step_gradient`` or ``hrm_fast_grad_cycles``."""
    L, module, period = config.num_layers, config.num_blocks // 2, config.hrm_period
    fast_layers = period * module
    text = config.hrm_flow == "hrm_text"
    slow, fast_adds = (INPUT, (INPUT,)) if text else (SLOW, (SLOW, INPUT))
    # One-step gradient: only the last fast and the last slow module application record.
    first_recorded = L - 2 * module if config.hrm_one_step_gradient else 0
    recorded_fast = config.fast_grad_applications()
    steps = []
    for layer in range(L):
        cycle, position = divmod(layer, config.hrm_cycle_length)
        application, offset = divmod(position, module)
        records = layer >= first_recorded
        if position < fast_layers:  # z_L <- f_L(z_L + z_H (+ x)) at the start of each fast module application
            state, adds = FAST, (fast_adds if offset == 0 else ())
            records = records and application >= period - recorded_fast[cycle]
        else:  # z_H <- f_H(z_H + z_L)
            state, adds = slow, ((FAST,) if position == fast_layers else ())
        steps.append(LayerStep(layer, config.block_of_layer(layer), state, adds, records,
                               norm_after=text and offset == module - 1))
    return LoopShape(tuple(steps), 2 if text else 3, slow, L)


def _injected_core_shape(config: RecursiveConfig) -> LoopShape:
    """Huginn's prelude, core passes and coda (``config.injection``): the prelude on the input, each pass of the core
    on the core state after the adapter's injection (a token may leave after each but the last), the norm after the
    last pass, the coda on the core state (the tail). One loop for :class:`recursive.DepthBatchingEngine` (the whole
    stack)."""
    before, passes, after = config.recursions()
    steps = [LayerStep(layer, config.block_of_layer(layer)) for layer in before]
    for n, layers in enumerate(passes):
        last = n + 1 == len(passes)
        steps.extend(LayerStep(layer, config.block_of_layer(layer), CORE, inject=j == 0,
                               exit_after=not last and j + 1 == len(layers), norm_after=last and j + 1 == len(layers))
                     for j, layer in enumerate(layers))
    steps.extend(LayerStep(layer, config.block_of_layer(layer), CORE) for layer in after)
    return LoopShape(tuple(steps), 2, CORE, config.num_layers, tail=len(after))
