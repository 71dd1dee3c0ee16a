"""When a decoded token leaves at a loop boundary: :class:`ExitRule`, one interface for every model's own rule.

A rule sees each decoding row at the end of each loop but the last: the loops it has run, its hidden state there
(after the final norm's place: what the LM head reads), the LM head's logits, and a per-row state of its own that
it carries from boundary to boundary within one token (the engine keeps it per slot). ``generate``, the engine and
the command line take ``exit_threshold``: a number picks the model's own rule at that threshold
(:func:`resolve_exit_rule`), an :class:`ExitRule` any rule.

- :class:`ConfidenceExit`: the LM head's top probability reaches the threshold (CALM's softmax confidence).
- :class:`GateExit`: Ouro's learned gate: the cumulative exit probability ``1 - prod_t (1 - lambda_t)`` reaches the
  threshold after at least ``min_loops`` loops (vllm-rlt's rule; Ouro's readout without running the later loops).
- :class:`KLExit`: Huginn's ``kl`` criterion: the KL divergence of the previous boundary's next-token distribution
  (uniform before the first) from this one's falls below the threshold.
- :class:`RouterExit`: a Mixture-of-Recursions model's causal routing, which also gates each recursion's update: the
  rule its engine run follows (no threshold: the routers decide).

For Huginn a boundary's logits are its readout: the norm, the coda (over the cache) and the norm again, then the LM
head, as Huginn checks its criteria.
"""

from __future__ import annotations

import math
from typing import Optional, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from recursive_kernels.backends import accumulation_dtype

from ..checks import check_int, is_number
from ..config import RecursiveConfig
from ..losses import upcast


def top_probability(logits: Tensor) -> Tensor:
    """(*, vocab) -> (*,), the largest softmax probability, in float32 at least."""
    return upcast(logits).softmax(-1).amax(-1)


class ExitRule:
    """Whether each decoding row leaves at a loop boundary (the module docstring). ``threshold`` in (0, 1)."""

    state_width = 0  # the per-row state's width

    def __init__(self, threshold: float) -> None:
        if not is_number(threshold) or not 0.0 < threshold < 1.0:
            raise ValueError(f"exit_threshold: expected a number in (0, 1), got {threshold!r}")
        self.threshold = float(threshold)

    def width(self, model) -> int:
        """The per-row state's width for ``model``."""
        return self.state_width

    def check(self, config: RecursiveConfig) -> None:
        """Raise ValueError naming ``exit_threshold`` when ``config``'s model cannot follow this rule."""
        config.check_loop_boundaries("exit_threshold")

    def initial_state(self, rows: int, model) -> Tensor:
        """The state of ``rows`` rows before their token's first loop: (rows, state_width), on the model's device in
        its dtype, float32 at least."""
        weight = model.lm_head.weight
        return torch.zeros(rows, self.width(model), device=weight.device, dtype=accumulation_dtype(weight.dtype))

    def decide(self, model, loops: Tensor, hidden: Tensor, logits: Tensor, state: Tensor) -> Tuple[Tensor, Tensor]:
        """``loops`` (rows,) int64: the loops each row has run; ``hidden`` (rows, hidden): its state at this boundary;
        ``logits`` (rows, vocab): the LM head's there; ``state`` (rows, state_width) -> (leave (rows,) bool, the new
        state)."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.threshold:g})"


class ConfidenceExit(ExitRule):
    """Leave when the LM head's top probability reaches ``threshold``."""

    def decide(self, model, loops, hidden, logits, state):
        return top_probability(logits) >= self.threshold, state


class GateExit(ExitRule):
    """Ouro's gate: ``remaining *= 1 - sigmoid(exit_gate(h))`` at each boundary (the state), and leave once at least
    ``min_loops`` loops ran and ``1 - remaining`` reaches ``threshold``."""

    state_width = 1

    def __init__(self, threshold: float, min_loops: int = 2) -> None:
        super().__init__(threshold)
        self.min_loops = check_int("min_loops", min_loops, 1)

    def check(self, config: RecursiveConfig) -> None:
        super().check(config)
        if not config.exit_gate:
            raise ValueError("exit_threshold: GateExit reads Ouro's exit gate, and this model has none (exit_gate)")

    def initial_state(self, rows: int, model) -> Tensor:
        return super().initial_state(rows, model) + 1

    def decide(self, model, loops, hidden, logits, state):
        gate = model.model.exit_gate(model.model.final_norm(hidden))  # as the forward gates each loop's output
        remaining = state * (1 - torch.sigmoid(upcast(gate)))
        leave = (loops >= self.min_loops) & (1 - remaining[:, 0] >= self.threshold)
        return leave, remaining

    def __repr__(self) -> str:
        return f"GateExit({self.threshold:g}, min_loops={self.min_loops})"


class KLExit(ExitRule):
    """Huginn's ``kl`` criterion: leave when ``KL(p_prev || p)`` of the next-token distributions at the previous
    boundary and this one falls below ``threshold`` (Huginn's default 1e-3); before the first boundary ``p_prev`` is
    uniform. The state is ``log p_prev`` (a vocabulary's width)."""

    def __init__(self, threshold: float) -> None:  # a divergence, not a probability: any positive number
        if not is_number(threshold) or threshold <= 0:
            raise ValueError(f"exit_threshold: expected a positive divergence, got {threshold!r}")
        self.threshold = float(threshold)

    def width(self, model) -> int:
        return model.config.vocab_size

    def initial_state(self, rows: int, model) -> Tensor:
        return super().initial_state(rows, model) - math.log(model.config.vocab_size)

    def decide(self, model, loops, hidden, logits, state):
        log_p = torch.log_softmax(upcast(logits), -1)
        divergence = (state.exp() * (state - log_p)).sum(-1)
        return divergence < self.threshold, log_p


class RouterExit(ExitRule):
    """A Mixture-of-Recursions model's causal routing (token choice, or expert choice with threshold routing) as the
    rule that ends a token's run (:class:`recursive.generation.recursion_run.RecursionEngineRun` follows it):
    :meth:`start` routes a token that begins (after the layers before the recursions), :meth:`gate` gives each
    recursion's gate (the routing also scales the update, ``h + g (F(h) - h)``), :meth:`decide` whether the token
    leaves after the recursion it ran, as the model's forward routes it. The state (rows, 2): threshold routing:
    the router logit of the recursion the token runs next; token choice: its last recursion and that one's gate."""

    state_width = 2

    def __init__(self, config: RecursiveConfig, device) -> None:
        self.threshold = None  # the routers decide
        self.config, self.num_recursions = config, len(config.recursions()[1])
        self.by_threshold = config.mor_routing == "expert_choice"
        # threshold routing: recursions of capacity 1 keep every token
        self.keeps_all = torch.tensor([c == 1.0 for c in config.mor_capacities or ()], device=device)

    def check(self, config: RecursiveConfig) -> None:
        if config.mor_routing is None or not config.kv_cacheable:
            raise ValueError("exit_threshold: RouterExit follows a Mixture-of-Recursions model's causal routing")

    def start(self, model, hidden: Tensor) -> Tensor:
        """The state of tokens that begin, from ``hidden`` (rows, hidden) after the layers before the recursions."""
        router = model.model.mor_router
        if self.by_threshold:
            logits = upcast(F.linear(hidden, router.weight[:1]))[:, 0]
            return torch.stack((logits, torch.zeros_like(logits)), 1)
        probs = upcast(router(hidden)).softmax(-1)
        chosen = probs.argmax(-1)
        gate = self.config.mor_router_alpha * probs.gather(-1, chosen[:, None])[:, 0]
        return torch.stack((chosen.to(gate.dtype), gate), 1)

    def gate(self, state: Tensor, recursion: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """For recursion ``recursion`` (rows,) of each row: whether it runs it (False only for a token that threshold
        routing keeps out of the first), its gate, and whether the gate applies."""
        if self.by_threshold:
            ran = self.keeps_all[recursion] | (state[:, 0] >= 0)
            return ran, self.config.mor_router_alpha * state[:, 0].sigmoid(), ran
        return torch.ones_like(recursion, dtype=torch.bool), state[:, 1], state[:, 0].long() == recursion

    def decide(self, model, loops, hidden, logits, state):
        recursion = loops - 1
        ran = self.gate(state, recursion)[0]
        if not self.by_threshold:
            return ~(ran & (recursion < state[:, 0].long())), state
        following = loops.clamp(max=self.num_recursions - 1)
        router = model.model.mor_router
        next_logits = upcast(F.linear(hidden, router.weight)).gather(1, following[:, None])[:, 0]
        goes_on = ran & (loops < self.num_recursions) & (self.keeps_all[following] | (next_logits >= 0))
        return ~goes_on, torch.stack((next_logits, state[:, 1]), 1)

    def __repr__(self) -> str:
        return f"RouterExit({self.config.mor_routing})"


def resolve_exit_rule(exit_threshold: Union[None, float, ExitRule], config: RecursiveConfig) -> Optional[ExitRule]:
    """The rule to apply, or None when early exit is off (None or 1.0): a number is the model's own rule at that
    threshold (Ouro's gate for a model with one, Huginn's KL criterion for its recurrent core, else the confidence
    rule), an :class:`ExitRule` itself."""
    if exit_threshold is None:
        return None
    if isinstance(exit_threshold, ExitRule):
        rule = exit_threshold
    elif not is_number(exit_threshold) or not 0.0 < exit_threshold <= 1.0:
        raise ValueError(f"exit_threshold: expected None, a probability in (0, 1] or an ExitRule, "
                         f"got {exit_threshold!r}")
    elif exit_threshold == 1.0:
        return None
    else:
        rule = (GateExit(exit_threshold) if config.exit_gate else KLExit(exit_threshold)
                if config.injection != "none" else ConfidenceExit(exit_threshold))
    rule.check(config)
    return rule
