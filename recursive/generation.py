"""Generation for :class:`recursive.RecursiveForCausalLM`: sampling, KV-cached decoding with early exit,
and continuous depth-wise batching (:class:`DepthBatchingEngine`).

Loops. A model's loop is the shortest run of effective layers whose block pattern repeats over the
whole depth: with cycle sharing (layer l runs block ``l mod B``) the ``N = L / B`` loops are the passes
over the B blocks, loop n being layers ``n*B .. n*B + B - 1``; one shared block (any scheme) loops L
times over one layer. Sequence sharing with several blocks, middle-cycle sharing and untied models run
their stack as a single loop.

Early exit (``exit_threshold``). At the end of every loop but the last, a decoded token leaves when the
LM head's top probability there (final norm, ``lm_head``, softmax) reaches ``exit_threshold``; its
next-token logits are those at that boundary. Later tokens still attend to it at the deeper layers:
each deeper layer takes its keys and values from the token's hidden state at exit, through that
layer's own input norm and k/v projections with its depth's adapters
(:meth:`recursive.nn.RecursiveBlock.key_value`). Prompts (prefill) always run the full depth; early
exit applies to decoded tokens. ``None`` and ``1.0`` turn it off (1.0 is read as "off" because a
probability that rounds to 1.0 would otherwise reach it); a threshold below 1 on a model with a single
loop raises ``ValueError``.

Mixture-of-Recursions (causal routing, ``config.kv_cacheable``): ``generate`` decodes through the model's
own forward and recursion-wise cache; :class:`DepthBatchingEngine` runs one recursion per row and step,
and a token's routing, not its confidence, ends its run. Early exit is for plain stacks.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from functools import partial
from itertools import accumulate
from typing import Callable, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import Tensor

from .config import RecursiveConfig
from .nn import LayerKV, VarlenPacking, _ints_to_device, rotary_embedding
from .progress import Progress


# Sampling.


def top_k_filter(logits: Tensor, top_k: int) -> Tensor:
    """logits (B, V) with every entry below the row's ``top_k``-th largest set to -inf (ties with it
    stay, as in Hugging Face)."""
    kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[..., -1:]
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, top_p: float) -> Tensor:
    """logits (B, V) keeping, per row, the smallest set of most probable tokens whose probability mass
    reaches ``top_p`` (always at least the most probable one); the rest -inf."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= top_p  # the mass already reached p before this token
    drop_sorted[..., 0] = False
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def next_tokens(
    logits: Tensor, do_sample: bool = False, temperature: float = 1.0, top_k: Optional[int] = None,
    top_p: Optional[float] = None,
) -> Tensor:
    """logits (B, V) -> next tokens (B,) int64: the argmax, or with ``do_sample`` a draw from
    ``softmax(logits / temperature)`` after the top-k then the top-p filter (Hugging Face's order), in
    float32 at least, from torch's global generator (seed it with ``torch.manual_seed``)."""
    if not do_sample:
        return logits.argmax(-1)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32)) / temperature
    if top_k is not None:
        logits = top_k_filter(logits, top_k)
    if top_p is not None and top_p < 1.0:
        logits = top_p_filter(logits, top_p)
    return torch.multinomial(logits.softmax(-1), 1).squeeze(1)


# Loops and validation.


def loop_length(config: RecursiveConfig) -> int:
    """Effective layers per loop: the shortest period of the model's block pattern (see the module
    docstring); ``config.num_layers // loop_length(config)`` loops."""
    plan = [config.block_of_layer(layer) for layer in range(config.num_layers)]
    L = config.num_layers
    return next(p for p in range(1, L + 1) if L % p == 0 and all(plan[l] == plan[l % p] for l in range(L)))


def _check_exit_threshold(exit_threshold: Optional[float], config: RecursiveConfig) -> Optional[float]:
    """The threshold to apply, or None when early exit is off (None or 1.0)."""
    if exit_threshold is None:
        return None
    if isinstance(exit_threshold, bool) or not isinstance(exit_threshold, (int, float)) or not 0.0 < exit_threshold <= 1.0:
        raise ValueError(f"exit_threshold: expected None or a probability in (0, 1], got {exit_threshold!r}")
    if exit_threshold == 1.0:
        return None
    _check_loops("exit_threshold", config)
    return float(exit_threshold)


def _check_plain_stack(name: str, config: RecursiveConfig) -> None:
    """Raise ValueError naming ``name`` when the model's data flow is not one pass down its effective
    layers (hierarchical sharing, Mixture-of-Recursions): early exit steps through the layers
    themselves."""
    if config.sharing == "hierarchical" or config.mor_routing is not None:
        kind = ("hierarchical (HRM), whose fast and slow states flow differently" if config.sharing == "hierarchical"
                else "a Mixture-of-Recursions, whose routers decide each token's depth")
        raise ValueError(f"{name}: early exit steps through a plain stack of layers; this model is {kind}")


def _check_loops(name: str, config: RecursiveConfig) -> None:
    """Raise ValueError naming ``name`` when the model runs its layers as a single loop (no boundary to
    exit at), or not as a plain stack."""
    _check_plain_stack(name, config)
    if loop_length(config) == config.num_layers:
        raise ValueError(
            f"{name}: early exit happens at loop boundaries, and this model (sharing={config.sharing!r}, "
            f"num_layers={config.num_layers}, num_blocks={config.num_blocks}) runs its layers as a single loop"
        )


def _check_int(name: str, value: object, low: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name}: expected an int >= {low}, got {value!r}")
    return value


def _check_sampling(temperature: float, top_k: Optional[int], top_p: Optional[float]) -> None:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)) or not 0.0 < temperature < float("inf"):
        raise ValueError(f"temperature: expected a positive finite number, got {temperature!r}")
    if top_k is not None:
        _check_int("top_k", top_k, 1)
    if top_p is not None and (isinstance(top_p, bool) or not isinstance(top_p, (int, float)) or not 0.0 < top_p <= 1.0):
        raise ValueError(f"top_p: expected None or a number in (0, 1], got {top_p!r}")


def _check_token(name: str, token: Optional[int], vocab_size: int) -> None:
    if token is not None and (isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < vocab_size):
        raise ValueError(f"{name}: expected None or a token id in [0, {vocab_size}), got {token!r}")


def _check_ids(name: str, ids: Tensor, vocab_size: int) -> None:
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{name}: token ids must lie in [0, vocab_size={vocab_size}), got {int(ids.min())}..{int(ids.max())}")


def _lm_head(model, hidden: Tensor) -> Tensor:
    """The LM head at any depth: final norm and ``lm_head``, (*, hidden) -> (*, vocab)."""
    return model.lm_head(model.model.norm(hidden))


def _top_probability(logits: Tensor) -> Tensor:
    """(*, vocab) -> (*,), the largest softmax probability, in float32 at least."""
    return logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(-1).amax(-1)


@torch.no_grad()
def calibrate_exit_threshold(model, input_ids: Tensor, exit_fraction: float) -> float:
    """The exit threshold at which about ``exit_fraction`` of the tokens of ``input_ids`` (B, S) leave at
    the first loop boundary: the ``1 - exit_fraction`` quantile of the LM head's top probability there.

    For models whose confidence is not known in advance (random weights rarely reach a fixed threshold
    such as 0.9); the tokens run the first loop as a prompt does (causal attention over ``input_ids``).
    """
    config = model.config
    if isinstance(exit_fraction, bool) or not isinstance(exit_fraction, (int, float)) or not 0.0 < exit_fraction < 1.0:
        raise ValueError(f"exit_fraction: expected a number in (0, 1), got {exit_fraction!r}")
    period = loop_length(config)
    _check_loops("model", config)
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.numel() == 0:
        raise ValueError(f"input_ids: expected a non-empty int tensor (B, S), got {getattr(input_ids, 'shape', input_ids)!r}")
    _check_ids("input_ids", input_ids, config.vocab_size)
    backbone = model.model
    B, S = input_ids.shape
    positions = torch.arange(S, device=input_ids.device).expand(B, S)
    hidden = backbone.embed(input_ids)
    position_embeddings = rotary_embedding(positions, config.head_dim, config.rope_theta, hidden.dtype)
    for layer in range(period):
        hidden = backbone.blocks[backbone.block_of_layer[layer]](hidden, layer, position_embeddings)[0]
    top = _top_probability(_lm_head(model, hidden)).flatten()
    return float(top.double().quantile(1.0 - exit_fraction))


def exit_loss(model, hidden_states: Sequence[Tensor], labels: Tensor) -> Tensor:
    """The next-token cross-entropy of the LM head at every loop boundary but the last, averaged over the
    boundaries: the loss that teaches a model to decode from the depths where early exit stops tokens.
    Add it, weighted, to the final loss (``python -m recursive train --exit-loss-weight``).

    Args:
        model: a :class:`recursive.RecursiveForCausalLM` with more than one loop.
        hidden_states: its forward's ``hidden_states`` (``output_hidden_states=True``).
        labels: (B, S) token ids (-100: ignored), as the forward's ``labels``.
    """
    config = model.config
    period = loop_length(config)
    _check_loops("model", config)
    if len(hidden_states) != config.num_layers + 1:
        raise ValueError(f"hidden_states: expected {config.num_layers + 1} tensors (the forward's "
                         f"output_hidden_states), got {len(hidden_states)}")
    if not isinstance(labels, Tensor) or tuple(labels.shape) != tuple(hidden_states[0].shape[:2]):
        raise ValueError(f"labels: expected shape {tuple(hidden_states[0].shape[:2])}, got {getattr(labels, 'shape', labels)!r}")
    from .modeling import next_token_loss

    boundaries = range(period, config.num_layers, period)  # hidden_states[l] is layer l - 1's output
    return torch.stack([next_token_loss(_lm_head(model, hidden_states[b]), labels) for b in boundaries]).mean()


# KV-cached generation.


def _decode_step(
    model, tokens: Tensor, positions: Tensor, packing: Optional[VarlenPacking], past: Tuple[LayerKV, ...],
    exit_threshold: Optional[float],
) -> Tuple[Tensor, Tuple[LayerKV, ...]]:
    """One new token per row through the stack, leaving at loop boundaries with ``exit_threshold``.

    A row that left keeps its exit hidden state, so the blocks it still runs (for rows that did not
    leave) give the keys and values of that state; once every row has left, the remaining layers only
    project keys and values. tokens (B,), positions (B,) -> logits (B, vocab) and the extended cache.
    """
    backbone, config = model.model, model.config
    hidden = backbone.embed(tokens[:, None])
    position_embeddings = rotary_embedding(positions[:, None], config.head_dim, config.rope_theta, hidden.dtype)
    period = loop_length(config)
    running = torch.ones(tokens.shape[0], dtype=torch.bool, device=tokens.device)
    exit_logits: Optional[Tensor] = None
    all_left = False
    presents = []
    for layer, block_index in enumerate(backbone.block_of_layer):
        block = backbone.blocks[block_index]
        if all_left:
            presents.append(past[layer].append(block.key_value(hidden, layer, position_embeddings)))
            continue
        new_hidden, present, _ = block(hidden, layer, position_embeddings, packing, past[layer], use_cache=True)
        presents.append(present)
        if exit_threshold is None:
            hidden = new_hidden
            continue
        hidden = torch.where(running[:, None, None], new_hidden, hidden)
        if (layer + 1) % period == 0 and layer + 1 < config.num_layers:
            logits = _lm_head(model, hidden[:, -1])
            leaving = running & (_top_probability(logits) >= exit_threshold)
            exit_logits = logits if exit_logits is None else torch.where(leaving[:, None], logits, exit_logits)
            running = running & ~leaving
            all_left = not bool(running.any())
    if all_left:
        return exit_logits, tuple(presents)
    logits = _lm_head(model, hidden[:, -1])
    if exit_logits is not None:
        logits = torch.where(running[:, None], logits, exit_logits)
    return logits, tuple(presents)


@torch.no_grad()
def generate(
    model,
    input_ids: Tensor,
    max_new_tokens: int,
    attention_mask: Optional[Tensor] = None,
    do_sample: bool = False,
    temperature: float = 1.0,
    top_k: Optional[int] = None,
    top_p: Optional[float] = None,
    eos_token_id: Optional[int] = None,
    exit_threshold: Optional[float] = None,
    progress: Optional[Progress] = None,
) -> Tensor:
    """KV-cached generation; see :meth:`recursive.RecursiveForCausalLM.generate` (``progress``, when
    given, advances by the batch's new tokens at each step)."""
    config = model.config
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
        raise ValueError(f"input_ids: expected an int tensor (B, S), got {getattr(input_ids, 'shape', input_ids)!r}")
    if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
        raise ValueError(f"input_ids: expected at least one row and one token, got shape {tuple(input_ids.shape)}")
    _check_ids("input_ids", input_ids, config.vocab_size)
    _check_int("max_new_tokens", max_new_tokens, 0)
    _check_sampling(temperature, top_k, top_p)
    _check_token("eos_token_id", eos_token_id, config.vocab_size)
    exit_threshold = _check_exit_threshold(exit_threshold, config)
    B, S = input_ids.shape
    if attention_mask is None:
        attention_mask = torch.ones_like(input_ids)
    elif tuple(attention_mask.shape) != (B, S) or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
        raise ValueError(f"attention_mask: expected ({B}, {S}) of 0 and 1 like input_ids, got {tuple(attention_mask.shape)}")
    if not bool(attention_mask.any(1).all()):
        raise ValueError("attention_mask: every row needs at least one real token (an empty prompt)")
    if max_new_tokens == 0:
        return input_ids

    # A Mixture-of-Recursions model without a cache (config.kv_cacheable) recomputes the sequence at each step.
    cached = config.kv_cacheable
    out = model(input_ids, attention_mask=attention_mask, use_cache=cached)
    # The last real token of each row (the last column with left padding).
    last = (attention_mask.long() * torch.arange(S, device=input_ids.device)).argmax(1)
    logits, past = out.logits[torch.arange(B, device=input_ids.device), last], out.past_key_values
    positions = attention_mask.long().sum(1)
    padded = not bool(attention_mask.all())  # the new columns are real tokens: decided once
    sequence = input_ids
    finished = torch.zeros(B, dtype=torch.bool, device=input_ids.device)
    new_tokens = []
    for step in range(max_new_tokens):
        tokens = next_tokens(logits, do_sample, temperature, top_k, top_p)
        if eos_token_id is not None:
            tokens = tokens.masked_fill(finished, eos_token_id)  # finished rows pad with eos, as HF pads
            finished = finished | (tokens == eos_token_id)
        new_tokens.append(tokens)
        if progress is not None:
            progress.step(f"token {step + 1}/{max_new_tokens}", count=B)
        if step + 1 == max_new_tokens or (eos_token_id is not None and bool(finished.all())):
            break
        if padded or not cached:
            attention_mask = torch.cat((attention_mask, attention_mask.new_ones(B, 1)), dim=1)
        if not cached:
            sequence = torch.cat((sequence, tokens[:, None].to(sequence.dtype)), dim=1)
            logits = model(sequence, attention_mask=attention_mask).logits[:, -1]
        elif config.sharing == "hierarchical" or config.mor_routing is not None:  # their own data flow
            out = model(tokens[:, None], attention_mask=attention_mask if padded else None,
                        position_ids=positions[:, None], past_key_values=past, use_cache=True)
            logits, past = out.logits[:, -1], out.past_key_values
        else:
            packing = VarlenPacking.from_attention_mask(attention_mask, 1) if padded else None
            logits, past = _decode_step(model, tokens, positions, packing, past, exit_threshold)
        positions = positions + 1
    return torch.cat((input_ids, torch.stack(new_tokens, dim=1).to(input_ids.dtype)), dim=1)


# Continuous depth-wise batching.


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
class _Request:
    index: int
    tokens: List[int]  # prompt, then the generated tokens
    max_new_tokens: int
    generated: int = 0


class DepthBatchingEngine:
    """Decoding of many requests with continuous depth-wise batching (greedy, or sampled).

    ``max_batch_size`` slots hold one request each. A request's prompt is prefilled (full depth, batched
    with the other requests admitted at the same time) into its slot's cache, which gives its first
    token; then its current token advances one loop per engine step. One step runs each block once over
    the busy slots, every row at its own loop: per-row effective layers select each row's depth adapters
    (per-row ``lowrank_linear`` indices) and each row attends over its own cache at its own layer: the
    new keys and values are written into the slot caches first, then varlen ``circuit_attention`` reads
    each row's keys straight from them (one gather of the visible keys per layer, no padded copy). A token
    that reaches the full depth, or leaves early (``exit_threshold``, see the module docstring), gives the
    request's next token, which starts at loop 0 on the next step; a request that is done (its
    ``max_new_tokens``, or ``eos_token_id``) frees its slot, and waiting requests are admitted at once.

    Without early exit, every request's output equals :meth:`recursive.RecursiveForCausalLM.generate`
    (greedy) on that prompt alone; with it, the per-token early-exit rule of ``generate``. Sampling
    draws each token from the same distribution as ``generate`` (not the same draws: the rows share
    torch's generator in another order).
    A Mixture-of-Recursions model with causal routing is served with its loops as the recursions and
    its routers ending each token's run (:class:`_RecursionEngineRun`); a hierarchical (HRM) model
    with its whole stack as one loop (its fast and slow states within a step); outputs again equal to
    ``generate``'s.

    Cache layout: per effective layer, keys and values for every slot, token-major (L, slots, T, Hkv, D)
    (plus the QK/OV circuit's (L, slots, T, Hkv, R)), T the longest request (prompt plus new tokens), so
    that a row's keys at one layer are consecutive rows of the flattened (L * slots * T, Hkv, .) cache.

    Args:
        model: a :class:`recursive.RecursiveForCausalLM`.
        max_batch_size: the number of slots (rows in flight).
        exit_threshold: early exit at loop boundaries; None or 1.0: off.
    """

    def __init__(self, model, max_batch_size: int, exit_threshold: Optional[float] = None) -> None:
        from .modeling import RecursiveForCausalLM

        if not isinstance(model, RecursiveForCausalLM):
            raise ValueError(f"model: expected a RecursiveForCausalLM, got {type(model).__name__}")
        config = model.config
        self.model = model
        self.max_batch_size = _check_int("max_batch_size", max_batch_size, 1)
        if config.mor_routing is not None and not config.kv_cacheable:
            raise ValueError("model: depth-wise batching decodes token by token, and top-k expert choice routes by "
                             "the whole sequence; route with mor_threshold_routing (or token choice)")
        self.exit_threshold = _check_exit_threshold(exit_threshold, config)  # Mixture-of-Recursions: None or 1.0
        if config.mor_routing is not None:  # a loop is a recursion
            recursions = config.recursions()[1]
            self.loop_length, self.num_loops = len(recursions[0]), len(recursions)
        elif config.sharing == "hierarchical":  # one loop: its states flow through the whole stack
            self.loop_length, self.num_loops = config.num_layers, 1
        else:
            self.loop_length = loop_length(config)
            self.num_loops = config.num_layers // self.loop_length
        self.stats = EngineStats(num_loops=self.num_loops)

    def _requests(self, prompts, max_new_tokens, eos_token_id) -> List[_Request]:
        vocab = self.model.config.vocab_size
        if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence):
            raise ValueError(f"prompts: expected a list of token id lists, got {type(prompts).__name__}")
        if isinstance(max_new_tokens, Sequence):
            if len(max_new_tokens) != len(prompts):
                raise ValueError(f"max_new_tokens: expected one count per prompt ({len(prompts)}), got {len(max_new_tokens)}")
            counts = list(max_new_tokens)
        else:
            counts = [max_new_tokens] * len(prompts)
        _check_token("eos_token_id", eos_token_id, vocab)
        requests = []
        for i, (prompt, count) in enumerate(zip(prompts, counts)):
            tokens = prompt.tolist() if isinstance(prompt, Tensor) else prompt
            if not isinstance(tokens, Sequence) or isinstance(tokens, str) or len(tokens) == 0:
                raise ValueError(f"prompts[{i}]: expected a non-empty list of token ids, got {prompt!r}")
            for token in tokens:
                _check_token(f"prompts[{i}]", token, vocab)
            requests.append(_Request(i, list(tokens), _check_int(f"max_new_tokens[{i}]", count, 0)))
        return requests

    def generate(
        self,
        prompts: Sequence[Union[Sequence[int], Tensor]],
        max_new_tokens: Union[int, Sequence[int]],
        eos_token_id: Optional[int] = None,
        progress: Optional[Progress] = None,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
    ) -> List[List[int]]:
        """Args:
            prompts: token id lists (or 1-D int tensors), each non-empty.
            max_new_tokens: new tokens per request: one int for all, or one per prompt.
            eos_token_id: a request ends after generating it.
            progress: advanced by every new token.
            do_sample, temperature, top_k, top_p: sample each new token as :func:`next_tokens` does (from
                torch's global generator; early exit still decides on the unfiltered distribution's top
                probability); default greedy.

        Returns:
            Per prompt, in order, the prompt followed by its new tokens. :attr:`stats` describes the run.
        """
        run = self._start(prompts, max_new_tokens, eos_token_id, progress, do_sample, temperature, top_k, top_p)
        for _ in run.run():
            pass
        return [request.tokens for request in run.requests]

    def stream(
        self,
        prompts: Sequence[Union[Sequence[int], Tensor]],
        max_new_tokens: Union[int, Sequence[int]],
        eos_token_id: Optional[int] = None,
        progress: Optional[Progress] = None,
        *,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
    ) -> Iterator[Tuple[int, int]]:
        """:meth:`generate`, token by token: an iterator of ``(request, token)`` pairs (``request``: the
        prompt's index), each yielded as soon as the step that decides it is done, so a server can send a
        request's tokens while the others are still decoding. The arguments are checked here, at once; a
        request's tokens come in order, and together they are :meth:`generate`'s new tokens. :attr:`stats`
        describes the run once the iterator is exhausted."""
        return self._start(prompts, max_new_tokens, eos_token_id, progress, do_sample, temperature, top_k,
                           top_p).run()

    def _start(self, prompts, max_new_tokens, eos_token_id, progress, do_sample, temperature, top_k,
               top_p) -> "_EngineRun":
        requests = self._requests(prompts, max_new_tokens, eos_token_id)
        _check_sampling(temperature, top_k, top_p)
        pick = partial(next_tokens, do_sample=bool(do_sample), temperature=temperature, top_k=top_k, top_p=top_p)
        run = (_EngineRun if self.model.config.mor_routing is None else _RecursionEngineRun)(
            self, requests, eos_token_id, progress, pick)
        self.stats = run.stats
        return run


class _EngineRun:
    """The state of one :meth:`DepthBatchingEngine.generate` call: slots, their caches and the queue."""

    def __init__(self, engine: DepthBatchingEngine, requests: List[_Request], eos_token_id: Optional[int],
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
        self.slot_request: List[Optional[_Request]] = [None] * slots
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

    def _emit(self, request: _Request, token: int) -> bool:
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

    def _prefill(self, batch: List[_Request], slots: List[int]) -> None:
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
        return _ints_to_device(self.device, *columns)

    def _row_packing(self, first_rows: Tensor, key_counts: List[int], offsets: Tensor) -> VarlenPacking:
        """The packing of one query per row, row i attending over ``key_counts[i]`` consecutive rows of the
        flattened caches from ``first_rows[i]``; ``offsets``: :func:`_offsets` of ``key_counts`` on the
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
            _SlotCache(self, store_rows + shift), check_depth=False)[0]

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
            busy, positions, first_layers, first_rows, _offsets(key_counts), finishing)
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
            hidden = backbone._hierarchical(hidden, run_offset)
        else:
            for offset in range(engine.loop_length):
                hidden = run_offset(offset, hidden)

        if engine.exit_threshold is None:
            self.hidden[slots] = hidden
            done, tokens = finishing, []
            if finishing:  # else nothing to read back this step
                tokens_d = self.pick(_lm_head(self.model, hidden[finishing_d, 0]))
                self.hidden[slots[finishing_d]] = backbone.embed(tokens_d[:, None])
                tokens = tokens_d.tolist()
        else:
            logits = _lm_head(self.model, hidden[:, 0])
            can_exit = torch.ones(rows, dtype=torch.bool, device=self.device).index_fill_(0, finishing_d, False)
            leaving = can_exit & (_top_probability(logits) >= engine.exit_threshold)
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


class _RecursionEngineRun(_EngineRun):
    """:class:`_EngineRun` for a Mixture-of-Recursions model with causal routing: a step runs one
    recursion for every busy row, each row at its own, and the routing ends a token's run.

    A token starts with the layers before the recursions and its routing (token choice: its depth;
    threshold routing: its first router's logit), runs one recursion per step (gated as in the
    model's forward), and once the routing ends it (token choice: at its depth; threshold routing: at a
    recursion whose router says no, decided on the step's output for the next one, or at the first)
    runs the layers after the recursions and the LM head, which gives the request's next token. Rows
    that finish and the rows of a new request share the steps with the others.

    Recursion-wise cache: the layers of recursion r hold, per slot, the keys of the slot's tokens that
    ran r at consecutive positions (``count[slot][r]`` of them, known on the host); with KV sharing
    the later recursions attend over the first one's (writing their own keys to their unused caches).
    Per step the host reads back which rows ran and go on, then the finished rows' tokens.
    """

    def __init__(self, engine: "DepthBatchingEngine", requests: List[_Request], eos_token_id: Optional[int],
                 progress: Optional[Progress], pick: Callable[[Tensor], Tensor]) -> None:
        super().__init__(engine, requests, eos_token_id, progress, pick)
        config = self.config
        self.before, self.recursions, self.after = config.recursions()
        slots = engine.max_batch_size
        self.count = [[0] * len(self.recursions) for _ in range(slots)]
        self.threshold = config.mor_routing == "expert_choice"
        router = self.backbone.mor_router.weight
        route_dtype = torch.promote_types(router.dtype, torch.float32)
        # Per slot, on the device: token choice: the token's last recursion and its gate; threshold
        # routing: the router logit of the recursion the token runs next.
        self.chosen = torch.zeros(slots, dtype=torch.long, device=self.device)
        self.route = torch.zeros(slots, dtype=route_dtype, device=self.device)
        if self.threshold:
            self.keeps_all = torch.tensor([c == 1.0 for c in config.mor_capacities], device=self.device)

    def _store_prompts(self, out, slot_index: Tensor, slots: List[int], width: int) -> None:
        counts = torch.stack([(out.recursion_depths > r).sum(1) for r in range(len(self.recursions))], 1)
        for slot, slot_counts in zip(slots, counts.tolist()):
            self.count[slot] = slot_counts
        super()._store_prompts(out, slot_index, slots, width)

    def _store_prompt_layer(self, layer: int, present, slot_index: Tensor, slots: List[int], width: int) -> None:
        from .modeling import RecursionKV

        if not isinstance(present, RecursionKV):  # None: a later recursion under KV sharing
            if present is not None:
                super()._store_prompt_layer(layer, present, slot_index, slots, width)
            return
        # Each row's tokens (its True columns) to consecutive positions of its slot.
        mask = present.token_mask
        first_rows = self._to_device([self._flat_row(layer, slot) for slot in slots])[0]
        rows = (first_rows[:, None] + mask.long().cumsum(1) - 1)[mask]
        for cache, tensor in zip(self.caches(), present.key_value):
            if tensor is not None:
                cache.view(-1, *cache.shape[3:]).index_copy_(0, rows, tensor.transpose(1, 2)[mask])

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
            busy, positions, recursion, own_layers, store_rows, read_rows, _offsets(key_counts), starting)
        cos, sin = rotary_embedding(positions_d[:, None], config.head_dim, config.rope_theta, self.hidden.dtype)
        hidden = self.hidden[slots]
        if starting:
            start = hidden[starting_d]
            if self.before:
                start = self._plain_layers(self.before, start, [busy[i] for i in starting], [positions[i] for i in starting],
                                           (cos[starting_d], sin[starting_d]))
                hidden = hidden.index_copy(0, starting_d, start)
            self._route_start(start[:, 0], slots[starting_d])

        # This step's recursion, each row at its own (its layers are consecutive: offset o is layer first + o).
        packing = self._row_packing(read_rows_d, key_counts, offsets)
        out = hidden
        for offset, layer in enumerate(self.recursions[0]):
            out = self._run_block(layer, out, own_layers_d + offset, (cos, sin), packing, store_rows_d,
                                  offset * self.layer_stride)
        ran, gate, gated = self._routing(slots, recursion_d)
        g = gate[:, None, None].to(hidden.dtype)
        out = torch.where(gated[:, None, None], hidden + g * (out - hidden), out)
        hidden = torch.where(ran[:, None, None], out, hidden)
        going_on = self._goes_on(hidden[:, 0], slots, recursion_d, ran)
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
                finished = self._plain_layers(self.after, finished, [busy[i] for i in done], [positions[i] for i in done],
                                              (cos[done_d], sin[done_d]))
            tokens_d = self.pick(_lm_head(self.model, finished[:, 0]))
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

    def _plain_layers(self, layers: List[int], hidden: Tensor, slots: List[int], positions: List[int],
                      position_embeddings: Tuple[Tensor, Tensor]) -> Tensor:
        """The consecutive effective ``layers`` (before or after the recursions, which every token runs) on
        ``hidden`` (rows, 1, hidden), the token of each of ``slots`` at its position."""
        first_rows = [self._flat_row(layers[0], slot) for slot in slots]
        key_counts = [position + 1 for position in positions]
        first_rows_d, store_rows_d, offsets = self._to_device(
            first_rows, [row + position for row, position in zip(first_rows, positions)], _offsets(key_counts))
        packing = self._row_packing(first_rows_d, key_counts, offsets)
        for j, layer in enumerate(layers):
            hidden = self._run_block(layer, hidden, layer, position_embeddings, packing, store_rows_d,
                                     j * self.layer_stride)
        return hidden

    def _route_start(self, hidden: Tensor, slots: Tensor) -> None:
        """Routing of the tokens that start (``hidden`` (rows, hidden), after the layers before the
        recursions), as the model's forward does it."""
        from .modeling import _upcast

        router = self.backbone.mor_router
        if self.threshold:
            self.route[slots] = _upcast(F.linear(hidden, router.weight[:1]))[:, 0]
            return
        probs = _upcast(router(hidden)).softmax(-1)
        chosen = probs.argmax(-1)
        self.chosen[slots] = chosen
        self.route[slots] = self.config.mor_router_alpha * probs.gather(-1, chosen[:, None])[:, 0]

    def _routing(self, slots: Tensor, recursion: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
        """For this step's recursion of each row: whether it runs it (False only for a token that threshold
        routing keeps out of the first), its gate, and whether the gate applies (rows,)."""
        if self.threshold:
            logits = self.route[slots]
            ran = self.keeps_all[recursion] | (logits >= 0)
            return ran, self.config.mor_router_alpha * logits.sigmoid(), ran
        return torch.ones_like(recursion, dtype=torch.bool), self.route[slots], self.chosen[slots] == recursion

    def _goes_on(self, hidden: Tensor, slots: Tensor, recursion: Tensor, ran: Tensor) -> Tensor:
        """Whether each row's token runs the next recursion, from this step's output ``hidden`` (rows,
        hidden); threshold routing keeps the next router's logit."""
        if not self.threshold:
            return ran & (recursion < self.chosen[slots])
        from .modeling import _upcast

        following = (recursion + 1).clamp(max=len(self.recursions) - 1)
        logits = _upcast(F.linear(hidden, self.backbone.mor_router.weight)).gather(1, following[:, None])[:, 0]
        self.route[slots] = logits
        return ran & (recursion + 1 < len(self.recursions)) & (self.keeps_all[following] | (logits >= 0))


def _offsets(key_counts: Sequence[int]) -> List[int]:
    """``[0, 1, .., rows]`` (one query per row) followed by the cumulative ``key_counts`` from 0: the
    offsets of :meth:`_EngineRun._row_packing`."""
    return list(range(len(key_counts) + 1)) + list(accumulate(key_counts, initial=0))


class _SlotCache:
    """One engine step's cache at one block offset, for :meth:`recursive.nn.CircuitAttention.forward`:
    ``append`` writes the rows' new keys and values at flattened cache ``rows`` and returns the whole
    flattened caches, (1, Hkv, L * slots * T, .) views, from which the step's packing picks each row's keys."""

    def __init__(self, run: _EngineRun, rows: Tensor) -> None:
        self.run, self.rows = run, rows

    def append(self, new: LayerKV) -> LayerKV:
        self.run._store(self.rows, new)
        return LayerKV(*(None if tensor is None else cache.view(1, -1, *cache.shape[3:]).transpose(1, 2)
                         for cache, tensor in zip(self.run.caches(), new)))


def generate_in_batches(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: Union[int, Sequence[int]], batch_size: int,
    eos_token_id: Optional[int] = None, progress: Optional[Progress] = None, **generate_kwargs,
) -> List[List[int]]:
    """Plain (static) batching: :meth:`recursive.RecursiveForCausalLM.generate` over left-padded batches
    of ``batch_size`` prompts in order, each batch running until its longest request is done.

    Returns, per prompt, the prompt and its new tokens (its own ``max_new_tokens``, cut after
    ``eos_token_id``), like :meth:`DepthBatchingEngine.generate`; ``generate_kwargs`` go to ``generate``.
    """
    _check_int("batch_size", batch_size, 1)
    counts = list(max_new_tokens) if isinstance(max_new_tokens, Sequence) else [max_new_tokens] * len(prompts)
    if len(counts) != len(prompts):
        raise ValueError(f"max_new_tokens: expected one count per prompt ({len(prompts)}), got {len(counts)}")
    device = model.lm_head.weight.device
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch, batch_counts = [list(p) for p in prompts[start:start + batch_size]], counts[start:start + batch_size]
        for i, prompt in enumerate(batch):
            if not prompt:
                raise ValueError(f"prompts[{start + i}]: expected a non-empty list of token ids")
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = generate(model, ids, max(batch_counts), mask, eos_token_id=eos_token_id, progress=progress, **generate_kwargs)
        for prompt, count, row in zip(batch, batch_counts, out.tolist()):
            new = row[width:width + count]
            if eos_token_id in new:
                new = new[: new.index(eos_token_id) + 1]
            outputs.append(prompt + new)
    return outputs


# Command line: python -m recursive generate.


def add_arguments(parser) -> None:
    """The options of ``python -m recursive generate`` on ``parser`` (an argparse sub-parser)."""
    parser.add_argument("--model", help="directory written by save_pretrained (default: a small random model)")
    parser.add_argument("--adapter", metavar="DIR", help="adapters written by save_adapter, loaded into --model")
    parser.add_argument("--prompt", action="append",
                        help="a prompt as comma-separated token ids (repeatable; the project has no tokenizer)")
    parser.add_argument("--num-prompts", type=int, default=16, help="random prompts when no --prompt is given")
    parser.add_argument("--prompt-len", type=int, default=16, help="length of the random prompts")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--engine", action="store_true", help="DepthBatchingEngine instead of plain batches")
    parser.add_argument("--max-batch-size", type=int, default=8, help="rows per batch, or the engine's slots")
    exit_options = parser.add_mutually_exclusive_group()
    exit_options.add_argument("--exit-threshold", type=float, help="early exit at loop boundaries (0, 1]")
    exit_options.add_argument("--exit-fraction", type=float,
                              help="calibrate the threshold on the prompts so this fraction of tokens would leave at "
                                   "the first loop boundary (for untrained models)")
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-k", type=int)
    parser.add_argument("--top-p", type=float)
    parser.add_argument("--eos-token-id", type=int)
    parser.add_argument("--seed", type=int, default=0, help="seeds the random model, prompts and sampling")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--dtype", choices=("float32", "float64", "bfloat16", "float16"),
                        help="default: the checkpoint's, float32 for the random model")
    parser.add_argument("--quiet", action="store_true", help="print only the summary, not the tokens")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=command)


def default_config() -> RecursiveConfig:
    """The small random model of ``python -m recursive generate`` without ``--model``: 8 layers cycling
    over 2 blocks (4 loops) with per-depth LoRA."""
    return RecursiveConfig(vocab_size=1024, hidden_size=128, intermediate_size=352, num_attention_heads=4,
                           num_layers=8, num_blocks=2, relaxation="depth_lora", lora_rank=4)


def _parse_prompt(text: str) -> List[int]:
    try:
        return [int(token) for token in text.replace(" ", "").split(",") if token]
    except ValueError:
        raise ValueError(f"--prompt: expected comma-separated token ids, got {text!r}") from None


def command(args) -> None:
    """``python -m recursive generate``: generate from token-id prompts and print tokens/s."""
    import sys
    import time

    from .modeling import RecursiveForCausalLM

    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        dtype = getattr(torch, args.dtype) if args.dtype else None
        torch.manual_seed(args.seed)
        if args.model:
            model = RecursiveForCausalLM.from_pretrained(args.model, device=device, dtype=dtype)
        else:
            model = RecursiveForCausalLM(default_config()).to(device=device, dtype=dtype or torch.float32).eval()
        if args.adapter:
            model.load_adapter(args.adapter)
        if args.prompt:
            prompts = [_parse_prompt(text) for text in args.prompt]
        else:
            _check_int("--num-prompts", args.num_prompts, 1)
            _check_int("--prompt-len", args.prompt_len, 1)
            prompts = torch.randint(model.config.vocab_size, (args.num_prompts, args.prompt_len)).tolist()
        exit_threshold = args.exit_threshold
        if args.exit_fraction is not None:
            width = min(map(len, prompts))
            calibration = torch.tensor([p[:width] for p in prompts], device=device)
            exit_threshold = calibrate_exit_threshold(model, calibration, args.exit_fraction)
        progress = Progress(len(prompts) * max(args.max_new_tokens, 0), enabled=not args.no_progress, unit="tok")
        start = time.perf_counter()
        with progress:
            if args.engine:
                engine = DepthBatchingEngine(model, args.max_batch_size, exit_threshold)
                outputs = engine.generate(prompts, args.max_new_tokens, args.eos_token_id, progress,
                                          do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k,
                                          top_p=args.top_p)
            else:
                outputs = generate_in_batches(
                    model, prompts, args.max_new_tokens, args.max_batch_size, args.eos_token_id, progress,
                    do_sample=args.do_sample, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                    exit_threshold=exit_threshold)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
    except ValueError as exc:
        sys.exit(f"error: {exc}")
    if not args.quiet:
        for i, (prompt, tokens) in enumerate(zip(prompts, outputs)):
            print(f"[{i}] {','.join(map(str, prompt))} -> {','.join(map(str, tokens[len(prompt):]))}")
    new_tokens = sum(len(tokens) - len(prompt) for prompt, tokens in zip(prompts, outputs))
    how = "engine" if args.engine else "plain batches"
    line = f"{new_tokens} new tokens for {len(prompts)} prompts in {seconds:.2f} s ({how}): {new_tokens / seconds:.1f} tokens/s"
    if exit_threshold is not None:
        line += f", exit threshold {exit_threshold:.4g}"
    if args.engine:
        line += f", {engine.stats.mean_exit_loops:.2f} of {engine.stats.num_loops} loops per decoded token"
    print(line)
