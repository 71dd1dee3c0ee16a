"""Benchmark whole recursive models: forward and training-step throughput, fused backends against the
torch reference, and recursive models (relaxed, Mixture-of-Recursions) against an untied one of the same depth.

Four models of the same sizes and effective depth L:

- relaxed: L layers over L / 4 shared blocks (cycle) with a depth-wise LoRA of rank 16 on every
  projection (Relaxed Recursive Transformer);
- untied: L blocks of its own per layer, no relaxation (the ordinary transformer it compresses);
- mor: the relaxed model's L / 4 shared blocks without LoRA as a Mixture-of-Recursions (expert choice
  keeps all, 3/4, 1/2 and 1/4 of the tokens in its four loops: 5/8 of the layers' token work);
- relaxed ckpt: the relaxed model with activation checkpointing (``gradient_checkpointing_enable``),
  training step only; its GFLOP/s count the model's FLOPs, not the recomputed ones, so that they
  compare as useful throughput.

Each is timed with the automatically selected (fused) backends and with the torch reference, forward
(inference, no autograd) and forward+backward of the loss (a training step without the optimizer).
Printed per row: time, tokens/s, GFLOP/s (from ``recursive.flops``: the model's FLOPs in
FlopCounterMode's convention, the same count for every backend), ``vs torch`` (torch reference time
over this time: above 1 is faster) and ``vs untied`` (the untied model's time with the same backends
over this time). CPU: float32, a small model; GPU: bfloat16 parameters, a 12-layer model.

By default the relaxed and untied models; ``--full`` adds mor and relaxed ckpt.

    python -m recursive bench --only model [--full] [--device cuda] [--json out.json]
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass, replace
from typing import Callable, Dict, List, Optional, Tuple

import torch

from recursive import RecursiveConfig, RecursiveForCausalLM, export_hf
from recursive.flops import forward_flops, training_step_flops

from .common import Column, Steps, machine_description, median_seconds, render, resolve, speedup

MODES = ("fwd", "fwd+bwd")
IMPLS = ("auto", "torch")  # auto: the fused backend each op selects on this device
PEER = "transformers"  # the untied model exported to Hugging Face transformers (when it is installed)
VARIANTS = ("relaxed", "untied", "mor", "relaxed ckpt")
LORA_RANK = 16


@dataclass(frozen=True)
class Case:
    """One model (``variant`` of ``base``) on inputs of ``batch_size`` x ``seq_len`` tokens."""

    variant: str
    base: RecursiveConfig
    batch_size: int
    seq_len: int

    @property
    def checkpointing(self) -> bool:
        return self.variant.endswith(" ckpt")

    def runs(self, mode: str) -> bool:
        """Checkpointing changes only the training step."""
        return mode == "fwd+bwd" or not self.checkpointing

    @property
    def config(self) -> RecursiveConfig:
        if self.variant.split()[0] == "relaxed":
            return replace(self.base, num_blocks=self.base.num_layers // 4, relaxation="depth_lora",
                           lora_rank=LORA_RANK, lora_alpha=float(LORA_RANK), lora_targets=None)
        if self.variant == "mor":
            return replace(self.base, num_blocks=self.base.num_layers // 4, relaxation="none", lora_targets=None,
                           mor_routing="expert_choice")
        return replace(self.base, num_blocks=self.base.num_layers, relaxation="none", lora_targets=None)

    def flops(self, backward: bool) -> int:
        count = training_step_flops if backward else forward_flops
        return count(self.config, self.batch_size, self.seq_len)

    @property
    def label(self) -> str:
        c = self.config
        return f"{self.variant} L={c.num_layers} B={c.num_blocks} h={c.hidden_size} {self.batch_size}x{self.seq_len}"


def default_cases(device: torch.device, full: bool = False) -> List[Case]:
    """The relaxed and untied models; ``full`` adds the Mixture-of-Recursions and checkpointed ones."""
    if device.type == "cuda":
        base = RecursiveConfig(vocab_size=32000, hidden_size=1024, intermediate_size=2816, num_attention_heads=16,
                               num_key_value_heads=4, num_layers=12)
        batch_size, seq_len = 8, 1024
    else:
        base = RecursiveConfig(vocab_size=2048, hidden_size=256, intermediate_size=704, num_attention_heads=4,
                               num_key_value_heads=2, num_layers=8)
        batch_size, seq_len = 2, 128
    return [Case(variant, base, batch_size, seq_len) for variant in (VARIANTS if full else VARIANTS[:2])]


def build_model(case: Case, impl: str, device: torch.device, dtype: torch.dtype):
    """The case's model with the given backends (``PEER``: the untied model as a transformers model), seeded, so
    that every impl runs the same weights."""
    if impl == PEER:
        return export_hf(build_model(case, "auto", device, dtype))
    torch.manual_seed(0)
    config = replace(case.config, backend=None if impl == "auto" else impl)
    model = RecursiveForCausalLM(config).to(device=device, dtype=dtype)
    if case.checkpointing:
        model.gradient_checkpointing_enable()
    return model


def peer_available() -> bool:
    return importlib.util.find_spec("transformers") is not None


def _callable(model, case: Case, backward: bool, device: torch.device) -> Callable[[], object]:
    input_ids = torch.randint(0, case.config.vocab_size, (case.batch_size, case.seq_len),
                              generator=torch.Generator().manual_seed(0)).to(device)
    return forward_or_step(model, input_ids, backward)


def forward_or_step(model, input_ids: torch.Tensor, backward: bool) -> Callable[[], object]:
    """A forward of ``input_ids`` without autograd (eval mode), or a training step's forward and backward of the
    loss (train mode; the optimizer aside), of ``model`` (ours or transformers': both take ``labels`` and shift
    them inside)."""
    if not backward:
        model.eval()

        def forward():
            with torch.no_grad():
                return model(input_ids).logits

        return forward
    model.train()

    def step():
        model.zero_grad(set_to_none=True)
        model(input_ids, labels=input_ids).loss.backward()

    return step


def _timed_models(cases: List[Case], impls) -> List[Tuple[Case, str]]:
    """(case, impl) of every model to time: each case with each impl, and the untied case in transformers."""
    peer = [(case, PEER) for case in cases if case.variant == "untied" and peer_available()]
    return [(case, impl) for case in cases for impl in impls] + peer


def steps(cases: List[Case], modes=MODES, impls=IMPLS) -> int:
    """Progress units of ``run``: one per timed model and mode (a step per mode times every model of that mode)."""
    return sum(case.runs(mode) for case, _ in _timed_models(cases, impls) for mode in modes)


STEP_SECONDS = 1.0  # a unit's rough time on a 2-core CPU, for the run's time left


def run(
    device: Optional[torch.device] = None,
    dtype: Optional[torch.dtype] = None,
    modes=MODES,
    impls=IMPLS,
    cases: Optional[List[Case]] = None,
    progress: Optional[Steps] = None,
) -> Dict[str, object]:
    device, dtype = resolve(device, dtype)
    cases = cases or default_cases(device)
    progress = progress or Steps(None)
    pairs = _timed_models(cases, impls)
    peer = any(impl == PEER for _, impl in pairs)
    models = {(case.variant, impl): build_model(case, impl, device, dtype) for case, impl in pairs}
    timed = {}  # mode -> {(variant, impl): seconds}; every model of a mode timed in the same rounds
    for mode in modes:
        progress.step(mode, count=sum(case.runs(mode) for case, _ in pairs))
        timed[mode] = median_seconds(
            {(case.variant, impl): _callable(models[case.variant, impl], case, mode == "fwd+bwd", device)
             for case, impl in pairs if case.runs(mode)},
            device,
        )
    rows = []
    for case, impl in pairs:
        for mode in filter(case.runs, modes):
            times = timed[mode]
            seconds = times[case.variant, impl]
            config = case.config
            rows.append(
                {
                    "model": case.variant,
                    "L": config.num_layers,
                    "B": config.num_blocks,
                    "h": config.hidden_size,
                    "tokens": f"{case.batch_size}x{case.seq_len}",
                    "mode": mode,
                    "impl": impl,
                    "ms": seconds * 1e3,
                    "tokens/s": case.batch_size * case.seq_len / seconds,
                    "GFLOP/s": case.flops(mode == "fwd+bwd") / seconds / 1e9,
                    "vs torch": times[case.variant, "torch"] / seconds if "torch" in impls else None,
                    "vs untied": (times["untied", impl] / seconds
                                  if impl != PEER and ("untied", impl) in times else None),
                    "vs transformers": times["untied", PEER] / seconds if peer else None,
                }
            )
    notes = [] if peer_available() else [f"no {PEER} rows: transformers is not installed "
                                         "(pip install 'recursive-kernels[bench]')"]
    return {
        "machine": machine_description(device),
        "dtype": str(dtype).replace("torch.", ""),
        "cases": [case.label for case in cases],
        "rows": rows,
        "notes": notes,
    }


COLUMNS = [
    Column("model", "", "relaxed: L layers over B shared blocks with a rank-16 LoRA per depth; untied: L blocks of "
                        "its own; mor: B blocks as a Mixture-of-Recursions; relaxed ckpt: relaxed with activation "
                        "checkpointing"),
    Column("L", "d", "effective layers"),
    Column("B", "d", "unique blocks"),
    Column("h", "d", "hidden size"),
    Column("tokens", "", "batch x sequence length"),
    Column("mode", "", "fwd: inference forward; fwd+bwd: forward and backward of the loss (a training step without "
                       "the optimizer)"),
    Column("impl", "", "auto: the fused backends each op selects here; torch: the pure-PyTorch reference; "
                       "transformers: the untied model exported to a Hugging Face LlamaForCausalLM (the peer)"),
    Column("ms", ".1f", "median time of one call"),
    Column("tokens/s", ".0f", "tokens / time"),
    Column("GFLOP/s", ".1f", "the model's FLOPs (recursive.flops, the same for every impl) / time"),
    Column("vs torch", ".2f", speedup("the torch reference (same model)")),
    Column("vs untied", ".2f", speedup("the untied model (same impl)")),
    Column("vs transformers", ".2f", speedup("the untied model in transformers (same mode)")),
]


def render_result(result: Dict[str, object]) -> str:
    return render(f"recursive models on {result['machine']}, {result['dtype']}", result, COLUMNS, *result["notes"])
