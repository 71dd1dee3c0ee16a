"""One :class:`recursive.DepthBatchingEngine` run on a plain stack of layers: the slots, their caches and the
queue, and the step that advances every busy row by one loop (each at its own), with early exit."""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import accumulate
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor

from ..progress import Progress

from ..cache import LayerKV, VarlenPacking, ints_to_device
from ..nn import rotary_embedding
from .early_exit import top_probability


@dataclass
class EngineStats:
    """Counts of the last :meth:`DepthBatchingEngine.generate` run.

    ``new_tokens``: tokens generated (the first of each request comes from its prefill); ``steps``:
    engine steps (one loop over the blocks for every busy row); ``decoded_tokens``: tokens produced by
    engine steps; ``mean_exit_loops``: the loops those tokens ran, on average, of ``num_loops`` (a
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


class EngineRun:
    """The state of one :meth:`DepthBatchingEngine.generate` call: slots, their caches and the queue."""

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
        # in-flight token's position and the loops it has run. Its hidden state lives on the device.
        self.length = [0] * slots
        self.loop = [0] * slots
        self.hidden = torch.zeros(slots, 1, config.hidden_size, **options)
        self.device = weight.device
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
        """Prefill waiting requests into the free slots until none is free or none waits."""
        while self.waiting:
            free = [slot for slot, request in enumerate(self.slot_request) if request is None]
            if not free:
                return
            batch = [self.waiting.pop() for _ in range(min(len(free), len(self.waiting)))]
            self._prefill(batch, free[: len(batch)])

    def _prefill(self, batch: List[Request], slots: List[int]) -> None:
        """Run the prompts of ``batch`` (right-padded into one batch), store their caches in ``slots``
        and emit their first tokens; requests done at once leave their slot free."""
        device = self.device
        width = max(len(r.tokens) for r in batch)
        ids, mask, lengths, slot_index = self._to_device(
            [token for r in batch for token in r.tokens + [0] * (width - len(r.tokens))],
            [int(i < len(r.tokens)) for r in batch for i in range(width)], [len(r.tokens) for r in batch], slots)
        ids, mask = ids.view(len(batch), width), mask.view(len(batch), width)
        out = self.model(ids, attention_mask=mask, use_cache=True)
        self._store_prompts(out, slot_index, slots, width)
        first = self.pick(out.logits[torch.arange(len(batch), device=device), lengths - 1])
        for request, slot in zip(batch, slots):
            self.length[slot], self.loop[slot] = len(request.tokens), 0
        self.hidden[slot_index] = self.backbone.embed(first[:, None])
        for request, slot, token in zip(batch, slots, first.tolist()):
            if not self._emit(request, token):
                self.slot_request[slot] = request

    def _store_prompts(self, out, slot_index: Tensor, slots: List[int], width: int) -> None:
        """Copy the prefill's cache (``out.past_key_values``) into ``slots``."""
        for layer, present in enumerate(out.past_key_values):
            self._store_prompt_layer(layer, present, slot_index, slots, width)

    def _store_prompt_layer(self, layer: int, present, slot_index: Tensor, slots: List[int], width: int) -> None:
        """One layer of :meth:`_store_prompts`: a :class:`LayerKV` (B, Hkv, width, .)."""
        for cache, tensor in zip(self.caches(), present):
            if tensor is not None:
                cache[layer, slot_index, :width] = tensor.transpose(1, 2)

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
        )

    def _run_block(self, layer: int, hidden: Tensor, depth: Union[int, Tensor], position_embeddings: Tuple[Tensor, Tensor],
                   packing: VarlenPacking, store_rows: Tensor, shift: int) -> Tensor:
        """The block of effective ``layer`` on ``hidden`` (rows, 1, hidden) at ``depth`` (an int, or one
        per row), ``shift`` rows on in the flattened caches: each row writes its new keys at ``store_rows +
        shift`` and reads the keys of ``packing`` shifted so."""
        return self.backbone.blocks[self.backbone.block_of_layer[layer]](
            hidden, depth, position_embeddings, replace(packing, key_rows=packing.key_rows + shift),
            SlotCache(self, store_rows + shift), check_depth=False)[0]

    def _store(self, rows: Tensor, new: LayerKV) -> None:
        """Write the newest keys and values of ``new`` (the last of its sequence) at flattened cache ``rows``."""
        for cache, tensor in zip(self.caches(), new):
            if tensor is not None:
                cache.view(-1, *cache.shape[3:]).index_copy_(0, rows, tensor[:, :, -1])

    def _step(self) -> None:
        """Advance every busy slot's token by one loop; finish, exit and restart tokens.

        The step's indices come from the host's bookkeeping in one copy to the device, and the one read back
        is the new tokens (with which rows left early): at most one host synchronisation per step on a GPU.
        """
        engine, config, backbone = self.engine, self.config, self.backbone
        busy = [slot for slot, request in enumerate(self.slot_request) if request is not None]
        rows = len(busy)
        positions = [self.length[slot] for slot in busy]
        loops = [self.loop[slot] + 1 for slot in busy]  # after this step
        first_layers = [(loop - 1) * engine.loop_length for loop in loops]
        first_rows = [self._flat_row(layer, slot) for layer, slot in zip(first_layers, busy)]
        finishing = [i for i, loop in enumerate(loops) if loop == engine.num_loops]
        key_counts = [position + 1 for position in positions]
        slots, positions_d, first_layers_d, first_rows_d, offsets, finishing_d = self._to_device(
            busy, positions, first_layers, first_rows, key_offsets(key_counts), finishing)
        # Each row reads positions [0, position] (its cache and the new token) of its (layer, slot) in the
        # flattened caches; the layer of block offset o is loop * loop_length + o, so the rows of offset o
        # are those of offset 0 shifted by o layers.
        packing = self._row_packing(first_rows_d, key_counts, offsets)
        position_embeddings = rotary_embedding(positions_d[:, None], config.head_dim, config.rope_theta, self.hidden.dtype)
        hidden = self.hidden[slots]

        def run_offset(offset: int, hidden: Tensor) -> Tensor:
            # the same block at this offset of every loop
            return self._run_block(offset, hidden, first_layers_d + offset, position_embeddings, packing,
                                   first_rows_d + positions_d, offset * self.layer_stride)

        if config.sharing == "hierarchical":  # one loop of every layer, in the HRM data flow
            hidden = backbone.hierarchical(hidden, run_offset)
        else:
            for offset in range(engine.loop_length):
                hidden = run_offset(offset, hidden)

        if engine.exit_threshold is None:
            self.hidden[slots] = hidden
            done, tokens = finishing, []
            if finishing:  # else nothing to read back this step
                tokens_d = self.pick(self.model.logits_at(hidden[finishing_d, 0]))
                self.hidden[slots[finishing_d]] = backbone.embed(tokens_d[:, None])
                tokens = tokens_d.tolist()
        else:
            logits = self.model.logits_at(hidden[:, 0])
            can_exit = torch.ones(rows, dtype=torch.bool, device=self.device).index_fill_(0, finishing_d, False)
            leaving = can_exit & (top_probability(logits) >= engine.exit_threshold)
            tokens_d = self.pick(logits)
            self.hidden[slots] = torch.where((leaving | ~can_exit)[:, None, None], backbone.embed(tokens_d[:, None]), hidden)
            all_tokens, left = torch.stack((tokens_d, leaving.long())).tolist()
            exited = [i for i in range(rows) if left[i]]
            self._store_deeper(exited, busy, positions, loops, hidden, position_embeddings)
            done = sorted(finishing + exited)
            tokens = [all_tokens[i] for i in done]

        self.stats.steps += 1
        self.stats.decoded_tokens += len(done)
        for slot, loop in zip(busy, loops):
            self.loop[slot] = loop
        for i, token in zip(done, tokens):
            slot = busy[i]
            self.exit_loops_sum += loops[i]
            self.length[slot] += 1
            self.loop[slot] = 0
            if self._emit(self.slot_request[slot], token):
                self.slot_request[slot] = None

    def _store_deeper(self, exited: List[int], busy: List[int], positions: List[int], loops: List[int], hidden: Tensor,
                      position_embeddings: Tuple[Tensor, Tensor]) -> None:
        """For the rows ``exited`` (indices into the step's rows), the keys and values of every layer
        they skip, from their exit hidden states: one ``key_value`` call per block over (row, loop) pairs."""
        if not exited:
            return
        engine = self.engine
        pairs = [(i, loop) for i in exited for loop in range(loops[i], engine.num_loops)]
        first_layers = [loop * engine.loop_length for _, loop in pairs]
        rows, first_layers_d, first_rows_d = self._to_device(
            [i for i, _ in pairs], first_layers,
            [self._flat_row(layer, busy[i]) + positions[i] for (i, _), layer in zip(pairs, first_layers)])
        cos, sin = position_embeddings
        for offset in range(engine.loop_length):
            block_index = self.backbone.block_of_layer[offset]
            new = self.backbone.blocks[block_index].key_value(hidden[rows], first_layers_d + offset, (cos[rows], sin[rows]),
                                                              check_depth=False)
            self._store(first_rows_d + offset * self.layer_stride, new)


class SlotCache:
    """One engine step's cache at one block offset, for :meth:`recursive.nn.CircuitAttention.forward`:
    ``append`` writes the rows' new keys and values at flattened cache ``rows`` and returns the whole
    flattened caches, (1, Hkv, L * slots * T, .) views, from which the step's packing picks each row's keys."""

    def __init__(self, run: EngineRun, rows: Tensor) -> None:
        self.run, self.rows = run, rows

    def append(self, new: LayerKV) -> LayerKV:
        self.run._store(self.rows, new)
        return LayerKV(*(None if tensor is None else cache.view(1, -1, *cache.shape[3:]).transpose(1, 2)
                         for cache, tensor in zip(self.run.caches(), new)))


def key_offsets(key_counts: Sequence[int]) -> List[int]:
    """``[0, 1, .., rows]`` (one query per row) followed by the cumulative ``key_counts`` from 0: the
    offsets of :meth:`EngineRun._row_packing`."""
    return list(range(len(key_counts) + 1)) + list(accumulate(key_counts, initial=0))
