"""One :class:`recursive.DepthBatchingEngine` run on Huginn's recurrent depth (``config.injection``): a step runs one
pass of the core for every busy row, each at its own pass, and a token leaves through the norm, the coda and the LM
head after its last pass, or earlier by the engine's exit rule."""

from __future__ import annotations

from typing import List, Tuple

import torch
from torch import Tensor

from ..loops import INPUT, LayerInputs
from ..nn import rotary_rows
from .engine_run import EngineRun, key_offsets


class CoreEngineRun(EngineRun):
    """:class:`EngineRun` for Huginn's prelude, recurrent core and coda.

    A token starts with the prelude, which gives its ``e`` (kept per slot), and a fresh core state; each step runs one
    pass of the core (``adapter([state, e])``, then the core's layers) for every busy row at its own pass. A row at its
    last pass, or (with an exit rule) at any other, is read out as the model's forward and ``generate`` read it (the
    norm, the coda over the slot's cache, the final norm, the LM head); a row that leaves early stores the keys of
    the passes it skips from its exit state (:meth:`_store_skipped`), and its coda keys are those of its exit's
    readout. A prompt is prefilled by a forward of the model.
    """

    prefills_in_steps = False

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.before, passes, self.after = self.config.recursions()
        self.pass_steps = [self.backbone.shape.steps[layer] for layer in passes[0]]
        self.prelude = torch.zeros_like(self.hidden)  # each slot's e: the prelude's output for its token

    def _step(self) -> None:
        engine, backbone = self.engine, self.backbone
        busy = [slot for slot, request in enumerate(self.slot_request) if request is not None]
        positions = [self.length[slot] for slot in busy]
        passes = [self.loop[slot] for slot in busy]
        starting = [i for i, n in enumerate(passes) if n == 0]
        width = len(self.pass_steps)
        first_rows = [self._flat_row(self.before[-1] + 1 + n * width, slot) for n, slot in zip(passes, busy)]
        key_counts = [position + 1 for position in positions]
        slots_d, positions_d, shifts_d, first_rows_d, offsets, starting_d = self._to_device(
            busy, positions, [n * width for n in passes], first_rows, key_offsets(key_counts), starting)
        cos, sin = rotary_rows(self.rotary_table, positions_d)
        if starting:  # the new tokens' prelude, and their core states' start
            embedded = self.hidden[slots_d[starting_d]]
            e = self._plain_layers(self.before, embedded, [busy[i] for i in starting], [positions[i] for i in starting],
                                   (cos[starting_d], sin[starting_d])).states[INPUT]
            self.prelude[slots_d[starting_d]] = e
            self.hidden[slots_d[starting_d]] = backbone.initial_state(e)
        e, state = self.prelude[slots_d], self.hidden[slots_d]

        # This step's pass, each row at its own (the layers of pass n are pass 0's shifted by n passes).
        inputs = LayerInputs((cos, sin), self._row_packing(first_rows_d, key_counts, offsets), shifts_d,
                             check_indices=False)
        state = self._run_layers(None, self.pass_steps, inputs, first_rows_d + positions_d, states=[e, state]).hidden
        self.hidden[slots_d] = state

        finishing = [i for i, n in enumerate(passes) if n + 1 == engine.num_loops]
        may_exit = [] if engine.exit_rule is None else [i for i, n in enumerate(passes) if n + 1 < engine.num_loops]
        deciding = finishing + may_exit
        done, tokens = finishing, []
        if deciding:
            deciding_d = self._to_device(deciding)[0]
            logits = self._readout([busy[i] for i in deciding], [positions[i] for i in deciding], e[deciding_d],
                                   state[deciding_d], (cos[deciding_d], sin[deciding_d]))
            tokens_d = self.pick(logits)
            leaving = torch.ones(len(deciding), dtype=torch.bool, device=self.device)
            if may_exit:
                leaving = self._exit_decisions(finishing, [busy[i] for i in may_exit], state[deciding_d, 0], logits)
            all_tokens, left = torch.stack((tokens_d, leaving.long())).tolist()
            exited = [i for i, gone in zip(may_exit, left[len(finishing):]) if gone]
            self._store_skipped([busy[i] for i in exited], self._to_device(exited)[0] if exited else None, e, state,
                                (cos, sin))
            done = sorted(finishing + exited)
            token_of = dict(zip(deciding, all_tokens))
            tokens = [token_of[i] for i in done]
            if done:
                done_d = self._to_device([busy[i] for i in done], tokens)
                self.hidden[done_d[0]] = backbone.embed(done_d[1][:, None])

        self._finish_step(busy, done, tokens)

    def _readout(self, slots: List[int], positions: List[int], e: Tensor, state: Tensor,
                 position_embeddings: Tuple[Tensor, Tensor]) -> Tensor:
        """The next-token logits (rows, vocab) of the core ``state`` of the tokens of ``slots``: the norm, the coda
        (writing its keys at the tokens' positions), the final norm, the LM head."""
        backbone = self.backbone
        coda = self._plain_layers(self.after, None, slots, positions, position_embeddings,
                                  states=[e, backbone.norm(state)]).hidden
        return self.model.lm_head(backbone.final_norm(coda[:, 0]))

    def _store_skipped(self, slots: List[int], rows_d, e: Tensor, state: Tensor,
                       position_embeddings: Tuple[Tensor, Tensor]) -> None:
        """For the tokens of ``slots`` that left early this step (``rows_d``: their rows among the step's), the keys
        and values of every pass they skip, from their exit states (the strategy of ``generate``: each skipped layer
        projects them through its own norm, the first of a pass after the adapter's injection). Called before the
        step's bookkeeping."""
        if not slots:
            return
        width, rows = len(self.pass_steps), rows_d.tolist()
        pairs = [(row, slot, n) for row, slot in zip(rows, slots)
                 for n in range(self.loop[slot] + 1, self.engine.num_loops)]
        if not pairs:
            return
        first = self.before[-1] + 1
        pair_rows, shifts, store_rows = self._to_device(
            [row for row, _, _ in pairs], [n * width for _, _, n in pairs],
            [self._flat_row(first + n * width, slot) + self.length[slot] for _, slot, n in pairs])
        cos, sin = position_embeddings
        inputs = LayerInputs((cos[pair_rows], sin[pair_rows]), None, shifts, check_indices=False)
        self._run_layers(None, self.pass_steps, inputs, store_rows, keys_only=True,
                         states=[e[pair_rows], state[pair_rows]])
