"""The training loop (:class:`Trainer`; :func:`train` runs one to its end): AdamW with warm-up and decay,
gradient accumulation, bfloat16 autocast, held-out evaluation, a metrics file, checkpoints that resume exactly,
a clean stop on Ctrl-C, and data parallelism (DDP or FSDP2) under torchrun, where each rank reads its own rows
of every global batch.

A run on N processes with gradient accumulation A computes the same steps as one process with the same
global batch (``batch_size`` windows per optimizer step): each rank's micro-batch loss is a mean over equal
token counts, so the mean of the ranks' and micro-batches' means is the global mean.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import signal
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple, Union

import torch
from torch import Tensor, nn

from ..checks import check_choice, check_int, is_number
from ..losses import exit_loss
from ..modeling import RecursiveForCausalLM
from ..progress import Progress
from .checkpoint import load_checkpoint, resolve_checkpoint, save_checkpoint, save_model
from .corpus import encode, synthetic_corpus
from .data import TokenStream, WindowSampler, eval_windows
from .distributed import World, all_sum, any_rank, current_world, unwrapped, wrap
from .tokenizers import Tokenizer

SCHEDULES = ("cosine", "linear")


# What a resumed run must share with the checkpoint for its steps to be the ones the first run would have taken.
# ``steps`` may differ: the run is extended (or shortened) and its schedule re-planned over the new total.
RESUME_FIELDS = ("batch_size", "seq_len", "lr", "warmup_steps", "schedule", "weight_decay",
                 "max_grad_norm", "exit_loss_weight", "seed")


def _option(default: Any, help: str, group: str = "optimisation", **argparse_options: Any) -> Any:
    """A :class:`TrainingArguments` field whose ``train`` option has this help, sits in this argument group and
    takes these further ``argparse`` options (``choices``)."""
    return field(default=default, metadata={"help": help, "group": group, **argparse_options})


@dataclass
class TrainingArguments:
    """What a run does: its length and batches, the optimizer and its schedule, evaluation and checkpoints.

    Each field is the ``train`` command's option of its name (``batch_size``: ``--batch-size``), with its default;
    its help (``python -m recursive train --help``, or the field's ``metadata["help"]``) documents it.
    """

    steps: int = _option(300, "optimizer steps in all; a resumed run goes on to this total: the checkpoint's own, or "
                              "another one, which extends the run and re-plans the learning rate's decay over it (the "
                              "warm-up stays the checkpoint's)")
    batch_size: int = _option(16, "windows per optimizer step, over every process and accumulation step (the global "
                                  "batch): a multiple of the number of processes times --grad-accum")
    seq_len: int = _option(64, "tokens per window")
    lr: float = _option(3e-3, "AdamW's peak learning rate")
    warmup_steps: Optional[int] = _option(None, "steps of linear warm-up to --lr, then the --schedule decay to 0 at "
                                                "--steps (default: a tenth of --steps)")
    schedule: str = _option("cosine", "the learning rate's decay after the warm-up, to 0 at --steps",
                            choices=SCHEDULES)
    weight_decay: float = _option(0.01, "AdamW's weight decay, on matrices only (not on norms and biases)")
    max_grad_norm: float = _option(1.0, "gradients are clipped to this total norm")
    grad_accum: int = _option(1, "micro-batches per optimizer step on each process")
    bf16: bool = _option(False, "run the forward under bfloat16 autocast (the parameters stay float32)")
    exit_loss_weight: float = _option(0.0, "weight of the LM head's loss at the loop boundaries "
                                           "(recursive.losses.exit_loss, which trains for early exit) added to the "
                                           "loss; 0: the final loss only")
    seed: int = _option(0, "seeds the batches and the synthetic corpus (and, in the train command, the model's init)")
    eval_every: int = _option(0, "held-out loss every N steps (0: at the end only), when there is held-out data",
                              group="evaluation and output")
    eval_windows: int = _option(64, "at most this many held-out windows per evaluation, spread over the held-out "
                                    "text", group="evaluation and output")
    save_every: int = _option(0, "a checkpoint every N steps (0: at the end only), when there is a save folder "
                                 "(--save)", group="evaluation and output")
    keep_checkpoints: int = _option(2, "the newest N checkpoints are kept (0: all)", group="evaluation and output")
    fsdp: bool = _option(False, "under torchrun: shard with FSDP2 instead of replicating with DDP (several "
                                "processes only)")

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "seq_len", "grad_accum", "eval_windows"):
            check_int(name, getattr(self, name), 1)
        for name in ("eval_every", "save_every", "keep_checkpoints"):
            check_int(name, getattr(self, name), 0)
        if self.warmup_steps is None:
            self.warmup_steps = max(1, self.steps // 10)
        check_int("warmup_steps", self.warmup_steps, 0)
        if self.warmup_steps > self.steps:
            raise ValueError(f"warmup_steps: expected at most steps={self.steps}, got {self.warmup_steps}")
        for name in ("lr", "max_grad_norm"):
            if not is_number(getattr(self, name)) or not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for name in ("weight_decay", "exit_loss_weight"):
            if not is_number(getattr(self, name)) or not getattr(self, name) >= 0:
                raise ValueError(f"{name}: expected a number >= 0, got {getattr(self, name)!r}")
        check_choice("schedule", self.schedule, SCHEDULES)


@dataclass
class TrainingResult:
    """``losses``: the training loss of each step this call ran (the global batch's mean); ``eval_losses``:
    ``(step, held-out loss)`` pairs; ``step``: the steps done in all; ``interrupted``: stopped by Ctrl-C (or
    SIGTERM) before ``steps``; ``checkpoint``: the last checkpoint written, if any."""

    losses: List[float] = field(default_factory=list)
    eval_losses: List[Tuple[int, float]] = field(default_factory=list)
    step: int = 0
    tokens_per_second: float = 0.0
    seconds: float = 0.0
    interrupted: bool = False
    checkpoint: Optional[str] = None


def learning_rate_factor(step: int, steps: int, warmup_steps: int, schedule: str) -> float:
    """Multiplier of the peak learning rate at ``step`` (0-based): linear warm-up over ``warmup_steps``,
    then a cosine or linear decay to 0 at ``steps``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, steps - warmup_steps)
    return 0.5 * (1.0 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress


Data = Union[TokenStream, Tensor]


def _stream(data: Optional[Data], name: str) -> Optional[TokenStream]:
    if data is None or isinstance(data, TokenStream):
        return data
    if isinstance(data, Tensor) and data.dim() == 1 and not data.is_floating_point() and not data.is_complex():
        return TokenStream.of_tensor(data.cpu())
    raise ValueError(f"{name}: expected a TokenStream or (N,) integer token ids, got {type(data).__name__}")


class _StopRequest:
    """Ctrl-C (SIGINT) and SIGTERM ask the loop to stop after the current step; a second Ctrl-C interrupts
    at once. Only the main thread can install signal handlers: elsewhere the run cannot be stopped so."""

    def __init__(self) -> None:
        self.requested = False
        self._previous = {}

    def __enter__(self) -> "_StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


class Trainer:
    """One training run of ``model`` in place; on several processes (an initialised ``torch.distributed`` process
    group) one data-parallel run. The constructor checks the model, arguments and data, wraps the model (DDP or
    FSDP2), builds the optimizer and resumes from ``resume_from``; :meth:`fit` runs the loop to ``args.steps``,
    and :meth:`train_step`, :meth:`evaluate` and :meth:`save` are its parts, for a loop of one's own.

    Args:
        model: a causal LM on the device to train on, in float32 (or float64), the same on every rank.
        args: :class:`TrainingArguments` (default: its defaults).
        data: training tokens: a :class:`recursive.training.TokenStream` (of a token file) or (N,) integer
            ids; default the synthetic corpus of ``args.seed``.
        eval_data: held-out tokens, evaluated every ``args.eval_every`` steps and at the end.
        save_dir: checkpoints go here (every ``args.save_every`` steps and at the end), and the final model
            (``save_pretrained``, with ``tokenizer``).
        resume_from: a checkpoint, or a save folder (its newest checkpoint), to continue from exactly.
        metrics_path: JSON lines, one per step (step, tokens, loss, learning rate, tokens/s; eval loss and
            perplexity where evaluated), written by rank 0; a resumed run drops rows past its checkpoint.
        tokenizer: saved beside every checkpoint and the final model.
        interrupt_dir: where a Ctrl-C checkpoint goes when there is no ``save_dir``.
        progress: a progress bar on rank 0.

    Attributes:
        step, tokens: optimizer steps done and tokens trained on, in all (a resumed run counts the checkpoint's).
        args: the run's arguments (a longer run resumed: with the checkpoint's warm-up).
        model: the model as trained: DDP- or FSDP2-wrapped on several processes, else ``model`` itself.
        optimizer: AdamW, with weight decay on the matrices only.
    """

    def __init__(
        self,
        model: RecursiveForCausalLM,
        args: Optional[TrainingArguments] = None,
        data: Optional[Data] = None,
        eval_data: Optional[Data] = None,
        *,
        save_dir: Optional[str] = None,
        resume_from: Optional[str] = None,
        metrics_path: Optional[str] = None,
        tokenizer: Optional[Tokenizer] = None,
        interrupt_dir: Optional[str] = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(model, RecursiveForCausalLM):
            raise ValueError(f"model: expected a RecursiveForCausalLM, got {type(model).__name__}")
        args = args or TrainingArguments()
        if not isinstance(args, TrainingArguments):
            raise ValueError(f"args: expected TrainingArguments, got {type(args).__name__}")
        stream = _stream(data, "data") or TokenStream.of_tensor(encode(synthetic_corpus(seed=args.seed)))
        held_out = _stream(eval_data, "eval_data")
        vocab_size = model.config.vocab_size
        for name, s in (("data", stream), ("eval_data", held_out)):
            beyond = s.token_beyond(vocab_size) if s is not None else None
            if beyond is not None:
                raise ValueError(f"{name}: holds token id {beyond}, outside the model's vocabulary of {vocab_size}")
        world = current_world(next(model.parameters()).device)
        per_step = world.size * args.grad_accum
        if args.batch_size % per_step:
            raise ValueError(f"batch_size: {args.batch_size} windows do not split into {world.size} process(es) x "
                             f"{args.grad_accum} accumulation step(s)")
        self.world, self.micro = world, args.batch_size // per_step
        self.sampler = WindowSampler(stream, args.seq_len, args.seed)
        checkpoint = resolve_checkpoint(resume_from) if resume_from else None

        self.model = wrap(model, world, args.fsdp)
        named = [(n, p) for n, p in unwrapped(self.model).named_parameters() if p.requires_grad]
        if not named:
            raise ValueError("model: has no trainable parameter")
        self.optimizer = torch.optim.AdamW([
            {"params": [p for _, p in named if p.dim() >= 2], "weight_decay": args.weight_decay},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0},
        ], lr=args.lr)
        self.step = self.tokens = 0
        if checkpoint is not None:
            args = self._resume(checkpoint, args)
        self.args = args
        self.metrics = _Metrics(metrics_path, world, self.step)
        self.held_out = held_out
        self.eval_starts = eval_windows(held_out, args.seq_len, args.eval_windows) if held_out is not None else []
        if held_out is not None and not self.eval_starts:
            raise ValueError(f"eval_data: {len(held_out)} tokens hold no window of seq_len={args.seq_len}")
        self.save_dir, self.interrupt_dir, self.tokenizer, self.progress = save_dir, interrupt_dir, tokenizer, progress
        self.model.train()

    def _resume(self, checkpoint: str, args: TrainingArguments) -> TrainingArguments:
        """Load ``checkpoint`` into the model, optimizer, sampler, step and tokens; returns the arguments to go on
        with (``args``, or a longer run's with the checkpoint's warm-up)."""
        state = load_checkpoint(checkpoint, self.model, self.optimizer, self.world)
        theirs = state["arguments"]
        if args.steps != theirs["steps"]:
            if args.steps <= state["step"]:
                raise ValueError(f"steps: {checkpoint!r} is at step {state['step']} already; ask for more steps")
            # The warm-up is behind (or part of) the checkpoint: only the decay is re-planned.
            args = dataclasses.replace(args, warmup_steps=theirs["warmup_steps"])
            if self.world.is_main:
                print(f"resume: the run goes on from step {state['step']} to {args.steps} (it was planned for "
                      f"{theirs['steps']}); the learning rate's {args.schedule} decay is re-planned over {args.steps} "
                      f"steps", file=sys.stderr)
        differ = [f"--{name.replace('_', '-')} {theirs.get(name)} there, {getattr(args, name)} here"
                  for name in RESUME_FIELDS if theirs.get(name) != getattr(args, name)]
        if differ:
            raise ValueError(f"resume: {checkpoint!r} was trained with other settings ({'; '.join(differ)})")
        self.sampler.load_state_dict(state["sampler"])
        self.step, self.tokens = state["step"], state["tokens"]
        return args

    def learning_rate(self) -> float:
        """The learning rate of the next step: a function of the step alone, so a resumed or extended run needs
        no saved state for it."""
        args = self.args
        return args.lr * learning_rate_factor(self.step, args.steps, args.warmup_steps, args.schedule)

    def train_step(self) -> float:
        """One optimizer step on the next global batch at :meth:`learning_rate`; returns its mean loss over every
        rank (and advances ``step`` and ``tokens``)."""
        if self.step >= self.args.steps:
            raise ValueError(f"steps: the run has done its {self.args.steps} steps")
        starts = self.sampler.next_starts(self.args.batch_size)
        lr = self.learning_rate()
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss = _step(self.model, self.optimizer, self.sampler, starts, self.args, self.micro, self.world)
        self.step += 1
        self.tokens += self.args.batch_size * self.args.seq_len
        return loss

    def evaluate(self) -> float:
        """The mean next-token loss over the held-out windows (``eval_data``'s, at most ``args.eval_windows``)."""
        if self.held_out is None:
            raise ValueError("eval_data: none was given, so there is nothing to evaluate on")
        return evaluate(self.model, self.held_out, self.eval_starts, self.args, self.micro, self.world)

    def state_dict(self) -> dict:
        """The trainer's state a checkpoint keeps beside the weights and the optimizer's: step, tokens seen, the
        sampler's position and the arguments (JSON-able)."""
        return {"step": self.step, "tokens": self.tokens, "sampler": self.sampler.state_dict(),
                "arguments": dataclasses.asdict(self.args)}

    def save(self, directory: str) -> str:
        """Write the checkpoint of this step into ``directory`` (every rank calls it; the newest
        ``args.keep_checkpoints`` are kept); returns its folder."""
        return save_checkpoint(directory, self.step, self.model, self.optimizer, self.state_dict(), self.world,
                               self.tokenizer, self.args.keep_checkpoints)

    def fit(self) -> TrainingResult:
        """Train to ``args.steps``: a progress bar, held-out evaluation every ``args.eval_every`` steps and at the
        end, a metrics row per step, checkpoints every ``args.save_every`` steps and at the end, a checkpoint and
        a clean stop on Ctrl-C (or SIGTERM), and the final model in ``save_dir``."""
        args, world = self.args, self.world
        result = TrainingResult(step=self.step)
        start, start_tokens = time.perf_counter(), self.tokens
        bar = Progress(args.steps - self.step, self.progress and world.is_main, unit="step")
        with bar, _StopRequest() as stop:
            while self.step < args.steps:
                lr = self.learning_rate()
                loss = self.train_step()
                result.step = self.step
                result.losses.append(loss)
                elapsed = time.perf_counter() - start
                row = {"step": self.step, "tokens": self.tokens, "loss": loss, "lr": lr,
                       "tokens_per_s": (self.tokens - start_tokens) / elapsed, "elapsed_s": elapsed}
                last = self.step == args.steps
                label = f"loss {loss:.3f}"
                if self.held_out is not None and (last or (args.eval_every and self.step % args.eval_every == 0)):
                    eval_loss = self.evaluate()
                    result.eval_losses.append((self.step, eval_loss))
                    row.update(eval_loss=eval_loss, eval_perplexity=math.exp(min(eval_loss, 80.0)))
                if result.eval_losses:
                    label += f"  eval {result.eval_losses[-1][1]:.3f}"
                self.metrics.write(row)
                bar.step(f"{label}  {row['tokens_per_s']:,.0f} tok/s")
                if self.save_dir and (last or (args.save_every and self.step % args.save_every == 0)):
                    result.checkpoint = self.save(self.save_dir)
                if not last and any_rank(stop.requested, world):
                    result.interrupted = True
                    if self.save_dir or self.interrupt_dir:
                        result.checkpoint = self.save(self.save_dir or self.interrupt_dir)
                    break
        result.seconds = time.perf_counter() - start
        result.tokens_per_second = (self.tokens - start_tokens) / result.seconds if result.seconds > 0 else 0.0
        if self.save_dir and not result.interrupted:
            save_model(self.save_dir, self.model, world, self.tokenizer)
        return result


def train(
    model: RecursiveForCausalLM,
    args: Optional[TrainingArguments] = None,
    data: Optional[Data] = None,
    eval_data: Optional[Data] = None,
    *,
    save_dir: Optional[str] = None,
    resume_from: Optional[str] = None,
    metrics_path: Optional[str] = None,
    tokenizer: Optional[Tokenizer] = None,
    interrupt_dir: Optional[str] = None,
    progress: bool = True,
) -> TrainingResult:
    """Train ``model`` in place: :meth:`Trainer.fit` of a :class:`Trainer` of these arguments (documented there)."""
    return Trainer(model, args, data, eval_data, save_dir=save_dir, resume_from=resume_from,
                   metrics_path=metrics_path, tokenizer=tokenizer, interrupt_dir=interrupt_dir,
                   progress=progress).fit()


def _accumulation(model: nn.Module, last: bool):
    """Gradient synchronisation on the last micro-batch of a step only (DDP's no_sync, FSDP2's switch)."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        return contextlib.nullcontext() if last else model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):  # an FSDP2 module
        model.set_requires_gradient_sync(last)
    return contextlib.nullcontext()


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, sampler: WindowSampler, starts: List[int],
          args: TrainingArguments, micro: int, world: World) -> float:
    """One optimizer step on the global batch ``starts``; returns its mean loss over every rank."""
    device = world.device
    total = torch.zeros((), device=device, dtype=torch.float64)
    for a in range(args.grad_accum):
        first = (a * world.size + world.rank) * micro
        input_ids = sampler.read(starts[first:first + micro]).to(device, non_blocking=True)
        with _accumulation(model, a == args.grad_accum - 1):
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.bf16):
                # the data's token ids were checked against the vocabulary once, at the start
                out = model(input_ids, labels=input_ids, output_hidden_states=args.exit_loss_weight > 0,
                            check_indices=False)
                loss = out.loss
                if args.exit_loss_weight > 0:
                    loss = loss + args.exit_loss_weight * exit_loss(unwrapped(model), out.hidden_states, input_ids)
            (loss / args.grad_accum).backward()
        total += out.loss.detach().double() / args.grad_accum
    torch.nn.utils.clip_grad_norm_(model.parameters(), args.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return float(all_sum(total, world)) / world.size


@torch.no_grad()
def evaluate(model: nn.Module, stream: TokenStream, starts: List[int], args: TrainingArguments, micro: int,
             world: World) -> float:
    """The mean next-token loss over the windows at ``starts`` of ``stream``, the ranks sharing them. Every rank
    runs the same number of forwards (FSDP2 gathers weights in each): a rank out of windows reruns the first
    with weight 0. The stream's token ids are trusted to lie in the vocabulary (a Trainer checks its data
    once)."""
    mine = starts[world.rank::world.size]
    rounds = math.ceil(math.ceil(len(starts) / world.size) / micro)
    forward = unwrapped(model) if isinstance(model, nn.parallel.DistributedDataParallel) else model
    sums = torch.zeros(2, dtype=torch.float64, device=world.device)  # loss x tokens, tokens
    model.eval()
    for r in range(rounds):
        rows, weight = mine[r * micro:(r + 1) * micro], 1.0
        if not rows:
            rows, weight = starts[:1], 0.0
        input_ids = stream.windows(rows, args.seq_len).to(world.device)
        with torch.autocast(world.device.type, dtype=torch.bfloat16, enabled=args.bf16):
            loss = forward(input_ids, labels=input_ids, check_indices=False).loss
        count = len(rows) * (args.seq_len - 1) * weight
        sums += torch.stack([loss.double() * count, torch.tensor(count, dtype=torch.float64, device=world.device)])
    model.train()
    sums = all_sum(sums, world)
    return float(sums[0] / sums[1])


class _Metrics:
    """JSON lines on rank 0; a resumed run first drops the rows past the step it resumes from."""

    def __init__(self, path: Optional[str], world: World, resumed_step: int) -> None:
        self.path = path if world.is_main else None
        if self.path is None:
            return
        os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
        kept = []
        if resumed_step and os.path.exists(self.path):
            with open(self.path) as f:
                kept = [line for line in f if line.strip() and json.loads(line)["step"] <= resumed_step]
        with open(self.path, "w") as f:
            f.writelines(kept)

    def write(self, row: dict) -> None:
        if self.path is not None:
            with open(self.path, "a") as f:
                f.write(json.dumps(row) + "\n")
