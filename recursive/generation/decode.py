"""KV-cached decoding: :class:`GenerationMixin` (``model.generate``) and plain (static) batching of many
requests."""

from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch
from torch import Tensor

from ..cache import VarlenPacking
from ..checks import check_ids, check_int, check_token
from ..nn import rotary_embedding, rotary_rows
from ..progress import Progress
from .early_exit import decode_step
from .exit_rules import ExitRule, resolve_exit_rule
from .sampling import next_tokens
from .validation import check_sampling


class GenerationMixin:
    """``generate`` for a causal LM of the family (as Hugging Face models get theirs): the model is ``self``, with
    ``config``, ``model`` (the backbone: ``embed``, ``run``, ``run_layers``, ``shape``) and :meth:`logits_at` (the LM
    head at any depth)."""

    @torch.no_grad()
    def generate(
        self,
        input_ids: Tensor,
        max_new_tokens: int,
        attention_mask: Optional[Tensor] = None,
        do_sample: bool = False,
        temperature: float = 1.0,
        top_k: Optional[int] = None,
        top_p: Optional[float] = None,
        eos_token_id: Optional[int] = None,
        exit_threshold: Union[None, float, ExitRule] = None,
        progress: Optional[Progress] = None,
        token_type_ids: Optional[Tensor] = None,
    ) -> Tensor:
        """KV-cached generation, like Hugging Face's ``generate``: the prompt (B, S) followed by up to
        ``max_new_tokens`` new tokens, (B, S + T); generation stops early once every row has produced
        ``eos_token_id``, and finished rows are padded with it.

        Args:
            input_ids: (B, S) token ids; padded rows need ``attention_mask`` (any padding side).
            max_new_tokens: new tokens per row (0 returns ``input_ids``).
            attention_mask: (B, S) of 1 (token) and 0 (padding), or None.
            do_sample: sample (from torch's global generator) instead of greedy argmax.
            temperature, top_k, top_p: the sampling distribution (:func:`recursive.generation.next_tokens`).
            eos_token_id: the end-of-sequence token, or None.
            exit_threshold: early exit at loop boundaries for decoded tokens (the package docstring of
                :mod:`recursive.generation`): a threshold of the model's own rule, or an
                :class:`recursive.generation.ExitRule`; None or 1.0: off. A plain stack only: not with
                hierarchical sharing or Mixture-of-Recursions.
            progress: a :class:`recursive.progress.Progress` advanced by the batch's new tokens at each step.
            token_type_ids: (B, S), a prefix LM's prompt types (:meth:`recursive.RecursiveModel.forward`): the tokens
                of type 1 attend to each other both ways in the prompt's forward; the new tokens are causal.

        A Mixture-of-Recursions model without a KV cache (``config.kv_cacheable``) recomputes the whole
        sequence at each step.
        """
        config = self.config
        if (not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.dtype.is_floating_point
                or input_ids.dtype == torch.bool):
            raise ValueError("input_ids: expected an int tensor (B, S), "
                             f"got {getattr(input_ids, 'shape', input_ids)!r}")
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids: expected at least one row and one token, got shape {tuple(input_ids.shape)}")
        check_ids("input_ids", input_ids, config.vocab_size)
        check_int("max_new_tokens", max_new_tokens, 0)
        check_sampling(temperature, top_k, top_p)
        check_token("eos_token_id", eos_token_id, config.vocab_size)
        exit_rule = resolve_exit_rule(exit_threshold, config)
        B, S = input_ids.shape
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        elif tuple(attention_mask.shape) != (B, S) or not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError(f"attention_mask: expected ({B}, {S}) of 0 and 1 like input_ids, "
                             f"got {tuple(attention_mask.shape)}")
        if not bool(attention_mask.any(1).all()):
            raise ValueError("attention_mask: every row needs at least one real token (an empty prompt)")
        if max_new_tokens == 0:
            return input_ids

        # A Mixture-of-Recursions model without a cache (config.kv_cacheable) recomputes the sequence at each step.
        cached = config.kv_cacheable
        out = self.model(input_ids, attention_mask, use_cache=cached, token_type_ids=token_type_ids,
                         check_indices=False)  # checked above
        # The last real token of each row (the last column with left padding): the LM head there only, as the
        # prompt's other positions predict nothing (with SmolLM2-135M's 49152-token head over every prompt token,
        # a profile of 8 requests showed our matrix products 6% above transformers' for the same calls).
        last = (attention_mask.long() * torch.arange(S, device=input_ids.device)).argmax(1)
        logits = self.lm_head(out.last_hidden_state[torch.arange(B, device=input_ids.device), last])
        past = out.past_key_values
        positions = attention_mask.long().sum(1)
        padded = not bool(attention_mask.all())  # the new columns are real tokens: decided once
        # RoPE of every position a row can reach, once (decode_step takes its rows of it)
        rotary_table = rotary_embedding(torch.arange(S + max_new_tokens, device=input_ids.device)[None],
                                        config.head_dim, config.rope_theta, self.model.embed_tokens.weight.dtype)
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
                if token_type_ids is not None:  # the new tokens are causal
                    token_type_ids = torch.cat((token_type_ids, token_type_ids.new_zeros(B, 1)), dim=1)
                logits = self.lm_head(self.model(sequence, attention_mask, token_type_ids=token_type_ids)
                                      .last_hidden_state[:, -1])
            else:
                packing = (VarlenPacking.from_attention_mask(attention_mask, 1, queries_real=True) if padded
                           else VarlenPacking.uniform(B, 1, S + step + 1, input_ids.device))
                logits, past = decode_step(self, tokens, positions, rotary_rows(rotary_table, positions), packing,
                                           past, exit_rule)
            positions = positions + 1
        return torch.cat((input_ids, torch.stack(new_tokens, dim=1).to(input_ids.dtype)), dim=1)


def generate_in_batches(
    model, prompts: Sequence[Sequence[int]], max_new_tokens: Union[int, Sequence[int]], batch_size: int,
    eos_token_id: Optional[int] = None, progress: Optional[Progress] = None, **generate_kwargs,
) -> List[List[int]]:
    """Plain (static) batching: :meth:`recursive.RecursiveForCausalLM.generate` over left-padded batches
    of ``batch_size`` prompts in order, each batch running until its longest request is done.

    Returns, per prompt, the prompt and its new tokens (its own ``max_new_tokens``, cut after
    ``eos_token_id``), like :meth:`DepthBatchingEngine.generate`; ``generate_kwargs`` go to ``generate``.
    """
    check_int("batch_size", batch_size, 1)
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
        out = model.generate(ids, max(batch_counts), mask, eos_token_id=eos_token_id, progress=progress,
                             **generate_kwargs)
        for prompt, count, row in zip(batch, batch_counts, out.tolist()):
            new = row[width:width + count]
            if eos_token_id in new:
                new = new[: new.index(eos_token_id) + 1]
            outputs.append(prompt + new)
    return outputs
