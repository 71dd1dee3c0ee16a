"""``recursive_kernels.circuit_attention`` and ``circuit_attention_varlen``.

The reference (the spec and the oracle) against independent computations: plain attention equals
``scaled_dot_product_attention``, corrections equal attention over concatenated head dimensions,
bottom-right causal masking, fully masked rows, varlen against dense. Every fused backend on this machine
(Triton through its CPU interpreter) against float64: outputs and all six gradients, dense and varlen,
error at most twice that of the same computation done eagerly by PyTorch in the tested dtype plus half
an ulp (FlashAttention's rule); gradcheck, opcheck and torch.compile; input checks.
"""

from __future__ import annotations

import importlib
import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import recursive_kernels
from tests.helpers import assert_error_rule, per_backend, serving_backends

F64 = torch.float64


def rand(gen, *shape, dtype=F64, scale=1.0):
    return (torch.randn(*shape, generator=gen, dtype=F64) * scale).to(dtype).requires_grad_(True)


def make(seed=0, B=2, H=4, Hkv=2, Sq=5, Sk=7, D=8, R=3, Rv=2, dtype=F64):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (rand(gen, B, H, Sq, D, dtype=dtype), rand(gen, B, Hkv, Sk, D, dtype=dtype),
               rand(gen, B, Hkv, Sk, D, dtype=dtype))
    q_c = rand(gen, B, H, Sq, R, dtype=dtype) if R is not None else None
    k_c = rand(gen, B, Hkv, Sk, R, dtype=dtype) if R is not None else None
    v_c = rand(gen, B, Hkv, Sk, Rv, dtype=dtype) if Rv is not None else None
    return q, k, v, q_c, k_c, v_c


def bottom_right_mask(Sq, Sk):
    i = torch.arange(Sq).unsqueeze(1)
    j = torch.arange(Sk).unsqueeze(0)
    return j <= i + (Sk - Sq)


def sdpa(q, k, v, causal, scale):
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    mask = bottom_right_mask(q.shape[2], k.shape[2]) if causal else None
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("Sq,Sk", [(5, 7), (7, 7), (1, 17)])
def test_plain_attention_equals_sdpa(causal, Sq, Sk):
    q, k, v, *_ = make(Sq=Sq, Sk=Sk, R=None, Rv=None)
    out, out_c = recursive_kernels.circuit_attention(q, k, v, causal=causal)
    assert out_c is None
    torch.testing.assert_close(out, sdpa(q, k, v, causal, q.shape[-1] ** -0.5))


@pytest.mark.parametrize("causal", [False, True])
def test_corrections_equal_attention_over_concatenated_dims(causal):
    """S = scale q k^T + q_c k_c^T is attention over [q, q_c / scale] and [k, k_c]; out_c rides along v."""
    q, k, v, q_c, k_c, v_c = make(seed=1)
    scale = 0.3
    out, out_c = recursive_kernels.circuit_attention(q, k, v, q_c, k_c, v_c, causal=causal, scale=scale)
    both = sdpa(torch.cat([q, q_c / scale], -1), torch.cat([k, k_c], -1), torch.cat([v, v_c], -1), causal, scale)
    torch.testing.assert_close(torch.cat([out, out_c], -1), both)
    grad = torch.randn_like(both)
    leaves = [q, k, v, q_c, k_c, v_c]
    ours = torch.autograd.grad(torch.cat([out, out_c], -1), leaves, grad)
    theirs = torch.autograd.grad(both, leaves, grad)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)


def test_fully_masked_rows_give_zeros_without_nan():
    q, k, v, q_c, k_c, v_c = make(Sq=9, Sk=4)  # bottom-right causal: the first 5 queries see no key
    out, out_c = recursive_kernels.circuit_attention(q, k, v, q_c, k_c, v_c, causal=True)
    assert torch.all(out[:, :, :5] == 0) and torch.all(out_c[:, :, :5] == 0)
    grads = torch.autograd.grad((out.sum() + out_c.sum()), [q, q_c])
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][:, :, :5] == 0)


def test_large_logits_stay_finite():
    q, k, v, q_c, k_c, v_c = make(seed=2, dtype=torch.float32)
    with torch.no_grad():
        q.mul_(5), k.mul_(3), q_c.mul_(5)
    out, out_c = recursive_kernels.circuit_attention(q, k, v, q_c, k_c, v_c)
    assert torch.isfinite(out).all() and torch.isfinite(out_c).all()


def test_zero_rank_corrections():
    q, k, v, q_c, k_c, v_c = make(R=0, Rv=0)
    out, out_c = recursive_kernels.circuit_attention(q, k, v, q_c, k_c, v_c, causal=True)
    torch.testing.assert_close(out, sdpa(q, k, v, True, q.shape[-1] ** -0.5))
    assert out_c.shape == (*q.shape[:-1], 0)


def test_gradcheck_float64():
    q, k, v, q_c, k_c, v_c = make(B=1, H=2, Hkv=1, Sq=3, Sk=4, D=4, R=2, Rv=2)
    assert torch.autograd.gradcheck(
        lambda *t: recursive_kernels.circuit_attention(*t, causal=True), (q, k, v, q_c, k_c, v_c), eps=1e-6, atol=1e-6
    )


def test_varlen_matches_dense_per_sequence():
    lengths_q, lengths_k = [3, 0, 5], [4, 2, 5]
    H, Hkv, D, R, Rv = 4, 2, 8, 3, 2
    gen = torch.Generator().manual_seed(3)
    tq, tk = sum(lengths_q), sum(lengths_k)
    q, q_c = rand(gen, tq, H, D), rand(gen, tq, H, R)
    k, v, k_c, v_c = rand(gen, tk, Hkv, D), rand(gen, tk, Hkv, D), rand(gen, tk, Hkv, R), rand(gen, tk, Hkv, Rv)
    cu_q = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    cu_k = torch.tensor([0, 4, 6, 11], dtype=torch.int32)
    out, out_c = recursive_kernels.circuit_attention_varlen(q, k, v, cu_q, cu_k, 5, 5, q_c, k_c, v_c, causal=True)
    assert out.shape == (tq, H, D) and out_c.shape == (tq, H, Rv)
    for b in range(3):
        rq, rk = slice(int(cu_q[b]), int(cu_q[b + 1])), slice(int(cu_k[b]), int(cu_k[b + 1]))
        dense = [t[r].transpose(0, 1).unsqueeze(0)
                 for t, r in ((q, rq), (k, rk), (v, rk), (q_c, rq), (k_c, rk), (v_c, rk))]
        o, oc = recursive_kernels.circuit_attention(*dense, causal=True)
        torch.testing.assert_close(out[rq], o[0].transpose(0, 1))
        torch.testing.assert_close(out_c[rq], oc[0].transpose(0, 1))


def _dense_args():
    q, k, v, q_c, k_c, v_c = make(R=3, Rv=2)
    return dict(q=q.detach(), k=k.detach(), v=v.detach(), q_c=q_c.detach(), k_c=k_c.detach(), v_c=v_c.detach())


@pytest.mark.parametrize(
    "change,argument",
    [
        (lambda a: a.update(k=a["k"][..., :-1]), "k"),  # head dims differ
        (lambda a: a.update(v=a["v"][..., :-1]), "v"),
        (lambda a: a.update(k=torch.cat([a["k"]] * 3, 1)[:, :3], v=torch.cat([a["v"]] * 3, 1)[:, :3]), "k"),  # 4 % 3
        (lambda a: a.update(q_c=None), "q_c"),  # a correction without its partner
        (lambda a: a.update(k_c=None), "k_c"),
        (lambda a: a.update(k_c=a["k_c"][..., :-1]), "k_c"),  # mismatched ranks
        (lambda a: a.update(v_c=a["v_c"][:, :, :-1]), "v_c"),
        (lambda a: a.update(v=a["v"].float()), "v"),  # dtypes
        (lambda a: a.update(q_c=a["q_c"].to("meta")), "q_c"),  # devices
        (lambda a: a.update(q=a["q"][0]), "q"),
        (lambda a: a.update(scale=float("nan")), "scale"),
        (lambda a: a.update(scale="0.5"), "scale"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(change, argument):
    args = _dense_args()
    change(args)
    with pytest.raises(ValueError, match=f"^{argument}:"):
        recursive_kernels.circuit_attention(**args)


@pytest.mark.parametrize(
    "cu_q,cu_k,max_q,argument",
    [
        ([0, 3, 9], [0, 4, 11], 6, "cu_seqlens_q"),  # does not end at total_q = 8
        ([1, 3, 8], [0, 4, 11], 6, "cu_seqlens_q"),  # does not start at 0
        ([0, 5, 3, 8], [0, 4, 6, 11], 6, "cu_seqlens_q"),  # decreasing
        ([0, 3, 8], [0, 4, 11], 4, "max_seqlen_q"),  # below the longest sequence
        ([0, 3, 8], [0, 4, 6, 11], 6, "cu_seqlens_k"),  # batch sizes differ
    ],
)
def test_malformed_cu_seqlens_raise(cu_q, cu_k, max_q, argument):
    gen = torch.Generator().manual_seed(0)
    q, k, v = rand(gen, 8, 2, 4), rand(gen, 11, 2, 4), rand(gen, 11, 2, 4)
    with pytest.raises(ValueError, match=f"^{argument}:"):
        recursive_kernels.circuit_attention_varlen(q, k, v, torch.tensor(cu_q), torch.tensor(cu_k), max_q, 11)


# ------------------------------------------------------------------ fused backends vs float64

def kernel_backends(dtype, head_dim=16, op="circuit_attention"):
    """The fused backends on this machine (comparing the reference with itself cannot fail)."""
    return [p for p in serving_backends(op, dtype, head_dim=head_dim) if p.values[0] != "torch"]


# The reference loops over sequences in Python, so it must read the offsets; the fused backends need not.
@pytest.mark.parametrize("backend,device", kernel_backends(torch.float32, head_dim=4, op="circuit_attention_varlen"))
def test_varlen_trusted_offsets_skip_the_host_read(monkeypatch, backend, device):
    gen = torch.Generator().manual_seed(4)
    q, k, v = (rand(gen, n, 2, 4, dtype=torch.float32).to(device) for n in (8, 11, 11))
    cu_q = torch.tensor([0, 3, 8], dtype=torch.int32, device=device)
    cu_k = torch.tensor([0, 4, 11], dtype=torch.int32, device=device)
    expected, _ = recursive_kernels.circuit_attention_varlen(q, k, v, cu_q, cu_k, 5, 7, causal=True, backend=backend)

    def no_host_read(self):
        raise AssertionError("the offsets were read on the host")

    monkeypatch.setattr(torch.Tensor, "tolist", no_host_read)
    out, _ = recursive_kernels.circuit_attention_varlen(q, k, v, cu_q, cu_k, 5, 7, causal=True, check_indices=False,
                                              backend=backend)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    with pytest.raises(AssertionError, match="read on the host"):
        recursive_kernels.circuit_attention_varlen(q, k, v, cu_q, cu_k, 5, 7, causal=True, backend=backend)


# (B, H, Hkv, Sq, Sk, D, R, Rv, causal): odd lengths, Sq < Sk (decode with a cache), Sq > Sk (fully
# masked rows), grouped-query heads, head dims that are not powers of two, absent corrections, rank 64.
CASES = [
    (1, 2, 2, 1, 17, 16, 16, 3, True),
    (2, 4, 2, 17, 17, 40, 16, None, True),
    (1, 4, 1, 17, 40, 64, None, 3, False),
    (2, 2, 1, 40, 17, 16, 4, 4, True),
    (1, 2, 2, 33, 33, 80, 16, 16, False),
    (1, 2, 1, 20, 20, 112, 64, 33, True),
]


def _results(call, tensors, device, dtype, seed):
    """Outputs and the gradients of every given tensor of ``call(*leaves)`` -> (out, out_c)."""
    leaves = [t.detach().to(device=device, dtype=dtype).requires_grad_(True) if t is not None else None
              for t in tensors]
    out, out_c = call(*leaves)
    outs = [out] + ([out_c] if out_c is not None else [])
    gen = torch.Generator().manual_seed(seed + 1)
    grads_out = [torch.randn(o.shape, generator=gen, dtype=F64).to(device=device, dtype=dtype) for o in outs]
    grads = torch.autograd.grad(outs, [t for t in leaves if t is not None], grads_out)
    return [o.detach().double().cpu() for o in outs] + [g.double().cpu() for g in grads]


def assert_error_at_most_twice_eager(call, tensors64, backend, device, dtype, seed=5):
    """``call(*tensors, backend=...)``: the backend's outputs and gradients against float64, bounded by twice
    the error of the eager reference in ``dtype`` plus half an ulp; finite wherever the reference is."""
    ref = _results(lambda *t: call(*t, backend="torch"), tensors64, "cpu", F64, seed)
    ours = _results(lambda *t: call(*t, backend=backend), tensors64, device, dtype, seed)
    eager = _results(lambda *t: call(*t, backend="torch"), tensors64, device, dtype, seed)
    for i, (o, e, r) in enumerate(zip(ours, eager, ref)):
        assert_error_rule(f"{backend} result {i}", o, r, e, dtype)
    return ours


DTYPES = (torch.float32, torch.bfloat16)


@pytest.mark.parametrize("case,dtype,backend,device", [
    pytest.param(case, *p.values, id=f"{case}-{p.id}")
    for case in CASES for p in per_backend(DTYPES, lambda dtype, D=case[5]: kernel_backends(dtype, D))])
def test_backend_error_at_most_twice_eager(case, dtype, backend, device):
    B, H, Hkv, Sq, Sk, D, R, Rv, causal = case
    tensors64 = make(seed=5, B=B, H=H, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, R=R, Rv=Rv)
    out = assert_error_at_most_twice_eager(
        lambda *t, backend: recursive_kernels.circuit_attention(*t, causal=causal, backend=backend),
        tensors64, backend, device, dtype)[0]
    if causal and Sq > Sk:  # queries before the first key see nothing: zeros
        assert torch.all(out[:, :, : Sq - Sk] == 0)


def _varlen_inputs(lengths_q, lengths_k, H=4, Hkv=2, D=24, R=5, Rv=3, seed=7):
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(lengths_q), sum(lengths_k)
    tensors = [rand(gen, tq, H, D), rand(gen, tk, Hkv, D), rand(gen, tk, Hkv, D),
               rand(gen, tq, H, R) if R else None, rand(gen, tk, Hkv, R) if R else None,
               rand(gen, tk, Hkv, Rv) if Rv else None]
    cu_q = torch.tensor([0] + lengths_q).cumsum(0).to(torch.int32)
    cu_k = torch.tensor([0] + lengths_k).cumsum(0).to(torch.int32)
    return tensors, cu_q, cu_k


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dtype,backend,device",
                         per_backend(DTYPES, lambda dtype: kernel_backends(dtype, op="circuit_attention_varlen")))
def test_varlen_backends_error_at_most_twice_eager(causal, dtype, backend, device):
    """A mixed batch: an empty sequence, one with no keys, decode rows (1 query, many keys), Sq > Sk."""
    lengths_q, lengths_k = [3, 0, 1, 20, 2], [5, 4, 19, 9, 0]
    tensors64, cu_q, cu_k = _varlen_inputs(lengths_q, lengths_k)
    cq, ck = cu_q.to(device), cu_k.to(device)
    out = assert_error_at_most_twice_eager(
        lambda q, k, v, q_c, k_c, v_c, backend: recursive_kernels.circuit_attention_varlen(
            q, k, v, cq, ck, max(lengths_q), max(lengths_k), q_c, k_c, v_c, causal=causal, backend=backend),
        tensors64, backend, device, dtype)[0]
    assert torch.all(out[cu_q[4]:] == 0), "queries of a sequence without keys get zeros"


@pytest.mark.parametrize("backend,device", kernel_backends(torch.float32, op="circuit_attention_varlen"))
def test_varlen_without_corrections_on_fused_backends(backend, device):
    tensors64, cu_q, cu_k = _varlen_inputs([7, 1], [7, 12], R=0, Rv=0)
    assert_error_at_most_twice_eager(
        lambda q, k, v, q_c, k_c, v_c, backend: recursive_kernels.circuit_attention_varlen(
            q, k, v, cu_q.to(device), cu_k.to(device), 7, 12, causal=True, backend=backend),
        tensors64, backend, device, torch.float32)


@pytest.mark.parametrize("S", [1, 17, 113, 1023])
def test_long_sequences_on_the_cpp_backend(S):
    if "cpp" not in [p.values[0] for p in kernel_backends(torch.float32)]:
        pytest.skip("the cpp extension is not built")
    tensors64 = make(seed=S, B=1, H=2, Hkv=1, Sq=S, Sk=S, D=16, R=4, Rv=4)
    assert_error_at_most_twice_eager(
        lambda *t, backend: recursive_kernels.circuit_attention(*t, causal=True, backend=backend),
        tensors64, "cpp", "cpu", torch.float32)


@pytest.mark.parametrize("dtype,backend,device", per_backend(DTYPES, kernel_backends))
def test_large_logits_stay_finite_on_fused_backends(dtype, backend, device):
    q, k, v, q_c, k_c, v_c = make(seed=2, Sq=33, Sk=33, D=16)
    with torch.no_grad():
        q.mul_(5), k.mul_(3), q_c.mul_(5)
    assert_error_at_most_twice_eager(
        lambda *t, backend: recursive_kernels.circuit_attention(*t, causal=True, backend=backend),
        (q, k, v, q_c, k_c, v_c), backend, device, dtype)


def arranged(t, layout):
    """``t`` (B, heads, S, width) with its values laid out ``layout``: "head" (contiguous), "token" (token-major: a
    transpose(1, 2) view of a contiguous (B, S, heads, width) tensor, as models pass it) or "strided" (every
    other row of a longer token-major tensor: neither)."""
    if layout == "head":
        return t.contiguous()
    tokens = t.transpose(1, 2)
    if layout == "token":
        return tokens.contiguous().transpose(1, 2)
    wide = tokens.repeat_interleave(2, 1)
    return wide[:, ::2].transpose(1, 2)


# The layouts of (q, k, v, q_c, k_c, v_c): each side (q, q_c; k, v, k_c, v_c) takes its first tensor's, and a
# tensor in another one is copied into it.
LAYOUTS = {
    "token-major": ("token",) * 6,
    "queries token-major": ("token", "head", "head", "token", "head", "head"),
    "keys token-major": ("head", "token", "token", "head", "token", "token"),
    "q_c head-major": ("token", "token", "token", "head", "token", "token"),
    "v_c strided": ("token", "token", "token", "token", "token", "strided"),
    "q strided": ("strided", "token", "token", "token", "token", "token"),
}


def side_layouts(layouts):
    """The layout each of the six tensors is read in: its side's, contiguous where the side's first is neither."""
    queries, keys = ("token" if layouts[i] == "token" else "head" for i in (0, 1))
    return (queries, keys, keys, queries, keys, keys)


@pytest.mark.parametrize("layouts", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("dtype,backend,device", per_backend(DTYPES, kernel_backends))
def test_backend_error_at_most_twice_eager_in_every_layout(layouts, dtype, backend, device):
    tensors64 = make(seed=9, B=2, H=4, Hkv=2, Sq=17, Sk=20, D=16, R=4, Rv=3)
    assert_error_at_most_twice_eager(
        lambda *t, backend: recursive_kernels.circuit_attention(
            *(arranged(x, layout) for x, layout in zip(t, layouts)), causal=True, backend=backend),
        tensors64, backend, device, dtype)


@pytest.mark.parametrize("layouts", list(LAYOUTS.values()), ids=list(LAYOUTS))
@pytest.mark.parametrize("backend,device", kernel_backends(torch.float32, head_dim=8))
def test_results_come_back_in_their_sides_layouts(backend, device, layouts):
    """out and out_c in q's layout (for a token-major q, ``out.transpose(1, 2)`` is contiguous: the module's
    flatten is free), each gradient in its side's: its input's, for an input in its side's layout."""
    leaves = [arranged(t.detach().float().to(device), layout).requires_grad_()
              for t, layout in zip(make(seed=10, Sq=6, Sk=9), layouts)]
    out, out_c = recursive_kernels.circuit_attention(*leaves, causal=True, backend=backend)
    query_side = side_layouts(layouts)[0]
    assert out.stride() == arranged(out.detach(), query_side).stride()
    assert out_c.stride() == arranged(out_c.detach(), query_side).stride()
    grads = torch.autograd.grad((out, out_c), leaves, (arranged(torch.ones_like(out), "token"), torch.ones_like(out_c)))
    for name, grad, layout in zip(("q", "k", "v", "q_c", "k_c", "v_c"), grads, side_layouts(layouts)):
        assert grad.stride() == arranged(grad, layout).stride(), name


def test_cpp_reads_token_major_float32_in_place():
    """Token-major float32 inputs, and token-major gradients of the outputs, reach the cpp passes as they lie: no
    clone or copy of any of them, forward or backward (only the results are allocated)."""
    if "cpp" not in [p.values[0] for p in kernel_backends(torch.float32)]:
        pytest.skip("the cpp extension is not built")
    from torch.utils._python_dispatch import TorchDispatchMode

    copying = {torch.ops.aten.clone, torch.ops.aten.copy_, torch.ops.aten._to_copy}

    class Copies(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.seen = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            if func.overloadpacket in copying:
                self.seen.append(str(func))
            return func(*args, **(kwargs or {}))

    leaves = [arranged(t.detach().float(), "token").requires_grad_() for t in make(seed=11, Sq=9, Sk=11)]
    with Copies() as copies:
        out, out_c = recursive_kernels.circuit_attention(*leaves, causal=True, backend="cpp")
        torch.autograd.grad((out, out_c), leaves, (arranged(torch.ones_like(out), "token"),
                                                   arranged(torch.ones_like(out_c), "token")))
    assert copies.seen == []


@pytest.mark.parametrize("layouts", [LAYOUTS["q_c head-major"], LAYOUTS["v_c strided"]], ids=["q_c", "v_c"])
def test_cpp_called_directly_reads_each_side_in_its_first_tensors_layout(layouts):
    """Called without the Python layer, the cpp backend copies a tensor in another layout than its side's into
    it, as the op does: the same results as from normalised inputs."""
    if "cpp" not in [p.values[0] for p in kernel_backends(torch.float32)]:
        pytest.skip("the cpp extension is not built")
    from recursive_kernels import _C

    tensors = [t.detach().float() for t in make(seed=12, Sq=70, Sk=75)]  # joined operands from 64 query rows
    given = [arranged(t, layout) for t, layout in zip(tensors, layouts)]
    normalised = [arranged(t, layout) for t, layout in zip(tensors, side_layouts(layouts))]
    out, out_c, lse = _C.circuit_attention_forward(*given, None, None, 70, 75, True, 0.3)
    expected = _C.circuit_attention_forward(*normalised, None, None, 70, 75, True, 0.3)
    torch.testing.assert_close((out, out_c, lse), expected, rtol=0, atol=0)
    grad_out, grad_out_c = torch.ones_like(out), arranged(torch.ones_like(out_c), "head")
    grads = _C.circuit_attention_backward(grad_out, grad_out_c, *given, out, out_c, lse, None, None, 70, 75, True, 0.3)
    expected = _C.circuit_attention_backward(grad_out, grad_out_c, *normalised, out, out_c, lse, None, None, 70, 75,
                                             True, 0.3)
    torch.testing.assert_close(grads, expected, rtol=0, atol=0)


def test_gradcheck_float64_on_the_cpp_backend():
    if "cpp" not in [p.values[0] for p in kernel_backends(F64)]:
        pytest.skip("the cpp extension is not built")
    dense = make(B=1, H=2, Hkv=1, Sq=3, Sk=5, D=4, R=2, Rv=3)
    assert torch.autograd.gradcheck(
        lambda *t: recursive_kernels.circuit_attention(*t, causal=True, backend="cpp"), dense, eps=1e-6, atol=1e-6)
    packed, cu_q, cu_k = _varlen_inputs([2, 0, 3], [3, 2, 1], H=2, Hkv=1, D=4, R=2, Rv=2)
    assert torch.autograd.gradcheck(
        lambda q, k, v, q_c, k_c, v_c: recursive_kernels.circuit_attention_varlen(
            q, k, v, cu_q, cu_k, 3, 3, q_c, k_c, v_c, causal=True, backend="cpp"),
        packed, eps=1e-6, atol=1e-6)


@pytest.mark.parametrize("products", ["blas", "microkernel"])
@pytest.mark.parametrize("path", ["fused", "split"])
def test_both_cpp_backward_paths(path, products, monkeypatch):
    """The cpp backward picks its fused pass (items per (sequence, kv head)) or its split passes (per query
    block, then per key block) by the thread count, and its products go through torch's BLAS where torch
    exports one, else through its own micro-kernel; each, forced, stays within twice the eager error."""
    if "cpp" not in [p.values[0] for p in kernel_backends(torch.float32)]:
        pytest.skip("the cpp extension is not built")
    monkeypatch.setenv("RECURSIVE_KERNELS_CPU_ATTENTION_BACKWARD", path)
    monkeypatch.setenv("RECURSIVE_KERNELS_CPU_BLAS", "1" if products == "blas" else "0")
    # The last two: a mixed causal case, and one long enough for 256-row forward blocks and joined operands.
    for B, H, Hkv, Sq, Sk, D, R, Rv, causal in CASES + [(2, 4, 2, 150, 130, 16, 4, 4, True),
                                                        (1, 2, 1, 800, 900, 16, 4, 4, False)]:
        tensors64 = make(seed=5, B=B, H=H, Hkv=Hkv, Sq=Sq, Sk=Sk, D=D, R=R, Rv=Rv)
        for dtype in (torch.float32, torch.bfloat16):
            assert_error_at_most_twice_eager(
                lambda *t, backend: recursive_kernels.circuit_attention(*t, causal=causal, backend=backend),
                tensors64, "cpp", "cpu", dtype)
    for Sq, Sk in ((150, 130), (1, 17)):  # token-major, as models pass it: joined operands, and decoding
        assert_error_at_most_twice_eager(
            lambda *t, backend: recursive_kernels.circuit_attention(
                *(arranged(x, "token") for x in t), causal=True, backend=backend),
            make(seed=5, B=2, H=4, Hkv=2, Sq=Sq, Sk=Sk, D=16, R=4, Rv=4), "cpp", "cpu", torch.float32)
    lengths_q, lengths_k = [3, 0, 1, 70, 2], [5, 4, 19, 90, 0]
    packed, cu_q, cu_k = _varlen_inputs(lengths_q, lengths_k)
    assert_error_at_most_twice_eager(
        lambda q, k, v, q_c, k_c, v_c, backend: recursive_kernels.circuit_attention_varlen(
            q, k, v, cu_q, cu_k, max(lengths_q), max(lengths_k), q_c, k_c, v_c, causal=True, backend=backend),
        packed, "cpp", "cpu", torch.float32)
    dense = make(B=1, H=2, Hkv=1, Sq=3, Sk=5, D=4, R=2, Rv=3)
    assert torch.autograd.gradcheck(
        lambda *t: recursive_kernels.circuit_attention(*t, causal=True, backend="cpp"), dense, eps=1e-6, atol=1e-6)


def _fused_cpu_backend():
    served = [p.values[0] for p in kernel_backends(torch.float32) if p.values[1].type == "cpu"]
    if not served:
        pytest.skip("no fused backend serves CPU tensors here")
    return "cpp" if "cpp" in served else served[0]


# The custom op sees the backend interface's layouts: each side contiguous or token-major.
OPCHECK_LAYOUTS = {name: LAYOUTS[name] for name in ("token-major", "queries token-major")}


@pytest.mark.parametrize("layouts", [("head",) * 6, *OPCHECK_LAYOUTS.values()], ids=["head-major", *OPCHECK_LAYOUTS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", kernel_backends(torch.bfloat16, head_dim=8))  # they serve float32 too
def test_opcheck_custom_op(backend, device, dtype, layouts):
    """The fake's results (strides included: out and out_c in q's layout, gradients in their inputs') match
    what the backend returns, in each dtype."""
    from recursive_kernels.circuit_attention import _circuit_attention_op

    q, k, v, q_c, k_c, v_c = (arranged(t.detach().to(device, dtype), layout).requires_grad_(True)
                              for t, layout in zip(make(seed=4, Sq=9, Sk=11), layouts))
    torch.library.opcheck(_circuit_attention_op, (q, k, v, q_c, k_c, v_c, None, None, 9, 11, True, 0.3, backend))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("backend,device", kernel_backends(torch.bfloat16, op="circuit_attention_varlen"))
def test_opcheck_custom_op_packed(backend, device, dtype):
    from recursive_kernels.circuit_attention import _circuit_attention_op

    packed, cu_q, cu_k = _varlen_inputs([2, 4], [3, 5])
    packed = [t.detach().to(device, dtype).requires_grad_(True) for t in packed]
    torch.library.opcheck(_circuit_attention_op, (*packed, cu_q.to(device), cu_k.to(device), 4, 5, False, 0.25,
                                                  backend))


@pytest.mark.parametrize("layout", ["head", "token"])
def test_torch_compile_fullgraph_matches_eager(layout):
    backend = _fused_cpu_backend()
    tensors = [arranged(t.detach().float(), layout) for t in make(seed=6, Sq=9, Sk=9)]

    def loss(*t):
        out, out_c = recursive_kernels.circuit_attention(*t, causal=True, backend=backend)
        heads = out.transpose(1, 2).flatten(2)  # as the module reads it: a view only if out has the fake's strides
        return (heads * heads).sum() + out_c.sum()

    eager_leaves = [t.clone().requires_grad_(True) for t in tensors]
    compiled_leaves = [t.clone().requires_grad_(True) for t in tensors]
    eager_loss = loss(*eager_leaves)
    compiled_loss = torch.compile(loss, fullgraph=True, backend="aot_eager")(*compiled_leaves)
    torch.testing.assert_close(compiled_loss, eager_loss)
    for a, b in zip(torch.autograd.grad(compiled_loss, compiled_leaves), torch.autograd.grad(eager_loss, eager_leaves)):
        torch.testing.assert_close(a, b)


def test_triton_launch_grids_stay_within_cuda_limits(monkeypatch):
    """At B * H = 70000 every Triton launch's grid keeps axes 1 and 2 within CUDA's 65535 and axis 0 within
    2^31 - 1, and covers every (sequence, head, block) (B * H on axis 1 failed to launch past 65535)."""
    pytest.importorskip("triton")
    T = importlib.import_module("recursive_kernels.triton_circuit_attention")
    grids = {}

    def recorder(name):
        def run(*args, grid, warmup, **kwargs):  # launches nothing: only the grid is wanted
            grids[name] = grid({**kwargs, "BLOCK_M": 16, "BLOCK_N": 16}) if callable(grid) else grid
        return run

    for name in ("_fwd_kernel", "_bwd_preprocess_kernel", "_bwd_dq_kernel", "_bwd_dkdv_kernel"):
        monkeypatch.setattr(getattr(T, name), "run", recorder(name))
    B, H, S = 7000, 10, 40  # bfloat16: the 16-bit backward runs the preprocess kernel too
    q, k, v = (torch.zeros(B, H, S, 1, dtype=torch.bfloat16) for _ in range(3))
    out, out_c, lse = T.forward(q, k, v, None, None, None, None, None, S, S, True, 1.0)
    T.backward(out, out_c, q, k, v, None, None, None, out, out_c, lse, None, None, S, S, True, 1.0)
    assert sorted(grids) == ["_bwd_dkdv_kernel", "_bwd_dq_kernel", "_bwd_preprocess_kernel", "_fwd_kernel"]
    for name, grid in grids.items():
        assert grid[0] <= 2**31 - 1 and all(axis <= 65535 for axis in grid[1:]), (name, grid)
        block = 64 if name == "_bwd_preprocess_kernel" and not T.INTERPRET else 16
        assert math.prod(grid) == B * H * -(-S // block), (name, grid)


def test_registry_explains_what_a_backend_cannot_serve():
    from recursive_kernels import backends

    assert any("head dims up to 256" in r for r in backends.reasons("circuit_attention", "triton", torch.device("cpu"),
                                                                   dtype=torch.float32, head_dim=300))
    assert any("float64" in r for r in backends.reasons("circuit_attention", "triton", torch.device("cpu"),
                                                       dtype=F64, head_dim=16))
    q, k, v, *_ = make(D=8, R=None, Rv=None)
    with pytest.raises(recursive_kernels.BackendUnavailableError, match="triton"):
        recursive_kernels.circuit_attention(q, k, v, backend="triton")  # float64
    empty = [t[..., :0] for t in (q, k, v)]  # D = 0: only the reference serves it
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # the automatic choice says why it passed cpp over
        out, _ = recursive_kernels.circuit_attention(*empty)
    assert out.shape == q.shape[:-1] + (0,)


@pytest.mark.parametrize("backend,device", kernel_backends(torch.float32, head_dim=8))
def test_inference_calls_the_backend_without_autograd(backend, device, monkeypatch):
    """Under no_grad, or with no input requiring grad, the op skips autograd.Function: the same output, no graph."""
    inputs = [t.detach().float().to(device) for t in make(seed=7)]
    tracked = [t.detach().requires_grad_() for t in inputs]
    expected = recursive_kernels.circuit_attention(*tracked, causal=True, backend=backend)
    assert all(t.grad_fn is not None for t in expected)
    module = importlib.import_module("recursive_kernels.circuit_attention")

    def no_function(*args):
        raise AssertionError("autograd.Function used without a graph to record")

    monkeypatch.setattr(module._CircuitAttentionFunction, "apply", no_function)
    with torch.no_grad():
        inferred = recursive_kernels.circuit_attention(*tracked, causal=True, backend=backend)
    untracked = recursive_kernels.circuit_attention(*inputs, causal=True, backend=backend)
    for outputs in (inferred, untracked):
        assert all(t.grad_fn is None for t in outputs)
        torch.testing.assert_close(outputs, tuple(t.detach() for t in expected), rtol=0, atol=0)


@pytest.mark.parametrize("varlen", [False, True])
@pytest.mark.parametrize("backend,device", serving_backends("circuit_attention", torch.bfloat16, head_dim=8))
def test_autocast_runs_in_the_autocast_dtype(backend, device, varlen):
    """Under torch.autocast the op equals the op on inputs cast to the autocast dtype, and the float32
    inputs get float32 gradients."""
    inputs = [t.detach().float().to(device).requires_grad_() for t in make(seed=6, B=1)]
    low = [t.detach().bfloat16().requires_grad_() for t in inputs]
    if varlen:  # one sequence, packed: (S, heads, width)
        cu_q = torch.tensor([0, 5], dtype=torch.int32, device=device)
        cu_k = torch.tensor([0, 7], dtype=torch.int32, device=device)

        def attend(*t):
            packed = [x[0].transpose(0, 1) for x in t]
            return recursive_kernels.circuit_attention_varlen(*packed[:3], cu_q, cu_k, 5, 7, *packed[3:], causal=True,
                                                    backend=backend)
    else:
        def attend(*t):
            return recursive_kernels.circuit_attention(*t, causal=True, backend=backend)
    with torch.autocast(device.type, dtype=torch.bfloat16):
        out, out_c = attend(*inputs)
    expected, expected_c = attend(*low)
    assert out.dtype == out_c.dtype == torch.bfloat16
    torch.testing.assert_close((out, out_c), (expected, expected_c), rtol=0, atol=0)
    (out.float().sum() + out_c.float().square().sum()).backward()
    (expected.float().sum() + expected_c.float().square().sum()).backward()
    for p, q in zip(inputs, low):
        assert p.grad.dtype == torch.float32
        torch.testing.assert_close(p.grad, q.grad.float(), rtol=0, atol=0)
