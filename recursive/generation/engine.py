"""Continuous depth-wise batching: :class:`DepthBatchingEngine`."""

from __future__ import annotations

from functools import partial
from typing import Iterator, List, Optional, Sequence, Tuple, Union

from torch import Tensor

from ..checks import check_int, check_token
from ..progress import Progress
from .core_run import CoreEngineRun
from .decode import GenerationMixin
from .engine_run import EngineRun, EngineStats, Request
from .exit_rules import ExitRule, resolve_exit_rule
from .recursion_run import RecursionEngineRun
from .sampling import next_tokens
from .validation import check_sampling


class DepthBatchingEngine:
    """Decoding of many requests with continuous depth-wise batching (greedy, or sampled).

    ``max_batch_size`` slots hold one request each. A request's prompt rides along in the engine's steps:
    all its tokens advance one loop per step (full depth, no early exit), each attending over its slot's
    cache up to itself, and its last token's output gives the first new token; then the request's current
    token advances one loop per step. One step runs each block once over the in-flight tokens of the busy
    slots, every row at its own loop: per-row effective layers select each row's depth adapters
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
    its routers ending each token's run (:class:`RecursionEngineRun`; its prompts are prefilled by a
    forward of the model, whose routing takes the whole prompt); a hierarchical (HRM) model with its
    whole stack as one loop (its fast and slow states within a step); Huginn's recurrent depth with one pass of
    its core per row and step (:class:`CoreEngineRun`: the prelude when a token starts, the coda when it leaves);
    outputs again equal to ``generate``'s.

    Cache layout: per effective layer, keys and values for every slot, token-major (L, slots, T, Hkv, D)
    (plus the QK/OV circuit's (L, slots, T, Hkv, R)), T the longest request (prompt plus new tokens), so
    that a row's keys at one layer are consecutive rows of the flattened (L * slots * T, Hkv, .) cache.

    Args:
        model: a :class:`recursive.RecursiveForCausalLM`.
        max_batch_size: the number of slots (rows in flight).
        exit_threshold: early exit at loop boundaries: a threshold of the model's own rule, or an
            :class:`recursive.generation.ExitRule` (the rows' rule states are kept per slot); None or 1.0: off.
    """

    def __init__(self, model, max_batch_size: int, exit_threshold: Union[None, float, ExitRule] = None) -> None:
        if not isinstance(model, GenerationMixin):
            raise ValueError(f"model: expected a RecursiveForCausalLM, got {type(model).__name__}")
        config = model.config
        self.model = model
        self.max_batch_size = check_int("max_batch_size", max_batch_size, 1)
        if config.mor_routing is not None and not config.kv_cacheable:
            raise ValueError("model: depth-wise batching decodes token by token, and top-k expert choice routes by "
                             "the whole sequence; route with mor_threshold_routing (or token choice)")
        self.exit_rule = resolve_exit_rule(exit_threshold, config)  # Mixture-of-Recursions: None or 1.0
        if config.mor_routing is not None or config.injection != "none":  # a loop is a recursion, or a core pass
            recursions = config.recursions()[1]
            self.loop_length, self.num_loops = len(recursions[0]), len(recursions)
        else:  # a loop of the model's shape (HRM: its whole stack, through which its states flow)
            self.loop_length = model.model.shape.loop_length
            self.num_loops = config.num_layers // self.loop_length
        self.stats = EngineStats(num_loops=self.num_loops)

    def _requests(self, prompts, max_new_tokens, eos_token_id, token_type_ids) -> List[Request]:
        vocab = self.model.config.vocab_size
        if isinstance(prompts, Tensor) or not isinstance(prompts, Sequence):
            raise ValueError(f"prompts: expected a list of token id lists, got {type(prompts).__name__}")
        if isinstance(max_new_tokens, Sequence):
            if len(max_new_tokens) != len(prompts):
                raise ValueError(f"max_new_tokens: expected one count per prompt ({len(prompts)}), "
                                 f"got {len(max_new_tokens)}")
            counts = list(max_new_tokens)
        else:
            counts = [max_new_tokens] * len(prompts)
        check_token("eos_token_id", eos_token_id, vocab)
        requests = []
        for i, (prompt, count) in enumerate(zip(prompts, counts)):
            tokens = prompt.tolist() if isinstance(prompt, Tensor) else prompt
            if not isinstance(tokens, Sequence) or isinstance(tokens, str) or len(tokens) == 0:
                raise ValueError(f"prompts[{i}]: expected a non-empty list of token ids, got {prompt!r}")
            for token in tokens:
                check_token(f"prompts[{i}]", token, vocab)
            requests.append(Request(i, list(tokens), check_int(f"max_new_tokens[{i}]", count, 0)))
        if token_type_ids is not None:
            for request, span in zip(requests, self._spans(token_type_ids, requests)):
                request.span = span
        return requests

    def _spans(self, token_type_ids, requests: List[Request]) -> List[Tuple[int, int]]:
        """Each prompt's bidirectional span [start, end) from its ``token_type_ids`` (None or all 0: none)."""
        if not self.model.config.prefix_lm:
            raise ValueError("token_type_ids: this model is no prefix LM (config.prefix_lm is False)")
        if isinstance(token_type_ids, Tensor) or not isinstance(token_type_ids, Sequence) or (
                len(token_type_ids) != len(requests)):
            raise ValueError(f"token_type_ids: expected one list (or None) per prompt ({len(requests)}), "
                             f"got {token_type_ids!r}")
        spans = []
        for i, (types, request) in enumerate(zip(token_type_ids, requests)):
            if types is None:
                spans.append((0, 0))
                continue
            types = types.tolist() if isinstance(types, Tensor) else list(types)
            ones = [j for j, kind in enumerate(types) if kind == 1]
            if len(types) != len(request.tokens) or any(kind not in (0, 1) for kind in types):
                raise ValueError(f"token_type_ids[{i}]: expected {len(request.tokens)} values of 0 or 1 (one per "
                                 f"prompt token), got {types!r}")
            if ones and ones[-1] - ones[0] + 1 != len(ones):
                raise ValueError(f"token_type_ids[{i}]: the tokens of type 1 (attended both ways) must be one "
                                 f"contiguous span; got {types!r}")
            spans.append((ones[0], ones[-1] + 1) if ones else (0, 0))
        return spans

    def generate(
        self,
        prompts: Sequence[Union[Sequence[int], Tensor]],
        max_new_tokens: Union[int, Sequence[int]],
        eos_token_id: Optional[int] = None,
        progress: Optional[Progress] = None,
        token_type_ids: Optional[Sequence[Optional[Sequence[int]]]] = None,
        **sampling,
    ) -> List[List[int]]:
        """:meth:`stream` run to the end (the same arguments; ``sampling``: its ``do_sample``, ``temperature``,
        ``top_k``, ``top_p``). Returns, per prompt, in order, the prompt followed by its new tokens.
        :attr:`stats` describes the run."""
        tokens = self.stream(prompts, max_new_tokens, eos_token_id, progress, token_type_ids=token_type_ids,
                             **sampling)  # checks the arguments
        outputs = [prompt.tolist() if isinstance(prompt, Tensor) else list(prompt) for prompt in prompts]
        for request, token in tokens:
            outputs[request].append(token)
        return outputs

    def stream(
        self,
        prompts: Sequence[Union[Sequence[int], Tensor]],
        max_new_tokens: Union[int, Sequence[int]],
        eos_token_id: Optional[int] = None,
        progress: Optional[Progress] = None,
        *,
        token_type_ids: Optional[Sequence[Optional[Sequence[int]]]] = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
    ) -> Iterator[Tuple[int, int]]:
        """Decode every request: an iterator of ``(request, token)`` pairs (``request``: the prompt's index),
        each yielded as soon as the step that decides it is done, so a server can send a request's tokens
        while the others are still decoding; a request's tokens come in order. The arguments are checked
        here, at once. :attr:`stats` describes the run once the iterator is exhausted.

        Args:
            prompts: token id lists (or 1-D int tensors), each non-empty.
            max_new_tokens: new tokens per request: one int for all, or one per prompt.
            eos_token_id: a request ends after generating it.
            progress: advanced by every new token.
            token_type_ids: a prefix LM's prompt types (``config.prefix_lm``; as
                :meth:`recursive.RecursiveModel.forward` takes them): per prompt None or one 0/1 per token, the tokens
                of type 1 one contiguous span that attends both ways while the prompt runs; new tokens are causal.
            do_sample, temperature, top_k, top_p: sample each new token as :func:`next_tokens` does (from
                torch's global generator; early exit still decides on the unfiltered distribution's top
                probability); default greedy.
        """
        requests = self._requests(prompts, max_new_tokens, eos_token_id, token_type_ids)
        check_sampling(temperature, top_k, top_p)
        pick = partial(next_tokens, do_sample=bool(do_sample), temperature=temperature, top_k=top_k, top_p=top_p)
        config = self.model.config
        kind = (RecursionEngineRun if config.mor_routing is not None else CoreEngineRun if config.injection != "none"
                else EngineRun)
        run = kind(self, requests, eos_token_id, progress, pick)
        self.stats = run.stats
        return run.run()
