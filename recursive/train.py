"""Uptraining a small recursive causal LM on a synthetic language the package generates (no downloads).

The corpus is English-like text from a small probabilistic grammar (:func:`synthetic_corpus`):
determiners, adjectives, nouns and verbs that agree in number across a relative clause ("these old
dogs that the teacher likes chase a red ball ."), read as bytes (token id = byte value, all below 128).
It is deterministic for a seed and learnable: a model's loss falls well below the corpus's unigram
entropy once it picks up spelling, word order and agreement.

:func:`train` runs AdamW with a linear warm-up and a cosine (or linear) decay, gradient clipping and
optional bfloat16 autocast on random windows of the corpus, and returns the loss of every step.
``python -m recursive train`` (:mod:`recursive.cli`) builds a model from a default config, a JSON config or a
saved directory, trains it with :func:`train`, prints a summary and optionally saves it.
"""

from __future__ import annotations

import math
import random
import time
from typing import List, Optional

import torch
from torch import Tensor

from .losses import exit_loss
from .modeling import RecursiveForCausalLM
from .progress import Progress


CORPUS_VOCAB_SIZE = 128  # bytes of ASCII text


SCHEDULES = ("cosine", "linear")


_NOUNS = {  # singular -> plural
    "cat": "cats", "dog": "dogs", "bird": "birds", "child": "children", "teacher": "teachers",
    "robot": "robots", "farmer": "farmers", "mouse": "mice", "ball": "balls", "river": "rivers",
}


_VERBS = {  # third person singular -> plural
    "sees": "see", "likes": "like", "chases": "chase", "finds": "find", "helps": "help", "watches": "watch",
}


_DETERMINERS = {False: ("the", "a", "this", "every"), True: ("the", "some", "these", "many")}


_ADJECTIVES = ("small", "big", "red", "old", "happy", "quiet")


_PLACES = ("near the river", "in the garden", "at night", "after school")


def synthetic_corpus(num_bytes: int = 1 << 18, seed: int = 0) -> str:
    """Sentences of the package's grammar, joined by spaces, at least ``num_bytes`` characters long
    (whole sentences), the same for the same seed."""
    if isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 1:
        raise ValueError(f"num_bytes: expected an int >= 1, got {num_bytes!r}")
    rng = random.Random(seed)

    def noun_phrase(plural: bool) -> str:
        noun = rng.choice(list(_NOUNS))
        words = [rng.choice(_DETERMINERS[plural])]
        if rng.random() < 0.4:
            words.append(rng.choice(_ADJECTIVES))
        words.append(_NOUNS[noun] if plural else noun)
        return " ".join(words)

    def verb(plural: bool) -> str:
        singular = rng.choice(list(_VERBS))
        return _VERBS[singular] if plural else singular

    sentences, size = [], 0
    while size < num_bytes:
        plural = rng.random() < 0.5
        words = [noun_phrase(plural)]
        if rng.random() < 0.3:  # a relative clause between the subject and its verb
            inner = rng.random() < 0.5
            words += ["that", noun_phrase(inner), verb(inner)]
        words += [verb(plural), noun_phrase(rng.random() < 0.5)]
        if rng.random() < 0.3:
            words.append(rng.choice(_PLACES))
        sentence = " ".join(words) + " ."
        sentences.append(sentence)
        size += len(sentence) + 1
    return " ".join(sentences)


def encode(text: str) -> Tensor:
    """ASCII text -> (len,) int64 byte ids."""
    data = text.encode("ascii")
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def unigram_entropy(tokens: Tensor) -> float:
    """The entropy (nats) of the tokens' frequencies: the loss of the best model that ignores context."""
    counts = torch.bincount(tokens).double()
    probs = counts[counts > 0] / counts.sum()
    return float(-(probs * probs.log()).sum())


def learning_rate_factor(step: int, steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up over ``warmup_steps``,
    then a cosine or linear decay to 0 at ``steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


def train(
    model: RecursiveForCausalLM,
    *,
    steps: int = 300,
    batch_size: int = 16,
    seq_len: int = 64,
    lr: float = 3e-3,
    warmup_steps: Optional[int] = None,
    schedule: str = "cosine",
    weight_decay: float = 0.01,
    max_grad_norm: float = 1.0,
    bf16: bool = False,
    exit_loss_weight: float = 0.0,
    corpus: Optional[Tensor] = None,
    seed: int = 0,
    progress: bool = True,
) -> List[float]:
    """Train ``model`` in place on random windows of ``corpus``; return each step's loss.

    Args:
        model: a causal LM with ``vocab_size`` >= the largest token id + 1, on the device to train on.
        steps, batch_size, seq_len: optimizer steps and the (batch_size, seq_len) windows of each.
        lr: peak learning rate of AdamW.
        warmup_steps: linear warm-up (default: a tenth of ``steps``).
        schedule: "cosine" or "linear" decay after the warm-up.
        weight_decay: AdamW's, on matrices only (not on norms and biases).
        max_grad_norm: gradients are clipped to this total norm.
        bf16: run the forward under ``torch.autocast`` to bfloat16 (the parameters stay float32).
        exit_loss_weight: adds this times :func:`recursive.losses.exit_loss` (the LM head's loss at the
            loop boundaries) to the loss, so that early exit can stop tokens there; 0: the final loss only.
        corpus: (N,) int64 token ids; default ``encode(synthetic_corpus(seed=seed))``.
        seed: seeds the window sampling (and the default corpus).
        progress: show a progress bar with the loss and tokens/s.

    Returns:
        The final next-token loss of each step (floats, without the exit loss), ``steps`` of them.
    """
    if not isinstance(model, RecursiveForCausalLM):
        raise ValueError(f"model: expected a RecursiveForCausalLM, got {type(model).__name__}")
    for name, value in (("steps", steps), ("batch_size", batch_size), ("seq_len", seq_len)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected an int >= 1, got {value!r}")
    if not lr > 0:
        raise ValueError(f"lr: expected a positive learning rate, got {lr!r}")
    warmup_steps = max(1, steps // 10) if warmup_steps is None else warmup_steps
    if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or not 0 <= warmup_steps <= steps:
        raise ValueError(f"warmup_steps: expected an int in [0, steps={steps}], got {warmup_steps!r}")
    if isinstance(exit_loss_weight, bool) or not isinstance(exit_loss_weight, (int, float)) or not exit_loss_weight >= 0:
        raise ValueError(f"exit_loss_weight: expected a number >= 0, got {exit_loss_weight!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule: expected one of {SCHEDULES}, got {schedule!r}")
    if corpus is None:
        corpus = encode(synthetic_corpus(seed=seed))
    if not isinstance(corpus, Tensor) or corpus.dim() != 1 or corpus.dtype != torch.int64 or corpus.numel() < seq_len:
        raise ValueError(f"corpus: expected (N,) int64 token ids with N >= seq_len={seq_len}")
    if int(corpus.max()) >= model.config.vocab_size:
        raise ValueError(f"model: vocab_size {model.config.vocab_size} does not cover the corpus's token {int(corpus.max())}")

    device = next(model.parameters()).device
    matrices = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    vectors = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    optimizer = torch.optim.AdamW(
        [{"params": matrices, "weight_decay": weight_decay}, {"params": vectors, "weight_decay": 0.0}], lr=lr
    )
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: learning_rate_factor(step, steps, warmup_steps, schedule)
    )
    generator = torch.Generator().manual_seed(seed)
    offsets = torch.arange(seq_len)
    model.train()
    losses: List[float] = []
    start = time.perf_counter()
    with Progress(steps, progress, unit="step") as bar:
        for _ in range(steps):
            starts = torch.randint(0, corpus.numel() - seq_len + 1, (batch_size, 1), generator=generator)
            input_ids = corpus[starts + offsets].to(device)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
                out = model(input_ids, labels=input_ids, output_hidden_states=exit_loss_weight > 0)
                loss = out.loss
                if exit_loss_weight > 0:
                    loss = loss + exit_loss_weight * exit_loss(model, out.hidden_states, input_ids)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), max_grad_norm)
            optimizer.step()
            scheduler.step()
            losses.append(out.loss.item())
            tokens_per_second = len(losses) * batch_size * seq_len / (time.perf_counter() - start)
            bar.step(f"loss {losses[-1]:.3f}  {tokens_per_second:,.0f} tok/s")
    return losses
