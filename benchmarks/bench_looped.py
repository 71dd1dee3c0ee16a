"""Benchmark serving the published looped models: HRM-Text against transformers' own ``HrmTextForCausalLM.generate``,
Ouro and Huginn through ``DepthBatchingEngine`` against plain batching, at full depth and with Ouro's own exit gate.

Each model has random weights in its own architecture at a tiny or a mid size (the cases), all requests greedy:

- plain: ``RecursiveForCausalLM.generate`` on left-padded batches of ``max_batch_size`` requests in arrival order,
  each batch running until its longest request is done; +exit q: with the model's own exit rule at threshold q
  (Ouro: its gate, ``GateExit(q)``, after at least two loops; Huginn: ``KLExit`` at the q-quantile of the divergences
  between its passes in full-depth decoding of the same requests, as random weights have no fixed scale);
- engine: ``DepthBatchingEngine`` with as many slots (+exit q likewise);
- transformers (HRM-Text): the same model in transformers (``HrmTextForCausalLM``, the weights ours were converted
  from), its own batched ``generate`` on the same batches.

``vs plain`` and ``vs transformers``: ratios of times taken in the same interleaved rounds (medians). ``exit loops``:
the loops an engine-decoded token ran on average, of the model's loops. ``agree``: the fraction of new tokens equal
to full-depth plain decoding's at the same position. Ouro's random gate gives each loop's exit probability about
one half, so the thresholds pick how many loops tokens run; what exit costs in quality shows only on trained weights.

    python -m recursive bench --only looped [--full]
"""

from __future__ import annotations

import importlib.util
import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional

import torch

from recursive import DepthBatchingEngine, RecursiveConfig, RecursiveForCausalLM
from recursive.generation import GateExit, KLExit, generate_in_batches
from recursive.looped import convert_looped

from .bench_generation import agreement, time_runners, transformers_in_batches
from .common import Column, Steps, machine_description, render, resolve, speedup

MODELS = ("hrm_text", "ouro", "huginn")
EXIT_THRESHOLDS = (0.6, 0.85)  # Ouro's gate (cumulative exit probability); Huginn: quantiles of its divergences


@dataclass(frozen=True)
class Case:
    """A model size and its requests."""

    model: str
    hidden_size: int
    num_heads: int
    vocab_size: int
    num_requests: int
    max_batch_size: int
    lengths: tuple  # prompt and output lengths, each drawn in [low, high]

    @property
    def label(self) -> str:
        return (f"{self.model} h={self.hidden_size}, {self.num_requests} requests ({self.lengths[0]}-{self.lengths[1]} "
                f"tokens in and out), batch {self.max_batch_size}")


def default_cases(device: torch.device, full: bool = False) -> List[Case]:
    sizes = [(128, 2)] + ([(384, 6)] if full else [])
    return [Case(model, hidden, heads, 2048, 16, 8, (4, 20)) for hidden, heads in sizes for model in MODELS
            if model != "hrm_text" or importlib.util.find_spec("transformers") is not None]


def make_model(case: Case, device: torch.device, dtype: torch.dtype):
    """The model (and for HRM-Text transformers' own, which it was converted from)."""
    torch.manual_seed(0)
    hidden, heads, vocab = case.hidden_size, case.num_heads, case.vocab_size
    if case.model == "hrm_text":
        import transformers

        peer = transformers.HrmTextForCausalLM(transformers.HrmTextConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_hidden_layers=2,
            num_attention_heads=heads, head_dim=hidden // heads, H_cycles=2, L_cycles=2, initializer_range=0.05))
        peer.generation_config.eos_token_id = None
        peer = peer.to(device, dtype).eval()
        return convert_looped(peer).eval(), peer
    common = dict(vocab_size=vocab, hidden_size=hidden, intermediate_size=3 * hidden, num_attention_heads=heads,
                  block_norms="pre_and_output" if case.model == "ouro" else "pre_and_residual")
    if case.model == "ouro":  # 4 layers looped 4 times
        config = RecursiveConfig(num_layers=16, num_blocks=4, loop_norm=True, exit_gate=True, **common)
    else:  # Huginn's shape: a prelude and a coda layer around 2 core layers run 4 times
        config = RecursiveConfig(num_layers=10, num_blocks=4, sharing="middle_cycle", injection="linear",
                                 qk_bias=True, embed_scale=hidden ** 0.5, **common)
    return RecursiveForCausalLM(config).to(device, dtype).eval(), None


def make_requests(case: Case, seed: int = 0):
    rng = random.Random(seed)
    prompts = [[rng.randrange(case.vocab_size) for _ in range(rng.randint(*case.lengths))]
               for _ in range(case.num_requests)]
    return prompts, [rng.randint(*case.lengths) for _ in prompts]


def methods_of(case: Case) -> List[str]:
    methods = ["plain", "engine"]
    if case.model == "hrm_text":
        methods.append("transformers")
    if case.model != "hrm_text":
        methods += [f"{method}+exit {q}" for q in EXIT_THRESHOLDS for method in ("plain", "engine")]
    return methods


class _Divergences(KLExit):
    """Huginn's KL rule that never fires and records every divergence it sees."""

    def __init__(self) -> None:
        super().__init__(1.0)
        self.seen: List[float] = []

    def decide(self, model, loops, hidden, logits, state):
        log_p = torch.log_softmax(logits.double(), -1)
        self.seen += (state.exp() * (state - log_p)).sum(-1).tolist()
        return torch.zeros_like(loops, dtype=torch.bool), log_p.to(state.dtype)


def exit_rules(case: Case, model, prompts, lengths) -> Dict[float, object]:
    """Each threshold's rule: Ouro's gate at it; for Huginn the KL rule at that quantile of the divergences between
    passes in full-depth decoding of the requests."""
    if case.model == "ouro":
        return {q: GateExit(q) for q in EXIT_THRESHOLDS}
    recorder = _Divergences()
    generate_in_batches(model, prompts, lengths, case.max_batch_size, exit_threshold=recorder)
    seen = torch.tensor(recorder.seen)
    return {q: KLExit(float(seen.quantile(q))) for q in EXIT_THRESHOLDS}


def _runner(method: str, model, peer, prompts, lengths, case: Case, rules) -> Callable[[], List[List[int]]]:
    threshold = rules[float(method.split()[-1])] if "+exit" in method else None
    if method == "transformers":
        return lambda: transformers_in_batches(peer, prompts, lengths, case.max_batch_size)
    if method.startswith("engine"):
        engine = DepthBatchingEngine(model, case.max_batch_size, threshold)
        runner = lambda: engine.generate(prompts, lengths)  # noqa: E731
        runner.engine = engine
        return runner
    return lambda: generate_in_batches(model, prompts, lengths, case.max_batch_size, exit_threshold=threshold)


def steps(cases: List[Case], repeats: int = 3) -> int:
    """Progress steps of ``run``: a warm-up and ``repeats`` timed runs per method and case."""
    return sum(len(methods_of(case)) for case in cases) * (repeats + 1)


STEP_SECONDS = 0.6


def run(device: Optional[torch.device] = None, dtype: Optional[torch.dtype] = None, cases: Optional[List[Case]] = None,
        repeats: int = 3, progress: Optional[Steps] = None) -> Dict[str, object]:
    device, dtype = resolve(device, dtype)
    cases = default_cases(device) if cases is None else cases
    progress = progress or Steps(None)
    rows = []
    with torch.no_grad():
        for case in cases:
            rows += _run_case(case, device, dtype, repeats, progress)
    return {"machine": machine_description(device), "dtype": str(dtype).replace("torch.", ""), "rows": rows,
            "notes": [] if any(c.model == "hrm_text" for c in cases) else
            ["no HRM-Text rows: its peer needs transformers 5.9 or later"]}


def _run_case(case: Case, device, dtype, repeats: int, progress: Steps) -> List[Dict[str, object]]:
    model, peer = make_model(case, device, dtype)
    prompts, lengths = make_requests(case)
    methods = methods_of(case)
    rules = exit_rules(case, model, prompts, lengths) if case.model != "hrm_text" else {}
    runners = {method: _runner(method, model, peer, prompts, lengths, case, rules) for method in methods}
    outputs, medians = time_runners(runners, repeats, device, progress, f"{case.model} ")
    new_tokens = sum(lengths)
    rows = []
    for method in methods:
        engine = getattr(runners[method], "engine", None)
        rows.append({"case": case.label, "method": method, "s": medians[method],
                     "tokens/s": new_tokens / medians[method],
                     "exit loops": engine.stats.mean_exit_loops if engine else None,
                     "of loops": engine.stats.num_loops if engine else None,
                     "agree": agreement(outputs[method], outputs["plain"], prompts)})
    peer_row = next((row for row in rows if row["method"] == "transformers"), None)
    for row in rows:
        row["vs plain"] = row["tokens/s"] / rows[0]["tokens/s"]
        row["vs transformers"] = row["tokens/s"] / peer_row["tokens/s"] if peer_row else None
    return rows


COLUMNS = [
    Column("case", "", "the model (random weights in its architecture), its width and the requests"),
    Column("method", "", "plain: generate on batches in arrival order; engine: DepthBatchingEngine; +exit q: with "
                         "Ouro's gate at threshold q (after at least two loops), Huginn's KL rule at the q-quantile of "
                         "its divergences; transformers: HRM-Text's own generate in transformers on the same batches"),
    Column("s", ".2f", "median wall time of the whole run (prefill included)"),
    Column("tokens/s", ".0f", "requested new tokens / time"),
    Column("vs plain", ".2f", speedup("plain")),
    Column("vs transformers", ".2f", speedup("transformers")),
    Column("exit loops", ".2f", "loops an engine-decoded token ran on average"),
    Column("of loops", "", "the model's loops (Huginn: its core passes; HRM-Text: its whole stack is one engine step)"),
    Column("agree", ".3f", "fraction of new tokens equal to full-depth plain decoding's at the same position"),
]


def render_result(result: Dict[str, object]) -> str:
    return render(f"looped models' serving on {result['machine']}, {result['dtype']}", result, COLUMNS,
                  *result["notes"])
