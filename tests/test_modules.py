"""``recursive.nn``: every module against plain-PyTorch references written from the math (no kernels).

The references (``ref_*``) live in ``tests/helpers.py``, shared with the tests that unroll whole models on
them. Float64, seeded, tiny sizes.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from recursive import RecursiveConfig
from recursive.cache import LayerKV, VarlenPacking
from recursive.nn import (
    CircuitAttention,
    GatedFeedForward,
    LowRankLinear,
    MoLFeedForward,
    RecursiveBlock,
    RMSNorm,
    rotary_embedding,
)
from tests.helpers import (
    DTYPE,
    TOL,
    randomize_,
    ref_activation,
    ref_attention,
    ref_feed_forward,
    ref_mixture,
    ref_rms_norm,
    ref_rope,
)


def positions_of(batch: int, length: int) -> Tensor:
    return torch.arange(length).expand(batch, length)


# LowRankLinear.

def peft_lora(x, weight, bias, lora_a, lora_b, scaling):
    """PEFT's ``lora.Linear.forward``: ``base(x) + lora_B(lora_A(x)) * scaling``."""
    return F.linear(x, weight, bias) + (x @ lora_a.T @ lora_b.T) * scaling


@pytest.mark.parametrize("form", ["none", "int", "per-row", "top-k"])
def test_lowrank_linear_equals_peft(form):
    torch.manual_seed(0)
    E = 1 if form == "none" else 4
    layer = randomize_(LowRankLinear(12, 10, num_adapters=E, rank=3, alpha=6.0, dtype=DTYPE))
    x = torch.randn(2, 5, 12, dtype=DTYPE, requires_grad=True)
    gates = None
    if form == "none":
        indices, per_row = None, torch.zeros(2, 5, 1, dtype=torch.long)
    elif form == "int":
        indices, per_row = 2, torch.full((2, 5, 1), 2)
    elif form == "per-row":
        indices = torch.randint(-1, E, (2, 5))
        per_row = indices[..., None]
    else:
        indices = torch.stack([torch.randperm(E)[:2] for _ in range(10)]).view(2, 5, 2)
        indices[0, 0, 1] = -1
        gates = torch.rand(2, 5, 2, dtype=DTYPE, requires_grad=True)
        per_row = indices
    y = layer(x, indices, gates)
    assert layer.scaling == 2.0

    expected = F.linear(x, layer.weight, layer.bias)
    for j in range(per_row.shape[-1]):
        e = per_row[..., j]
        g = torch.ones(e.shape, dtype=DTYPE) if gates is None else gates[..., j]
        for adapter in range(E):
            rows = ((e == adapter).to(DTYPE) * g)[..., None]
            delta = peft_lora(x, layer.weight, layer.bias, layer.lora_a[adapter], layer.lora_b[adapter], layer.scaling)
            expected = expected + rows * (delta - F.linear(x, layer.weight, layer.bias))
    torch.testing.assert_close(y, expected, **TOL)

    grad = torch.randn_like(y)
    inputs = [x, layer.weight, layer.bias, layer.lora_a, layer.lora_b] + ([gates] if gates is not None else [])
    got = torch.autograd.grad(y, inputs, grad)
    want = torch.autograd.grad(expected, inputs, grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_lowrank_linear_init_like_peft_and_seeded():
    torch.manual_seed(1)
    a = LowRankLinear(16, 8, num_adapters=3, rank=4)
    torch.manual_seed(1)
    b = LowRankLinear(16, 8, num_adapters=3, rank=4)
    for name, p in a.named_parameters():
        assert torch.equal(p, dict(b.named_parameters())[name])
    assert torch.count_nonzero(a.lora_b) == 0
    assert a.lora_a.abs().max() <= 1 / math.sqrt(16)  # Kaiming-uniform with a = sqrt(5): bound 1/sqrt(fan_in)
    assert a.lora_a.std() > 0.5 / math.sqrt(3 * 16)
    x = torch.randn(5, 16)
    torch.testing.assert_close(a(x, 1), F.linear(x, a.weight, a.bias))  # a fresh adapter changes nothing


def test_lowrank_linear_from_linear_shares_weights():
    linear = nn.Linear(8, 6, dtype=DTYPE)
    layer = LowRankLinear.from_linear(linear, num_adapters=2, rank=3, alpha=3.0)
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert layer.weight.data_ptr() == linear.weight.data_ptr()
    assert layer.lora_a.shape == (2, 3, 8) and layer.lora_b.shape == (2, 6, 3)
    assert layer.lora_a.dtype == DTYPE and layer.lora_a.device == linear.weight.device
    with torch.no_grad():
        linear.weight.mul_(2.0)  # one tensor: the layer sees the change
    x = torch.randn(4, 8, dtype=DTYPE)
    torch.testing.assert_close(layer(x, 0), linear(x), **TOL)
    no_bias = LowRankLinear.from_linear(nn.Linear(8, 6, bias=False), 1, 2)
    assert no_bias.bias is None


def test_lowrank_linear_rank_clamped_and_plain_forms():
    layer = LowRankLinear(4, 6, num_adapters=2, rank=10, alpha=8.0)
    assert layer.rank == 4 and layer.lora_a.shape == (2, 4, 4) and layer.lora_b.shape == (2, 6, 4)
    assert layer.scaling == 2.0
    x = torch.randn(3, 4)
    randomize_(layer)
    base = F.linear(x, layer.weight, layer.bias)
    torch.testing.assert_close(layer(x, -1), base)  # -1: no adapter
    for plain in (LowRankLinear(4, 6, rank=0), LowRankLinear(4, 6, num_adapters=0)):
        assert plain.lora_a is None and plain.lora_b is None and plain.rank == 0 and plain.num_adapters == 0
        torch.testing.assert_close(plain(x, torch.tensor([0, 1, -1])), F.linear(x, plain.weight, plain.bias))
    with pytest.raises(ValueError, match="rank"):
        LowRankLinear(4, 6, rank=-1)
    with pytest.raises(ValueError, match="num_adapters"):
        LowRankLinear(4, 6, num_adapters=1.5)
    with pytest.raises(IndexError):
        layer(x, 2)


# Norm and rotary tables.

@pytest.mark.parametrize("unit_offset", [False, True])
def test_rms_norm(unit_offset):
    norm = randomize_(RMSNorm(10, eps=1e-5, unit_offset=unit_offset, dtype=DTYPE))
    x = torch.randn(3, 10, dtype=DTYPE)
    torch.testing.assert_close(norm(x), ref_rms_norm(x, norm.weight, 1e-5, unit_offset), **TOL)
    assert RMSNorm(4, unit_offset=unit_offset).weight.tolist() == [0.0 if unit_offset else 1.0] * 4


def test_rotary_embedding_is_rotate_half():
    positions = torch.tensor([[0, 3, 7], [2, 2, 5]])
    x = torch.randn(2, 3, 2, 8, dtype=DTYPE)
    cos, sin = rotary_embedding(positions, 8, 500.0, DTYPE)
    assert cos.shape == (2, 3, 8) and cos.dtype == DTYPE
    rotate_half = torch.cat((-x[..., 4:], x[..., :4]), dim=-1)
    torch.testing.assert_close(x * cos[:, :, None] + rotate_half * sin[:, :, None], ref_rope(x, positions, 500.0),
                               **TOL)


# CircuitAttention.

def make_attention(causal=True, **kwargs) -> CircuitAttention:
    options = dict(num_key_value_heads=2, head_dim=6, qkv_bias=True, causal=causal, num_depths=3,
                   lora_rank={"q": 2, "v": 3, "o": 2}, lora_alpha=4.0, circuit_rank=2, dtype=DTYPE)
    options.update(kwargs)
    return randomize_(CircuitAttention(16, 4, **options))


def run_attention(attn, x, indices, positions, **kwargs):
    cos_sin = rotary_embedding(positions, attn.head_dim, 10000.0, x.dtype)
    return attn(x, cos_sin, indices, **kwargs)


def ref_of(attn: CircuitAttention, x, adapter, positions, key_mask=None):
    return ref_attention(
        x, dict(attn.named_parameters()), adapter, heads=attn.num_heads, kv_heads=attn.num_key_value_heads,
        head_dim=attn.head_dim, positions=positions, theta=10000.0, causal=attn.causal, alpha=4.0, key_mask=key_mask,
    )


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("adapter", [None, 0, 2])
def test_circuit_attention_against_reference(causal, adapter):
    torch.manual_seed(2)
    attn = make_attention(causal)
    x = torch.randn(2, 7, 16, dtype=DTYPE, requires_grad=True)
    positions = positions_of(2, 7)
    out, present = run_attention(attn, x, adapter, positions)
    assert present is None
    expected = ref_of(attn, x, -1 if adapter is None else adapter, positions)
    torch.testing.assert_close(out, expected, **TOL)
    grad = torch.randn_like(out)
    inputs = [x] + list(attn.parameters())
    got = torch.autograd.grad(out, inputs, grad, allow_unused=True)
    want = torch.autograd.grad(expected, inputs, grad, allow_unused=True)
    for g, w in zip(got, want):
        if w is None:
            assert g is None or torch.count_nonzero(g) == 0
        else:
            torch.testing.assert_close(g, w, **TOL)


def test_circuit_attention_per_row_depths_equal_per_sample():
    torch.manual_seed(3)
    attn = make_attention()
    x = torch.randn(4, 5, 16, dtype=DTYPE)
    positions = positions_of(4, 5)
    depths = torch.tensor([2, -1, 0, 2])
    out, _ = run_attention(attn, x, depths, positions)
    for row, depth in enumerate(depths.tolist()):
        alone, _ = run_attention(attn, x[row:row + 1], depth, positions[row:row + 1])
        torch.testing.assert_close(out[row:row + 1], alone, **TOL)
    per_token = depths[:, None].expand(4, 5)
    torch.testing.assert_close(run_attention(attn, x, per_token, positions)[0], out, **TOL)
    with pytest.raises(IndexError, match="indices"):
        run_attention(attn, x, 3, positions)
    with pytest.raises(ValueError, match="indices"):
        run_attention(attn, x, torch.zeros(3, dtype=torch.long), positions)


@pytest.mark.parametrize("adapter", [-1, 1])
def test_circuit_attention_cache_equals_full_recompute(adapter):
    torch.manual_seed(4)
    attn = make_attention()
    x = torch.randn(2, 6, 16, dtype=DTYPE)
    positions = positions_of(2, 6)
    full, _ = run_attention(attn, x, adapter, positions)
    out, cache = run_attention(attn, x[:, :3], adapter, positions[:, :3], use_cache=True)
    assert cache.key.shape == (2, 3, 2, 6) and (cache.key_c is None) == (adapter == -1)
    pieces = [out]
    for start, stop in ((3, 5), (5, 6)):  # a two-token chunk, then one token
        out, cache = run_attention(attn, x[:, start:stop], adapter, positions[:, start:stop],
                                   past_key_value=cache, use_cache=True)
        pieces.append(out)
    assert cache.value.shape == (2, 6, 2, 6)  # token-major (B, S, Hkv, D)
    torch.testing.assert_close(torch.cat(pieces, dim=1), full, **TOL)


def test_circuit_attention_cache_mismatch_raises():
    torch.manual_seed(4)
    attn = make_attention()
    x = torch.randn(1, 3, 16, dtype=DTYPE)
    _, plain_cache = run_attention(attn, x[:, :2], -1, positions_of(1, 3)[:, :2], use_cache=True)
    assert plain_cache.key_c is None
    with pytest.raises(ValueError, match="past_key_value: cached with and used without the QK/OV circuit"):
        run_attention(attn, x[:, 2:], 1, positions_of(1, 3)[:, 2:], past_key_value=plain_cache)


def test_layer_kv_append_extends_along_the_sequence():
    past = LayerKV(*(torch.randn(2, 3, 1, d) for d in (4, 4, 2, 2)))  # (B, S, Hkv, .)
    new = LayerKV(*(torch.randn(2, 1, 1, d) for d in (4, 4, 2, 2)))
    for joined, p, n in zip(past.append(new), past, new):
        torch.testing.assert_close(joined, torch.cat((p, n), dim=1), rtol=0, atol=0)
    assert LayerKV(past.key, past.value).append(LayerKV(new.key, new.value)).key_c is None


@pytest.mark.parametrize("causal", [True, False])
def test_circuit_attention_padding_masks_keys(causal):
    torch.manual_seed(5)
    attn = make_attention(causal)
    x = torch.randn(3, 6, 16, dtype=DTYPE, requires_grad=True)
    mask = torch.tensor([[0, 0, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    packing = VarlenPacking.from_attention_mask(mask, 6)
    out, _ = run_attention(attn, x, 1, positions, packing=packing)
    expected = ref_of(attn, x, 1, positions, key_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(out[real], expected[real], **TOL)
    assert torch.count_nonzero(out[~real]) == 0  # padded queries attend to nothing (o_proj has no bias)
    grad = torch.randn_like(out) * real[..., None]
    got = torch.autograd.grad(out, [x, attn.qk_u, attn.q_proj.weight], grad)
    want = torch.autograd.grad(expected * real[..., None], [x, attn.qk_u, attn.q_proj.weight], grad)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)


def test_varlen_packing_layout():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 0, 1]])
    packing = VarlenPacking.from_attention_mask(mask, 2)
    assert packing.key_rows.tolist() == [1, 2, 3, 4, 5, 7]
    assert packing.query_rows.tolist() == [0, 1, 3]  # of the last two columns, flattened (B * 2)
    assert packing.cu_seqlens_k.tolist() == [0, 3, 6] and packing.cu_seqlens_q.tolist() == [0, 2, 3]
    assert (packing.max_seqlen_q, packing.max_seqlen_k) == (2, 3)
    assert packing.query_mask.tolist() == [[True, True], [False, True]]
    with pytest.raises(ValueError, match="attention_mask"):
        VarlenPacking.from_attention_mask(mask, 5)


# Feed-forward modules.

@pytest.mark.parametrize("act", ["silu", "gelu", "gelu_pytorch_tanh"])
def test_gated_feed_forward(act):
    torch.manual_seed(6)
    mlp = randomize_(GatedFeedForward(12, 20, act, num_adapters=3, lora_rank={"gate": 2, "down": 3}, lora_alpha=2.0,
                                      dtype=DTYPE))
    assert mlp.up_proj.lora_a is None and mlp.gate_proj.lora_a.shape == (3, 2, 12)
    x = torch.randn(2, 4, 12, dtype=DTYPE)
    params = dict(mlp.named_parameters())
    for adapter in (-1, 0, 2):
        torch.testing.assert_close(mlp(x, adapter), ref_feed_forward(x, params, adapter, act, 2.0), **TOL)
    rows = torch.tensor([[0, 1, -1, 2], [2, 2, 0, -1]])
    expected = torch.stack([torch.stack([ref_feed_forward(x[b, t], params, int(rows[b, t]), act, 2.0)
                                         for t in range(4)])
                            for b in range(2)])
    torch.testing.assert_close(mlp(x, rows), expected, **TOL)
    with pytest.raises(ValueError, match="hidden_act"):
        GatedFeedForward(4, 8, "relu")


def make_mixture(**kwargs) -> MoLFeedForward:
    options = dict(num_experts=4, top_k=2, lora_rank=3, lora_alpha=6.0, dtype=DTYPE)
    options.update(kwargs)
    return randomize_(MoLFeedForward(12, 20, "gelu", **options), scale=0.3)


def test_mol_routing_output_gates_and_balancing_loss():
    torch.manual_seed(7)
    mol = make_mixture()
    x = torch.randn(3, 5, 12, dtype=DTYPE, requires_grad=True)
    gates, experts, probs = mol.route(x)
    assert gates.shape == experts.shape == (3, 5, 2) and probs.shape == (3, 5, 4)
    torch.testing.assert_close(probs, torch.softmax(x @ mol.router.weight.T, -1), **TOL)
    assert torch.equal(experts, probs.topk(2, -1).indices)
    out, aux = mol(x)
    params = dict(mol.named_parameters())
    expected, expected_aux = ref_mixture(x, params, 2, "gelu", 6.0)
    torch.testing.assert_close(out, expected, **TOL)
    torch.testing.assert_close(aux, expected_aux, **TOL)

    # The router learns through the gates (and the balancing loss); every parameter's gradient matches.
    grad = torch.randn_like(out)
    names, parameters = zip(*mol.named_parameters())
    inputs = [x, *parameters]
    got = torch.autograd.grad((out * grad).sum() + aux, inputs)
    want = torch.autograd.grad((expected * grad).sum() + expected_aux, inputs)
    assert torch.count_nonzero(got[1 + names.index("router.weight")]) > 0
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, **TOL)

    mask = torch.rand(3, 5) > 0.4
    _, masked_aux = mol(x, mask)
    torch.testing.assert_close(masked_aux, ref_mixture(x, params, 2, "gelu", 6.0, mask)[1], **TOL)


def test_mol_balancing_loss_is_one_at_uniform_routing():
    mol = MoLFeedForward(8, 16, num_experts=4, top_k=2, dtype=DTYPE)
    with torch.no_grad():
        mol.router.weight.zero_()
    x = torch.randn(6, 8, dtype=DTYPE)
    gates, _, _ = mol.route(x)
    torch.testing.assert_close(gates, torch.full((6, 2), 0.25, dtype=DTYPE), **TOL)
    torch.testing.assert_close(mol(x)[1], torch.tensor(1.0, dtype=DTYPE), **TOL)


def test_mol_merge_experts():
    torch.manual_seed(8)
    mol = make_mixture()
    calibration = torch.randn(64, 12, dtype=DTYPE)
    gates, experts, _ = mol.route(calibration)
    mean_routing = torch.zeros(64, 4, dtype=DTYPE).scatter_add(-1, experts, gates).mean(0)

    merged = mol.merge_experts(calibration, rank=12)  # full rank (clamped to min(in, out) = 12)
    assert isinstance(merged, GatedFeedForward)
    for name in ("gate_proj", "up_proj", "down_proj"):
        projection = getattr(merged, name)
        assert projection.weight is getattr(mol, name).weight  # shared, not copied
        assert projection.lora_a.shape[0] == 1 and projection.rank == 12
    # At full rank the merged adapter is exactly the mixture with every token routed by the mean weights.
    params = dict(mol.named_parameters())

    def with_routing(x, routing):
        def projection(h, name):
            y = h @ params[f"{name}.weight"].T
            for e in range(4):
                lora_a, lora_b = params[f"{name}.lora_a"][e], params[f"{name}.lora_b"][e]
                y = y + 2.0 * routing[e] * (h @ (lora_b @ lora_a).T)
            return y
        return projection(ref_activation("gelu", projection(x, "gate_proj")) * projection(x, "up_proj"), "down_proj")

    x = torch.randn(5, 12, dtype=DTYPE)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), with_routing(x, mean_routing), **TOL)

    # Where routing does not depend on the token, the merged adapter reproduces the mixture on the
    # calibration data; truncating the rank costs accuracy but stays closer than dropping the experts.
    with torch.no_grad():
        mol.router.weight.zero_()
        mol.router.weight[:, 0] = torch.tensor([3.0, 1.0, 2.0, 0.0], dtype=DTYPE)
    calibration[:, 0] = 1.0
    with torch.no_grad():
        mixture, _ = mol(calibration)
        torch.testing.assert_close(mol.merge_experts(calibration, rank=12)(calibration), mixture, **TOL)
        truncated = mol.merge_experts(calibration)  # the experts' rank, 3
        assert truncated.gate_proj.rank == 3
        base = GatedFeedForward(12, 20, "gelu", dtype=DTYPE)
        base.load_state_dict({k: v for k, v in mol.state_dict().items() if k.endswith(".weight") and "router" not in k
                              and "lora" not in k})
        error = (truncated(calibration) - mixture).norm()
        assert error < 0.5 * (base(calibration) - mixture).norm()
    with pytest.raises(ValueError, match="calibration"):
        mol.merge_experts(torch.randn(4, 11, dtype=DTYPE))


# RecursiveBlock.

def block_config(relaxation: str, **kwargs) -> RecursiveConfig:
    options = dict(vocab_size=50, hidden_size=16, intermediate_size=24, num_attention_heads=4, num_key_value_heads=2,
                   num_layers=6, num_blocks=2, relaxation=relaxation, lora_rank=2, circuit_rank=2, start_index=2,
                   num_experts=3)
    options.update(kwargs)
    return RecursiveConfig(**options)


@pytest.mark.parametrize("relaxation", ["depth_lora", "circuit"])
def test_block_per_row_depths_equal_per_depth_calls(relaxation):
    torch.manual_seed(9)
    block = randomize_(RecursiveBlock(block_config(relaxation), block_index=1).to(DTYPE))
    # cycle over 2 blocks: block 1 runs layers 1, 3, 5; from start_index 2 on, 3 and 5 own adapters 0 and 1.
    assert block.adapter_index(1) == -1 and block.adapter_index(3) == 0 and block.adapter_index(5) == 1
    assert block.self_attn.num_depths == 2
    x = torch.randn(3, 4, 16, dtype=DTYPE)
    cos_sin = rotary_embedding(positions_of(3, 4), 4, 10000.0, DTYPE)
    depths = torch.tensor([5, 1, 3])
    indices = block.adapter_index(depths)
    assert indices.tolist() == [1, -1, 0]
    out, _, aux = block(x, indices, cos_sin)
    assert aux is None
    for row, depth in enumerate(depths.tolist()):
        alone, _, _ = block(x[row:row + 1], block.adapter_index(depth), tuple(t[row:row + 1] for t in cos_sin))
        torch.testing.assert_close(out[row:row + 1], alone, **TOL)
    with pytest.raises(ValueError, match="depth"):
        block.adapter_index(6)
    with pytest.raises(ValueError, match="depth"):
        block.adapter_index(torch.tensor([0, -1, 2]))
    with pytest.raises(IndexError, match="indices"):
        block(x, 2, cos_sin)  # two adapters
    with pytest.raises(IndexError, match="indices"):
        block(x, torch.tensor([0, 2, 1]), cos_sin)


def test_block_checks_per_row_indices_once_per_module(monkeypatch):
    """Mapping per-row depths to a block's adapter indices reads them on the host once (a host synchronisation
    on the GPU), and a block with per-row indices reads them once (in its attention; its MLP and the
    projections trust them); with check_indices=False neither reads. Its attention and MLP called on their
    own read their indices once, not once per projection: bad values still raise."""
    import importlib

    import recursive.nn.attention
    import recursive.nn.feed_forward

    # the package exports a function of that name
    op_module = importlib.import_module("recursive_kernels.lowrank_linear")
    calls = {"op": 0, "module": 0, "depth": 0}
    checked = op_module.check_index_values

    def counting(key, function=checked):
        def check(*args, **kwargs):
            calls[key] += 1
            return function(*args, **kwargs)
        return check

    monkeypatch.setattr(op_module, "check_index_values", counting("op"))
    for module in (recursive.nn.attention, recursive.nn.feed_forward):  # the modules that check indices
        monkeypatch.setattr(module, "check_index_values", counting("module"))
    monkeypatch.setattr(torch, "aminmax", counting("depth", torch.aminmax))  # every host read of index values
    block = randomize_(RecursiveBlock(block_config("depth_lora"), block_index=1).to(DTYPE))
    x = torch.randn(3, 4, 16, dtype=DTYPE)
    cos_sin = rotary_embedding(positions_of(3, 4), 4, 10000.0, DTYPE)
    depth = torch.tensor([5, 1, 3])
    indices = block.adapter_index(depth)
    assert calls == {"op": 0, "module": 0, "depth": 1}
    assert torch.equal(block.adapter_index(depth, check_indices=False), indices)
    out, _, _ = block(x, indices, cos_sin)
    assert calls == {"op": 0, "module": 1, "depth": 2}  # check_index_values reads through aminmax
    trusted, _, _ = block(x, indices, cos_sin, check_indices=False)
    block.key_value(x, indices, cos_sin, check_indices=False)
    assert calls == {"op": 0, "module": 1, "depth": 2} and torch.equal(trusted, out)
    block.self_attn(x, cos_sin, torch.tensor([0, 1, 0]))
    block.mlp(x, torch.tensor([[0, 1, 1, 0]] * 3))
    assert calls == {"op": 0, "module": 3, "depth": 4}
    with pytest.raises(IndexError, match="indices"):
        block.self_attn(x, cos_sin, torch.tensor([0, 2, 1]))  # 2 depths: 2 is out of range
    with pytest.raises(IndexError, match="indices"):
        block.mlp(x, torch.tensor([[0, 1, 2, 0]] * 3))
    mixture = randomize_(RecursiveBlock(block_config("mol", num_blocks=1), block_index=0).to(DTYPE))
    calls.update(op=0, module=0, depth=0)
    mixture(x, -1, cos_sin)  # the router's top-k experts are in range by construction: no host read
    assert calls == {"op": 0, "module": 0, "depth": 0}


def test_block_with_merged_mixture():
    torch.manual_seed(10)
    block = randomize_(RecursiveBlock(block_config("mol", num_blocks=1), block_index=0).to(DTYPE))
    x = torch.randn(2, 5, 16, dtype=DTYPE)
    cos_sin = rotary_embedding(positions_of(2, 5), 4, 10000.0, DTYPE)
    out, _, aux = block(x, -1, cos_sin)
    assert aux.shape == () and out.shape == x.shape
    block.mlp = block.mlp.merge_experts(torch.randn(32, 16, dtype=DTYPE))
    merged, _, aux = block(x, -1, cos_sin)
    assert aux is None and merged.shape == x.shape and not torch.allclose(merged, out)
