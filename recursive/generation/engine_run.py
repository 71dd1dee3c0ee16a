"""One :class:`recursive.DepthBatchingEngine` run on a plain stack of layers: the slots, their caches and the
queue, and the step that advances every in-flight token by one loop (each at its own), with early exit. A new
request's prompt rides along in the steps (its tokens advance one loop per step beside the decoding tokens)
instead of taking a forward of its own."""

from __future__ import annotations

from dataclasses import dataclass
from itertools import accumulate
from typing import Callable, Iterator, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..cache import LayerKV, VarlenPacking, ints_to_device
from ..loops import LayerInputs, LayerStep
from ..nn import rotary_embedding, rotary_rows
from ..progress import Progress


@dataclass
class EngineStats:
    """Counts of the last :meth:`DepthBatchingEngine.generate` run.

    ``new_tokens``: tokens generated (the first of each request comes from its prompt's last token);
    ``steps``: engine steps (one loop over the blocks for every in-flight token); ``decoded_tokens``: tokens
    decoded from an earlier new token (every new token but each request's first); ``mean_exit_loops``: the
    loops those tokens ran, on average, of ``num_loops`` (a
    Mixture-of-Recursions model: its recursions; an HRM model: its one loop).
    """

    new_tokens: int = 0
    steps: int = 0
    decoded_tokens: int = 0
    mean_exit_loops: float = 0.0
    num_loops: int = 1


@dataclass
class Request:
    index: int
    tokens: List[int]  # prompt, then the generated tokens
    max_new_tokens: int
    generated: int = 0
    span: Tuple[int, int] = (0, 0)  # a prefix LM's prompt: its tokens [start, end) attend both ways; empty: none


class EngineRun:
    """The state of one :meth:`DepthBatchingEngine.generate` call: slots, their caches and the queue."""

    # A prompt's tokens run in the engine's steps, one loop per step like the decoding tokens (the per-row
    # packing serves a prompt token as a row attending over its slot's cache up to itself). Per-step costs on
    # a small batch are mostly per call, so the prompt rows cost little there, where a forward of their own
    # would pay all of them again for every admission.
    prefills_in_steps = True

    def __init__(self, engine, requests: List[Request], eos_token_id: Optional[int],
                 progress: Optional[Progress], pick: Callable[[Tensor], Tensor]) -> None:
        self.engine, self.model, self.eos_token_id, self.progress = engine, engine.model, eos_token_id, progress
        self.pick = pick  # next-token logits (rows, vocab) -> tokens (rows,)
        self.requests = requests
        self.emitted: List[Tuple[int, int]] = []  # (request, token) since the last yield of run()
        self.config = config = self.model.config
        self.backbone = self.model.model
        self.waiting = [request for request in requests if request.max_new_tokens > 0]
        self.waiting.reverse()  # popped from the end, in order
        self.stats = EngineStats(num_loops=engine.num_loops)
        self.exit_loops_sum = 0
        if engine.exit_rule is not None:  # each slot's exit-rule state (of its decoding token)
            self.exit_state = engine.exit_rule.initial_state(engine.max_batch_size, engine.model)

        slots = engine.max_batch_size
        capacity = max((len(r.tokens) + r.max_new_tokens for r in self.waiting), default=1)
        weight = self.backbone.embed_tokens.weight
        options = {"device": weight.device, "dtype": weight.dtype}
        kv_shape = (config.num_layers, slots, capacity, config.num_key_value_heads, config.head_dim)
        self.keys, self.values = torch.zeros(kv_shape, **options), torch.zeros(kv_shape, **options)
        self.keys_c = self.values_c = None
        if any(block.self_attn.qk_u is not None for block in self.backbone.blocks):
            # zeros: rows at a layer without circuit factors multiply these by zero, so they must be finite
            circuit_shape = kv_shape[:-1] + (config.circuit_rank,)
            self.keys_c, self.values_c = torch.zeros(circuit_shape, **options), torch.zeros(circuit_shape, **options)
        self.slot_request: List[Optional[Request]] = [None] * slots
        # Per slot, kept on the host (a step builds its indices from them without reading the device): the
        # tokens in its cache, the loops its in-flight tokens have run, how many are in flight (its prompt
        # while it prefills, else the one token being decoded) and whether it prefills. Their hidden states
        # live on the device, row j of slot s at row s * rows_per_slot + j of ``hidden``.
        self.length = [0] * slots
        self.loop = [0] * slots
        self.in_flight = [0] * slots
        self.prefilling = [False] * slots
        self.rows_per_slot = max((len(r.tokens) for r in self.waiting), default=1) if self.prefills_in_steps else 1
        self.hidden = torch.zeros(slots * self.rows_per_slot, 1, config.hidden_size, **options)
        self.device = weight.device
        # RoPE of every position a request can reach, once: a step picks its rows' (rotary_rows)
        self.rotary_table = rotary_embedding(torch.arange(capacity, device=self.device)[None], config.head_dim,
                                             config.rope_theta, weight.dtype)
        # Rows of the flattened (L * slots * T, Hkv, .) caches: T per slot, slots * T per layer.
        self.capacity, self.layer_stride = capacity, slots * capacity

    @torch.no_grad()  # torch's decorator holds for a generator's own frames only, not the caller's between them
    def run(self) -> Iterator[Tuple[int, int]]:
        """Decode every request; yields each step's ``(request, token)`` pairs after the step."""
        self._admit()
        yield from self._take_emitted()
        while any(request is not None for request in self.slot_request):
            self._step()
            self._admit()
            yield from self._take_emitted()
        if self.stats.decoded_tokens:
            self.stats.mean_exit_loops = self.exit_loops_sum / self.stats.decoded_tokens

    def _take_emitted(self) -> List[Tuple[int, int]]:
        emitted, self.emitted = self.emitted, []
        return emitted

    # Requests.

    def _emit(self, request: Request, token: int) -> bool:
        """Record ``token``; True when the request is done."""
        request.tokens.append(token)
        request.generated += 1
        self.emitted.append((request.index, token))
        self.stats.new_tokens += 1
        if self.progress is not None:
            self.progress.step(f"request {request.index}")
        return request.generated == request.max_new_tokens or token == self.eos_token_id

    def _admit(self) -> None:
        """Start waiting requests in the free slots until none is free or none waits."""
        while self.waiting:
            free = [slot for slot, request in enumerate(self.slot_request) if request is None]
            if not free:
                return
            batch = [self.waiting.pop() for _ in range(min(len(free), len(self.waiting)))]
            self._start(batch, free[: len(batch)])

    def _start(self, batch: List[Request], slots: List[int]) -> None:
        """Put the prompts of ``batch`` in flight in ``slots``: their embeddings, at loop 0; a run that does not
        prefill in its steps prefills them by a forward of the model and emits their first tokens (requests done at
        once leave their slot free)."""
        if not self.prefills_in_steps:
            first = self._prefill(batch, slots)
            for request, slot in zip(batch, slots):
                self.length[slot], self.loop[slot] = len(request.tokens), 0
            self.hidden[self._to_device(slots)[0]] = self.backbone.embed(first[:, None])
            for request, slot, token in zip(batch, slots, first.tolist()):
                if not self._emit(request, token):
                    self.slot_request[slot] = request
            return
        for request, slot in zip(batch, slots):
            self.slot_request[slot] = request
            self.length[slot], self.loop[slot] = 0, 0
            self.in_flight[slot], self.prefilling[slot] = len(request.tokens), True
        ids, rows = self._to_device(
            [token for request in batch for token in request.tokens],
            [slot * self.rows_per_slot + j for request, slot in zip(batch, slots) for j in range(len(request.tokens))])
        self.hidden.index_copy_(0, rows, self.backbone.embed(ids[:, None]))

    # One step.

    def caches(self) -> Tuple[Optional[Tensor], ...]:
        """The slot caches in :class:`LayerKV` order."""
        return self.keys, self.values, self.keys_c, self.values_c

    def _flat_row(self, layer: int, slot: int) -> int:
        """The row of position 0 of (layer, slot) in the flattened (L * slots * T, Hkv, .) caches."""
        return layer * self.layer_stride + slot * self.capacity

    def _to_device(self, *columns: Sequence[int]) -> List[Tensor]:
        """Host integer lists as int64 tensors on the model's device, in one copy that does not wait for
        the queued work."""
        return ints_to_device(self.device, *columns)

    def _row_packing(self, first_rows: Tensor, key_counts: List[int], offsets: Tensor) -> VarlenPacking:
        """The packing of one query per row, row i attending over ``key_counts[i]`` consecutive rows of the
        flattened caches from ``first_rows[i]``; ``offsets``: :func:`key_offsets` of ``key_counts`` on the
        device."""
        rows, total = len(key_counts), sum(key_counts)
        starts = offsets[rows + 1:-1]
        key_rows = torch.repeat_interleave(first_rows - starts, offsets[rows + 2:] - starts, output_size=total)
        offsets32 = offsets.to(torch.int32)
        return VarlenPacking(
            query_rows=offsets[:rows], key_rows=key_rows + torch.arange(total, device=self.device),
            cu_seqlens_q=offsets32[: rows + 1], cu_seqlens_k=offsets32[rows + 1:], max_seqlen_q=1,
            max_seqlen_k=max(key_counts), query_mask=torch.ones(rows, 1, dtype=torch.bool, device=self.device),
            every_query=True,
        )

    def _run_layers(self, hidden: Optional[Tensor], steps: Sequence[LayerStep], inputs: LayerInputs,
                    store_rows: Tensor, keys_only: bool = False, states: Optional[Sequence[Tensor]] = None):
        """Consecutive effective-layer ``steps`` on the rows ``hidden`` (rows, 1, hidden) (or their ``states``): at
        step j each row writes its new keys at ``store_rows`` of the flattened caches shifted j layers on, and reads
        the keys of ``inputs.packing`` (built for the first step's layer) shifted so (:class:`SlotCache`); the
        :class:`recursive.outputs.LayersOutput`."""
        caches = [SlotCache(self, store_rows, j * self.layer_stride) for j in range(len(steps))]
        return self.backbone.run_layers(hidden, steps, inputs, caches, keys_only=keys_only, states=states)

    def _plain_layers(self, layers: List[int], hidden: Optional[Tensor], slots: List[int], positions: List[int],
                      position_embeddings: Tuple[Tensor, Tensor], states: Optional[Sequence[Tensor]] = None):
        """The consecutive effective ``layers`` that every token runs (before or after the loops) on ``hidden``
        (rows, 1, hidden) (or their ``states``), the token of each of ``slots`` at its position."""
        first_rows = [self._flat_row(layers[0], slot) for slot in slots]
        key_counts = [position + 1 for position in positions]
        first_rows_d, store_rows_d, offsets = self._to_device(
            first_rows, [row + position for row, position in zip(first_rows, positions)], key_offsets(key_counts))
        packing = self._row_packing(first_rows_d, key_counts, offsets)
        steps = [self.backbone.shape.steps[layer] for layer in layers]
        return self._run_layers(hidden, steps, LayerInputs(position_embeddings, packing), store_rows_d, states=states)

    def _prefill(self, batch: List[Request], slots: List[int]) -> Tensor:
        """Run the prompts of ``batch`` (right-padded into one batch) through the model, store their caches in
        ``slots`` and return their first tokens (on the device); for runs that do not prefill in their steps."""
        width = max(len(r.tokens) for r in batch)
        ids, mask, types, lengths, slot_index = self._to_device(
            [token for r in batch for token in r.tokens + [0] * (width - len(r.tokens))],
            [int(i < len(r.tokens)) for r in batch for i in range(width)],
            [int(r.span[0] <= i < r.span[1]) for r in batch for i in range(width)], [len(r.tokens) for r in batch],
            slots)
        ids, mask, types = (t.view(len(batch), width) for t in (ids, mask, types))
        spans = any(r.span[0] < r.span[1] for r in batch)  # a prefix LM's prompts: their types go to the forward
        out = self.model(ids, attention_mask=mask, use_cache=True, token_type_ids=types if spans else None)
        self._store_prompt(out, slot_index, slots, width)
        return self.pick(out.logits[torch.arange(len(batch), device=self.device), lengths - 1])

    def _store_prompt(self, out, slot_index: Tensor, slots: List[int], width: int) -> None:
        """The prefill's cache (one :class:`LayerKV` (B, width, Hkv, .) per layer) into ``slots``."""
        for layer, present in enumerate(out.past_key_values):
            for cache, tensor in zip(self.caches(), present):
                if tensor is not None:
                    cache[layer, slot_index, :width] = tensor

    def _step(self) -> None:
        """Advance every in-flight token by one loop; finish, exit and restart tokens.

        The rows are the in-flight tokens: a decoding slot's one and a prefilling slot's whole prompt, each
        token attending over its slot's cache up to itself. A slot whose tokens finish their last loop gives
        its request's next token (a prompt: from its last token); a decoding token may leave early. The
        step's indices come from the host's bookkeeping in one copy to the device, and the one read back is
        the new tokens (with which rows left early): at most one host synchronisation per step on a GPU.
        """
        engine, backbone = self.engine, self.backbone
        busy = [slot for slot, request in enumerate(self.slot_request) if request is not None]
        row_slots = [slot for slot in busy for _ in range(self.in_flight[slot])]
        positions = [self.length[slot] + j for slot in busy for j in range(self.in_flight[slot])]
        hidden_rows = [slot * self.rows_per_slot + j for slot in busy for j in range(self.in_flight[slot])]
        last_rows = list(accumulate(self.in_flight[slot] for slot in busy))  # one past each slot's rows
        first_layers = [self.loop[slot] * engine.loop_length for slot in row_slots]
        first_rows = [self._flat_row(layer, slot) for layer, slot in zip(first_layers, row_slots)]
        key_counts = [self._key_count(slot, position) for slot, position in zip(row_slots, positions)]
        # The rows that give a token: each slot's last row once its tokens run their last loop; without
        # that, a decoding row may leave early (index into ``busy``: ``finishing`` and ``may_exit``).
        finishing = [i for i, slot in enumerate(busy) if self.loop[slot] + 1 == engine.num_loops]
        may_exit = [] if engine.exit_rule is None else [
            i for i, slot in enumerate(busy) if not self.prefilling[slot] and self.loop[slot] + 1 < engine.num_loops]
        deciding = finishing + may_exit
        hidden_rows_d, positions_d, first_layers_d, first_rows_d, offsets, deciding_rows_d, deciding_slots_d = (
            self._to_device(hidden_rows, positions, first_layers, first_rows, key_offsets(key_counts),
                            [last_rows[i] - 1 for i in deciding], [busy[i] * self.rows_per_slot for i in deciding]))
        # Each row reads positions [0, position] (its cache and the new token) of its (layer, slot) in the
        # flattened caches; the layer of block offset o is loop * loop_length + o, so the rows of offset o
        # are those of offset 0 shifted by o layers.
        packing = self._row_packing(first_rows_d, key_counts, offsets)
        position_embeddings = rotary_rows(self.rotary_table, positions_d)
        hidden = self.hidden[hidden_rows_d]

        # Rows all at one loop (as without early exit, where tokens finish together) share one depth: an int,
        # which the blocks serve as one adapter for every row, with no per-row indices to build and check.
        one_loop = len({self.loop[slot] for slot in busy}) == 1
        inputs = LayerInputs(position_embeddings, packing, first_layers[0] if one_loop else first_layers_d,
                             check_indices=False)
        # the first loop's steps, each row at its own loop (an HRM model's one loop: its whole stack)
        hidden = self._run_layers(hidden, backbone.shape.steps[:engine.loop_length], inputs,
                                  first_rows_d + positions_d).hidden

        self.hidden[hidden_rows_d] = hidden
        done, tokens = finishing, []
        if deciding:  # else nothing to read back this step
            decided = hidden[deciding_rows_d, 0]
            logits = self.model.logits_at(decided)
            tokens_d = self.pick(logits)
            if may_exit:
                leaving = self._exit_decisions(finishing, [busy[i] for i in may_exit], decided, logits)
                self.hidden[deciding_slots_d] = torch.where(leaving[:, None, None], backbone.embed(tokens_d[:, None]),
                                                            decided[:, None])
                all_tokens, left = torch.stack((tokens_d, leaving.long())).tolist()
                exited = [i for i, gone in zip(may_exit, left[len(finishing):]) if gone]
                self._store_deeper([busy[i] for i in exited], [last_rows[i] - 1 for i in exited], hidden,
                                   position_embeddings)
                done = sorted(finishing + exited)
                token_of = dict(zip(deciding, all_tokens))
                tokens = [token_of[i] for i in done]
            else:
                self.hidden[deciding_slots_d] = backbone.embed(tokens_d[:, None])
                tokens = tokens_d.tolist()

        self._finish_step(busy, done, tokens)

    def _key_count(self, slot: int, position: int) -> int:
        """How many of its slot's keys the token at ``position`` attends over: those up to itself, or, for a prompt
        token in its request's bidirectional span, those up to the span's end (all written before attention)."""
        start, end = self.slot_request[slot].span
        if self.prefilling[slot] and start <= position < end:
            return end
        return position + 1

    def _finish_step(self, busy: List[int], done: List[int], tokens: List[int]) -> None:
        """The step's bookkeeping: every busy slot ran one more loop; the rows ``done`` (indices into ``busy``) gave
        ``tokens``, their slots' next tokens start at loop 0, and requests that are done free their slots."""
        self.stats.steps += 1
        for slot in busy:
            self.loop[slot] += 1
        for i, token in zip(done, tokens):
            slot = busy[i]
            if self.prefilling[slot]:  # the prompt is in the cache now; its first token comes next
                self.length[slot] += self.in_flight[slot]
                self.in_flight[slot], self.prefilling[slot] = 1, False
            else:
                self.stats.decoded_tokens += 1
                self.exit_loops_sum += self.loop[slot]
                self.length[slot] += 1
            self.loop[slot] = 0
            if self._emit(self.slot_request[slot], token):
                self.slot_request[slot] = None

    def _exit_decisions(self, finishing: List[int], slots: List[int], decided: Tensor, logits: Tensor) -> Tensor:
        """Which deciding rows leave (``finishing`` ones first: they give a token anyway; then the decoding rows of
        ``slots``, by the engine's exit rule, whose states this updates): (rows,) bool."""
        rule, rows = self.engine.exit_rule, len(finishing)
        loops = [self.loop[slot] + 1 for slot in slots]  # the loops each has run, this one included
        slots_d, fresh_d, loops_d = self._to_device(slots, [int(loop == 1) for loop in loops], loops)
        state = torch.where(fresh_d.bool()[:, None], rule.initial_state(len(slots), self.model),
                            self.exit_state[slots_d])  # a token's first boundary starts from the initial state
        leaving, self.exit_state[slots_d] = rule.decide(self.model, loops_d, decided[rows:], logits[rows:], state)
        return torch.cat((torch.ones(rows, dtype=torch.bool, device=self.device), leaving))

    def _store_deeper(self, slots: List[int], rows: List[int], hidden: Tensor,
                      position_embeddings: Tuple[Tensor, Tensor]) -> None:
        """For the decoding tokens of ``slots`` that left early this step (``rows``: theirs among the step's),
        the keys and values of every layer they skip, from their exit hidden states: one ``key_value`` call
        per block over (row, loop) pairs. Called before the step's bookkeeping."""
        if not slots:
            return
        engine = self.engine
        pairs = [(row, slot, loop) for row, slot in zip(rows, slots)
                 for loop in range(self.loop[slot] + 1, engine.num_loops)]
        first_layers = [loop * engine.loop_length for _, _, loop in pairs]
        rows_d, first_layers_d, first_rows_d = self._to_device(
            [row for row, _, _ in pairs], first_layers,
            [self._flat_row(layer, slot) + self.length[slot] for (_, slot, _), layer in zip(pairs, first_layers)])
        cos, sin = position_embeddings
        inputs = LayerInputs((cos[rows_d], sin[rows_d]), None, first_layers_d, check_indices=False)
        self._run_layers(hidden[rows_d], self.backbone.shape.steps[:engine.loop_length], inputs, first_rows_d,
                         keys_only=True)


class SlotCache:
    """One engine step's cache at one layer (a :class:`recursive.cache.KVCache`): the slot caches flattened to
    (L * slots * T, Hkv, .) rows, from row ``start`` on (the first of the layer the step's packing was built
    for, ``start`` rows before this one). ``append`` writes the rows' new keys and values at ``rows`` of them
    and returns them all, as (1, rows, Hkv, .) views, from which the step's packing picks each row's keys."""

    def __init__(self, run: EngineRun, rows: Tensor, start: int) -> None:
        self.run, self.rows, self.start = run, rows, start

    def append(self, new: LayerKV) -> LayerKV:
        views = []
        for cache, tensor in zip(self.run.caches(), new):
            if tensor is None:
                views.append(None)
                continue
            flat = cache.view(-1, *cache.shape[3:])[self.start:]
            flat.index_copy_(0, self.rows, tensor[:, -1])  # the newest keys: the last of their sequence
            views.append(flat.unsqueeze(0))
        return LayerKV(*views)


def key_offsets(key_counts: Sequence[int]) -> List[int]:
    """``[0, 1, .., rows]`` (one query per row) followed by the cumulative ``key_counts`` from 0: the
    offsets of :meth:`EngineRun._row_packing`."""
    return list(range(len(key_counts) + 1)) + list(accumulate(key_counts, initial=0))
