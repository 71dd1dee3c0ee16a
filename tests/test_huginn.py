"""Huginn-0125 loaded exactly: tiny checkpoints in Huginn's layout (config.json with ``model_type: huginn_raven``, its
``transformer.*`` tensor names) against an independent float64 reference written here from the published math:
prelude, random or zero core state, ``adapter([state, e])`` before each core pass, sandwich blocks that norm after
each residual add, q/k biases before a RoPE on adjacent pairs, ``ln_f`` before and after the coda."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file

from recursive import DepthBatchingEngine, RecursiveForCausalLM
from recursive.__main__ import main as cli_main
from recursive.generation.exit_rules import KLExit, resolve_exit_rule
from recursive.looped import convert_looped
from recursive.nn import rotary_embedding
from tests.helpers import max_relative_error, ref_rms_norm, sampled_by_recompute

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, HIDDEN, HEADS, INTER, EPS, BASE = 97, 32, 4, 40, 1e-6, 50000.0
HEAD_DIM = HIDDEN // HEADS
PRELUDE, CORE, CODA, STEPS = 1, 2, 1, 3
TIGHT = 1e-10


def huginn_tensors(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=generator, dtype=torch.float64)

    tensors = {"transformer.wte.weight": rand(VOCAB, HIDDEN, scale=0.3),
               "transformer.adapter.weight": rand(HIDDEN, 2 * HIDDEN, scale=0.15),
               "transformer.ln_f.weight": rand(HIDDEN, mean=1.0), "freqs_cis": torch.zeros(1, 16, 1, HEAD_DIM // 2, 2)}
    for stage, count in (("prelude", PRELUDE), ("core_block", CORE), ("coda", CODA)):
        for i in range(count):
            p = f"transformer.{stage}.{i}."
            for norm in ("norm_1", "norm_2", "norm_3", "norm_4"):
                tensors[p + norm + ".weight"] = rand(HIDDEN, mean=1.0)
            tensors[p + "attn.Wqkv.weight"] = rand(3 * HIDDEN, HIDDEN)
            tensors[p + "attn.qk_bias"] = rand(2, 1, HEADS, HEAD_DIM, scale=0.5)
            tensors[p + "attn.proj.weight"] = rand(HIDDEN, HIDDEN)
            tensors[p + "mlp.fc.weight"] = rand(2 * INTER, HIDDEN)
            tensors[p + "mlp.proj.weight"] = rand(HIDDEN, INTER)
    return tensors


def huginn_config(**options):
    values = {"model_type": "huginn_raven", "architectures": ["RavenForCausalLM"], "n_embd": HIDDEN,
              "num_attention_heads": HEADS, "num_key_value_heads": HEADS, "n_layers_in_prelude": PRELUDE,
              "n_layers_in_recurrent_block": CORE, "n_layers_in_coda": CODA, "mean_recurrence": STEPS,
              "intermediate_size": INTER, "vocab_size": VOCAB, "padded_vocab_size": VOCAB, "norm_eps": EPS,
              "rope_base": BASE, "qk_bias": True, "bias": False, "tie_embeddings": True, "injection_type": "linear",
              "state_init": "like-init", "block_class_name": "SandwichBlock", "norm_class_name": "RMSNorm_llama",
              "mlp_class_name": "GatedMLP", "nonlin_name": "SiLU"}
    values.update(options)
    return values


def save_huginn(folder, tensors=None, **options):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(huginn_config(**options)))
    save_file(huginn_tensors() if tensors is None else tensors, folder / "model.safetensors")
    return folder


def pairwise_rope(x, positions):
    """x (B, S, heads, D): dims 2i and 2i + 1 rotate together by ``position * BASE ** (-2i / D)``."""
    angles = positions[..., None].double() * BASE ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float64) / HEAD_DIM)
    cos, sin = angles.cos()[:, :, None], angles.sin()[:, :, None]
    even, odd = x[..., 0::2], x[..., 1::2]
    return torch.stack((even * cos - odd * sin, odd * cos + even * sin), -1).flatten(-2)


def sandwich_block(x, t, prefix, positions, key_mask):
    B, S, _ = x.shape

    def norm(h, name):
        return ref_rms_norm(h, t[prefix + name + ".weight"], EPS, False)

    q, k, v = (norm(x, "norm_1") @ t[prefix + "attn.Wqkv.weight"].T).split(HIDDEN, -1)
    bias = t[prefix + "attn.qk_bias"]
    q = pairwise_rope(q.view(B, S, HEADS, HEAD_DIM) + bias[0], positions).transpose(1, 2)
    k = pairwise_rope(k.view(B, S, HEADS, HEAD_DIM) + bias[1], positions).transpose(1, 2)
    scores = q @ k.transpose(-1, -2) / math.sqrt(HEAD_DIM)
    allowed = torch.ones(S, S, dtype=torch.bool).tril()
    if key_mask is not None:
        allowed = allowed & key_mask.bool()[:, None, None, :]
    probs = scores.masked_fill(~allowed, float("-inf")).softmax(-1).nan_to_num(0.0)
    attention = (probs @ v.view(B, S, HEADS, HEAD_DIM).transpose(1, 2)).transpose(1, 2).reshape(B, S, HIDDEN)
    h = norm(x + attention @ t[prefix + "attn.proj.weight"].T, "norm_2")
    gate, up = (norm(h, "norm_3") @ t[prefix + "mlp.fc.weight"].T).chunk(2, -1)
    return norm(h + (F.silu(gate) * up) @ t[prefix + "mlp.proj.weight"].T, "norm_4")


def reference(t, ids, state, steps=STEPS, mask=None):
    """Huginn's forward from its core's initial ``state`` (B, S, hidden): the logits (B, S, V)."""
    B, S = ids.shape
    positions = torch.arange(S).expand(B, S) if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)
    e = t["transformer.wte.weight"][ids] * math.sqrt(HIDDEN)
    for i in range(PRELUDE):
        e = sandwich_block(e, t, f"transformer.prelude.{i}.", positions, mask)
    x = state
    for _ in range(steps):
        x = torch.cat((x, e), -1) @ t["transformer.adapter.weight"].T
        for i in range(CORE):
            x = sandwich_block(x, t, f"transformer.core_block.{i}.", positions, mask)
    x = ref_rms_norm(x, t["transformer.ln_f.weight"], EPS, False)
    for i in range(CODA):
        x = sandwich_block(x, t, f"transformer.coda.{i}.", positions, mask)
    return ref_rms_norm(x, t["transformer.ln_f.weight"], EPS, False) @ t["transformer.wte.weight"].T


def inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[2, :4] = 0
    return ids, mask


def logits(model, ids, **kwargs):
    with torch.no_grad():
        return model(ids, **kwargs).logits


@pytest.fixture
def zero_state(tmp_path):
    return convert_looped(save_huginn(tmp_path / "zero", state_init="zero"))


@pytest.mark.parametrize("padded", [False, True])
def test_logits_match_the_reference(zero_state, padded):
    ids, mask = inputs()
    mask = mask if padded else None
    expected = reference(huginn_tensors(), ids, torch.zeros(*ids.shape, HIDDEN, dtype=torch.float64), mask=mask)
    assert max_relative_error(logits(zero_state, ids, attention_mask=mask), expected, mask) < TIGHT


def test_the_random_state_is_huginns_draw(tmp_path):
    """like-init: a truncated normal (std sqrt(2 / (5 hidden)), cut at 3 std) times sqrt(hidden), drawn as Huginn
    draws it (randn_like, then trunc_normal_ over it) from the seeded global generator."""
    model = convert_looped(save_huginn(tmp_path / "random"))
    ids = inputs()[0]
    std = math.sqrt(2 / (5 * HIDDEN))
    assert model.config.core_state_std == pytest.approx(std)
    torch.manual_seed(7)
    state = torch.randn(*ids.shape, HIDDEN, dtype=torch.float64)
    torch.nn.init.trunc_normal_(state, 0.0, std, -3 * std, 3 * std)
    expected = reference(huginn_tensors(), ids, state * math.sqrt(HIDDEN))
    torch.manual_seed(7)
    assert max_relative_error(logits(model, ids), expected) < TIGHT
    assert max_relative_error(logits(model, ids), expected) > 1e-6  # another draw: the state matters


@pytest.mark.parametrize("steps", [1, 5])
def test_num_loops_sets_the_core_passes(tmp_path, steps):
    model = convert_looped(save_huginn(tmp_path / "steps", state_init="zero"), num_loops=steps)
    assert model.config.num_layers == PRELUDE + CODA + CORE * steps
    ids = inputs()[0]
    expected = reference(huginn_tensors(), ids, torch.zeros(*ids.shape, HIDDEN, dtype=torch.float64), steps=steps)
    assert max_relative_error(logits(model, ids), expected) < TIGHT


def test_cached_generation_and_the_engine_equal_recomputation(zero_state):
    ids, mask = inputs()
    generated = zero_state.generate(ids, 5, attention_mask=mask)
    sequence, full_mask = ids, mask
    for _ in range(5):
        token = logits(zero_state, sequence, attention_mask=full_mask)[:, -1].argmax(-1)
        sequence = torch.cat((sequence, token[:, None]), 1)
        full_mask = torch.cat((full_mask, torch.ones_like(token)[:, None]), 1)
    assert torch.equal(generated, sequence)
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    expected = [row[-len(p) - 5:].tolist() for row, p in zip(sequence, prompts)]
    assert DepthBatchingEngine(zero_state, max_batch_size=2).generate(prompts, 5) == expected


def test_round_trip(zero_state, tmp_path):
    ids = inputs()[0]
    zero_state.save_pretrained(tmp_path / "saved")
    again = RecursiveForCausalLM.from_pretrained(tmp_path / "saved")
    assert torch.equal(logits(again, ids), logits(zero_state, ids))


@pytest.mark.parametrize("options, message", [
    (dict(bias=True), "bias=True"),
    (dict(test_time_noise=0.1), "test_time_noise"),
    (dict(block_class_name="PreNormBlock"), "block_class_name"),
    (dict(injection_type="add"), "injection_type"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(state_init="normal"), "state_init"),
])
def test_unsupported_configs_are_named(tmp_path, options, message):
    with pytest.raises(ValueError, match="model_or_path") as error:
        convert_looped(save_huginn(tmp_path / "huginn", **options))
    assert message in str(error.value)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    tensors = huginn_tensors()
    del tensors["transformer.core_block.1.attn.qk_bias"]
    with pytest.raises(ValueError, match="no tensor transformer.core_block.1.attn.qk_bias"):
        convert_looped(save_huginn(tmp_path / "a", tensors))
    tensors = huginn_tensors()
    tensors["transformer.coda.0.mlp.fc.weight"] = torch.zeros(2 * INTER + 1, HIDDEN, dtype=torch.float64)
    with pytest.raises(ValueError, match="transformer.coda.0.mlp.fc.weight has 81 rows"):
        convert_looped(save_huginn(tmp_path / "b", tensors))
    with pytest.raises(ValueError, match="num_loops"):
        convert_looped(save_huginn(tmp_path / "c"), num_loops=0)


def test_convert_command_sets_the_loops(tmp_path, capsys):
    folder = save_huginn(tmp_path / "huginn")
    cli_main(["convert", str(folder), str(tmp_path / "ours"), "--num-loops", "2", "--no-progress"])
    assert f"huginn_raven: {PRELUDE + CODA + 2 * CORE} effective layers" in capsys.readouterr().out
    assert RecursiveForCausalLM.from_pretrained(tmp_path / "ours").config.num_layers == PRELUDE + CODA + 2 * CORE


# Early exit by Huginn's KL criterion.


@torch.no_grad()
def readout(model, tokens, passes):
    """The last token's next-token logits from a full forward without cache in which token i runs ``passes[i]`` core
    passes and keeps its state after them (the exit strategy: later tokens attend over that state's keys); the coda
    reads each token's state through the norm (the last pass's own norm for a token that ran them all)."""
    config, backbone = model.config, model.model
    steps = backbone.shape.steps
    core_end = len(steps) - CODA
    ends = [i + 1 for i, step in enumerate(steps) if step.exit_after] + [core_end]
    ids = torch.tensor([tokens])
    hidden = backbone.embed(ids)
    pe = rotary_embedding(torch.arange(len(tokens))[None], config.head_dim, config.rope_theta, hidden.dtype)
    limits = torch.tensor(passes)[None, :, None]
    e, state = hidden, torch.zeros_like(hidden)
    for i, step in enumerate(steps[:core_end]):
        block = backbone.blocks[step.block]
        if step.state == 0:  # the prelude
            e = block(e, -1, pe)[0]
            continue
        n = sum(end <= i for end in ends)  # the pass this step belongs to
        h = backbone.adapter(torch.cat((state, e), -1)) if step.inject else state
        out = block(h, -1, pe)[0]
        if step.norm_after:
            out = backbone.norm(out)
        state = torch.where(limits > n, out, state)
    x = torch.where(limits == len(ends), state, backbone.norm(state))
    for step in steps[core_end:]:
        x = backbone.blocks[step.block](x, -1, pe)[0]
    return model.lm_head(backbone.norm(x))[0, -1]


def kl_exit_reference(model, prompt, new_tokens, threshold):
    """One request, token by token: each decoded token runs pass after pass, and leaves at the first boundary where
    KL(previous boundary's distribution || this one's) < threshold (uniform before the first); returns the tokens
    and every divergence seen."""
    passes = len(model.config.recursions()[1])
    tokens, ran = list(prompt), [passes] * len(prompt)
    logits, divergences = readout(model, tokens, ran), []
    for _ in range(new_tokens - 1):
        tokens.append(int(logits.argmax()))
        previous = torch.full((VOCAB,), -math.log(VOCAB), dtype=torch.float64)
        for n in range(1, passes + 1):
            logits = readout(model, tokens, ran + [n])
            if n == passes:
                break
            log_p = torch.log_softmax(logits, -1)
            divergences.append(float((previous.exp() * (previous - log_p)).sum()))
            previous = log_p
            if divergences[-1] < threshold:
                break
        ran.append(n)
    return tokens + [int(logits.argmax())], divergences


def test_kl_exit_generate_matches_the_reference(tmp_path):
    model = convert_looped(save_huginn(tmp_path / "huginn", state_init="zero"), num_loops=4)
    prompts = [[5, 17, 3], [60, 2, 9, 41, 8], [33]]
    divergences = [d for p in prompts for d in kl_exit_reference(model, p, 6, 0.0)[1]]
    threshold = float(torch.tensor(divergences).median())  # some tokens leave early, some not
    references = [kl_exit_reference(model, p, 6, threshold)[0] for p in prompts]
    assert references != [kl_exit_reference(model, p, 6, 0.0)[0] for p in prompts]  # exits change tokens
    ids = torch.tensor([[0] * (5 - len(p)) + p for p in prompts])
    mask = (torch.arange(5) >= torch.tensor([5 - len(p) for p in prompts])[:, None]).long()
    out = model.generate(ids, 6, attention_mask=mask, exit_threshold=KLExit(threshold))
    assert [row[5 - len(p):].tolist() for row, p in zip(out, prompts)] == references
    assert repr(resolve_exit_rule(1e-3, model.config)) == "KLExit(0.001)"  # a number: the model's own rule
    engine = DepthBatchingEngine(model, 2, exit_threshold=KLExit(threshold))
    assert engine.generate(prompts, 6) == references
    assert 1 <= engine.stats.mean_exit_loops < engine.stats.num_loops == 4


def test_with_num_loops_shares_the_weights(zero_state):
    """Test-time depth on a loaded model: the same parameters (no copy), the reference at that many passes."""
    ids = inputs()[0]
    deeper = zero_state.with_num_loops(5)
    assert deeper.config.num_layers == PRELUDE + CODA + CORE * 5
    assert zero_state.config.num_layers == PRELUDE + CODA + CORE * STEPS
    for ours, theirs in zip(deeper.parameters(), zero_state.parameters()):
        assert ours.data_ptr() == theirs.data_ptr()
    expected = reference(huginn_tensors(), ids, torch.zeros(*ids.shape, HIDDEN, dtype=torch.float64), steps=5)
    assert max_relative_error(logits(deeper, ids), expected) < TIGHT


def test_sampled_generation_equals_recomputation(zero_state):
    ids = inputs()[0][:2, :6]
    torch.manual_seed(3)
    cached = zero_state.generate(ids, 5, do_sample=True, top_k=20)
    assert torch.equal(cached, sampled_by_recompute(zero_state, ids, 5, seed=3, top_k=20))
