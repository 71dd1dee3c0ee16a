"""The benchmarks' harness: the correctness column (every timed implementation against eager in float64), the GPU
run's plan and its configuration sweep."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
import triton

from recursive import RecursiveConfig
from recursive_benchmarks import bench_circuit_attention, bench_lowrank_linear, bench_model, common, gpu_sweep


def test_relative_error_over_tensor_sequences():
    ref = (torch.tensor([3.0, 0.0]), torch.tensor([4.0]))
    assert common.relative_error(ref, ref) == 0.0
    assert common.relative_error((torch.tensor([3.0, 0.0]), torch.tensor([4.0 + 5.0])), ref) == pytest.approx(1.0)
    assert common.relative_error(torch.zeros(2), torch.zeros(2)) == 0.0
    with pytest.raises(ValueError, match="out"):
        common.relative_error(ref[:1], ref)


def test_seeded_like_draws_the_same_numbers_in_every_dtype():
    low = common.seeded_like(torch.empty(5, 3, dtype=torch.bfloat16))
    high = common.seeded_like(torch.empty(5, 3, dtype=torch.float64))
    assert low.dtype == torch.bfloat16 and high.dtype == torch.float64
    torch.testing.assert_close(low, high.to(torch.bfloat16), rtol=0, atol=0)


@pytest.fixture
def quick_timing(monkeypatch, one_thread):
    monkeypatch.setattr(common, "CPU_ROUNDS", 1)


def _errors(result, baseline):
    rows = result["rows"]
    assert all(row["rel err"] is None for row in rows if row["impl"] == baseline)
    return {(row["impl"], row["mode"]): row["rel err"] for row in rows if row["impl"] != baseline}


def test_lowrank_linear_benchmark_checks_every_implementation(quick_timing):
    cases = [bench_lowrank_linear.Case("top-2", 17, 64, 48), bench_lowrank_linear.Case("one-adapter", 5, 64, 48)]
    result = bench_lowrank_linear.run(device=torch.device("cpu"), cases=cases)
    errors = _errors(result, "base")
    assert {impl for impl, _ in errors} >= {"eager", "torch"}
    assert all(0 < err < 1e-5 for err in errors.values()), errors


def test_circuit_attention_benchmark_checks_every_implementation(quick_timing):
    cases = [bench_circuit_attention.Case(33, 16, True, 1, 2)]
    result = bench_circuit_attention.run(device=torch.device("cpu"), cases=cases, compiled_cases=0)
    errors = _errors(result, "sdpa")
    assert {impl for impl, _ in errors} >= {"eager", "torch"}
    assert all(0 < err < 1e-5 for err in errors.values()), errors


@pytest.mark.slow
def test_circuit_attention_benchmark_times_the_compiled_peer(quick_timing):
    """torch.compile of the eager way is timed and checked like the backends on the first case only; each row
    names the faster peer."""
    cases = [bench_circuit_attention.Case(17, 8, False, 1, 2), bench_circuit_attention.Case(9, 8, True, 1, 2)]
    result = bench_circuit_attention.run(device=torch.device("cpu"), cases=cases, impls=["cpp"])
    errors = _errors(result, "sdpa")
    first = {impl for (impl, mode) in errors if mode == "fwd"}
    assert "compiled" in first and all(err < 1e-5 for err in errors.values()), errors
    later = {row["impl"] for row in result["rows"] if row["S"] == 9}
    assert later == {"sdpa", "eager", "cpp"}
    assert all(row["peer"] in bench_circuit_attention.PEERS and row["vs peer"] > 0 for row in result["rows"])


def test_model_benchmark_times_every_variant_against_the_untied_model(quick_timing):
    base = RecursiveConfig(vocab_size=64, hidden_size=32, intermediate_size=48, num_attention_heads=2, num_layers=8)
    cases = [bench_model.Case(variant, base, 1, 9) for variant in bench_model.VARIANTS]
    result = bench_model.run(device=torch.device("cpu"), dtype=torch.float32, cases=cases)
    rows = {(row["model"], row["mode"], row["impl"]): row for row in result["rows"]}
    peer = {("untied", mode, bench_model.PEER) for mode in bench_model.MODES} if bench_model.peer_available() else set()
    assert set(rows) == {(case.variant, mode, impl) for case in cases for mode in bench_model.MODES
                         for impl in bench_model.IMPLS if mode == "fwd+bwd" or case.variant != "relaxed ckpt"} | peer
    assert all(rows[key]["vs transformers"] == 1.0 for key in peer)
    assert all(row["vs untied"] > 0 and row["GFLOP/s"] > 0 for key, row in rows.items() if key not in peer)
    assert all(rows["untied", mode, impl]["vs untied"] == 1.0
               for mode in bench_model.MODES for impl in bench_model.IMPLS)
    mor, relaxed = (cases[bench_model.VARIANTS.index(v)] for v in ("mor", "relaxed"))
    assert mor.flops(backward=False) < relaxed.flops(backward=False)  # the later loops run on fewer tokens
    assert bench_model.build_model(cases[bench_model.VARIANTS.index("relaxed ckpt")], "auto", torch.device("cpu"),
                                   torch.float32).is_gradient_checkpointing
    if peer:  # the peer runs the same weights: the same logits (to float32: transformers' norms run in float32)
        untied = cases[bench_model.VARIANTS.index("untied")]
        ids = torch.randint(0, 64, (2, 9))
        ours, theirs = (bench_model.build_model(untied, impl, torch.device("cpu"), torch.float64)(ids).logits
                        for impl in ("auto", bench_model.PEER))
        torch.testing.assert_close(theirs, ours, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_lowrank_linear_benchmark_times_the_peers(quick_timing):
    """Per-row adapters: torch.compile of the masked way and (when installed) PEFT's mixed batch are timed and
    checked like the backends; each row names the fastest peer."""
    cases = [bench_lowrank_linear.Case("per-row", 9, 32, 24)]
    result = bench_lowrank_linear.run(device=torch.device("cpu"), cases=cases, impls=["cpp"])
    errors = _errors(result, "base")
    peers = {"eager", "compiled"} | ({"peft"} if bench_lowrank_linear.peft_available() else set())
    assert {impl for impl, mode in errors if mode == "fwd"} == peers | {"cpp"}
    assert "peft" not in {impl for impl, mode in errors if mode == "fwd+bwd"}  # inference only
    assert all(0 < err < 1e-5 for err in errors.values()), errors
    for row in result["rows"]:
        assert row["peer"] in peers and row["vs peer"] > 0


def test_a_benchmarks_share_of_the_bar_ends_complete():
    """Planned units that no step took (a compile counted apart) are completed at close: the bar ends at 100%."""
    from recursive.progress import Progress

    bar = Progress(2 * 5.0 + 3.0, enabled=False)
    first, second = common.Steps(bar, "a", 2.0, units=5), common.Steps(bar, "b", 1.0, units=3)
    first.step("case", count=2)
    first.step("case")
    first.close()
    assert bar.done == 10.0
    for _ in range(3):
        second.step("case")
    second.close()
    assert bar.done == bar.total


def test_the_real_model_benchmark_runs_on_request():
    from recursive_benchmarks import bench_pretrained, runner

    assert "pretrained" not in runner.selected(None, full=False)
    assert runner.selected(None, full=True)[-1] == "pretrained"
    asked = runner.selected(["model"], full=False)
    assert asked == (["model", "pretrained"] if bench_pretrained.available() else ["model"])
    assert runner.selected(["generation", "generation"], full=False) == ["generation"]


def test_the_gpu_run_plan_fits_one_call_with_the_evidence_first():
    """One lent GPU call runs 10 minutes at most: the plan stays under 9, and the correctness results and the
    lowrank table come within its first 5 (a run cut short keeps them)."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_run.sh"
    plan = subprocess.run(["bash", str(script), "--plan"], capture_output=True, text=True, check=True)
    lines = plan.stdout.splitlines()
    steps = [line.split() for line in lines[:-1]]
    names = [step[0] for step in steps]
    assert names == ["env", "correctness", "sweep", "lowrank", "attention", "model", "engine", "cuda"]
    caps = [int(step[1]) for step in steps]
    assert lines[-1] == f"total: {sum(caps)} s" and sum(caps) < 9 * 60
    assert sum(caps[:names.index("lowrank") + 1]) <= 5 * 60


@pytest.fixture
def autotuner_restored(monkeypatch):
    """The sweep's forcer replaces Triton's Autotuner.run (in its own worker processes): put it back after."""
    from triton.runtime.autotuner import Autotuner

    monkeypatch.setattr(Autotuner, "run", Autotuner.run)


@pytest.fixture
def sweep_cases():
    return [gpu_sweep.LowrankCase("gathered", 9, 64, 48, 8, E=3, strided=True),
            gpu_sweep.AttentionCase(1, 2, 1, 20, 24, 16, True, token_major=True)]


def test_the_configuration_sweep_checks_every_kernel_it_launches(tmp_path, sweep_cases, autotuner_restored):
    """Every autotuned kernel of both ops runs (under the interpreter: its one configuration) and meets the error
    rule on strided, token-major and grouped-query inputs; records carry the kernel and the configuration."""
    folder, out = str(tmp_path), str(tmp_path / "sweep.jsonl")
    gpu_sweep.prepare_references(sweep_cases, torch.device("cpu"), folder)
    saved = torch.load(tmp_path / "0-0.pt")
    assert len(saved["reference"]) == 5 and all(e > 0 for e in saved["torch_errors"])  # y, dx, dA, dB, dgates
    gpu_sweep.worker(1, 0, sweep_cases, folder, out, deadline=float("inf"))
    records = [json.loads(line) for line in open(out)]
    kernels = {name for _, name, _ in gpu_sweep.items()}
    assert {r["kernel"] for r in records} == kernels
    assert {r["dtype"] for r in records} == {"bfloat16", "float16", "float32"}
    assert all(r["status"] == "ok" for r in records), [r for r in records if r["status"] != "ok"]
    assert "sweep: " in gpu_sweep.summarise(out) and "ok" in gpu_sweep.summarise(out)


def test_the_sweep_fails_an_unwritten_or_inaccurate_result(tmp_path, sweep_cases):
    device = torch.device("cpu")
    gpu_sweep.prepare_references(sweep_cases[:1], device, str(tmp_path))
    saved = torch.load(tmp_path / "0-0.pt")
    results = gpu_sweep.run_op(sweep_cases[0], gpu_sweep.draw(sweep_cases[0], seed=0), torch.bfloat16, device, "torch")
    assert gpu_sweep.check(results, saved, device)["status"] == "ok"
    results[1][3, 5] = float("nan")  # an element of dx nothing wrote
    assert gpu_sweep.check(results, saved, device)["status"] == "fail"
    results[1][3, 5] = 0.0
    results[0] = results[0] * (1 + 1e-2)  # an error five times bfloat16's rounding
    verdict = gpu_sweep.check(results, saved, device)
    assert verdict["status"] == "fail" and verdict["worst_ratio"] > 2


def test_the_sweep_forces_each_configuration_and_skips_pruned_ones(autotuner_restored):
    """The forced kernel runs the configuration asked for, or none when its pruning drops it for the shape."""
    from recursive_kernels import triton_lowrank_linear as tl_lowrank

    forcer = gpu_sweep.ConfigForcer()
    tuner = tl_lowrank._linear_kernel
    forcer.target, forcer.launched = tuner, []
    forcer.config = tuner.configs[0]
    case = gpu_sweep.LowrankCase("single", 5, 64, 48, 8, E=2)
    gpu_sweep.run_op(case, gpu_sweep.draw(case, seed=1), torch.float32, torch.device("cpu"), "triton")
    assert forcer.launched  # forward and dx: the forced kernel ran
    forcer.config = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 2}, num_warps=1,
                                  num_stages=1)  # not in the space: never among the pruned configurations
    with pytest.raises(gpu_sweep.Pruned):
        gpu_sweep.run_op(case, gpu_sweep.draw(case, seed=1), torch.float32, torch.device("cpu"), "triton")


def test_a_failing_peer_is_left_out_of_its_case_not_the_benchmark(capsys, one_thread):
    """A peer from another package (PEFT) or torch.compile that fails on a machine leaves its rows out, with the
    reason on stderr; the package's own implementations are not optional."""
    case = bench_lowrank_linear.Case("top-2", 5, 16, 8)

    def prepare(case, backward, inputs_dtype=None):
        def make(impl):
            if impl == "peft":
                raise ImportError("peft needs another transformers")
            return lambda: torch.ones(2)
        return make

    (_, _, times, errors), = common.time_cases([case], ["fwd"], ["eager", "peft", "cpp"], prepare,
                                               torch.device("cpu"), checked=["peft", "cpp"], optional=("peft",))
    assert set(times) == {"eager", "cpp"} and set(errors) == {"cpp"}
    assert "peft left out of top-2" in capsys.readouterr().err
    with pytest.raises(ImportError):
        next(common.time_cases([case], ["fwd"], ["eager", "peft"], prepare, torch.device("cpu")))
