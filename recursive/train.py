"""Uptraining a small recursive causal LM on a synthetic language the package generates (no downloads).

The corpus is English-like text from a small probabilistic grammar (:func:`synthetic_corpus`):
determiners, adjectives, nouns and verbs that agree in number across a relative clause ("these old
dogs that the teacher likes chase a red ball ."), read as bytes (token id = byte value, all below 128).
It is deterministic for a seed and learnable: a model's loss falls well below the corpus's unigram
entropy once it picks up spelling, word order and agreement.

:func:`train` runs AdamW with a linear warm-up and a cosine (or linear) decay, gradient clipping and
optional bfloat16 autocast on random windows of the corpus, and returns the loss of every step.
``python -m recursive train`` (see :func:`add_arguments`) builds a model from a default config, a JSON
config or a saved directory, trains it, prints a summary and optionally saves it.
"""

from __future__ import annotations

import argparse
import math
import random
import time
from typing import List, Optional

import torch
from torch import Tensor

from .config import RecursiveConfig
from .generation import exit_loss
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
        exit_loss_weight: adds this times :func:`recursive.generation.exit_loss` (the LM head's loss at the
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


def default_config() -> RecursiveConfig:
    """The small model ``python -m recursive train`` builds by default: 6 effective layers over 2 shared
    blocks with a depth-wise LoRA, byte vocabulary."""
    return RecursiveConfig(
        vocab_size=CORPUS_VOCAB_SIZE, hidden_size=64, intermediate_size=176, num_attention_heads=4,
        num_key_value_heads=2, num_layers=6, num_blocks=2, relaxation="depth_lora", lora_rank=8, lora_alpha=16.0,
    )


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``python -m recursive train``."""
    source = parser.add_mutually_exclusive_group()
    source.add_argument("--config", help="a JSON RecursiveConfig to build the model from (default: a small built-in one)")
    source.add_argument("--model", help="a directory written by save_pretrained to continue training")
    parser.add_argument("--device", help="cpu or cuda (default: cuda when available)")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--lr", type=float, default=3e-3, help="peak learning rate")
    parser.add_argument("--warmup-steps", type=int, help="default: a tenth of --steps")
    parser.add_argument("--schedule", choices=SCHEDULES, default="cosine")
    parser.add_argument("--bf16", action="store_true", help="bfloat16 autocast (GPU)")
    parser.add_argument("--exit-loss-weight", type=float, default=0.0,
                        help="weight of the LM head's loss at the loop boundaries (trains for early exit)")
    parser.add_argument("--seed", type=int, default=0, help="seeds the init, the corpus and the batches")
    parser.add_argument("--adapters-only", action="store_true",
                        help="freeze the base model and train the adapters (LoRA, circuit factors, routers) only")
    parser.add_argument("--gradient-checkpointing", action="store_true",
                        help="recompute each layer in the backward instead of keeping its activations")
    parser.add_argument("--save", metavar="DIR", help="save the trained model here (save_pretrained)")
    parser.add_argument("--save-adapter", metavar="DIR", help="save the adapters alone here (save_adapter)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> List[float]:
    """``python -m recursive train``: build, train, summarise, save; returns the losses."""
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.manual_seed(args.seed)
    if args.model:
        model = RecursiveForCausalLM.from_pretrained(args.model, device=device, dtype=torch.float32)
    else:
        config = default_config()
        if args.config:
            with open(args.config) as f:
                config = RecursiveConfig.from_json_string(f.read())
        model = RecursiveForCausalLM(config).to(device)
    corpus = encode(synthetic_corpus(seed=args.seed))
    if args.adapters_only:
        model.mark_only_adapters_trainable()
    if args.gradient_checkpointing:
        model.gradient_checkpointing_enable()
    num_parameters = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    config = model.config
    print(f"training {trainable / 1e6:.2f}M of {num_parameters / 1e6:.2f}M parameters ({config.num_layers} layers "
          f"over {config.num_blocks} blocks, {config.relaxation}) on {device}, {args.steps} steps of "
          f"{args.batch_size} x {args.seq_len} tokens")
    start = time.perf_counter()
    losses = train(
        model, steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
        warmup_steps=args.warmup_steps, schedule=args.schedule, bf16=args.bf16,
        exit_loss_weight=args.exit_loss_weight, corpus=corpus, seed=args.seed,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    window = min(10, len(losses))
    print(f"loss: first {sum(losses[:window]) / window:.3f}, last {sum(losses[-window:]) / window:.3f} "
          f"(means of {window} steps); the corpus's unigram entropy is {unigram_entropy(corpus):.3f}")
    print(f"{args.steps * args.batch_size * args.seq_len / seconds:,.0f} tokens/s over {seconds:.1f} s")
    if args.save:
        model.save_pretrained(args.save)
        print(f"saved to {args.save}")
    if args.save_adapter:
        model.save_adapter(args.save_adapter)
        print(f"saved the adapters to {args.save_adapter}")
    return losses
