"""Hierarchical recurrence (HRM-LM) and Mixture-of-Recursions against plain unrolled references.

Each reference runs the data flow of ``recursive.config``'s docstring step by step, with an untied copy of
its block's parameters per effective layer (Mixture-of-Recursions: one sequence at a time, on exactly the
tokens the routing keeps); outputs and losses must agree, and every shared parameter's gradient must equal
the sum of its copies'. Decoding (the recursion-wise cache, ``generate``, the depth-batching engine) must
equal the full forward, or ``generate`` one request at a time. Float64, seeded, tiny sizes (float32 where
the fused backends run).
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

from recursive import DepthBatchingEngine, RecursiveEncoder
from recursive.cache import LayerKV, RecursionKV
from recursive.generation.exit_rules import RouterExit
from recursive_kernels import backends
from recursive_kernels.backends import BACKENDS
from tests.helpers import (
    HIERARCHICAL,
    MIXTURE_OF_RECURSIONS,
    TOL,
    VOCAB,
    assert_every_request_completes,
    check_against_reference,
    copies,
    make_model,
    ref_block,
    ref_feed_forward,
    ref_linear,
    ref_rms_norm,
    ref_rope,
    sub,
    synchronisations_per_step,
    tiny_config,
)


def lm_loss(model, top, hidden: Tensor, labels: Tensor) -> Tuple[Tensor, Tensor]:
    config = model.config
    hidden = ref_rms_norm(hidden, top["model.norm.weight"], config.rms_norm_eps, config.norm_unit_offset)
    logits = hidden @ (top["model.embed_tokens.weight"] if config.tie_word_embeddings else top["lm_head.weight"]).T
    return logits, F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), labels[:, 1:].reshape(-1), ignore_index=-100)


# Hierarchical recurrence (HRM-LM).


def ref_hierarchical(model, input_ids: Tensor, attention_mask: Optional[Tensor], one_step: bool):
    """``z_L <- f_L(z_L + z_H + x)`` hrm_period times, then ``z_H <- f_H(z_H + z_L)``, per cycle."""
    config = model.config
    top, layers = copies(model)
    x = top["model.embed_tokens.weight"][input_ids] * config.embed_scale
    B, S = input_ids.shape
    positions = torch.arange(S).expand(B, S) if attention_mask is None else (attention_mask.cumsum(-1) - 1).clamp(min=0)
    module = config.num_blocks // 2
    layer = 0

    def module_pass(h: Tensor) -> Tensor:
        nonlocal layer
        for _ in range(module):
            _, params, adapter = layers[layer]
            with torch.set_grad_enabled(not one_step or layer >= config.num_layers - 2 * module):
                h = ref_block(h, params, adapter, config, positions, True, attention_mask)[0]
            layer += 1
        return h

    fast = slow = torch.zeros_like(x)
    for _ in range(config.num_layers // config.hrm_cycle_length):
        for _ in range(config.hrm_period):
            fast = module_pass(fast + slow + x)
        slow = module_pass(slow + fast)
    assert layer == config.num_layers
    return slow, top, layers


@pytest.mark.parametrize("variant", list(HIERARCHICAL))
@pytest.mark.parametrize("padded", [False, True])
def test_hierarchical_matches_unrolled_reference(variant, padded):
    model = make_model(seed=21, **HIERARCHICAL[variant])
    torch.manual_seed(22)
    input_ids = torch.randint(0, VOCAB, (2, 7))
    attention_mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 0, 0]]) if padded else None
    labels = input_ids if attention_mask is None else input_ids.masked_fill(attention_mask == 0, -100)
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    hidden, top, layers = ref_hierarchical(model, input_ids, attention_mask, model.config.hrm_one_step_gradient)
    logits, loss = lm_loss(model, top, hidden, labels)
    check_against_reference(model, out, logits, loss, top, layers,
                            None if attention_mask is None else attention_mask.bool())


def test_one_step_gradient_reaches_only_the_last_two_modules():
    full, one_step = (make_model(seed=23, **dict(HIERARCHICAL["two_blocks"], hrm_one_step_gradient=flag))
                      for flag in (False, True))
    input_ids = torch.randint(0, VOCAB, (2, 5))
    for model in (full, one_step):
        model(input_ids, labels=input_ids).loss.backward()
    torch.testing.assert_close(one_step(input_ids).logits, full(input_ids).logits, **TOL)  # the forward is the same
    fast, slow = one_step.model.blocks  # the last fast and slow steps are layers 4 and 5 of 6
    for a, b in zip(fast.parameters(), full.model.blocks[0].parameters()):
        assert a.grad is not None and not torch.allclose(a.grad, b.grad)
    with torch.no_grad():
        assert not one_step(input_ids).logits.requires_grad


def test_hierarchical_cache_and_generate_equal_recompute():
    model = make_model(seed=24, **HIERARCHICAL["modules_of_two"]).eval()
    torch.manual_seed(25)
    input_ids = torch.randint(0, VOCAB, (2, 8))
    with torch.no_grad():
        full = model(input_ids).logits
        out = model(input_ids[:, :5], use_cache=True)
        pieces = [out.logits]
        for t in range(5, 8):
            out = model(input_ids[:, t:t + 1], past_key_values=out.past_key_values, use_cache=True)
            pieces.append(out.logits)
        torch.testing.assert_close(torch.cat(pieces, 1), full, **TOL)

        prompts = torch.randint(0, VOCAB, (2, 4))
        mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
        generated = model.generate(prompts, 5, attention_mask=mask)
        for row in range(2):
            sequence = prompts[row, 4 - int(mask[row].sum()):][None]
            for _ in range(5):
                sequence = torch.cat((sequence, model(sequence).logits[:, -1].argmax(-1, keepdim=True)), 1)
            assert torch.equal(generated[row, 4:], sequence[0, -5:])


# Mixture-of-Recursions.


def ref_block_over_shared_keys(h: Tensor, params: Dict[str, Tensor], adapter: int, config, positions: Tensor,
                               first: Tuple[Tensor, Dict[str, Tensor], int, Tensor], causal: bool) -> Tensor:
    """A block whose attention takes its keys and values from ``first`` = (the first recursion's input
    (1, n0, hidden) to the same layer, that layer's parameters and adapter, its positions (1, n0)), causal
    by position or not. h (1, n, hidden), positions (1, n)."""
    norm = {"eps": config.rms_norm_eps, "unit_offset": config.norm_unit_offset}
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    D, alpha = config.head_dim, config.lora_alpha
    h0, params0, adapter0, positions0 = first
    x = ref_rms_norm(h, params["input_layernorm.weight"], **norm)
    x0 = ref_rms_norm(h0, params0["input_layernorm.weight"], **norm)
    attn0 = sub(params0, "self_attn.")
    n, n0 = h.shape[1], h0.shape[1]
    q = ref_rope(ref_linear(x, sub(params, "self_attn."), "q_proj", adapter, alpha).view(1, n, heads, D), positions,
                 config.rope_theta).transpose(1, 2)
    k = ref_rope(ref_linear(x0, attn0, "k_proj", adapter0, alpha).view(1, n0, kv_heads, D), positions0,
                 config.rope_theta)
    v = ref_linear(x0, attn0, "v_proj", adapter0, alpha).view(1, n0, kv_heads, D)
    group = heads // kv_heads
    k, v = k.transpose(1, 2).repeat_interleave(group, 1), v.transpose(1, 2).repeat_interleave(group, 1)
    allowed = positions0[0][None, :] <= positions[0][:, None] if causal else torch.ones(n, n0, dtype=torch.bool)
    probs = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(D)).masked_fill(~allowed, float("-inf")), -1)
    out = (probs @ v).transpose(1, 2).reshape(1, n, heads * D)
    h = h + ref_linear(out, sub(params, "self_attn."), "o_proj", adapter, alpha)
    x = ref_rms_norm(h, params["post_attention_layernorm.weight"], **norm)
    return h + ref_feed_forward(x, sub(params, "mlp."), adapter, config.hidden_act, alpha)


def ref_mixture_of_recursions(model, input_ids: Tensor, attention_mask: Tensor, causal: bool = True):
    """Routing and recursions one sequence at a time; returns the hidden states, the weighted router
    losses, the depths and the copies."""
    config = model.config
    top, layers = copies(model)
    h = top["model.embed_tokens.weight"][input_ids] * config.embed_scale
    B, S = input_ids.shape
    positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)

    def run(layer: int, h: Tensor, positions: Tensor, key_mask: Optional[Tensor]) -> Tensor:
        _, params, adapter = layers[layer]
        return ref_block(h, params, adapter, config, positions, causal, key_mask)[0]

    before, recursions, after = config.recursions()
    for layer in before:
        h = run(layer, h, positions, attention_mask)
    router, alpha, N = top["model.mor_router.weight"], config.mor_router_alpha, len(recursions)
    real = [attention_mask[b].nonzero().flatten().tolist() for b in range(B)]
    active = real
    depths = torch.zeros(B, S, dtype=torch.int64)
    z_terms, router_terms = [], []
    extra = 0.0
    if config.mor_routing == "token_choice":
        logits = h @ router.T
        probs = logits.softmax(-1)
        chosen = probs.argmax(-1)
        real_mask = attention_mask.bool()
        used = torch.stack([(chosen[real_mask] == i).double().mean() for i in range(N)])
        extra = config.mor_balance_loss_coef * N * (used * probs[real_mask].mean(0)).sum()
        z_terms.append(logits[real_mask].logsumexp(-1).square().mean())
        gates = alpha * probs.gather(-1, chosen[..., None]).squeeze(-1)
    first: List[List[Tuple[Tensor, Dict[str, Tensor], int, Tensor]]] = [[] for _ in range(B)]  # KV sharing
    for r, recursion_layers in enumerate(recursions):
        if config.mor_routing == "expert_choice":
            logits = h @ router[r]
            scored = [torch.tensor(active[b], dtype=torch.long) for b in range(B)]
            z_terms.append(torch.cat([logits[b, scored[b]] for b in range(B)]).square().mean())
            capacity = config.mor_capacities[r]
            if capacity < 1.0 and config.mor_threshold_routing:
                active = [[t for t in active[b] if logits[b, t].sigmoid() >= 0.5] for b in range(B)]
            elif capacity < 1.0:
                kept = [max(1, math.ceil(capacity * len(real[b]) - 1e-9)) for b in range(B)]
                active = [sorted(sorted(active[b], key=lambda t: -logits[b, t].item())[:kept[b]]) for b in range(B)]
            targets = torch.cat([torch.tensor([float(t in active[b]) for t in scored[b].tolist()], dtype=h.dtype)
                                 for b in range(B)])
            router_terms.append(F.binary_cross_entropy(torch.cat([logits[b, scored[b]] for b in range(B)]).sigmoid(),
                                                       targets))
            gates = alpha * logits.sigmoid()
        else:
            active = [[t for t in real[b] if chosen[b, t] >= r] for b in range(B)]
        rows = []
        for b in range(B):
            if not active[b]:
                rows.append(h[b])
                continue
            index = torch.tensor(active[b])
            chosen_rows = h[b, index][None]
            out = chosen_rows
            for j, layer in enumerate(recursion_layers):
                if config.mor_kv_sharing and r > 0:
                    _, params, adapter = layers[layer]
                    out = ref_block_over_shared_keys(out, params, adapter, config, positions[b, index][None],
                                                     first[b][j], causal)
                    continue
                if config.mor_kv_sharing:
                    first[b].append((out, layers[layer][1], layers[layer][2], positions[b, index][None]))
                out = run(layer, out, positions[b, index][None], None)
            g = gates[b, index][None, :, None]
            gated = (torch.ones_like(g, dtype=torch.bool) if config.mor_routing == "expert_choice"
                     else (chosen[b, index] == r)[None, :, None])
            new = torch.where(gated, chosen_rows + g * (out - chosen_rows), out)
            rows.append(h[b].index_put((index,), new[0]))
            depths[b, index] += 1
        h = torch.stack(rows)
    for layer in after:
        h = run(layer, h, positions, attention_mask)
    if router_terms:
        extra = extra + config.mor_router_loss_coef * torch.stack(router_terms).mean()
    return h, config.mor_z_loss_coef * torch.stack(z_terms).mean() + extra, depths, top, layers


@pytest.mark.parametrize("variant", list(MIXTURE_OF_RECURSIONS))
def test_mixture_of_recursions_matches_reference(variant):
    model = make_model(seed=31, **MIXTURE_OF_RECURSIONS[variant])
    torch.manual_seed(32)
    input_ids = torch.randint(0, VOCAB, (3, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[0, :3] = 0  # left padding
    attention_mask[2, 6:] = 0  # right padding
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    out = model(input_ids, attention_mask=attention_mask, labels=labels)
    out.loss.backward()
    hidden, router_loss, depths, top, layers = ref_mixture_of_recursions(model, input_ids, attention_mask)
    logits, loss = lm_loss(model, top, hidden, labels)
    torch.testing.assert_close(out.recursion_loss, router_loss, **TOL)
    assert torch.equal(out.recursion_depths, depths)
    assert len(set(depths[attention_mask.bool()].tolist())) > 1  # the routing did split the tokens
    check_against_reference(model, out, logits, loss + router_loss, top, layers, attention_mask.bool())
    assert model.model.mor_router.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("variant", ["expert_cycle", "token_kv_sharing"])
def test_encoder_mixture_of_recursions_matches_reference(variant):
    """Bidirectional: each recursion's tokens see each other (or the first recursion's) in both directions."""
    model = make_model(RecursiveEncoder, seed=38, hidden_act="gelu", **MIXTURE_OF_RECURSIONS[variant])
    input_ids = torch.randint(0, VOCAB, (2, 8))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 5:] = 0
    out = model(input_ids, attention_mask=attention_mask)
    hidden, router_loss, depths, top, _ = ref_mixture_of_recursions(model, input_ids, attention_mask, causal=False)
    config = model.config
    hidden = ref_rms_norm(hidden, top["model.norm.weight"], config.rms_norm_eps, config.norm_unit_offset)
    real = attention_mask.bool()
    torch.testing.assert_close(out.last_hidden_state[real], hidden[real], **TOL)
    torch.testing.assert_close(out.recursion_loss, router_loss, **TOL)
    assert torch.equal(out.recursion_depths, depths)


def test_expert_choice_keeps_its_capacities():
    model = make_model(seed=33, mor_routing="expert_choice", num_layers=8, num_blocks=2,
                       mor_capacities=(1.0, 0.5, 0.5, 0.2))
    lengths = [10, 7, 1]
    input_ids = torch.randint(0, VOCAB, (3, 10))
    attention_mask = (torch.arange(10) < torch.tensor(lengths)[:, None]).long()
    depths = model(input_ids, attention_mask=attention_mask).recursion_depths
    for row, n in enumerate(lengths):
        for r, capacity in enumerate(model.config.mor_capacities):
            assert int((depths[row] > r).sum()) == max(1, math.ceil(capacity * n))
        assert not depths[row, n:].any()


CAUSAL_ROUTING = ["token_cycle", "token_kv_sharing", "expert_threshold", "expert_threshold_kv_sharing"]


def left_padded_inputs() -> Tuple[Tensor, Tensor]:
    """Seeded (2, 9) token ids and their attention mask, the second row left-padded by 2."""
    torch.manual_seed(37)
    input_ids = torch.randint(0, VOCAB, (2, 9))
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, :2] = 0
    return input_ids, attention_mask


def generated_alone(model, prompt: List[int], count: int, eos: int) -> List[int]:
    """``prompt`` and ``model.generate``'s greedy tokens for it alone: ``count`` of them, or up to and
    including the first ``eos``."""
    if not count:
        return prompt
    expected = model.generate(torch.tensor([prompt]), count, eos_token_id=eos)[0].tolist()
    if eos in expected[len(prompt):]:
        expected = expected[:expected.index(eos, len(prompt)) + 1]
    return expected


def decode_in_pieces(model, input_ids: Tensor, attention_mask: Tensor, stops=(5, 7, 8, 9)):
    """Logits of a prefill up to ``stops[0]`` and then cached steps up to each stop; the last output."""
    out = model(input_ids[:, :stops[0]], attention_mask=attention_mask[:, :stops[0]], use_cache=True)
    pieces = [out.logits]
    for start, stop in zip(stops, stops[1:]):
        out = model(input_ids[:, start:stop], attention_mask=attention_mask[:, :stop],
                    past_key_values=out.past_key_values, use_cache=True)
        pieces.append(out.logits)
    return torch.cat(pieces, 1), out


@pytest.mark.parametrize("variant", CAUSAL_ROUTING)
def test_causal_routing_decodes_with_a_recursion_wise_cache(variant):
    """Each recursion's layers cache exactly the tokens that ran it (with KV sharing the later ones
    none: they read the first's), and cached decoding equals the full forward."""
    model = make_model(seed=36, **MIXTURE_OF_RECURSIONS[variant]).eval()
    config = model.config
    assert config.kv_cacheable
    input_ids, attention_mask = left_padded_inputs()
    real = attention_mask.bool()
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask)
        assert len(set(full.recursion_depths[real].tolist())) > 1
        logits, out = decode_in_pieces(model, input_ids, attention_mask)
    torch.testing.assert_close(logits[real], full.logits[real], **TOL)
    before, recursions, after = config.recursions()
    for layer in before + after:
        assert isinstance(out.past_key_values[layer], LayerKV) and out.past_key_values[layer].key.shape[1] == 9
    for r, layers in enumerate(recursions):
        for layer in layers:
            cache = out.past_key_values[layer]
            if config.mor_kv_sharing and r > 0:
                assert cache is None
                continue
            assert isinstance(cache, RecursionKV) and cache.length == 9
            key = cache.key_value.key
            assert tuple(cache.token_mask.shape) == (key.shape[0], key.shape[1])
            assert torch.equal(cache.token_mask.sum(1), (full.recursion_depths > r).sum(1))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["token_cycle", "expert_threshold_kv_sharing"])
def test_recursion_wise_cache_on_every_backend(backend, variant):
    """The fused kernels serve the cache's layout too (holes, fewer queries than keys, rows without a
    query): float32 cached decoding equals the same backend's full forward."""
    cpu = torch.device("cpu")
    why = backends.reasons("circuit_attention", backend, cpu, dtype=torch.float32, head_dim=8) + backends.reasons(
        "lowrank_linear", backend, cpu, dtype=torch.float32)
    if why:
        pytest.skip("; ".join(dict.fromkeys(why)))
    model = make_model(seed=36, backend=backend, **MIXTURE_OF_RECURSIONS[variant]).float().eval()
    input_ids, attention_mask = left_padded_inputs()
    real = attention_mask.bool()
    with torch.no_grad():
        full = model(input_ids, attention_mask=attention_mask).logits
        logits, _ = decode_in_pieces(model, input_ids, attention_mask)
    torch.testing.assert_close(logits[real], full[real])


def test_recursion_wise_cache_of_recursions_no_token_reaches():
    """A router that sends every token to depth 1 (all logits equal: argmax picks recursion 0) leaves
    the later recursions' caches empty, from the prefill on."""
    model = make_model(seed=39, **MIXTURE_OF_RECURSIONS["token_cycle"]).eval()
    with torch.no_grad():
        model.model.mor_router.weight.zero_()
        input_ids = torch.randint(0, VOCAB, (2, 9))
        attention_mask = torch.ones_like(input_ids)
        full = model(input_ids, attention_mask=attention_mask)
        logits, out = decode_in_pieces(model, input_ids, attention_mask)
    assert torch.equal(full.recursion_depths, torch.ones_like(input_ids))
    torch.testing.assert_close(logits, full.logits, **TOL)
    assert [cache.key_value.key.shape[1] for cache in out.past_key_values] == [9, 0, 0]
    with pytest.raises(ValueError, match="past_key_values: entry 1 must be RecursionKV"):
        model(input_ids[:, :1], past_key_values=(out.past_key_values[0],) + (out.past_key_values[0].key_value,) * 2)


@pytest.mark.parametrize("variant", CAUSAL_ROUTING + ["expert_kv_sharing"])
def test_mixture_of_recursions_generates_like_recomputing(variant):
    model = make_model(seed=34, **MIXTURE_OF_RECURSIONS[variant]).eval()
    prompts = torch.randint(0, VOCAB, (2, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]])
    generated = model.generate(prompts, 4, attention_mask=mask)
    with torch.no_grad():
        for row in range(2):
            sequence = prompts[row, 5 - int(mask[row].sum()):][None]
            for _ in range(4):
                sequence = torch.cat((sequence, model(sequence).logits[:, -1].argmax(-1, keepdim=True)), 1)
            assert torch.equal(generated[row, 5:], sequence[0, -4:])
    input_ids = prompts[:, :3]
    rejected = [(dict(output_hidden_states=True), "output_hidden_states")]
    if not model.config.kv_cacheable:
        rejected.append((dict(use_cache=True), "use_cache"))
    for kwargs, name in rejected:
        with pytest.raises(ValueError, match=name):
            model(input_ids, **kwargs)


@pytest.mark.parametrize("variant", CAUSAL_ROUTING + ["hierarchical"])
def test_depth_batching_engine_serves_other_data_flows(variant):
    """Mixture-of-Recursions with causal routing: rows at different recursions share each step (the
    layers before and after the recursions run on the rows that start and finish). HRM: the whole stack
    per step. Every request's output equals generate on it alone."""
    options = HIERARCHICAL["modules_of_two"] if variant == "hierarchical" else MIXTURE_OF_RECURSIONS[variant]
    model = make_model(seed=40, **options).eval()
    generator = torch.Generator().manual_seed(41)
    lengths = torch.randint(1, 9, (10,), generator=generator).tolist()
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    counts = torch.randint(0, 8, (10,), generator=generator).tolist()
    eos = 5
    engine = DepthBatchingEngine(model, 3)
    outputs = engine.generate(prompts, counts, eos_token_id=eos)
    for prompt, count, output in zip(prompts, counts, outputs):
        assert output == generated_alone(model, prompt, count, eos)
    stats = engine.stats
    assert engine.generate(prompts, counts, eos_token_id=eos, do_sample=True, top_k=1) == outputs
    assert stats.decoded_tokens > 10
    if variant == "hierarchical":
        assert stats.num_loops == 1 and stats.mean_exit_loops == 1.0
        return
    assert stats.num_loops == len(model.config.recursions()[1])
    # token choice runs at least one recursion; threshold routing may keep a token out of all of them
    assert (1.0 if variant.startswith("token") else 0.0) <= stats.mean_exit_loops < stats.num_loops


def test_recursion_engine_prefills_a_prefix_lms_prompts_with_their_span():
    """A Mixture-of-Recursions run prefills its prompts by a forward of the model: a prompt's bidirectional span
    (token_type_ids) goes into that forward, and the outputs equal generate's with the same types."""
    model = make_model(**MIXTURE_OF_RECURSIONS["token_kv_sharing"], prefix_lm=True).eval()
    ids = torch.randint(0, VOCAB, (1, 9), generator=torch.Generator().manual_seed(0))
    types = torch.zeros_like(ids)
    types[:, 1:6] = 1
    expected = model.generate(ids, 6, token_type_ids=types)[0].tolist()
    assert expected != model.generate(ids, 6)[0].tolist(), "the span changes the greedy tokens here"
    outputs = DepthBatchingEngine(model, 2).generate([ids[0].tolist(), ids[0, :5].tolist()], 6,
                                                     token_type_ids=[types[0].tolist(), None])
    assert outputs == [expected, model.generate(ids[:, :5], 6)[0].tolist()]


@pytest.mark.parametrize("variant", ["token_kv_sharing", "expert_threshold"])
def test_recursion_engine_many_random_requests_all_complete(variant):
    """150 requests of random lengths through 16 slots: every one completes with its count (or
    at eos), the counts add up, and a sample equals generate on it alone."""
    model = make_model(seed=44, **MIXTURE_OF_RECURSIONS[variant]).eval()
    generator = torch.Generator().manual_seed(45)
    lengths = torch.randint(1, 13, (150,), generator=generator).tolist()
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]
    counts = torch.randint(0, 9, (150,), generator=generator).tolist()
    eos = 5
    engine = DepthBatchingEngine(model, max_batch_size=16)
    outputs = engine.generate(prompts, counts, eos_token_id=eos)
    assert_every_request_completes(engine, outputs, prompts, counts, eos)
    for i in range(0, 150, 10):
        assert outputs[i] == generated_alone(model, prompts[i], counts[i], eos)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="host synchronisations are a CUDA matter")
@pytest.mark.parametrize("variant", ["token_kv_sharing", "expert_threshold"])
def test_recursion_engine_step_synchronises_at_most_twice(variant, monkeypatch):
    """A Mixture-of-Recursions engine step reads back which rows ran and go on, then (only when some
    finish) their tokens: at most two synchronising CUDA calls per step."""
    from recursive.generation.recursion_run import RecursionEngineRun

    model = make_model(seed=42, **MIXTURE_OF_RECURSIONS[variant]).float().cuda().eval()
    generator = torch.Generator().manual_seed(43)
    prompts = [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in range(1, 13)]
    counts = synchronisations_per_step(DepthBatchingEngine(model, max_batch_size=4), RecursionEngineRun, prompts,
                                       monkeypatch)
    assert counts and max(counts) <= 2, counts


@pytest.mark.parametrize("options", [HIERARCHICAL["two_blocks"], MIXTURE_OF_RECURSIONS["expert_cycle"],
                                     MIXTURE_OF_RECURSIONS["token_cycle"]])
def test_early_exit_and_depth_batching_reject_other_data_flows(options):
    model = make_model(seed=35, **options)
    if options.get("mor_routing") == "expert_choice":  # top-k routing looks at the whole sequence
        with pytest.raises(ValueError, match="model: .*top-k expert choice"):
            DepthBatchingEngine(model, 2)
    else:  # the engine serves the others, without early exit
        with pytest.raises(ValueError, match="exit_threshold: early exit steps through a plain stack"):
            DepthBatchingEngine(model, 2, exit_threshold=0.5)
    with pytest.raises(ValueError, match="exit_threshold"):
        model.generate(torch.randint(0, VOCAB, (1, 3)), 2, exit_threshold=0.5)


def test_recursion_plans():
    assert tiny_config(num_layers=6, num_blocks=2).recursions() == ([], [[0, 1], [2, 3], [4, 5]], [])
    assert tiny_config(sharing="middle_cycle", num_layers=6, num_blocks=4).recursions() == ([0], [[1, 2], [3, 4]], [5])
    assert tiny_config(sharing="sequence", num_layers=3, num_blocks=1).recursions() == ([], [[0], [1], [2]], [])
    assert tiny_config(sharing="sequence", num_layers=4, num_blocks=2).recursions() == ([], [[0, 1, 2, 3]], [])
    assert tiny_config(mor_routing="expert_choice", num_layers=6, num_blocks=2).mor_capacities == (1.0, 2 / 3, 1 / 3)


@pytest.mark.parametrize("bad, field", [
    (dict(sharing="hierarchical", num_layers=6, num_blocks=3), "num_blocks"),
    (dict(sharing="hierarchical", num_layers=4, num_blocks=2), "num_blocks"),  # not a multiple of the cycle of 3
    (dict(sharing="hierarchical", num_layers=6, num_blocks=2, hrm_period=0), "hrm_period"),
    (dict(hrm_one_step_gradient=1), "hrm_one_step_gradient"),
    (dict(mor_routing="top_k"), "mor_routing"),
    (dict(mor_routing="expert_choice", sharing="sequence"), "mor_routing"),
    (dict(mor_routing="token_choice", sharing="hierarchical", num_layers=6), "mor_routing"),
    (dict(mor_routing="expert_choice", mor_capacities=(1.0,)), "mor_capacities"),
    (dict(mor_routing="expert_choice", mor_capacities=(0.5, 1.0)), "mor_capacities"),
    (dict(mor_routing="expert_choice", mor_capacities=(1.0, 0.0)), "mor_capacities"),
    (dict(mor_routing="token_choice", mor_capacities=(1.0, 0.5)), "mor_capacities"),
    (dict(mor_capacities=(1.0, 0.5)), "mor_capacities"),
    (dict(mor_routing="expert_choice", mor_router_alpha=-1.0), "mor_router_alpha"),
    (dict(mor_routing="token_choice", mor_z_loss_coef=float("nan")), "mor_z_loss_coef"),
    (dict(mor_routing="token_choice", mor_kv_sharing=1), "mor_kv_sharing"),
    (dict(mor_kv_sharing=True), "mor_kv_sharing"),
    (dict(mor_routing="token_choice", mor_kv_sharing=True, relaxation="circuit"), "mor_kv_sharing"),
    (dict(mor_routing="token_choice", mor_threshold_routing=True), "mor_threshold_routing"),
    (dict(mor_threshold_routing=True), "mor_threshold_routing"),
    (dict(mor_routing="expert_choice", mor_router_loss_coef=-0.1), "mor_router_loss_coef"),
])
def test_config_rejects_bad_recurrence_values(bad, field):
    with pytest.raises(ValueError, match=field):
        tiny_config(**bad)


def test_causal_routing_is_the_engines_exit_rule():
    """The engine's recursion run follows the routing as an ExitRule (its decisions are checked against the
    forward's by the engine tests above); it serves causal routing only."""
    config = make_model(**MIXTURE_OF_RECURSIONS["token_cycle"]).config
    assert repr(RouterExit(config, "cpu")) == "RouterExit(token_choice)"
    with pytest.raises(ValueError, match="exit_threshold: RouterExit"):
        RouterExit(config, "cpu").check(make_model().config)
