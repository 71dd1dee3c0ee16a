"""Benchmark decoding throughput: continuous depth-wise batching against plain batched ``generate``.

One set of requests (seeded random prompts and output lengths) is generated greedily by

- plain: ``RecursiveForCausalLM.generate`` on left-padded batches of ``max_batch_size`` requests in
  arrival order, each batch running until its longest request is done (with and without early exit);
- untied: the same on a model of the same depth and width whose layers all have their own weights;
- engine: ``recursive.DepthBatchingEngine`` with as many slots (with and without early exit);
- mor, mor engine: plain batching and the engine on a Mixture-of-Recursions model of the recursive
  model's shape (token choice over its loops, recursion-wise KV cache; its router untrained, so the
  tokens' depths spread over the loops).

Tokens/s counts the requested new tokens over the wall time of the whole run (prefill included).
``vs plain``: the plain recursive run's time over this one's (above 1 is faster). ``exit loops``: the loops an
engine-decoded token ran on average, of the model's loops (mor: the recursions the decoded tokens ran, read off one
forward of each output). ``agree``: the fraction of new tokens equal to those of
full-depth decoding at the same position (1.0 without early exit).

Early exit on random weights: a fixed threshold such as 0.9 never fires, so the threshold is
calibrated on the model (``recursive.generation.calibrate_exit_threshold``): the value at which
``--exit-fraction`` of the tokens of the prompts would leave at the first loop boundary; the outputs
then differ from full depth (``agree``). ``--train-steps N`` first trains the recursive model on the
package's synthetic corpus (``recursive.train``, with the loop-boundary loss that teaches early exit,
``exit_loss_weight=1``) and draws the prompts from held-out text of that corpus: early exit then runs at
a fixed ``--exit-threshold`` (default 0.9) and ``agree`` measures the output quality it keeps.

By default plain, untied, engine and engine+exit; ``--full`` adds plain+exit, mor and mor engine.

    python -m recursive bench --only generation [--full] [--device cuda] [--train-steps 300] [--json out.json]
"""

from __future__ import annotations

import importlib.util
import random
import statistics
import time
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

import torch

from recursive import DepthBatchingEngine, RecursiveConfig, RecursiveForCausalLM, export_hf
from recursive.generation import calibrate_exit_threshold, generate_in_batches
from recursive.training import TrainingArguments, encode, synthetic_corpus, train

from .common import Column, Steps, machine_description, render, resolve, speedup

PEER = "transformers"  # the untied model exported to Hugging Face transformers, its own batched generate
METHODS = ("plain", "plain+exit", "untied", PEER, "engine", "engine+exit", "mor", "mor engine")
DEFAULT_METHODS = ("plain", "untied", PEER, "engine", "engine+exit")  # without --full


def available_methods(methods=METHODS) -> Tuple[str, ...]:
    """``methods`` but the peer when transformers is not installed."""
    return tuple(m for m in methods if m != PEER or importlib.util.find_spec("transformers") is not None)


@dataclass(frozen=True)
class Workload:
    """Model size and requests: ``num_layers`` effective layers over ``num_blocks`` cycled blocks."""

    hidden_size: int
    intermediate_size: int
    num_heads: int
    num_layers: int
    num_blocks: int
    vocab_size: int
    num_requests: int
    max_batch_size: int
    prompt_lengths: tuple
    output_lengths: tuple

    @property
    def label(self) -> str:
        return (f"h={self.hidden_size} L={self.num_layers} B={self.num_blocks} vocab={self.vocab_size}, "
                f"{self.num_requests} requests (prompts {self.prompt_lengths[0]}-{self.prompt_lengths[1]} tokens, "
                f"{self.output_lengths[0]}-{self.output_lengths[1]} new), batch {self.max_batch_size}")


def default_workload(device: torch.device) -> Workload:
    if device.type == "cuda":
        return Workload(1024, 2816, 16, 16, 2, 32000, 512, 64, (16, 128), (16, 128))
    return Workload(256, 704, 4, 8, 2, 2048, 32, 8, (4, 24), (4, 24))


def make_models(workload: Workload, device: torch.device, dtype: torch.dtype, train_steps: int = 0):
    """The recursive model (cycle sharing, per-depth LoRA), the untied model of the same depth and the
    Mixture-of-Recursions model of the recursive one's shape; with ``train_steps``, the recursive model
    trained that long on the synthetic corpus, for early exit too."""
    common = dict(vocab_size=workload.vocab_size, hidden_size=workload.hidden_size,
                  intermediate_size=workload.intermediate_size, num_attention_heads=workload.num_heads,
                  num_layers=workload.num_layers)
    torch.manual_seed(0)
    shared = dict(num_blocks=workload.num_blocks, relaxation="depth_lora", lora_rank=8, **common)
    recursive = RecursiveForCausalLM(RecursiveConfig(**shared))
    mor = RecursiveForCausalLM(RecursiveConfig(mor_routing="token_choice", **shared))
    with torch.no_grad():  # fresh LoRA B is zero: give the adapters something to do
        for name, parameter in [*recursive.named_parameters(), *mor.named_parameters()]:
            if name.endswith("lora_b"):
                parameter.normal_(0.0, 0.02)
    untied = RecursiveForCausalLM(RecursiveConfig(num_blocks=workload.num_layers, **common))
    if train_steps:
        train(recursive.to(device),
              TrainingArguments(steps=train_steps, exit_loss_weight=1.0, bf16=device.type == "cuda"), progress=False)
    return tuple(model.to(device, dtype).eval() for model in (recursive, untied, mor))


def make_requests(workload: Workload, seed: int = 0, from_corpus: bool = False):
    """Prompts (token lists) and output lengths: random token ids, or windows of held-out corpus text (a
    corpus seed the training never sees)."""
    rng = random.Random(seed)
    lengths = [rng.randint(*workload.prompt_lengths) for _ in range(workload.num_requests)]
    if from_corpus:
        text = encode(synthetic_corpus(1 << 16, seed=seed + 1)).tolist()
        starts = [rng.randrange(len(text) - length) for length in lengths]
        prompts = [text[start:start + length] for start, length in zip(starts, lengths)]
    else:
        prompts = [[rng.randrange(workload.vocab_size) for _ in range(length)] for length in lengths]
    return prompts, [rng.randint(*workload.output_lengths) for _ in prompts]


@torch.no_grad()
def transformers_in_batches(model, prompts: List[List[int]], lengths: List[int], batch_size: int) -> List[List[int]]:
    """Greedy ``generate`` of a transformers model over left-padded batches of ``batch_size`` prompts in order,
    each batch running until its longest request is done; per prompt, the prompt and its own new tokens."""
    device = model.device
    outputs = []
    for start in range(0, len(prompts), batch_size):
        batch, counts = prompts[start:start + batch_size], lengths[start:start + batch_size]
        width = max(map(len, batch))
        ids = torch.tensor([[0] * (width - len(p)) + p for p in batch], device=device)
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], device=device)
        out = model.generate(ids, attention_mask=mask, max_new_tokens=max(counts), do_sample=False, pad_token_id=0)
        outputs += [prompt + row[width:width + count] for prompt, count, row in zip(batch, counts, out.tolist())]
    return outputs


def _runner(method: str, models, prompts, lengths, workload: Workload,
            threshold: float) -> Callable[[], List[List[int]]]:
    recursive, untied, mor = models
    exit_threshold = threshold if method.endswith("+exit") else None
    if method == PEER:
        peer = export_hf(untied)
        peer.generation_config.eos_token_id = None  # every request runs to its length, as with the other methods
        return lambda: transformers_in_batches(peer, prompts, lengths, workload.max_batch_size)
    if "engine" in method:
        engine = DepthBatchingEngine(mor if method == "mor engine" else recursive, workload.max_batch_size,
                                     exit_threshold)
        runner = lambda: engine.generate(prompts, lengths)  # noqa: E731
        runner.engine = engine
        return runner
    model = {"untied": untied, "mor": mor}.get(method, recursive)
    return lambda: generate_in_batches(model, prompts, lengths, workload.max_batch_size, exit_threshold=exit_threshold)


@torch.no_grad()
def _mean_recursions(model, prompts: List[List[int]], outputs: List[List[int]]) -> float:
    """The recursions ``model`` ran, on average, for the decoded tokens of ``outputs`` (every new token
    but the last), read off one forward of each output."""
    device = next(model.parameters()).device
    depths = [model(torch.tensor([output], device=device)).recursion_depths[0, len(prompt):-1]
              for prompt, output in zip(prompts, outputs)]
    return float(torch.cat(depths).double().mean())


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_runners(runners: Dict[str, Callable[[], List[List[int]]]], repeats: int, device: torch.device,
                 progress: Steps, label: str = "") -> Tuple[Dict[str, List[List[int]]], Dict[str, float]]:
    """Each runner's outputs (from a warm-up run) and its median wall time over ``repeats`` timed runs, the runners
    taking turns so that a slow spell of the machine hits them all."""
    outputs = {}
    for method, runner in runners.items():
        progress.step(f"{label}{method} warm-up")
        outputs[method] = runner()
    seconds = {method: [] for method in runners}
    for _ in range(repeats):
        for method, runner in runners.items():
            progress.step(f"{label}{method}")
            _synchronize(device)
            start = time.perf_counter()
            runner()
            _synchronize(device)
            seconds[method].append(time.perf_counter() - start)
    return outputs, {method: statistics.median(times) for method, times in seconds.items()}


def agreement(outputs: List[List[int]], reference: List[List[int]], prompts: List[List[int]]) -> float:
    """The fraction of ``outputs``' new tokens equal to ``reference``'s at the same position."""
    new_tokens = sum(len(r) - len(p) for r, p in zip(reference, prompts))
    same = sum(a == b for o, r, p in zip(outputs, reference, prompts) for a, b in zip(o[len(p):], r[len(p):]))
    return same / new_tokens


def steps(methods=DEFAULT_METHODS, repeats: int = 3) -> int:
    """Progress steps of ``run``: a warm-up and ``repeats`` timed runs per method."""
    return len(available_methods(methods)) * (repeats + 1)


STEP_SECONDS = 0.75  # a step's rough time on a 2-core CPU, for the run's time left


def run(device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, workload: Optional[Workload] = None,
        exit_fraction: float = 0.5, repeats: int = 3, progress: Optional[Steps] = None, train_steps: int = 0,
        exit_threshold: Optional[float] = None, methods=DEFAULT_METHODS) -> Dict[str, object]:
    device, dtype = resolve(device, dtype)
    workload = workload or default_workload(device)
    progress = progress or Steps(None)
    if "plain" not in methods:
        raise ValueError(f"methods: {methods} lacks plain, the baseline")
    notes = [f"no {PEER} row: transformers is not installed (pip install 'recursive-kernels[bench]')"] \
        if PEER in methods and PEER not in available_methods() else []
    methods = available_methods(methods)
    models = make_models(workload, device, dtype, train_steps)
    prompts, lengths = make_requests(workload, from_corpus=train_steps > 0)
    threshold = exit_threshold
    if threshold is None and train_steps:
        threshold = 0.9
    if threshold is None:
        calibration = torch.tensor([p[: workload.prompt_lengths[0]] for p in prompts], device=device)
        threshold = calibrate_exit_threshold(models[0], calibration, exit_fraction)
    new_tokens = sum(lengths)
    runners = {method: _runner(method, models, prompts, lengths, workload, threshold) for method in methods}
    outputs, medians = time_runners(runners, repeats, device, progress)
    rows = []
    for method in methods:
        engine = getattr(runners[method], "engine", None)
        loops_run = engine.stats.mean_exit_loops if engine else None
        if method == "mor":
            loops_run = _mean_recursions(models[2], prompts, outputs[method])
        rows.append({
            "method": method,
            "s": medians[method],
            "tokens/s": new_tokens / medians[method],
            "exit loops": loops_run,
            "agree": (agreement(outputs[method], outputs["plain"], prompts)
                      if method in ("plain", "plain+exit", "engine", "engine+exit") else None),
        })
    peer = next((row for row in rows if row["method"] == PEER), None)
    for row in rows:
        row["vs plain"] = row["tokens/s"] / rows[0]["tokens/s"]
        row["vs transformers"] = row["tokens/s"] / peer["tokens/s"] if peer else None
    loops = workload.num_layers // workload.num_blocks
    return {"machine": machine_description(device), "dtype": str(dtype).replace("torch.", ""),
            "workload": workload.label, "loops": loops, "train_steps": train_steps, "exit_threshold": threshold,
            "new_tokens": new_tokens, "rows": rows, "notes": notes}


COLUMNS = [
    Column("method", "", "plain: RecursiveForCausalLM.generate on batches in arrival order, each until its longest "
                         "request is done; untied: the same on an untied model of the same depth; engine: "
                         "DepthBatchingEngine; +exit: with early exit; mor: a Mixture-of-Recursions model; "
                         "transformers: the untied model exported to a Hugging Face LlamaForCausalLM, its generate "
                         "on the same batches (the peer)"),
    Column("s", ".2f", "median wall time of the whole run (prefill included)"),
    Column("tokens/s", ".0f", "requested new tokens / time"),
    Column("vs plain", ".2f", speedup("plain")),
    Column("vs transformers", ".2f", speedup("transformers (the untied model's generate in transformers)")),
    Column("exit loops", ".2f", "loops a decoded token ran on average (of the model's loops)"),
    Column("agree", ".3f", "fraction of new tokens equal to full-depth plain decoding's at the same position"),
]


def render_result(result: Dict[str, object]) -> str:
    trained = f"trained {result['train_steps']} steps" if result["train_steps"] else "random weights"
    return render(f"generation on {result['machine']}, {result['dtype']}: {result['workload']}, {result['loops']} "
                  f"loops, {trained}, {result['new_tokens']} new tokens, exit threshold {result['exit_threshold']:.4g}",
                  result, COLUMNS, *result["notes"])
