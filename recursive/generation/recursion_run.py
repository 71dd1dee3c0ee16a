"""One :class:`recursive.DepthBatchingEngine` run on a Mixture-of-Recursions model with causal routing: a step
runs one recursion for every busy row, each at its own, and the routers end each token's run."""

from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch
from torch import Tensor

from ..cache import RecursionKV
from ..loops import LayerInputs
from ..nn import rotary_rows
from ..progress import Progress
from .engine_run import EngineRun, Request, key_offsets
from .exit_rules import RouterExit


class RecursionEngineRun(EngineRun):
    """:class:`EngineRun` for a Mixture-of-Recursions model with causal routing: a step runs one
    recursion for every busy row, each row at its own, and the routing ends a token's run.

    A token starts with the layers before the recursions and its routing (token choice: its depth;
    threshold routing: its first router's logit), runs one recursion per step (gated as in the
    model's forward), and once the routing ends it (token choice: at its depth; threshold routing: at a
    recursion whose router says no, decided on the step's output for the next one, or at the first)
    runs the layers after the recursions and the LM head, which gives the request's next token. The routing is the
    run's exit rule (:class:`recursive.generation.exit_rules.RouterExit`). Rows
    that finish and the rows of a new request share the steps with the others.

    Recursion-wise cache: the layers of recursion r hold, per slot, the keys of the slot's tokens that
    ran r at consecutive positions (``count[slot][r]`` of them, known on the host); with KV sharing
    the later recursions attend over the first one's (writing their own keys to their unused caches).
    Per step the host reads back which rows ran and go on, then the finished rows' tokens. A prompt is
    prefilled by a forward of the model (its routing is the forward's, over the whole prompt).
    """

    prefills_in_steps = False

    def __init__(self, engine, requests: List[Request], eos_token_id: Optional[int],
                 progress: Optional[Progress], pick: Callable[[Tensor], Tensor]) -> None:
        super().__init__(engine, requests, eos_token_id, progress, pick)
        config = self.config
        self.before, self.recursions, self.after = config.recursions()
        slots = engine.max_batch_size
        self.count = [[0] * len(self.recursions) for _ in range(slots)]
        self.rule = RouterExit(config, self.device)  # the routing: what ends a token's run, and its gates
        self.route = self.rule.initial_state(slots, self.model)  # each slot's routing state

    def _store_prompt(self, out, slot_index: Tensor, slots: List[int], width: int) -> None:
        """The prefill's cache into ``slots``, and the tokens each ran per recursion: a recursion's
        :class:`RecursionKV` (each row's tokens, its True columns, to consecutive positions of its slot), a plain
        layer's :class:`LayerKV` (B, width, Hkv, .), or None (a later recursion under KV sharing)."""
        counts = torch.stack([(out.recursion_depths > r).sum(1) for r in range(len(self.recursions))], 1)
        for slot, slot_counts in zip(slots, counts.tolist()):
            self.count[slot] = slot_counts
        for layer, present in enumerate(out.past_key_values):
            if isinstance(present, RecursionKV):
                mask = present.token_mask
                first_rows = self._to_device([self._flat_row(layer, slot) for slot in slots])[0]
                rows = (first_rows[:, None] + mask.long().cumsum(1) - 1)[mask]
                for cache, tensor in zip(self.caches(), present.key_value):
                    if tensor is not None:
                        cache.view(-1, *cache.shape[3:]).index_copy_(0, rows, tensor[mask])
            elif present is not None:
                for cache, tensor in zip(self.caches(), present):
                    if tensor is not None:
                        cache[layer, slot_index, :width] = tensor

    def _step(self) -> None:
        config, backbone = self.config, self.backbone
        busy = [slot for slot, request in enumerate(self.slot_request) if request is not None]
        rows = len(busy)
        positions = [self.length[slot] for slot in busy]
        recursion = [self.loop[slot] for slot in busy]
        starting = [i for i in range(rows) if recursion[i] == 0]
        shared = [config.mor_kv_sharing and r > 0 for r in recursion]
        own_layers = [self.recursions[r][0] for r in recursion]
        store_rows = [self._flat_row(layer, slot) + self.count[slot][r]
                      for layer, slot, r in zip(own_layers, busy, recursion)]
        read_rows = [self._flat_row(self.recursions[0][0], slot) if reads_first else row - self.count[slot][r]
                     for reads_first, slot, r, row in zip(shared, busy, recursion, store_rows)]
        key_counts = [self.count[slot][0] if reads_first else self.count[slot][r] + 1
                      for reads_first, slot, r in zip(shared, busy, recursion)]
        slots, positions_d, recursion_d, own_layers_d, store_rows_d, read_rows_d, offsets, starting_d = self._to_device(
            busy, positions, recursion, own_layers, store_rows, read_rows, key_offsets(key_counts), starting)
        cos, sin = rotary_rows(self.rotary_table, positions_d)
        hidden = self.hidden[slots]
        if starting:
            start = hidden[starting_d]
            if self.before:
                start = self._plain_layers(self.before, start, [busy[i] for i in starting],
                                           [positions[i] for i in starting], (cos[starting_d], sin[starting_d])).hidden
                hidden = hidden.index_copy(0, starting_d, start)
            self._route_start(start[:, 0], slots[starting_d])

        # This step's recursion, each row at its own (its layers are consecutive: offset o is layer first + o).
        packing = self._row_packing(read_rows_d, key_counts, offsets)
        first = self.recursions[0]
        inputs = LayerInputs((cos, sin), packing, own_layers_d - first[0], check_indices=False)
        out = self._run_layers(hidden, [backbone.shape.steps[layer] for layer in first], inputs, store_rows_d).hidden
        ran, gate, gated = self._routing(slots, recursion_d)
        g = gate[:, None, None].to(hidden.dtype)
        out = torch.where(gated[:, None, None], hidden + g * (out - hidden), out)
        hidden = torch.where(ran[:, None, None], out, hidden)
        going_on = self._goes_on(hidden[:, 0], slots, recursion_d)
        self.hidden[slots] = hidden
        ran_host, going_on_host = torch.stack((ran, going_on)).tolist()

        done = [i for i in range(rows) if not going_on_host[i]]
        for i, slot in enumerate(busy):
            self.count[slot][recursion[i]] += ran_host[i]
            self.loop[slot] = recursion[i] + 1
        tokens = []
        if done:
            done_d = self._to_device(done)[0]
            finished = hidden[done_d]
            if self.after:
                finished = self._plain_layers(self.after, finished, [busy[i] for i in done],
                                              [positions[i] for i in done], (cos[done_d], sin[done_d])).hidden
            tokens_d = self.pick(self.model.logits_at(finished[:, 0]))
            self.hidden[slots[done_d]] = backbone.embed(tokens_d[:, None])
            tokens = tokens_d.tolist()
        self.stats.steps += 1
        self.stats.decoded_tokens += len(done)
        for i, token in zip(done, tokens):
            slot = busy[i]
            self.exit_loops_sum += recursion[i] + ran_host[i]
            self.length[slot] += 1
            self.loop[slot] = 0
            if self._emit(self.slot_request[slot], token):
                self.slot_request[slot] = None

    def _route_start(self, hidden: Tensor, slots: Tensor) -> None:
        """Routing of the tokens that start (``hidden`` (rows, hidden), after the layers before the
        recursions), as the model's forward does it."""
        self.route[slots] = self.rule.start(self.model, hidden)

    def _routing(self, slots: Tensor, recursion: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """For this step's recursion of each row: whether it runs it, its gate, and whether the gate applies (rows,)."""
        return self.rule.gate(self.route[slots], recursion)

    def _goes_on(self, hidden: Tensor, slots: Tensor, recursion: Tensor) -> Tensor:
        """Whether each row's token runs the next recursion, from this step's output ``hidden`` (rows, hidden)."""
        leaving, self.route[slots] = self.rule.decide(self.model, recursion + 1, hidden, None, self.route[slots])
        return ~leaving
