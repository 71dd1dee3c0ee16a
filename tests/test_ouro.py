"""Ouro loaded exactly: tiny checkpoints in Ouro's layout (config.json with ``model_type: ouro`` and its tensor names)
against an independent float64 reference written here from the published math (sandwich norms, ``model.norm`` after
every loop feeding the next, the exit gate and its distribution, the readout, the expected-loss objective)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from recursive import DepthBatchingEngine, RecursiveForCausalLM, convert_hf
from recursive.generation import GateExit
from recursive.generation.exit_rules import resolve_exit_rule
from recursive.looped import convert_looped
from tests.helpers import (
    make_model,
    max_relative_error,
    ref_attention,
    ref_feed_forward,
    ref_rms_norm,
    sampled_by_recompute,
    sub,
)

pytestmark = pytest.mark.usefixtures("one_thread")

VOCAB, HIDDEN, HEADS, KV_HEADS, HEAD_DIM, LAYERS, LOOPS, EPS, THETA = 97, 32, 4, 2, 8, 2, 3, 1e-6, 10000.0
TIGHT = 1e-10


def ouro_tensors(seed: int = 0):
    """Random float64 tensors under Ouro's names (norm gains around 1, gate logits of a few units)."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2, mean=0.0):
        return mean + scale * torch.randn(*shape, generator=generator, dtype=torch.float64)

    tensors = {"model.embed_tokens.weight": rand(VOCAB, HIDDEN, scale=1.0), "model.norm.weight": rand(HIDDEN, mean=1.0),
               "model.early_exit_gate.weight": rand(1, HIDDEN, scale=0.5), "model.early_exit_gate.bias": rand(1),
               "lm_head.weight": rand(VOCAB, HIDDEN)}
    shapes = {"self_attn.q_proj": (HEADS * HEAD_DIM, HIDDEN), "self_attn.k_proj": (KV_HEADS * HEAD_DIM, HIDDEN),
              "self_attn.v_proj": (KV_HEADS * HEAD_DIM, HIDDEN), "self_attn.o_proj": (HIDDEN, HEADS * HEAD_DIM),
              "mlp.gate_proj": (48, HIDDEN), "mlp.up_proj": (48, HIDDEN), "mlp.down_proj": (HIDDEN, 48)}
    for layer in range(LAYERS):
        for name, shape in shapes.items():
            tensors[f"model.layers.{layer}.{name}.weight"] = rand(*shape)
        for norm in ("input_layernorm", "input_layernorm_2", "post_attention_layernorm", "post_attention_layernorm_2"):
            tensors[f"model.layers.{layer}.{norm}.weight"] = rand(HIDDEN, mean=1.0)
    return tensors


def ouro_config(**options):
    values = {"model_type": "ouro", "architectures": ["OuroForCausalLM"], "vocab_size": VOCAB, "hidden_size": HIDDEN,
              "intermediate_size": 48, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
              "num_key_value_heads": KV_HEADS, "head_dim": HEAD_DIM, "hidden_act": "silu", "rms_norm_eps": EPS,
              "rope_theta": THETA, "rope_scaling": None, "tie_word_embeddings": False, "total_ut_steps": LOOPS,
              "early_exit_threshold": 1.0, "use_sliding_window": False, "layer_types": ["full_attention"] * LAYERS}
    values.update(options)
    return values


def save_ouro(folder, tensors=None, **options):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(ouro_config(**options)))
    save_file(ouro_tensors() if tensors is None else tensors, folder / "model.safetensors")
    return folder


def reference(tensors, ids, mask=None, loops=LOOPS):
    """Ouro's forward: every loop's logits (T tensors (B, S, V)) and the gate logits (B, S, T)."""
    B, S = ids.shape
    positions = torch.arange(S).expand(B, S) if mask is None else (mask.cumsum(-1) - 1).clamp(min=0)

    def norm(x, name):
        return ref_rms_norm(x, tensors[name], EPS, False)

    h = tensors["model.embed_tokens.weight"][ids]
    logits, gates = [], []
    for _ in range(loops):
        for layer in range(LAYERS):
            p = sub(tensors, f"model.layers.{layer}.")
            attention = ref_attention(norm(h, f"model.layers.{layer}.input_layernorm.weight"), sub(p, "self_attn."), -1,
                                      heads=HEADS, kv_heads=KV_HEADS, head_dim=HEAD_DIM, positions=positions,
                                      theta=THETA, causal=True, alpha=1.0, key_mask=mask)
            h = h + norm(attention, f"model.layers.{layer}.input_layernorm_2.weight")
            mlp = ref_feed_forward(norm(h, f"model.layers.{layer}.post_attention_layernorm.weight"), sub(p, "mlp."), -1,
                                   "silu", 1.0)
            h = h + norm(mlp, f"model.layers.{layer}.post_attention_layernorm_2.weight")
        h = norm(h, "model.norm.weight")  # after every loop, and the next loop's input
        logits.append(h @ tensors["lm_head.weight"].T)
        gates.append(h @ tensors["model.early_exit_gate.weight"].T + tensors["model.early_exit_gate.bias"])
    return logits, torch.cat(gates, -1)


def reference_distribution(gates):
    """p_t = lambda_t * prod_{s<t} (1 - lambda_s) for t < T - 1; the last loop takes what remains."""
    lam, remaining, p = torch.sigmoid(gates), torch.ones_like(gates[..., 0]), []
    for t in range(gates.shape[-1]):
        p.append(lam[..., t] * remaining if t < gates.shape[-1] - 1 else remaining)
        remaining = remaining * (1 - lam[..., t])
    return torch.stack(p, -1)


def inputs():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, VOCAB, (3, 9), generator=generator)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return ids, mask


@pytest.fixture
def ouro(tmp_path):
    return convert_looped(save_ouro(tmp_path / "ouro"))


@pytest.mark.parametrize("padded", [False, True])
def test_every_loop_and_the_exit_distribution_match_the_reference(ouro, padded):
    ids, mask = inputs()
    mask = mask if padded else None
    expected_logits, gates = reference(ouro_tensors(), ids, mask)
    with torch.no_grad():
        out = ouro.model(ids, attention_mask=mask)
        loop_logits = [ouro.lm_head(h) for h in out.loop_hidden_states]
    assert len(loop_logits) == LOOPS
    for ours, expected in zip(loop_logits, expected_logits):
        assert max_relative_error(ours, expected, mask) < TIGHT
    expected_p = reference_distribution(gates)
    assert max_relative_error(out.exit_probabilities, expected_p, mask) < TIGHT
    assert torch.allclose(out.exit_probabilities.sum(-1), torch.ones(()).double())
    assert max_relative_error(ouro(ids, attention_mask=mask).logits, expected_logits[-1], mask) < TIGHT


@pytest.mark.parametrize("threshold", [0.2, 0.5, 0.9, 1.0])
def test_readout_takes_the_first_loop_past_the_threshold(ouro, threshold):
    ids = inputs()[0]
    expected_logits, gates = reference(ouro_tensors(), ids)
    cumulative = reference_distribution(gates).cumsum(-1)
    with torch.no_grad():
        out = ouro(ids, exit_threshold=threshold)
    for b in range(ids.shape[0]):
        for s in range(ids.shape[1]):
            reached = [t for t in range(LOOPS) if cumulative[b, s, t] >= threshold]
            loop = reached[0] if reached else LOOPS - 1
            assert out.exit_loops[b, s] == loop
            assert max_relative_error(out.logits[b, s], expected_logits[loop][b, s]) < TIGHT
    if threshold == 0.5:  # the tokens do not all read one loop: the test sees the choice
        assert len(out.exit_loops.unique()) > 1


def test_objective_and_gradients_match_the_reference(ouro):
    """Ouro's objective, sum_t p_t CE_t - beta H(p) per token, and every parameter's gradient through it."""
    ids, mask = inputs()
    labels = ids.masked_fill(mask == 0, -100)
    tensors = {name: t.clone().requires_grad_() for name, t in ouro_tensors().items()}
    loop_logits, gates = reference(tensors, ids, mask)
    p = reference_distribution(gates)[:, :-1]
    targets = labels[:, 1:]
    counted = targets != -100
    expected = 0.0
    for b in range(ids.shape[0]):
        for s in range(ids.shape[1] - 1):
            if not counted[b, s]:
                continue
            ce = torch.stack([-torch.log_softmax(logits[b, s], -1)[targets[b, s]] for logits in loop_logits])
            entropy = -(p[b, s] * p[b, s].log()).sum()
            expected = expected + (p[b, s] * ce).sum() - ouro.config.exit_entropy_coef * entropy
    expected = expected / counted.sum()
    expected.backward()
    loss = ouro(ids, attention_mask=mask, labels=labels).loss
    assert abs(loss.item() - expected.item()) < TIGHT * abs(expected.item())
    loss.backward()
    names = {"model.exit_gate.weight": "model.early_exit_gate.weight",
             "model.exit_gate.bias": "model.early_exit_gate.bias"}
    for name, parameter in ouro.named_parameters():
        theirs = names.get(name, name.replace("model.blocks.", "model.layers."))
        assert max_relative_error(parameter.grad, tensors[theirs].grad) < 1e-9, name


def test_cached_generation_equals_recomputation(ouro):
    ids, mask = inputs()
    generated = ouro.generate(ids, 5, attention_mask=mask)
    sequence, full_mask = ids, mask
    for _ in range(5):
        with torch.no_grad():
            token = ouro(sequence, attention_mask=full_mask).logits[:, -1].argmax(-1)
        sequence = torch.cat((sequence, token[:, None]), 1)
        full_mask = torch.cat((full_mask, torch.ones_like(token)[:, None]), 1)
    assert torch.equal(generated, sequence)


def test_round_trip_and_defaults(ouro, tmp_path):
    ids = inputs()[0]
    ouro.save_pretrained(tmp_path / "saved")
    again = RecursiveForCausalLM.from_pretrained(tmp_path / "saved")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, ouro(ids).logits)
    config = ouro.config
    assert (config.num_blocks, config.num_layers, config.block_norms) == (LAYERS, LAYERS * LOOPS, "pre_and_output")
    values = ouro_config()
    del values["total_ut_steps"]  # Ouro's code reads 4 when absent
    folder = tmp_path / "default"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(values))
    save_file(ouro_tensors(), folder / "model.safetensors")
    assert convert_hf(folder).config.num_layers == 4 * LAYERS


@pytest.mark.parametrize("options, message", [
    (dict(use_sliding_window=True), "sliding-window"),
    (dict(layer_types=["full_attention", "sliding_attention"]), "sliding-window"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 4.0}), "rope_scaling"),
    (dict(attention_bias=True), "attention_bias"),
])
def test_unsupported_configs_are_named(tmp_path, options, message):
    with pytest.raises(ValueError, match="model_or_path") as error:
        convert_looped(save_ouro(tmp_path / "ouro", **options))
    assert message in str(error.value)


def test_missing_and_unknown_tensors_are_named(tmp_path):
    tensors = ouro_tensors()
    del tensors["model.early_exit_gate.bias"]
    with pytest.raises(ValueError, match="no tensor model.early_exit_gate.bias"):
        convert_looped(save_ouro(tmp_path / "a", tensors))
    tensors = ouro_tensors()
    tensors["model.layers.0.self_attn.q_norm.weight"] = torch.ones(HEAD_DIM, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not know: \\['model.layers.0.self_attn.q_norm.weight'\\]"):
        convert_looped(save_ouro(tmp_path / "b", tensors))


def test_exit_threshold_needs_the_gate(ouro):
    with pytest.raises(ValueError, match="exit_threshold"):
        make_model()(inputs()[0], exit_threshold=0.5)
    for bad in (0.0, 1.5, float("nan")):
        with pytest.raises(ValueError, match="exit_threshold"):
            ouro(inputs()[0], exit_threshold=bad)


# Serving with Ouro's own exit rule.


def test_the_gate_rule_decides_as_the_readout(ouro):
    """A decoded token leaves at the first loop whose cumulative exit probability reaches the threshold (min_loops=1):
    its logits are the full forward's readout there (the prompt and the token ran at full depth before it)."""
    ids = inputs()[0]
    first = ouro.generate(ids, 1)
    for threshold in (0.3, 0.6):
        with torch.no_grad():
            readout = ouro(first, exit_threshold=threshold)
        two = ouro.generate(ids, 2, exit_threshold=GateExit(threshold, min_loops=1))
        assert torch.equal(two[:, -1], readout.logits[:, -1].argmax(-1))
        if threshold == 0.3:  # the rows leave at different loops: the test sees where
            assert len(readout.exit_loops[:, -1].unique()) > 1


def test_the_engine_serves_ouro_with_its_gate(ouro):
    ids, mask = inputs()
    prompts = [row[m.bool()].tolist() for row, m in zip(ids, mask)]
    rule = GateExit(0.6, min_loops=1)
    expected = [ouro.generate(torch.tensor([p]), 6, exit_threshold=rule)[0].tolist() for p in prompts]
    engine = DepthBatchingEngine(ouro, max_batch_size=2, exit_threshold=rule)
    assert engine.generate(prompts, 6) == expected
    assert 1 <= engine.stats.mean_exit_loops < LOOPS  # some tokens left early
    full = [ouro.generate(torch.tensor([p]), 6)[0].tolist() for p in prompts]
    never = GateExit(0.6, min_loops=LOOPS)  # no boundary comes after LOOPS loops: nobody leaves
    assert DepthBatchingEngine(ouro, 2, exit_threshold=never).generate(prompts, 6) == full


def test_a_threshold_picks_the_models_own_rule(ouro):
    assert repr(resolve_exit_rule(0.7, ouro.config)) == "GateExit(0.7, min_loops=2)"
    assert repr(resolve_exit_rule(0.7, make_model().config)) == "ConfidenceExit(0.7)"
    with pytest.raises(ValueError, match="exit_threshold: GateExit reads Ouro's exit gate"):
        resolve_exit_rule(GateExit(0.7), make_model().config)
    with pytest.raises(ValueError, match="min_loops"):
        GateExit(0.5, min_loops=0)


def test_more_loops_on_a_loaded_model(ouro):
    ids = inputs()[0]
    deeper = ouro.with_num_loops(LOOPS + 2)
    expected_logits, gates = reference(ouro_tensors(), ids, loops=LOOPS + 2)
    with torch.no_grad():
        out = deeper.model(ids)
    assert max_relative_error(deeper.lm_head(out.last_hidden_state), expected_logits[-1]) < TIGHT
    assert max_relative_error(out.exit_probabilities, reference_distribution(gates)) < TIGHT
    with pytest.raises(ValueError, match="num_loops"):
        make_model(relaxation="depth_lora").with_num_loops(3)


def test_sampled_generation_equals_recomputation(ouro):
    ids = inputs()[0][:2, :6]
    torch.manual_seed(3)
    cached = ouro.generate(ids, 5, do_sample=True, top_k=20)
    assert torch.equal(cached, sampled_by_recompute(ouro, ids, 5, seed=3, top_k=20))
