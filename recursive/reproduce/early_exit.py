"""Experiment 6, continuous depth-wise batching with early exit (Bae et al., 2024): the pretrained untied
model converted to a relaxed recursive one (2 blocks, 3 loops, rank-8 SVD depth LoRA) and uptrained with the
loss at the loop boundaries; then greedy decoding of held-out prompts at a range of exit thresholds, with
the depth-batching engine and with plain batching, against full-depth output and against the original
untied model's ``generate`` in Hugging Face transformers."""

from __future__ import annotations

import importlib.util
import random
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

from ..convert import convert_hf, export_hf
from ..generation import DepthBatchingEngine, generate_in_batches
from ..training import TokenStream
from ..training.plots import figure
from .common import Claim, Context, Report, verdict

NAME = "early_exit"

THRESHOLDS = (None, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6)

BATCH = 8

AGREEMENT = 0.95  # the paper's "kept quality": greedy output equal to full depth's on this share of tokens


def prompts(stream: TokenStream, count: int, seed: int = 0) -> List[List[int]]:
    """``count`` windows of 16-48 tokens of ``stream`` (held-out text)."""
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        length = rng.randint(16, 48)
        out.append(stream.read(rng.randrange(len(stream) - length), length).tolist())
    return out


def agreement(outputs: List[List[int]], reference: List[List[int]], prompts_: List[List[int]]) -> float:
    same = total = 0
    for out, ref, prompt in zip(outputs, reference, prompts_):
        new, ref_new = out[len(prompt):], ref[len(prompt):]
        same += sum(a == b for a, b in zip(new, ref_new))
        total += len(ref_new)
    return same / total


def run(context: Context) -> Report:
    if importlib.util.find_spec("transformers") is None:
        raise ValueError("reproduce early_exit: needs transformers (the conversion and the reference point)")
    budget = context.budget
    count, new_tokens = budget.requests, budget.new_tokens
    report = Report(NAME, "Continuous depth-wise batching with early exit: throughput against agreement",
                    f"The pretrained untied model converted to 2 shared blocks looped 3 times with a rank-8 SVD depth "
                    f"LoRA and uptrained {budget.train_steps} steps with the exit loss (weight 1: the LM head's loss "
                    f"at each loop boundary). {count} held-out prompts of 16-48 bytes, {new_tokens} new bytes each, "
                    f"greedy, {BATCH} rows per batch (or engine slots); a token leaves at a loop boundary when its top "
                    "probability reaches the threshold. Agreement: share of new tokens equal to full-depth greedy "
                    "decoding's at the same position. Times are medians of interleaved rounds.")
    start = time.perf_counter()
    untied, _ = context.pretrained_untied()
    hf = export_hf(untied).float()
    model = convert_hf(hf, 2, "cycle", "stepwise", 8, progress=False).to(context.device)
    context.train(model, budget.train_steps, exit_loss_weight=1.0)
    model.eval()
    hf = hf.to(context.device).eval()
    requests = prompts(context.corpus.held_out, count)
    rows, points, hf_rate = serving_curve(model, hf, requests, [new_tokens] * count, THRESHOLDS, context.device,
                                          budget.timing_s)
    report.seconds = time.perf_counter() - start
    report.table("Decoding throughput and agreement with full depth:", SERVING_COLUMNS, rows)
    report.claims = claims(points, hf_rate)
    report.figure = lambda path: _plot(path, points, hf_rate)
    return report


SERVING_COLUMNS = ["method", "exit threshold", "loops per token", "agreement", "new tokens/s", "vs transformers"]


def serving_curve(model, hf, requests: List[List[int]], lengths: List[int], thresholds: Sequence[Optional[float]],
                  device, timing_s: float) -> Tuple[List[list], Dict[str, List[tuple]], float]:
    """Greedy decoding of ``requests`` (``lengths`` new tokens each) by ``model`` through the engine and plain
    batching at each exit threshold (the first None: full depth, the reference of agreement), and by the
    transformers model ``hf`` in batches, timed in interleaved rounds: (table rows in
    :data:`SERVING_COLUMNS`, ``{"engine"|"plain": [(agreement, tokens/s)]}`` per threshold, transformers'
    tokens/s)."""
    from recursive_benchmarks.bench_generation import transformers_in_batches
    from recursive_benchmarks.common import median_seconds

    hf.generation_config.eos_token_id = None  # every request runs to its length, as with the other methods
    # Greedy decoding gives the same tokens every round: the timed runs keep their last output, and each
    # engine's stats are those of its last run.
    outputs: Dict[str, List[List[int]]] = {}

    def recorded(name: str, decode: Callable[[], List[List[int]]]) -> Callable[[], None]:
        def run() -> None:
            outputs[name] = decode()
        return run

    engines = {t: DepthBatchingEngine(model, BATCH, t) for t in thresholds}
    runs = {"transformers": lambda: transformers_in_batches(hf, requests, lengths, BATCH)}
    for threshold in thresholds:
        runs[f"engine {threshold}"] = recorded(f"engine {threshold}",
                                               lambda t=threshold: engines[t].generate(requests, lengths))
        runs[f"plain {threshold}"] = recorded(f"plain {threshold}", lambda t=threshold: generate_in_batches(
            model, requests, lengths, BATCH, exit_threshold=t))
    seconds = median_seconds(runs, device, min_run_time=timing_s)
    reference = outputs[f"plain {thresholds[0]}"]  # full depth
    tokens = sum(lengths)
    rows, points = [], {"engine": [], "plain": []}
    for threshold in thresholds:
        loops = engines[threshold].stats.mean_exit_loops
        for how in ("engine", "plain"):
            rate = tokens / seconds[f"{how} {threshold}"]
            share = agreement(outputs[f"{how} {threshold}"], reference, requests)
            points[how].append((share, rate))
            rows.append([how, "none" if threshold is None else threshold, f"{loops:.2f}" if how == "engine" else "",
                         share, rate, seconds["transformers"] / seconds[f"{how} {threshold}"]])
    hf_rate = tokens / seconds["transformers"]
    rows.append(["transformers, the original", "", "", "", hf_rate, 1.0])
    return rows, points, hf_rate


def claims(points: Dict[str, List[tuple]], hf_rate: float) -> List[Claim]:
    full_engine, full_plain = points["engine"][0][1], points["plain"][0][1]
    kept = [(share, rate) for share, rate in points["engine"][1:] if share >= AGREEMENT]
    best = max(kept, key=lambda p: p[1]) if kept else max(points["engine"][1:], key=lambda p: p[0])
    faster = best[1] > max(full_engine, full_plain)
    return [
        Claim("Early exit with depth-wise batching buys throughput at kept quality",
              f"some threshold gives >= {AGREEMENT:.0%} agreement with full depth and more tokens/s than both the "
              "engine and plain batching without exit",
              verdict(bool(kept) and faster, clear=bool(kept) == faster),
              f"best kept: {best[0]:.1%} agreement at {best[1]:,.0f} tok/s; without exit: engine {full_engine:,.0f}, "
              f"plain {full_plain:,.0f}; transformers (untied) {hf_rate:,.0f}"),
        Claim("The engine beats plain batching at the same exit threshold",
              "engine tokens/s above plain batching's at every threshold",
              verdict(all(e[1] > p[1] for e, p in zip(points["engine"], points["plain"]))),
              ", ".join(f"{e[1] / p[1]:.2f}x" for e, p in zip(points["engine"], points["plain"]))),
    ]


def _plot(path: str, points: Dict[str, List[tuple]], hf_rate: float) -> None:
    with figure(path) as axes:
        for how, marker in (("engine", "o-"), ("plain", "s--")):
            axes.plot([100 * share for share, _ in points[how]], [rate for _, rate in points[how]], marker,
                      label=f"{how} (thresholds: none, {', '.join(str(t) for t in THRESHOLDS[1:])})")
        axes.axhline(hf_rate, color="gray", lw=1, label="transformers generate, untied original")
        axes.axvline(100 * AGREEMENT, color="gray", lw=0.8, ls=":")
        axes.set_xlabel("greedy agreement with full depth (%)")
        axes.set_ylabel("new tokens / s")
        axes.legend(fontsize=7)
