"""What the models return: the backbone's :class:`RecursiveModelOutput`, one run of layers' :class:`LayersOutput`, and
the heads' :class:`CausalLMOutput` and :class:`EncoderOutput`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, NamedTuple, Optional, Tuple

from torch import Tensor

from .cache import LayerKV, PastKeyValues


@dataclass
class RecursiveModelOutput:
    """``last_hidden_state`` (B, S, hidden) after the final norm; ``past_key_values`` (with
    ``use_cache``); ``aux_loss``: the MoL load-balancing loss averaged over layers (None without MoL);
    ``hidden_states`` (with ``output_hidden_states``): num_layers + 1 tensors (B, S, hidden), the
    embeddings and the output of every effective layer, all before the final norm (``hierarchical``:
    the state, fast or slow, that the layer updated). Mixture-of-Recursions only: ``recursion_loss``,
    the routers' losses weighted by their coefficients (``mor_balance_loss_coef`` times the
    token-choice balancing loss, ``mor_router_loss_coef`` times the expert-choice routers' auxiliary
    loss, ``mor_z_loss_coef`` times the z-loss), and ``recursion_depths``
    (B, S) int64, the recursions each token ran (0 at padding)."""

    last_hidden_state: Tensor
    past_key_values: Optional[PastKeyValues] = None
    aux_loss: Optional[Tensor] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    recursion_loss: Optional[Tensor] = None
    recursion_depths: Optional[Tensor] = None
    loop_hidden_states: Optional[Tuple[Tensor, ...]] = None
    exit_probabilities: Optional[Tensor] = None


class LayersOutput(NamedTuple):
    """What :meth:`RecursiveModel.run_layers` returns: ``hidden`` (B, S, hidden), the output state after the
    steps; ``presents``: each step's extended cache (None unless ``use_cache``; keys only: the extended
    caches, or the new keys and values without a cache); ``aux_losses``: the MoL losses; ``outputs``: each
    step's output (with ``output_hidden_states``); ``states``: every state after the steps (another run goes on from
    them)."""

    hidden: Tensor
    presents: List[Optional[LayerKV]]
    aux_losses: List[Tensor]
    outputs: List[Tensor]
    states: List[Tensor]


@dataclass
class CausalLMOutput:
    """``logits`` (B, S, vocab); ``loss``: next-token cross-entropy (plus ``router_aux_loss_coef *
    aux_loss`` with MoL, plus ``recursion_loss`` with Mixture-of-Recursions; with Ouro's exit gate its objective,
    :func:`recursive.losses.expected_exit_loss`) when labels are given; ``aux_loss``, ``past_key_values``,
    ``hidden_states``, ``recursion_loss``, ``recursion_depths`` and ``exit_probabilities`` as
    :class:`RecursiveModelOutput`; ``exit_loops`` (B, S) int64: with an exit gate and an ``exit_threshold``, the
    loop (0-based) whose logits each token reads."""

    logits: Tensor
    loss: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None
    past_key_values: Optional[PastKeyValues] = None
    hidden_states: Optional[Tuple[Tensor, ...]] = None
    recursion_loss: Optional[Tensor] = None
    recursion_depths: Optional[Tensor] = None
    exit_probabilities: Optional[Tensor] = None
    exit_loops: Optional[Tensor] = None


@dataclass
class EncoderOutput:
    """``logits``: (B, S, vocab) for the masked-LM head, (B, num_labels) for sequence classification;
    ``loss`` with labels; ``last_hidden_state`` (B, S, hidden); ``aux_loss``, ``recursion_loss`` and
    ``recursion_depths`` as :class:`RecursiveModelOutput`."""

    logits: Tensor
    loss: Optional[Tensor] = None
    last_hidden_state: Optional[Tensor] = None
    aux_loss: Optional[Tensor] = None
    recursion_loss: Optional[Tensor] = None
    recursion_depths: Optional[Tensor] = None
