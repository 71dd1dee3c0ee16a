"""The benchmarks' harness: the correctness column (every timed implementation against eager in float64) and the
compile pass."""

from __future__ import annotations

import pytest
import torch

from recursive import RecursiveConfig
from recursive_benchmarks import bench_circuit_attention, bench_lowrank_linear, bench_model, common


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


def test_compile_pass_runs_its_shard_once_and_times_nothing(monkeypatch, one_thread):
    cases = [bench_lowrank_linear.Case("top-2", 17, 64, 48), bench_lowrank_linear.Case("one-adapter", 5, 64, 48)]
    calls = []

    def counting_prepare(case, backward, inputs_dtype=None):
        assert inputs_dtype is None, "a compile pass checks nothing"
        return lambda impl: lambda: calls.append((case.label, backward, impl))

    monkeypatch.setenv(common.WARM_ENV, "1/3")
    yielded = list(common.time_cases(cases, ["fwd", "fwd+bwd"], ["base", "cpp"], counting_prepare,
                                     torch.device("cpu"), checked=["cpp"]))
    # of the (case, mode) pairs 0..3, shard 1/3 takes pair 1: the first case's fwd+bwd
    assert [(case.label, mode) for case, mode, _, _ in yielded] == [(cases[0].label, "fwd+bwd")]
    assert all(t != t for _, _, times, _ in yielded for t in times.values())  # NaN: nothing timed
    assert calls == [(cases[0].label, True, "base"), (cases[0].label, True, "cpp")]


@pytest.mark.parametrize("value", ["3/3", "1", "a/b", "-1/2"])
def test_compile_pass_rejects_a_malformed_shard(monkeypatch, value):
    monkeypatch.setenv(common.WARM_ENV, value)
    with pytest.raises(ValueError, match=common.WARM_ENV):
        common.warm_shard()


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
