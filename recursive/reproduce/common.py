"""What the experiments share: the corpus (the Python standard library's own sources, as bytes), the sizes
and budgets of a quick and a full run (fixed before any result was looked at), the untied model the
conversion experiments start from (pretrained once per run), training and held-out evaluation through
:mod:`recursive.training`, and the report each experiment writes: its tables, a plot, and each claim with
the criterion that decides it and the verdict.
"""

from __future__ import annotations

import hashlib
import os
import platform
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..config import RecursiveConfig
from ..modeling import RecursiveForCausalLM
from ..training import (
    ByteTokenizer,
    TokenStream,
    TrainingArguments,
    split_documents,
    stdlib_sources,
    tokenize_files,
    train,
)
from ..training.data import eval_windows
from ..training.distributed import World
from ..training.plots import figure
from ..training.tokenizers import Tokenizer
from ..training.trainer import evaluate

EVAL_FRACTION = 0.05


@dataclass(frozen=True)
class Budget:
    """Model sizes and training budgets of a run. ``seeds``: the training seeds every compared variant runs
    with (differences smaller than the spread over them are called mixed); ``files``: the standard library's
    sources read (0: all); ``requests``, ``new_tokens``: the decoding workload; ``timing_s``: the time spent
    timing each decoding method."""

    name: str
    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_kv_heads: int
    num_layers: int
    seq_len: int
    batch_size: int
    pretrain_steps: int
    train_steps: int
    lr: float
    eval_windows: int
    seeds: Tuple[int, ...]
    files: int
    requests: int
    new_tokens: int
    timing_s: float


QUICK = Budget("quick", hidden_size=64, intermediate_size=176, num_heads=4, num_kv_heads=2, num_layers=6, seq_len=64,
               batch_size=16, pretrain_steps=120, train_steps=30, lr=3e-3, eval_windows=48, seeds=(0,), files=120,
               requests=16, new_tokens=16, timing_s=2.0)
FULL = Budget("full", hidden_size=128, intermediate_size=352, num_heads=4, num_kv_heads=2, num_layers=6, seq_len=128,
              batch_size=16, pretrain_steps=800, train_steps=200, lr=2e-3, eval_windows=128, seeds=(0, 1), files=0,
              requests=32, new_tokens=32, timing_s=20.0)


@dataclass
class Corpus:
    """The training and held-out streams of the standard library's sources in ``unit`` (bytes, or a tokenizer's
    tokens), and what identifies them."""

    train: TokenStream
    held_out: TokenStream
    files: int
    num_bytes: int
    sha256: str
    unit: str = "bytes"

    def describe(self) -> str:
        return (f"the Python {platform.python_version()} standard library's *.py sources ({self.files} files, "
                f"{self.num_bytes:,} bytes, sha256 {self.sha256[:16]}), as {self.unit}; {len(self.train):,} training "
                f"and {len(self.held_out):,} held-out tokens ({EVAL_FRACTION:.0%} of the documents)")


def stdlib_corpus(cache_dir: str, limit: int = 0, tokenizer: Optional[Tokenizer] = None,
                  unit: str = "bytes") -> Corpus:
    """The corpus of the first ``limit`` (0: all) standard-library sources, tokenised into ``cache_dir`` by
    ``tokenizer`` (default: bytes), whose tokens ``unit`` names."""
    paths = stdlib_sources(limit)
    digest, size = hashlib.sha256(), 0
    for path in paths:
        with open(path, "rb") as f:
            data = f.read()
        digest.update(data)
        size += len(data)
    token_file = tokenize_files(paths, tokenizer or ByteTokenizer(), cache_dir, progress=False)
    train_docs, held_out_docs = split_documents(token_file.num_documents, EVAL_FRACTION)
    return Corpus(TokenStream.of_documents(token_file, train_docs), TokenStream.of_documents(token_file, held_out_docs),
                  len(paths), size, digest.hexdigest(), unit)


def held_out_loss(model: RecursiveForCausalLM, stream: TokenStream, starts: List[int], batch_size: int, seq_len: int,
                  device: torch.device) -> float:
    """Mean next-token loss (nats per token) over the windows of ``stream`` at ``starts``, ``batch_size`` at a
    time."""
    args = TrainingArguments(steps=1, batch_size=batch_size, seq_len=seq_len)
    return evaluate(model, stream, starts, args, batch_size, World(device=device))


@dataclass
class Claim:
    """A paper's claim, the criterion that decides it here (fixed with the budgets), and the outcome."""

    claim: str
    criterion: str
    verdict: str  # "held", "did not hold" or "mixed"
    evidence: str


def verdict(held: bool, clear: bool = True) -> str:
    """``held`` and ``clear`` (a margin beyond the seeds' spread): held; ``held`` alone: mixed."""
    if held:
        return "held" if clear else "mixed"
    return "did not hold" if clear else "mixed"


@dataclass
class Report:
    """An experiment's results: markdown tables, a figure, the claims."""

    name: str
    title: str
    setup: str
    tables: List[Tuple[str, Sequence[str], List[Sequence[object]]]] = field(default_factory=list)
    claims: List[Claim] = field(default_factory=list)
    figure: Optional[Callable[[str], None]] = None  # draws the PNG at the path it is given
    notes: List[str] = field(default_factory=list)
    seconds: float = 0.0
    # An experiment with a model and text of its own describes them here (sizes, steps, seeds; the text) instead
    # of the run's budget and corpus.
    budget: Optional[str] = None
    corpus: Optional[str] = None

    def table(self, caption: str, headers: Sequence[str], rows: List[Sequence[object]]) -> None:
        self.tables.append((caption, headers, rows))

    @staticmethod
    def _budget(context: "Context") -> str:
        return (f"{describe_budget(context.budget)}; seeds {', '.join(map(str, context.budget.seeds))}, fixed before "
                "the results")

    def markdown(self, context: "Context", figure_name: Optional[str]) -> str:
        lines = [f"# {self.title}", "", self.setup, "",
                 f"Machine: {machine()}. Budget: {context.budget.name} ({self.budget or self._budget(context)}). "
                 f"Wall time: {self.seconds / 60:.1f} min. Corpus: {self.corpus or context.corpus.describe()}.", ""]
        for caption, headers, rows in self.tables:
            lines += [caption, "", "| " + " | ".join(headers) + " |", "|" + "|".join(" --- " for _ in headers) + "|"]
            lines += ["| " + " | ".join(_cell(value) for value in row) + " |" for row in rows]
            lines.append("")
        if self.claims:
            lines += ["| claim | criterion | verdict | evidence |", "| --- | --- | --- | --- |"]
            lines += [f"| {c.claim} | {c.criterion} | **{c.verdict}** | {c.evidence} |" for c in self.claims]
            lines.append("")
        lines += [f"{note}" for note in self.notes] + ([""] if self.notes else [])
        if figure_name:
            lines += [f"![{self.title}]({figure_name})", ""]
        return "\n".join(lines)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    where = (torch.cuda.get_device_name() if torch.cuda.is_available() else
             f"CPU {cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} threads")
    return f"{where}; Python {platform.python_version()}, torch {torch.__version__}, float32"


def describe_budget(budget: Budget) -> str:
    return (f"{budget.num_layers} layers of hidden {budget.hidden_size}, {budget.batch_size} x {budget.seq_len} "
            f"tokens per step, pretraining {budget.pretrain_steps} steps, each variant {budget.train_steps} steps")


@dataclass
class Trained:
    """:meth:`Context.from_scratch`'s result."""

    losses: List[float]
    model: RecursiveForCausalLM
    curve: List[float]


class Context:
    """One ``reproduce`` run: its budget, corpus, output folder, and the untied model pretrained once for the
    experiments that start from one."""

    def __init__(self, out: str, budget: Budget, corpus: Corpus, device: torch.device, progress: bool) -> None:
        self.out, self.budget, self.corpus, self.device, self.progress = out, budget, corpus, device, progress
        self._untied: Optional[Tuple[Dict[str, torch.Tensor], RecursiveConfig, float]] = None
        self._eval_starts = eval_windows(corpus.held_out, budget.seq_len, budget.eval_windows)

    def config(self, **overrides) -> RecursiveConfig:
        """The budget's architecture on the byte vocabulary: untied unless ``overrides`` say otherwise."""
        budget = self.budget
        values = dict(vocab_size=ByteTokenizer.vocab_size, hidden_size=budget.hidden_size,
                      intermediate_size=budget.intermediate_size, num_attention_heads=budget.num_heads,
                      num_key_value_heads=budget.num_kv_heads, num_layers=budget.num_layers,
                      num_blocks=budget.num_layers)
        values.update(overrides)
        return RecursiveConfig(**values)

    def fresh(self, config: RecursiveConfig, seed: int = 0) -> RecursiveForCausalLM:
        torch.manual_seed(seed)
        return RecursiveForCausalLM(config).to(self.device)

    def train(self, model: RecursiveForCausalLM, steps: int, seed: int = 0, lr: Optional[float] = None,
              **options) -> List[float]:
        """Train ``model`` in place for ``steps`` on the corpus (window order seeded by ``seed``); the losses."""
        args = TrainingArguments(steps=steps, batch_size=self.budget.batch_size, seq_len=self.budget.seq_len,
                                 lr=lr or self.budget.lr, seed=seed, **options)
        return train(model, args, self.corpus.train, progress=self.progress).losses

    def from_scratch(self, config: RecursiveConfig, steps: int) -> "Trained":
        """A model of ``config`` trained from scratch ``steps`` steps with each of the budget's seeds (init and
        window order): the held-out loss of each, the last seed's model and the first seed's training losses."""
        losses, curves = [], []
        for seed in self.budget.seeds:
            model = self.fresh(config, seed)
            curves.append(self.train(model, steps, seed=seed))
            losses.append(self.held_out_loss(model))
        return Trained(losses, model.eval(), curves[0])

    def held_out_loss(self, model: RecursiveForCausalLM) -> float:
        """Mean next-token loss (nats per byte) over the run's fixed held-out windows."""
        return held_out_loss(model, self.corpus.held_out, self._eval_starts, self.budget.batch_size,
                             self.budget.seq_len, self.device)

    def pretrained_untied(self) -> Tuple[RecursiveForCausalLM, float]:
        """(a copy of the untied model pretrained for ``budget.pretrain_steps``, the seconds that took), trained
        once per run with seed 0."""
        if self._untied is None:
            start = time.perf_counter()
            model = self.fresh(self.config())
            self.train(model, self.budget.pretrain_steps)
            self._untied = ({k: v.detach().clone() for k, v in model.state_dict().items()}, model.config,
                            time.perf_counter() - start)
        state, config, seconds = self._untied
        model = RecursiveForCausalLM(config).to(self.device)
        model.load_state_dict(state)
        return model, seconds


def shared_start(context: "Context") -> RecursiveForCausalLM:
    """The pretrained untied model converted to 2 shared blocks looped 3 times, without relaxation (stepwise
    init): the frozen base the adapter experiments start from."""
    from ..convert import convert_hf, export_hf

    untied, _ = context.pretrained_untied()
    return convert_hf(export_hf(untied).float(), 2, "cycle", "stepwise", 0, progress=False).to(context.device)


def with_adapters(base: RecursiveForCausalLM, **relaxation) -> RecursiveForCausalLM:
    """A model of ``base``'s weights with the fresh adapters of ``relaxation`` (config fields), which change
    nothing until trained, and only the adapters trainable."""
    config = RecursiveConfig.from_dict({**base.config.to_dict(), "lora_targets": None,  # None: its default
                                        **relaxation})
    model = RecursiveForCausalLM(config).to(next(base.parameters()).device)
    missing, unexpected = model.load_state_dict(base.state_dict(), strict=False)
    adapters = set(model.adapter_state_dict())
    if unexpected or set(missing) - adapters:
        raise RuntimeError(f"with_adapters: {relaxation} does not extend the base "
                           f"(missing {sorted(set(missing) - adapters)}, unexpected {sorted(unexpected)})")
    model.mark_only_adapters_trainable()
    return model


def trainable(model: RecursiveForCausalLM) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values)


def spread(values: Sequence[float]) -> float:
    """max - min over the seeds (0 with one seed)."""
    return max(values) - min(values)


def log(text: str) -> None:
    print(text, file=sys.stderr, flush=True)




def bar_plot(path: str, loss: Dict[str, float]) -> None:
    """Held-out losses by model, as horizontal bars."""
    names = list(loss)
    with figure(path, size=(6.4, 0.9 + 0.35 * len(loss))) as axes:
        axes.barh(range(len(names)), [loss[n] for n in names], color="#3b75af")
        axes.set_yticks(range(len(names)), names, fontsize=8)
        axes.invert_yaxis()
        axes.set_xlim(min(loss.values()) * 0.97, max(loss.values()) * 1.01)
        axes.set_xlabel("held-out loss (nats per byte)")
