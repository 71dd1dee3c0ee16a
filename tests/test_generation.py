"""Generation: ``RecursiveForCausalLM.generate``, early exit and ``DepthBatchingEngine``.

References, all on tiny float64 models for several relaxations: greedy decoding by full recompute (the
argmax of a whole forward at every step), and a slow per-token early-exit reference that runs one
request's token through the layers one at a time, checks the LM head's top probability at every loop
boundary, and takes the deeper layers' keys and values from the exit hidden state by running those
blocks on it.
"""

from __future__ import annotations

import importlib.util
import random
from typing import List, Tuple

import pytest
import torch

from recursive import DepthBatchingEngine, RecursiveForCausalLM
from recursive.generation import calibrate_exit_threshold, generate_in_batches, next_tokens, top_k_filter, top_p_filter
from recursive.generation.engine_run import EngineRun
from recursive.losses import exit_loss
from recursive.nn import rotary_embedding
from tests.helpers import VOCAB, assert_every_request_completes, make_hf, make_model, synchronisations_per_step

# Cycle sharing (early exit needs loop boundaries), one configuration per relaxation.
CONFIGS = {
    "none": dict(relaxation="none", qkv_bias=True, tie_word_embeddings=True),  # 2 loops of 2 blocks
    "depth_lora": dict(relaxation="depth_lora", num_layers=6, start_index=1,
                       lora_rank={"q": 4, "k": 2, "v": 3, "o": 4, "gate": 2, "up": 4, "down": 3}),  # 3 loops
    "circuit": dict(relaxation="circuit", num_layers=6, start_index=3),  # layers 0-2 without circuit factors
    "mol": dict(relaxation="mol", num_blocks=1, hidden_act="gelu", lora_targets=("gate", "down")),  # 4 loops of 1
}
SEQUENCE = dict(relaxation="depth_lora", sharing="sequence")  # a single loop: no early exit


pytestmark = pytest.mark.usefixtures("one_thread")


def model_for(name: str) -> RecursiveForCausalLM:
    return make_model(**CONFIGS[name]).eval()


def random_prompts(count: int, low: int, high: int, seed: int = 0) -> List[List[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(VOCAB) for _ in range(rng.randint(low, high))] for _ in range(count)]


# References.


@torch.no_grad()
def greedy_by_recompute(model, prompt: List[int], max_new_tokens: int) -> List[int]:
    """The prompt and ``max_new_tokens`` greedy tokens, each the argmax of a full forward without cache."""
    tokens = list(prompt)
    for _ in range(max_new_tokens):
        tokens.append(int(model(torch.tensor([tokens])).logits[0, -1].argmax()))
    return tokens


@torch.no_grad()
def early_exit_reference(model, prompt: List[int], max_new_tokens: int,
                         threshold: float) -> Tuple[List[int], List[float]]:
    """One request, one token at a time, one layer at a time: the tokens and every boundary's top probability.

    The prompt runs full depth. A decoded token stops at the first loop boundary (every ``num_blocks``
    layers, cycle sharing) where softmax(lm_head(norm(h))) peaks at ``threshold`` or more; each deeper
    layer then still runs its block on the frozen exit state, only to extend its cache.
    """
    config, backbone = model.config, model.model
    out = model(torch.tensor([prompt]), use_cache=True)
    cache = list(out.past_key_values)
    tokens = list(prompt) + [int(out.logits[0, -1].argmax())]
    top_probabilities = []
    for _ in range(max_new_tokens - 1):
        position = torch.tensor([[len(tokens) - 1]])
        position_embeddings = rotary_embedding(position, config.head_dim, config.rope_theta, torch.float64)
        hidden = backbone.embed(torch.tensor([[tokens[-1]]]))
        logits = None
        for layer in range(config.num_layers):
            block = backbone.blocks[config.block_of_layer(layer)]
            new_hidden, cache[layer], _ = block(hidden, block.adapter_index(layer), position_embeddings, None,
                                                cache[layer], use_cache=True)
            if logits is not None:
                continue  # exited: the block ran on the exit state for its keys and values only
            hidden = new_hidden
            if (layer + 1) % config.num_blocks == 0 and layer + 1 < config.num_layers:
                boundary_logits = model.lm_head(backbone.norm(hidden[0, -1]))
                top = float(boundary_logits.softmax(-1).max())
                top_probabilities.append(top)
                if top >= threshold:
                    logits = boundary_logits
        if logits is None:
            logits = model.lm_head(backbone.norm(hidden[0, -1]))
        tokens.append(int(logits.argmax()))
    return tokens, top_probabilities


def calibrated_threshold(model, prompts: List[List[int]], max_new_tokens: int) -> float:
    """The median top probability at loop boundaries of full-depth decoding: some tokens exit, some not."""
    probabilities = [p for prompt in prompts for p in early_exit_reference(model, prompt, max_new_tokens, 2.0)[1]]
    return float(torch.tensor(probabilities).median())


def left_pad(prompts: List[List[int]]) -> Tuple[torch.Tensor, torch.Tensor]:
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def unpadded(row: torch.Tensor, pad: int) -> List[int]:
    return row.tolist()[pad:]


# KV-cached generate.


@pytest.mark.parametrize("name", [*CONFIGS, "sequence"])
def test_cached_greedy_equals_full_recompute(name):
    model = make_model(**SEQUENCE).eval() if name == "sequence" else model_for(name)
    prompts = random_prompts(3, 4, 4, seed=1)
    out = model.generate(torch.tensor(prompts), 5)
    assert out.tolist() == [greedy_by_recompute(model, p, 5) for p in prompts]


@pytest.mark.parametrize("name", CONFIGS)
def test_left_padded_batch_equals_each_prompt_alone(name):
    model = model_for(name)
    prompts = random_prompts(3, 1, 6, seed=2)
    ids, mask = left_pad(prompts)
    out = model.generate(ids, 5, attention_mask=mask)
    for row, prompt in zip(out, prompts):
        assert unpadded(row, ids.shape[1] - len(prompt)) == greedy_by_recompute(model, prompt, 5)


def test_eos_stops_and_pads():
    model = model_for("none")
    prompts = random_prompts(2, 3, 3, seed=3)
    full = [greedy_by_recompute(model, p, 6) for p in prompts]
    eos = full[0][3 + 1]  # the second token of row 0
    out = model.generate(torch.tensor(prompts), 6, eos_token_id=eos).tolist()
    for row, reference in zip(out, full):
        new = reference[3:]
        stop = new.index(eos) + 1 if eos in new else len(new)
        assert row[: 3 + stop] == reference[: 3 + stop]
        assert all(token == eos for token in row[3 + stop:])  # finished rows are padded with eos
    alone = model.generate(torch.tensor(prompts[:1]), 6, eos_token_id=eos)
    assert alone[0].tolist() == full[0][: 3 + full[0][3:].index(eos) + 1]  # stops once every row is finished


def test_zero_new_tokens_returns_the_prompt():
    model = model_for("none")
    ids = torch.tensor(random_prompts(2, 3, 3))
    assert torch.equal(model.generate(ids, 0), ids)


# Early exit.


@pytest.mark.parametrize("name", ["none", "circuit"])
def test_exit_threshold_off_changes_nothing(name):
    model = model_for(name)
    prompts = random_prompts(2, 3, 5, seed=4)
    ids, mask = left_pad(prompts)
    plain = model.generate(ids, 5, attention_mask=mask)
    assert torch.equal(model.generate(ids, 5, attention_mask=mask, exit_threshold=None), plain)
    assert torch.equal(model.generate(ids, 5, attention_mask=mask, exit_threshold=1.0), plain)
    engine = DepthBatchingEngine(model, 2, exit_threshold=1.0)
    assert engine.generate(prompts, 5) == [greedy_by_recompute(model, p, 5) for p in prompts]


@pytest.mark.parametrize("name", CONFIGS)
def test_early_exit_generate_and_engine_match_the_reference(name):
    model = model_for(name)
    prompts = random_prompts(5, 1, 6, seed=5)
    threshold = calibrated_threshold(model, prompts, 6)
    references = [early_exit_reference(model, p, 6, threshold)[0] for p in prompts]
    full_depth = [greedy_by_recompute(model, p, 6) for p in prompts]
    assert references != full_depth  # the threshold changes some tokens, so the test can tell exits apart

    ids, mask = left_pad(prompts)
    out = model.generate(ids, 6, attention_mask=mask, exit_threshold=threshold)
    assert [unpadded(row, ids.shape[1] - len(p)) for row, p in zip(out, prompts)] == references

    engine = DepthBatchingEngine(model, 2, exit_threshold=threshold)
    assert engine.generate(prompts, 6) == references
    stats = engine.stats
    assert stats.decoded_tokens == 5 * 5 and 1 <= stats.mean_exit_loops < stats.num_loops


def test_early_exit_when_every_row_leaves_at_the_first_boundary():
    """A threshold every token reaches: the decoded tokens all come from the first loop's LM head."""
    model = model_for("depth_lora")
    prompts = random_prompts(3, 2, 4, seed=6)
    tiny = 1.0 / VOCAB
    references = [early_exit_reference(model, p, 5, tiny)[0] for p in prompts]
    ids, mask = left_pad(prompts)
    out = model.generate(ids, 5, attention_mask=mask, exit_threshold=tiny)
    assert [unpadded(row, ids.shape[1] - len(p)) for row, p in zip(out, prompts)] == references
    engine = DepthBatchingEngine(model, 2, exit_threshold=tiny)
    assert engine.generate(prompts, 5) == references
    assert engine.stats.mean_exit_loops == 1.0


def test_block_key_value_equals_the_cache_forward_appends():
    model = model_for("circuit")
    config = model.config
    hidden = torch.randn(3, 2, config.hidden_size, dtype=torch.float64)
    position_embeddings = rotary_embedding(torch.tensor([[4, 5]] * 3), config.head_dim, config.rope_theta,
                                           torch.float64)
    block = model.model.blocks[1]
    for depth in (1, 5, torch.tensor([1, 3, 5])):  # 1: no circuit factors (before start_index)
        expected = block(hidden, block.adapter_index(depth), position_embeddings, use_cache=True)[1]
        got = block.key_value(hidden, block.adapter_index(depth), position_embeddings)
        for e, g in zip(expected, got):
            assert (e is None) == (g is None)
            if e is not None:
                torch.testing.assert_close(g, e, rtol=0, atol=0)


# DepthBatchingEngine.


@pytest.mark.parametrize("name", [*CONFIGS, "sequence"])
def test_engine_equals_one_request_at_a_time(name):
    model = make_model(**SEQUENCE).eval() if name == "sequence" else model_for(name)
    prompts = random_prompts(6, 1, 7, seed=7)
    lengths = [4, 0, 6, 1, 3, 5]
    engine = DepthBatchingEngine(model, max_batch_size=3)
    out = engine.generate(prompts, lengths)
    assert out == [model.generate(torch.tensor([p]), n)[0].tolist() for p, n in zip(prompts, lengths)]
    assert engine.stats.new_tokens == sum(lengths)


def test_engine_stream_yields_generates_tokens_as_they_come():
    model = model_for("depth_lora")
    prompts = random_prompts(7, 1, 6, seed=12)
    lengths = [5, 0, 2, 6, 1, 4, 3]
    engine = DepthBatchingEngine(model, max_batch_size=3)
    expected = engine.generate(prompts, lengths)
    stats = engine.stats
    stream = engine.stream(prompts, lengths)
    request, token = next(stream)  # request 0's first token: the first prompts finish together, in order
    assert (request, token) == (0, expected[0][len(prompts[0])])
    assert torch.is_grad_enabled()  # the stream's no_grad holds inside it only
    pairs = [(request, token), *stream]
    assert sorted(pairs, key=lambda pair: pair[0]) != pairs  # interleaved across requests
    for index, (prompt, tokens) in enumerate(zip(prompts, expected)):
        assert [t for r, t in pairs if r == index] == tokens[len(prompt):]
    assert engine.stats == stats
    with pytest.raises(ValueError, match="prompts"):
        engine.stream([[]], 3)  # checked at the call, not at the first next()


def test_engine_runs_prompts_in_its_steps():
    """A plain stack's prompts ride along in the engine's steps, beside the decoding tokens: the model's
    forward never runs, and a request's first token comes with the step in which its prompt ends its last loop."""
    model = model_for("depth_lora")
    forwards = []
    model.model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    prompts = random_prompts(5, 1, 9, seed=13)
    lengths = [3, 1, 4, 2, 5]
    engine = DepthBatchingEngine(model, max_batch_size=2)
    steps = []
    for request, token in engine.stream(prompts, lengths):
        steps.append((engine.stats.steps, request))
    assert not forwards
    loops = engine.num_loops
    assert [step for step, request in steps if request == 0][0] == loops  # admitted at once: its last loop
    assert engine.generate(prompts, lengths) == [model.generate(torch.tensor([p]), n)[0].tolist()
                                                  for p, n in zip(prompts, lengths)]
    assert engine.stats.decoded_tokens == sum(lengths) - len(prompts)


def test_engine_eos_equals_generate():
    model = model_for("none")
    prompts = random_prompts(5, 2, 5, seed=8)
    eos = greedy_by_recompute(model, prompts[0], 3)[-1]
    out = DepthBatchingEngine(model, 2).generate(prompts, 6, eos_token_id=eos)
    assert out == [model.generate(torch.tensor([p]), 6, eos_token_id=eos)[0].tolist() for p in prompts]


def test_engine_many_random_requests_with_early_exit_all_complete():
    torch.manual_seed(0)
    model = make_model(**CONFIGS["mol"]).float().eval()
    rng = random.Random(9)
    prompts = [[rng.randrange(VOCAB) for _ in range(rng.randint(1, 8))] for _ in range(300)]
    lengths = [rng.randint(0, 6) for _ in prompts]
    eos = 5
    threshold = calibrated_threshold(model.double(), prompts[:4], 4)
    model.float()
    engine = DepthBatchingEngine(model, max_batch_size=16, exit_threshold=threshold)
    out = engine.generate(prompts, lengths, eos_token_id=eos)
    assert_every_request_completes(engine, out, prompts, lengths, eos)
    stats = engine.stats
    assert 1.0 < stats.mean_exit_loops < stats.num_loops  # some tokens exited, some ran deeper


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations are a CUDA matter")
@pytest.mark.parametrize("exit_fraction", [None, 0.5])
def test_engine_step_synchronises_at_most_once(exit_fraction, monkeypatch):
    """An engine step builds its indices on the host and reads back only its new tokens: at most one
    synchronising CUDA call per step (torch's sync debug mode names each), and none in a step where no
    token finishes or leaves."""
    model = model_for("depth_lora").float().cuda()
    prompts = random_prompts(12, 1, 7, seed=11)
    threshold = None if exit_fraction is None else calibrate_exit_threshold(
        model, torch.tensor([p[:1] for p in prompts], device="cuda"), exit_fraction)
    engine = DepthBatchingEngine(model, max_batch_size=4, exit_threshold=threshold)
    counts = synchronisations_per_step(engine, EngineRun, prompts, monkeypatch)
    assert counts and max(counts) <= 1, counts
    if exit_fraction is None:
        assert 0 in counts  # steps where no token reached the full depth read nothing


# Sampling.


def test_top_k_filter_keeps_the_k_largest():
    logits = torch.randn(4, 50, generator=torch.Generator().manual_seed(0))
    for k in (1, 7, 50, 80):
        kept = top_k_filter(logits, k).isfinite()
        expected = torch.zeros_like(kept)
        for row in range(4):
            expected[row, logits[row].argsort(descending=True)[:k]] = True
        assert torch.equal(kept, expected)


def test_top_p_filter_keeps_the_smallest_set_reaching_p():
    logits = torch.randn(6, 40, dtype=torch.float64, generator=torch.Generator().manual_seed(1)) * 2
    for p in (1e-6, 0.3, 0.75, 0.95, 1.0):
        kept = top_p_filter(logits, p).isfinite()
        for row in range(6):
            probs = logits[row].softmax(-1)
            order = probs.argsort(descending=True).tolist()
            chosen, mass = [], 0.0
            for token in order:  # the most probable first, until the mass reaches p
                chosen.append(token)
                mass += float(probs[token])
                if mass >= p:
                    break
            assert sorted(kept[row].nonzero().squeeze(1).tolist()) == sorted(chosen)


def test_sampling_follows_the_filtered_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, -3.0])
    draws = 40000
    torch.manual_seed(0)
    tokens = next_tokens(logits.expand(draws, -1), do_sample=True, temperature=0.7, top_k=4, top_p=0.9)
    frequencies = torch.bincount(tokens, minlength=6).double() / draws
    tempered = (logits.double() / 0.7).softmax(-1)
    kept = tempered[:4]  # top_k=4; then top-p: the first three reach 0.9 of the top-4 mass? computed below
    kept = kept / kept.sum()
    mass_before = kept.cumsum(0) - kept
    kept = torch.where(mass_before < 0.9, kept, torch.zeros_like(kept))
    expected = torch.cat((kept / kept.sum(), torch.zeros(2, dtype=torch.float64)))
    torch.testing.assert_close(frequencies, expected, rtol=0, atol=0.01)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy():
    model = model_for("none")
    ids = torch.tensor(random_prompts(2, 3, 3, seed=10))
    torch.manual_seed(3)
    first = model.generate(ids, 6, do_sample=True, temperature=1.5, top_p=0.9)
    torch.manual_seed(3)
    assert torch.equal(model.generate(ids, 6, do_sample=True, temperature=1.5, top_p=0.9), first)
    assert torch.equal(model.generate(ids, 6, do_sample=True, top_k=1), model.generate(ids, 6))


def test_engine_samples_from_each_steps_distribution():
    """Sampled engine tokens (top-2 at a temperature) are always among the two most likely of a full
    recompute at their position, and the top one is drawn as often as its renormalised probability
    predicts, over the prefill's and the engine steps' tokens alike. top_k=1 is greedy."""
    model = model_for("depth_lora")
    prompts = random_prompts(300, 1, 6, seed=12)
    engine = DepthBatchingEngine(model, max_batch_size=16)
    torch.manual_seed(13)
    outputs = engine.generate(prompts, 3, do_sample=True, temperature=0.25, top_k=2)
    chosen_top, expected_top = [], []
    with torch.no_grad():
        for prompt, output in zip(prompts, outputs):
            logits = model(torch.tensor([output])).logits[0, len(prompt) - 1:-1]  # (3, vocab)
            top2 = logits.topk(2).indices
            new = torch.tensor(output[len(prompt):])
            assert bool((top2 == new[:, None]).any(1).all()), (prompt, output)
            chosen_top.append(new == top2[:, 0])
            expected_top.append((logits.gather(1, top2) / 0.25).softmax(-1)[:, 0])
    chosen_top, expected_top = torch.stack(chosen_top).double(), torch.stack(expected_top)
    # 900 draws: a standard error of about 0.016 on the rate (about 0.68 here; 0.55 at temperature 1)
    assert abs(chosen_top.mean() - expected_top.mean()) < 0.05
    steps = slice(1, None)  # the engine steps' tokens alone (600 draws)
    assert abs(chosen_top[:, steps].mean() - expected_top[:, steps].mean()) < 0.06
    assert engine.generate(prompts[:8], 3, do_sample=True, top_k=1) == engine.generate(prompts[:8], 3)
    with pytest.raises(ValueError, match="temperature"):
        engine.generate(prompts[:1], 2, do_sample=True, temperature=0.0)


# Bad input.


@pytest.mark.parametrize("kwargs, argument", [
    (dict(max_new_tokens=-1), "max_new_tokens"),
    (dict(input_ids=torch.tensor([[1, VOCAB]])), "input_ids"),
    (dict(input_ids=torch.tensor([[-1, 2]])), "input_ids"),
    (dict(input_ids=torch.zeros(1, 0, dtype=torch.long)), "input_ids"),
    (dict(input_ids=torch.tensor([1, 2])), "input_ids"),
    (dict(attention_mask=torch.tensor([[0, 0]])), "attention_mask"),
    (dict(attention_mask=torch.tensor([[1, 1, 1]])), "attention_mask"),
    (dict(temperature=0.0), "temperature"),
    (dict(top_k=0), "top_k"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(eos_token_id=VOCAB), "eos_token_id"),
    (dict(exit_threshold=0.0), "exit_threshold"),
    (dict(exit_threshold=1.5), "exit_threshold"),
])
def test_generate_rejects_bad_input(kwargs, argument):
    model = model_for("none")
    args = dict(input_ids=torch.tensor([[1, 2]]), max_new_tokens=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=argument):
        model.generate(**args)


def test_early_exit_needs_loop_boundaries():
    model = make_model(**SEQUENCE).eval()
    with pytest.raises(ValueError, match="exit_threshold"):
        model.generate(torch.tensor([[1, 2]]), 2, exit_threshold=0.5)
    with pytest.raises(ValueError, match="exit_threshold"):
        DepthBatchingEngine(model, 2, exit_threshold=0.5)


@pytest.mark.parametrize("prompts, max_new_tokens, argument", [
    ([[1, 2], []], 2, r"prompts\[1\]"),
    ([[1, VOCAB]], 2, r"prompts\[0\]"),
    ([[1, -3]], 2, r"prompts\[0\]"),
    ([[1, 2]], -1, r"max_new_tokens\[0\]"),
    ([[1, 2], [3]], [2, -1], r"max_new_tokens\[1\]"),
    ([[1, 2], [3]], [2], "max_new_tokens"),
    (torch.tensor([[1, 2]]), 2, "prompts"),
])
def test_engine_rejects_bad_input(prompts, max_new_tokens, argument):
    engine = DepthBatchingEngine(model_for("none"), 2)
    with pytest.raises(ValueError, match=argument):
        engine.generate(prompts, max_new_tokens)


def test_engine_rejects_bad_arguments():
    with pytest.raises(ValueError, match="max_batch_size"):
        DepthBatchingEngine(model_for("none"), 0)
    with pytest.raises(ValueError, match="model"):
        DepthBatchingEngine(torch.nn.Linear(2, 2), 2)
    with pytest.raises(ValueError, match="eos_token_id"):
        DepthBatchingEngine(model_for("none"), 2).generate([[1]], 2, eos_token_id=-1)


# Plain batches, calibration and the command line.


def test_generate_in_batches_equals_one_request_at_a_time():
    model = model_for("none")
    prompts = random_prompts(5, 1, 6, seed=11)
    lengths = [3, 0, 5, 1, 4]
    out = generate_in_batches(model, prompts, lengths, batch_size=2)
    assert out == [greedy_by_recompute(model, p, n) for p, n in zip(prompts, lengths)]


def test_calibrated_threshold_splits_the_first_boundary():
    model = model_for("mol")  # one block: the first boundary follows layer 0
    ids = torch.tensor(random_prompts(4, 9, 9, seed=12))
    threshold = calibrate_exit_threshold(model, ids, 0.25)
    positions = torch.arange(9).expand(4, 9)
    config = model.config
    with torch.no_grad():
        hidden = model.model.blocks[0](model.model.embed(ids), -1, rotary_embedding(
            positions, config.head_dim, config.rope_theta, torch.float64))[0]
        top = model.lm_head(model.model.norm(hidden)).softmax(-1).amax(-1)
    leaving = float((top >= threshold).double().mean())
    assert abs(leaving - 0.25) <= 1 / 36 + 1e-12
    with pytest.raises(ValueError, match="exit_fraction"):
        calibrate_exit_threshold(model, ids, 1.0)
    with pytest.raises(ValueError, match="^model: early exit happens at loop boundaries"):
        calibrate_exit_threshold(make_model(**SEQUENCE), ids, 0.5)


@pytest.mark.parametrize("name,boundaries", [("depth_lora", (2, 4)), ("mol", (1, 2, 3))])
def test_hidden_states_and_the_exit_loss(name, boundaries):
    """output_hidden_states gives the embeddings and every layer's output before the final norm; the exit
    loss is the mean next-token loss of the LM head at the loop boundaries but the last, and trains them."""
    model = model_for(name)
    ids = torch.tensor(random_prompts(2, 7, 7, seed=3))
    out = model(ids, labels=ids, output_hidden_states=True)
    hidden = out.hidden_states
    assert len(hidden) == model.config.num_layers + 1 and all(h.shape == (2, 7, 32) for h in hidden)
    assert torch.equal(hidden[0], model.model.embed(ids))
    assert torch.allclose(out.logits, model.lm_head(model.model.norm(hidden[-1])), rtol=0, atol=1e-12)
    assert model(ids).hidden_states is None
    expected = torch.stack([
        torch.nn.functional.cross_entropy(model.lm_head(model.model.norm(hidden[b]))[:, :-1].reshape(-1, VOCAB),
                                          ids[:, 1:].reshape(-1))
        for b in boundaries
    ]).mean()
    loss = exit_loss(model, hidden, ids)
    assert torch.allclose(loss, expected, rtol=1e-12, atol=0)
    loss.backward()
    assert model.model.blocks[0].input_layernorm.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="hidden_states"):
        exit_loss(model, hidden[:-1], ids)
    with pytest.raises(ValueError, match="labels"):
        exit_loss(model, hidden, ids[:, :-1])
    single = make_model(**SEQUENCE)
    with pytest.raises(ValueError, match="^model: early exit happens at loop boundaries"):
        exit_loss(single, single(ids, output_hidden_states=True).hidden_states, ids)


def test_generate_command(tmp_path, capsys):
    from recursive.__main__ import main

    model_for("none").save_pretrained(str(tmp_path))
    main(["generate", "--model", str(tmp_path), "--prompt", "1,2,3", "--prompt", "4", "--max-new-tokens", "3",
          "--engine", "--max-batch-size", "1", "--no-progress"])
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == "[0] 1,2,3 -> " + ",".join(map(str, greedy_by_recompute(model_for("none"), [1, 2, 3], 3)[3:]))
    assert "6 new tokens for 2 prompts" in lines[2] and "tokens/s" in lines[2]
    with pytest.raises(SystemExit, match="prompt"):
        main(["generate", "--model", str(tmp_path), "--prompt", "1,a", "--no-progress"])


# Hugging Face.


@pytest.mark.parametrize("family", ["llama", "qwen2", "gemma"])
def test_converted_model_greedy_equals_hugging_face_generate(family):
    """Two shared blocks over four layers with full-rank SVD adapters reproduce the original (the
    converter's exactness condition), so greedy decoding must pick the same tokens as Hugging Face's,
    with and without left padding; the converted model also decodes through the engine."""
    pytest.importorskip("transformers")
    from recursive import convert_hf

    hf = make_hf(family, 4, uniform=True)
    model = convert_hf(hf, 2, lora_rank=10**6).eval()
    # Hugging Face's eager attention gives NaN logits on left-padded float64 batches; sdpa does not.
    hf.set_attn_implementation("sdpa")
    eos = hf.generation_config.eos_token_id
    options = dict(max_new_tokens=8, do_sample=False, eos_token_id=eos, pad_token_id=eos)
    prompts = random_prompts(3, 2, 6, seed=13)
    ids, mask = left_pad(prompts)
    with torch.no_grad():
        expected = hf.generate(ids, attention_mask=mask, **options)
        alone = [hf.generate(torch.tensor([p]), **options)[0].tolist() for p in prompts]
    assert torch.equal(model.generate(ids, 8, attention_mask=mask, eos_token_id=eos), expected)
    assert DepthBatchingEngine(model, 2).generate(prompts, 8, eos_token_id=eos) == alone


def test_generation_benchmark_on_a_trained_model():
    """The benchmark's --train-steps path: a trained model, corpus prompts, a fixed threshold, every method."""
    from recursive_benchmarks.bench_generation import METHODS, PEER, Workload, available_methods, run

    workload = Workload(32, 48, 2, 4, 2, 128, 4, 2, (3, 6), (2, 5))
    result = run(torch.device("cpu"), torch.float32, workload, repeats=1, train_steps=2, methods=METHODS)
    assert result["train_steps"] == 2 and result["exit_threshold"] == 0.9
    rows = {row["method"]: row for row in result["rows"]}
    assert list(rows) == list(available_methods(METHODS))
    assert PEER not in rows or rows[PEER]["vs transformers"] == 1.0
    assert rows["plain"]["agree"] == rows["engine"]["agree"] == 1.0  # without early exit: full depth
    assert 1.0 <= rows["engine+exit"]["exit loops"] <= result["loops"]
    assert 1.0 <= rows["mor"]["exit loops"] <= result["loops"] and rows["mor"]["agree"] is None
    assert rows["mor engine"]["exit loops"] == pytest.approx(rows["mor"]["exit loops"])  # the same tokens


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
def test_generation_benchmark_peer_decodes_what_the_untied_model_decodes():
    """The benchmark's transformers row runs the same requests on the same weights: the same greedy tokens."""
    from recursive import RecursiveConfig, export_hf
    from recursive_benchmarks.bench_generation import transformers_in_batches

    untied = RecursiveForCausalLM(RecursiveConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48,
                                                  num_attention_heads=2, num_layers=3, num_blocks=3)).double().eval()
    peer = export_hf(untied)
    peer.generation_config.eos_token_id = None
    prompts, lengths = random_prompts(5, 2, 7, seed=3), [4, 1, 6, 3, 5]
    assert transformers_in_batches(peer, prompts, lengths, 2) == generate_in_batches(untied, prompts, lengths, 2)
