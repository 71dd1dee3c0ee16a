"""Checks of the CUDA fallback backend's sources in ``csrc/cuda`` (the ``recursive_kernels._C_cuda`` extension).

On any machine:
  * the kernels (``lowrank_linear_kernels.cu`` and ``circuit_attention_kernels.cu``, plain CUDA C++) compile
    with nvcc for sm_90, without warnings, also with the flags torch's CUDAExtension adds (its
    -D__CUDA_NO_HALF_OPERATORS__ family);
  * the host code (``lowrank_linear_cuda.cpp``, ``circuit_attention_cuda.cpp``) and the binding
    (``extension_cuda.cpp``) pass a C++ syntax check against torch's headers.
On a machine with a CUDA device (skipped otherwise): the installed extension (or, where it is absent or older
than its sources, one built with ``torch.utils.cpp_extension.load``) is checked against the float64
references of ``recursive_kernels.reference``:
  * ``lowrank_linear_forward`` / ``lowrank_linear_backward`` (float32, float16, bfloat16; plain,
    single-adapter, per-row and top-2 gated modes; -1 slots, M = 0, non-contiguous operands);
  * ``circuit_attention_forward`` / ``_backward``, dense and packed: out, out_c, lse and all six
    gradients, error at most twice that of the same-dtype eager reference plus half an ulp (decode, Sq > Sk
    causal with fully masked rows, grouped heads, D from 1 to 256, absent corrections, ranks past one
    shared-memory chunk and outputs past one column group, packed batches with empty sequences, large
    logits), and bad inputs.
One module, longer than the others: the compile checks and the GPU checks share the source lists, the build of
the extension and the case tables.
"""

from __future__ import annotations

import importlib
import os
import pathlib
import shutil
import subprocess
import sysconfig
from typing import Dict, List, Optional

import pytest
import torch

from recursive_kernels.reference import circuit_attention_ref, circuit_attention_varlen_ref, lowrank_linear_ref
from tests.helpers import assert_error_rule

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNELS_CU = CUDA_DIR / "lowrank_linear_kernels.cu"
ATTENTION_CU = CUDA_DIR / "circuit_attention_kernels.cu"
KERNEL_SOURCES = (KERNELS_CU, ATTENTION_CU)
SHARED_CHECKS = ROOT / "csrc" / "checks.h"  # included by the host files, shared with the CPU backend
HOST_SOURCES = (CUDA_DIR / "lowrank_linear_cuda.cpp", CUDA_DIR / "circuit_attention_cuda.cpp",
                CUDA_DIR / "extension_cuda.cpp")
OUR_FILES = ("lowrank_linear_kernels.cu", "lowrank_linear_kernels.h", "circuit_attention_kernels.cu",
             "circuit_attention_kernels.h", "element_conversions.cuh", "checks.h", "kernel_launch.h", "ops_cuda.h",
             "lowrank_linear_cuda.cpp", "circuit_attention_cuda.cpp", "extension_cuda.cpp")
COMPILE_TIMEOUT_S = 300

# The macros torch's CUDAExtension passes to nvcc (torch.utils.cpp_extension.COMMON_NVCC_FLAGS).
_TORCH_NVCC_FLAGS_FALLBACK = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]


# --------------------------------------------------------------------------------------------------
# helpers for the compile checks
# --------------------------------------------------------------------------------------------------


def _run(cmd: List[str], timeout: int = COMPILE_TIMEOUT_S) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


def _report(cmd: List[str], proc: subprocess.CompletedProcess) -> str:
    return f"command: {' '.join(cmd)}\nexit status: {proc.returncode}\n--- output ---\n{proc.stdout}{proc.stderr}"


def _warnings_about_our_files(output: str) -> List[str]:
    return [line for line in output.splitlines()
            if "warning" in line.lower() and any(name in line for name in OUR_FILES)]


def _nvcc() -> str:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH; cannot compile the CUDA kernels on this machine")
    return nvcc


def _cuda_include_dir() -> Optional[pathlib.Path]:
    """A directory holding cuda_runtime_api.h (the CUDA toolkit's headers), or None."""
    roots = [os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH")]
    try:
        from torch.utils.cpp_extension import CUDA_HOME

        roots.append(CUDA_HOME)
    except Exception:  # pragma: no cover - a broken torch install
        pass
    nvcc = shutil.which("nvcc")
    if nvcc:
        roots.append(str(pathlib.Path(nvcc).resolve().parent.parent))
    roots.append("/usr/local/cuda")
    for root in roots:
        if not root:
            continue
        for sub in ("include", "targets/x86_64-linux/include", "targets/sbsa-linux/include"):
            candidate = pathlib.Path(root) / sub
            if (candidate / "cuda_runtime_api.h").is_file():
                return candidate
    return None


# --------------------------------------------------------------------------------------------------
# compile checks (no GPU needed)
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda p: p.name)
def test_kernels_compile_with_nvcc(tmp_path, source):
    nvcc = _nvcc()
    obj = tmp_path / (source.stem + ".o")
    cmd = [nvcc, "-c", "-std=c++17", "-gencode=arch=compute_90,code=sm_90", "-o", str(obj), str(source)]
    proc = _run(cmd)
    assert proc.returncode == 0, _report(cmd, proc)
    assert obj.stat().st_size > 0
    assert "warning" not in (proc.stdout + proc.stderr).lower(), _report(cmd, proc)


@pytest.mark.parametrize("source", KERNEL_SOURCES, ids=lambda p: p.name)
def test_kernels_compile_with_torch_extension_flags(tmp_path, source):
    """The flags setup.py's CUDAExtension uses: -O3, torch's half/bf16 macros, sm_80 + sm_90 + PTX."""
    nvcc = _nvcc()
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS

        torch_flags = list(COMMON_NVCC_FLAGS)
    except Exception:
        torch_flags = list(_TORCH_NVCC_FLAGS_FALLBACK)
    cmd = [nvcc, "-c", "-O3", "-std=c++17", *torch_flags,
           "-gencode=arch=compute_80,code=sm_80",
           "-gencode=arch=compute_90,code=sm_90",
           "-gencode=arch=compute_90,code=compute_90",
           "-Xcompiler", "-Wall,-Wextra",
           "-o", str(tmp_path / (source.stem + ".o")), str(source)]
    proc = _run(cmd)
    assert proc.returncode == 0, _report(cmd, proc)
    assert not _warnings_about_our_files(proc.stdout + proc.stderr), _report(cmd, proc)
    assert "warning" not in (proc.stdout + proc.stderr).lower(), _report(cmd, proc)


def _torch_needs_cpp20() -> bool:
    """torch 2.14's headers stop a compiler below C++20 with an ``#error``; earlier ones take C++17 too."""
    from torch.utils.cpp_extension import include_paths

    headers = [pathlib.Path(p) / "ATen" / "ATen.h" for p in include_paths()]
    return any("C++20 or later" in h.read_text() for h in headers if h.is_file())


@pytest.mark.parametrize("std", ["c++17", "c++20"])
def test_binding_syntax(std):
    if std == "c++17" and _torch_needs_cpp20():
        pytest.skip(f"torch {torch.__version__} requires C++20")
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ / c++) on PATH")
    cuda_include = _cuda_include_dir()
    if cuda_include is None:
        pytest.skip("the CUDA toolkit headers (cuda_runtime_api.h) are not installed; the host code includes them "
                    "through c10/cuda")
    from torch.utils.cpp_extension import include_paths

    torch_includes = [pathlib.Path(p) for p in include_paths()]
    c10_cuda = [p / "c10" / "cuda" for p in torch_includes if (p / "c10" / "cuda" / "CUDAGuard.h").is_file()]
    if not c10_cuda:
        pytest.skip("this torch install ships no c10/cuda headers (CUDAGuard.h)")
    defines = ["-DTORCH_EXTENSION_NAME=_C_cuda", "-DTORCH_API_INCLUDE_EXTENSION_H"]
    if not (c10_cuda[0] / "impl" / "cuda_cmake_macros.h").is_file():
        # CPU wheels of torch ship c10/cuda without this generated file; c10 has a switch to do without it
        # (it only matters for the export macros on Windows).
        defines.append("-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE")
    cmd = [cxx, "-fsyntax-only", f"-std={std}", "-Wall", "-Wextra", *defines, f"-I{CUDA_DIR}"]
    for inc in [*torch_includes, cuda_include, pathlib.Path(sysconfig.get_paths()["include"])]:
        cmd += ["-isystem", str(inc)]  # their own warnings are not ours
    cmd += [str(p) for p in HOST_SOURCES]
    proc = _run(cmd)
    assert proc.returncode == 0, _report(cmd, proc)
    assert not _warnings_about_our_files(proc.stdout + proc.stderr), _report(cmd, proc)


# --------------------------------------------------------------------------------------------------
# numerical checks on a CUDA device
# --------------------------------------------------------------------------------------------------


def reference_u(x, lora_a, indices, adapter):
    """u[t, j] = x[t] @ lora_a[e[t, j]]^T, zeros for -1 slots (float64)."""
    x = x.double()
    a = lora_a.double()
    if indices is None:
        return (x @ a[adapter].T).unsqueeze(1)
    safe = indices.clamp(min=0)
    u = torch.einsum("mk,mjrk->mjr", x, a[safe])
    return u * (indices >= 0).unsqueeze(-1).to(u.dtype)


# One case: sizes, mode ("plain", "single", "indexed"), and the layout of each operand.
CASES: List[Dict] = [
    dict(id="plain-bias", M=17, K=113, N=17, mode="plain", bias=True),
    dict(id="plain-M0", M=0, K=17, N=3, mode="plain", bias=False),
    dict(id="single-xT", M=17, K=113, N=3, r=16, E=16, adapter=5, mode="single", bias=True, x="transposed"),
    dict(id="single-r1", M=3, K=17, N=113, r=1, E=1, adapter=0, mode="single", bias=False, grad_y="slice"),
    dict(id="perrow-neg", M=113, K=17, N=113, r=16, E=16, k=1, mode="indexed", bias=False, gates=False,
         x="slice", grad_y="transposed"),
    dict(id="top2-gates", M=113, K=113, N=113, r=16, E=16, k=2, mode="indexed", bias=True, gates=True,
         lora="transposed"),
    dict(id="top2-M0", M=0, K=17, N=3, r=16, E=16, k=2, mode="indexed", bias=True, gates=True),
    dict(id="tiny-r1", M=1, K=3, N=1, r=1, E=1, k=1, mode="indexed", bias=True, gates=False),
    dict(id="dup-slots", M=3, K=1, N=17, r=1, E=16, k=2, mode="indexed", bias=False, gates=True, dup=True),
    dict(id="big-odd", M=300, K=1023, N=300, r=20, E=8, k=2, mode="indexed", bias=True, gates=True,
         x="transposed", grad_y="slice", lora="transposed"),
]


def _matrix(rows, cols, layout, gen):
    """A float64 (rows, cols) CPU matrix with the given memory layout."""
    if layout == "transposed":
        return torch.randn(cols, rows, generator=gen, dtype=torch.float64).t()
    if layout == "slice":
        return torch.randn(rows, cols + 5, generator=gen, dtype=torch.float64)[:, 2:2 + cols]
    return torch.randn(rows, cols, generator=gen, dtype=torch.float64)


def _factor(E, d0, d1, layout, gen):
    """A float64 (E, d0, d1) tensor; "transposed": stored as (E, d1, d0) and viewed back."""
    if layout == "transposed":
        return torch.randn(E, d1, d0, generator=gen, dtype=torch.float64).transpose(1, 2)
    return torch.randn(E, d0, d1, generator=gen, dtype=torch.float64)


def _to(t, dtype, device):
    """Cast and move, keeping a non-contiguous layout (the cast happens on the same strided view)."""
    if t is None:
        return None
    return t.to(dtype=dtype).to(device=device) if t.is_contiguous() else _strided_copy(t, dtype, device)


def _strided_copy(t, dtype, device):
    # Rebuild the same kind of view on the target device: allocate the base, copy values, take the view.
    if t.dim() == 2 and t.stride(0) == 1 and t.stride(1) != 1:  # a transposed matrix
        return t.t().contiguous().to(dtype=dtype, device=device).t()
    if t.dim() == 2:  # a column slice
        base = torch.zeros(t.shape[0], t.shape[1] + 5, dtype=dtype, device=device)
        view = base[:, 2:2 + t.shape[1]]
        view.copy_(t.to(dtype))
        return view
    if t.dim() == 3:  # a transposed factor
        return t.transpose(1, 2).contiguous().to(dtype=dtype, device=device).transpose(1, 2)
    raise AssertionError("unexpected layout")


def _make_inputs(case, dtype, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    M, K, N = case["M"], case["K"], case["N"]
    x = _matrix(M, K, case.get("x", "contiguous"), gen)
    weight = _matrix(N, K, "contiguous", gen) / K ** 0.5
    bias = torch.randn(N, generator=gen, dtype=torch.float64) if case.get("bias") else None
    grad_y = _matrix(M, N, case.get("grad_y", "contiguous"), gen)
    lora_a = lora_b = indices = gates = None
    adapter = 0
    scaling = 0.75
    if case["mode"] != "plain":
        E, r = case["E"], case["r"]
        lora_a = _factor(E, r, K, case.get("lora", "contiguous"), gen) / K ** 0.5
        lora_b = _factor(E, N, r, case.get("lora", "contiguous"), gen) / r ** 0.5
        if case["mode"] == "single":
            adapter = case["adapter"]
        else:
            k = case["k"]
            indices = torch.randint(-1, E, (M, k), generator=gen)
            if M * k > 1:
                indices.view(-1)[0] = -1  # always at least one empty slot
            if case.get("dup") and k >= 2 and M > 0:
                indices[:, 1] = indices[:, 0].clamp(min=0)  # the same adapter twice in a row
            if case.get("gates"):
                gates = torch.rand(M, k, generator=gen, dtype=torch.float64) + 0.25
    return dict(
        x=_to(x, dtype, device), weight=_to(weight, dtype, device), bias=_to(bias, dtype, device),
        lora_a=_to(lora_a, dtype, device), lora_b=_to(lora_b, dtype, device),
        indices=None if indices is None else indices.to(device),
        gates=None if gates is None else gates.to(torch.float32).to(device),
        scaling=scaling, adapter=adapter, grad_y=_to(grad_y, dtype, device),
    )


_GRAD_NAMES = ("x", "weight", "bias", "lora_a", "lora_b", "gates")


def _reference_results(inp, dtype):
    """(y, grads) of the reference in `dtype` (inputs' values, autograd), on the inputs' device; for float64
    everything is moved to the CPU first."""
    device = torch.device("cpu") if dtype == torch.float64 else inp["x"].device
    leaves = {}
    for name in _GRAD_NAMES:
        t = inp[name]
        if t is None:
            continue
        t = t.detach().to(device=device, dtype=torch.float64 if dtype == torch.float64 else
                          (torch.float32 if name == "gates" else dtype))
        leaves[name] = t.requires_grad_(True)
    indices = None if inp["indices"] is None else inp["indices"].to(device)
    y = lowrank_linear_ref(leaves["x"], leaves["weight"], leaves.get("bias"), leaves.get("lora_a"),
                           leaves.get("lora_b"), indices, leaves.get("gates"), inp["scaling"], inp["adapter"])
    grad_y = inp["grad_y"].detach().to(device=device, dtype=y.dtype)
    names = list(leaves)
    grads = torch.autograd.grad(y, [leaves[n] for n in names], grad_y, allow_unused=True)
    out = {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, grads)}
    return y.detach(), out


def _error(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.detach().double().cpu() - ref.detach().double().cpu()).norm())


def _norm(t: torch.Tensor) -> float:
    return float(t.detach().double().cpu().norm())


def _check_close(name, ours, ref64, eager, dtype):
    assert tuple(ours.shape) == tuple(ref64.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(ref64.shape)}"
    if dtype == torch.float32:
        assert torch.isfinite(ours).all(), f"{name}: non-finite values"
        err, scale = _error(ours, ref64), _norm(ref64)
        assert err <= 1e-5 * scale + 1e-30, f"{name}: relative error {err / max(scale, 1e-30):.3g} > 1e-5"
    else:
        assert_error_rule(name, ours, ref64, eager, dtype, floor=1e-5)


def check_case(mod, case, dtype, device, seed=0):
    """Run the backend `mod` (forward + backward) on one case and compare with the references."""
    inp = _make_inputs(case, dtype, device, seed)
    x, weight, bias = inp["x"], inp["weight"], inp["bias"]
    lora_a, lora_b, indices, gates = inp["lora_a"], inp["lora_b"], inp["indices"], inp["gates"]
    scaling, adapter, grad_y = inp["scaling"], inp["adapter"], inp["grad_y"]
    M = x.shape[0]
    has_lora = lora_a is not None

    y, u = mod.lowrank_linear_forward(x, weight, bias, lora_a, lora_b, indices, gates, scaling, adapter)
    y64, grads64 = _reference_results(inp, torch.float64)
    eager_y, eager_grads = (None, {}) if dtype == torch.float32 else _reference_results(inp, dtype)

    assert y.dtype == dtype and y.device == x.device and y.is_contiguous()
    _check_close("y", y, y64, eager_y, dtype)
    assert u.dtype == torch.float32 and u.device == x.device
    if has_lora:
        k = 1 if indices is None else indices.shape[1]
        assert tuple(u.shape) == (M, k, lora_a.shape[1]) and u.is_contiguous()
        u64 = reference_u(x.cpu(), lora_a.cpu(), None if indices is None else indices.cpu(), adapter)
        err, scale = _error(u, u64), _norm(u64)
        assert err <= 1e-5 * scale + 1e-30, f"u: relative error {err / max(scale, 1e-30):.3g} > 1e-5"
        if indices is not None:
            assert (u.cpu()[indices.cpu() < 0] == 0).all(), "u: -1 slots must be zero"
    else:
        assert u.numel() == 0

    needs = [True, True, bias is not None, has_lora, has_lora, gates is not None]
    grads = mod.lowrank_linear_backward(grad_y, x, weight, lora_a, lora_b, indices, gates, scaling, adapter, u,
                                        needs)
    assert len(grads) == 6
    expected_dtype = {"x": dtype, "weight": dtype, "bias": dtype, "lora_a": dtype, "lora_b": dtype,
                      "gates": torch.float32}
    for name, need, g in zip(_GRAD_NAMES, needs, grads):
        if not need:
            assert g.numel() == 0, f"d{name}: expected an empty tensor when not needed"
            continue
        assert g.dtype == expected_dtype[name], f"d{name}: dtype {g.dtype}, expected {expected_dtype[name]}"
        assert g.device == x.device and g.is_contiguous(), f"d{name}: expected a contiguous tensor on {x.device}"
        _check_close(f"d{name}", g, grads64[name], eager_grads.get(name), dtype)
    if gates is not None and M > 0:
        dgates = grads[5].cpu()
        assert (dgates[indices.cpu() < 0] == 0).all(), "dgates: -1 slots must get zero"

    # Subsets of `needs` (each low-rank gradient on its own) give the same values and empties elsewhere.
    for only in range(6):
        if not needs[only] or only in (1, 2):
            continue
        partial = [i == only for i in range(6)]
        again = mod.lowrank_linear_backward(grad_y, x, weight, lora_a, lora_b, indices, gates, scaling, adapter, u,
                                            partial)
        for i, g in enumerate(again):
            if i != only:
                assert g.numel() == 0, f"needs={partial}: d{_GRAD_NAMES[i]} should be empty"
        torch.testing.assert_close(again[only].float(), grads[only].float(),
                                   **({} if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)))


def _installed_cuda_ext():
    """recursive_kernels._C_cuda when it imports and was built after every source changed (on a GPU machine a
    second build for the test would cost minutes), else None."""
    try:
        mod = importlib.import_module("recursive_kernels._C_cuda")
    except ImportError:
        return None
    built = pathlib.Path(mod.__file__).stat().st_mtime
    sources = [*(p for p in CUDA_DIR.iterdir() if p.suffix in (".cu", ".cuh", ".h", ".cpp")), SHARED_CHECKS]
    return mod if all(p.stat().st_mtime <= built for p in sources) else None


@pytest.fixture(scope="module")
def cuda_ext(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA backend's numerics are checked on GPU machines only")
    from torch.utils import cpp_extension

    installed = _installed_cuda_ext()
    if installed is not None:
        return installed
    if cpp_extension.is_ninja_available():
        build_dir = tmp_path_factory.mktemp("cuda_ext_build")
        return cpp_extension.load(
            name="recursive_kernels_cuda_sources_test",
            sources=[str(p) for p in (*KERNEL_SOURCES, *HOST_SOURCES)],
            extra_include_paths=[str(CUDA_DIR)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            build_directory=str(build_dir),
            verbose=False,
        )
    pytest.skip("ninja is not available to build the extension, and no up-to-date recursive_kernels._C_cuda imports")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", CASES, ids=[c["id"] for c in CASES])
def test_cuda_backend_matches_reference(cuda_ext, case, dtype):
    check_case(cuda_ext, case, dtype, torch.device("cuda"))
    torch.cuda.synchronize()


def test_cuda_backend_rejects_bad_inputs(cuda_ext):
    x = torch.randn(4, 8, device="cuda")
    w = torch.randn(5, 8, device="cuda")
    with pytest.raises(RuntimeError, match="weight"):
        cuda_ext.lowrank_linear_forward(x, w.double(), None, None, None, None, None, 1.0, 0)
    with pytest.raises(RuntimeError, match="x"):
        cuda_ext.lowrank_linear_forward(x.cpu(), w.cpu(), None, None, None, None, None, 1.0, 0)
    a = torch.randn(2, 3, 8, device="cuda")
    b = torch.randn(2, 5, 4, device="cuda")  # wrong rank
    with pytest.raises(RuntimeError, match="lora_b"):
        cuda_ext.lowrank_linear_forward(x, w, None, a, b, torch.zeros(4, 1, dtype=torch.long, device="cuda"),
                                        None, 1.0, 0)


# --------------------------------------------------------------------------------------------------
# circuit_attention (dense and packed varlen) on a CUDA device
# --------------------------------------------------------------------------------------------------

# Dense cases. Tiles are 16 rows x 32 columns, contractions are staged 32 columns at a time and a block
# accumulates at most 256 output columns, so the sizes below cross every one of those boundaries.
ATTENTION_CASES: List[Dict] = [
    dict(id="decode", B=2, H=4, Hkv=2, Sq=1, Sk=17, D=64, R=16, Rv=3, causal=True),
    dict(id="sq-gt-sk-causal", B=1, H=2, Hkv=1, Sq=40, Sk=17, D=40, R=16, Rv=3, causal=True),
    dict(id="gqa-d40-no-qk-corr", B=2, H=6, Hkv=2, Sq=33, Sk=50, D=40, R=0, Rv=3, causal=True),
    dict(id="d128-no-v-corr", B=1, H=4, Hkv=4, Sq=65, Sk=65, D=128, R=16, Rv=0, causal=False),
    dict(id="d128-r16-rv3-gqa", B=1, H=4, Hkv=1, Sq=47, Sk=80, D=128, R=16, Rv=3, causal=True),
    dict(id="plain-causal", B=2, H=2, Hkv=1, Sq=17, Sk=33, D=80, R=0, Rv=0, causal=True),
    dict(id="d256-ranks-70-64", B=1, H=2, Hkv=1, Sq=20, Sk=37, D=256, R=70, Rv=64, causal=True),
    dict(id="d1-r1-rv1", B=1, H=3, Hkv=3, Sq=3, Sk=113, D=1, R=1, Rv=1, causal=False),
    dict(id="large-logits-d112", B=1, H=2, Hkv=2, Sq=33, Sk=33, D=112, R=16, Rv=16, causal=False, large=True),
]

# Packed cases: per-sequence lengths (empty sequences, a query without keys, Sq > Sk causal).
VARLEN_CASES: List[Dict] = [
    dict(id="varlen-empty-seqs", lens_q=[3, 0, 40, 1, 9], lens_k=[5, 7, 33, 0, 4], H=4, Hkv=2, D=40, R=16, Rv=3,
         causal=True),
    dict(id="varlen-d128-plain", lens_q=[17, 33], lens_k=[1, 64], H=2, Hkv=1, D=128, R=0, Rv=0, causal=False),
    dict(id="varlen-d96-no-v-corr", lens_q=[20, 0, 5], lens_k=[20, 3, 30], H=2, Hkv=2, D=96, R=5, Rv=0,
         causal=True),
]

_ATTENTION_NAMES = ("q", "k", "v", "q_c", "k_c", "v_c")


def _attention_inputs(case, seed=0):
    """float64 CPU inputs of a case (None for an absent correction), plus the upstream gradients."""
    gen = torch.Generator().manual_seed(seed)
    H, Hkv, D, R, Rv = case["H"], case["Hkv"], case["D"], case["R"], case["Rv"]
    if "lens_q" in case:
        rows_q, rows_k = [sum(case["lens_q"]), H], [sum(case["lens_k"]), Hkv]
    else:
        rows_q, rows_k = [case["B"], H, case["Sq"]], [case["B"], Hkv, case["Sk"]]

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    t = dict(q=randn(*rows_q, D), k=randn(*rows_k, D), v=randn(*rows_k, D),
             q_c=randn(*rows_q, R) if R else None, k_c=randn(*rows_k, R) if R else None,
             v_c=randn(*rows_k, Rv) if Rv else None)
    if case.get("large"):
        t["q"], t["k"] = t["q"] * 5, t["k"] * 3
        t["q_c"] = t["q_c"] * 5
    grad_out = randn(*rows_q, D)
    grad_out_c = randn(*rows_q, Rv) if Rv else None
    return t, grad_out, grad_out_c


def _cu_seqlens(lengths, device):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=device)


def _reference_attention(case, inputs, grad_out, grad_out_c, dtype, device, scale):
    """(out, out_c, grads by name) of the reference in `dtype` on `device`, by autograd."""
    leaves = {n: None if t is None else t.to(device=device, dtype=dtype).requires_grad_(True)
              for n, t in inputs.items()}
    args = [leaves[n] for n in _ATTENTION_NAMES]
    if "lens_q" in case:
        cu_q, cu_k = _cu_seqlens(case["lens_q"], device), _cu_seqlens(case["lens_k"], device)
        out, out_c = circuit_attention_varlen_ref(*args[:3], cu_q, cu_k, *args[3:], case["causal"], scale)
    else:
        out, out_c = circuit_attention_ref(*args, case["causal"], scale)
    outs = [out] + ([out_c] if out_c is not None else [])
    upstream = [grad_out] + ([grad_out_c] if out_c is not None else [])
    names = [n for n in _ATTENTION_NAMES if leaves[n] is not None]
    grads = torch.autograd.grad(outs, [leaves[n] for n in names],
                                [g.to(device=device, dtype=dtype) for g in upstream], allow_unused=True)
    by_name = {n: (torch.zeros_like(leaves[n]) if g is None else g) for n, g in zip(names, grads)}
    return out.detach(), (None if out_c is None else out_c.detach()), by_name


def _reference_lse(case, inputs, scale):
    """float64 logsumexp of each row of S over the keys it sees, laid out like the backend's lse."""
    def dense_lse(q, k, q_c, k_c):  # (B, H, Sq, .) and (B, Hkv, Sk, .)
        group = q.shape[1] // k.shape[1]
        k = k.repeat_interleave(group, 1)
        scores = scale * (q @ k.transpose(-1, -2))
        if q_c is not None:
            scores = scores + q_c @ k_c.repeat_interleave(group, 1).transpose(-1, -2)
        if case["causal"]:
            Sq, Sk = q.shape[2], k.shape[2]
            visible = torch.ones(Sq, Sk, dtype=torch.bool).tril(Sk - Sq)
            scores = scores.masked_fill(~visible, float("-inf"))
        return torch.logsumexp(scores, dim=-1)  # -inf for a row without visible keys (also when Sk = 0)

    q, k, q_c, k_c = (inputs[n] for n in ("q", "k", "q_c", "k_c"))
    if "lens_q" not in case:
        return dense_lse(q, k, q_c, k_c)
    rows = []
    starts_q, starts_k = _cu_seqlens(case["lens_q"], "cpu").tolist(), _cu_seqlens(case["lens_k"], "cpu").tolist()
    for b in range(len(case["lens_q"])):
        rq, rk = slice(starts_q[b], starts_q[b + 1]), slice(starts_k[b], starts_k[b + 1])

        def dense(t, r):
            return None if t is None else t[r].transpose(0, 1).unsqueeze(0)

        rows.append(dense_lse(dense(q, rq), dense(k, rk), dense(q_c, rq), dense(k_c, rk))[0])  # (H, len_q)
    return torch.cat(rows, dim=1)


def _fully_masked_rows(case):
    """Boolean (rows_q,) over the packed or per-(b, h) query rows: True where a query sees no key."""
    if "lens_q" in case:
        masks = []
        for nq, nk in zip(case["lens_q"], case["lens_k"]):
            last = torch.arange(nq) + (nk - nq) if case["causal"] else torch.full((nq,), nk - 1)
            masks.append((last < 0) | (nk == 0))
        return torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
    Sq, Sk = case["Sq"], case["Sk"]
    last = torch.arange(Sq) + (Sk - Sq) if case["causal"] else torch.full((Sq,), Sk - 1)
    return (last < 0) | (Sk == 0)


def run_attention_backend(mod, case, inputs, grad_out, grad_out_c, dtype, device, scale):
    """Forward and backward of the extension `mod` on the case's inputs cast to `dtype` on `device`:
    (out, out_c, lse, [dq, dk, dv, dq_c, dk_c, dv_c])."""
    t = {n: None if x is None else x.to(dtype=dtype).to(device) for n, x in inputs.items()}
    g_out = grad_out.to(dtype=dtype).to(device)
    g_out_c = grad_out_c.to(dtype=dtype).to(device) if grad_out_c is not None else torch.empty(0, dtype=dtype,
                                                                                                   device=device)
    if "lens_q" in case:
        layout = (_cu_seqlens(case["lens_q"], device), _cu_seqlens(case["lens_k"], device), max(case["lens_q"]),
                  max(case["lens_k"]))
    else:
        layout = (None, None, case["Sq"], case["Sk"])
    operands = [t[n] for n in _ATTENTION_NAMES]
    out, out_c, lse = mod.circuit_attention_forward(*operands, *layout, case["causal"], scale)
    grads = mod.circuit_attention_backward(g_out, g_out_c, *operands, out, out_c, lse, *layout, case["causal"], scale)
    return out, out_c, lse, list(grads)


def check_attention_case(mod, case, dtype, device, seed=0):
    """Run the extension `mod` on one case and compare everything with the float64 and eager references."""
    inputs, grad_out, grad_out_c = _attention_inputs(case, seed)
    # The references see the inputs the kernels see: rounded to `dtype`.
    inputs = {n: None if x is None else x.to(dtype).double() for n, x in inputs.items()}
    grad_out = grad_out.to(dtype).double()
    grad_out_c = None if grad_out_c is None else grad_out_c.to(dtype).double()
    scale = case["D"] ** -0.5
    out, out_c, lse, grads = run_attention_backend(mod, case, inputs, grad_out, grad_out_c, dtype, device, scale)
    ref_out, ref_out_c, ref_grads = _reference_attention(case, inputs, grad_out, grad_out_c, torch.float64, "cpu",
                                                          scale)
    eager_out, eager_out_c, eager_grads = _reference_attention(case, inputs, grad_out, grad_out_c, dtype, device,
                                                                scale)

    def check(name, ours, ref, eager):
        assert tuple(ours.shape) == tuple(ref.shape), f"{name}: shape {tuple(ours.shape)} != {tuple(ref.shape)}"
        assert ours.dtype == dtype and ours.device.type == torch.device(device).type and ours.is_contiguous(), (
            f"{name}: expected a contiguous {dtype} tensor on {device}, got {ours.dtype} on {ours.device}")
        if ref.numel() == 0:
            return
        assert_error_rule(name, ours, ref, eager, dtype)

    check("out", out, ref_out, eager_out)
    if ref_out_c is None:
        assert out_c.numel() == 0, "out_c: expected an empty tensor without v_c"
    else:
        check("out_c", out_c, ref_out_c, eager_out_c)
    assert len(grads) == 6
    for name, g in zip(_ATTENTION_NAMES, grads):
        if inputs[name] is None:
            assert g.numel() == 0, f"d{name}: expected an empty tensor for an absent correction"
        else:
            check(f"d{name}", g, ref_grads[name], eager_grads[name])
    assert len({id(g) for g in grads}) == 6, "every gradient must be its own tensor"

    # lse: dtype, layout and values (float64 logsumexp of the same rounded inputs); -inf exactly where a row
    # sees no key.
    assert lse.dtype == (torch.float64 if dtype == torch.float32 else torch.float32), f"lse: dtype {lse.dtype}"
    ref_lse = _reference_lse(case, inputs, scale)
    lse = lse.cpu().double()
    assert lse.shape == ref_lse.shape, f"lse: shape {tuple(lse.shape)} != {tuple(ref_lse.shape)}"
    masked = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), masked), "lse: -inf exactly where a row sees no key"
    assert not torch.isnan(lse).any()
    lse_err = (lse[~masked] - ref_lse[~masked]).abs()
    assert (lse_err <= 1e-5 * (1 + ref_lse[~masked].abs())).all(), f"lse: max error {lse_err.max():.3e}"

    # Rows that see no key: exact zeros in out, out_c and the query gradients.
    rows = _fully_masked_rows(case)
    if rows.any():
        row_dim = 0 if "lens_q" in case else 2
        for name, t in (("out", out), ("out_c", out_c), ("dq", grads[0]), ("dq_c", grads[3])):
            if t.numel():
                assert (t.cpu().index_select(row_dim, rows.nonzero()[:, 0]) == 0).all(), f"{name}: masked rows"


@pytest.fixture(scope="module")
def attention_ext(cuda_ext):
    if not hasattr(cuda_ext, "circuit_attention_forward"):
        pytest.skip("this build of the extension predates circuit_attention; rebuild it")
    return cuda_ext


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ATTENTION_CASES + VARLEN_CASES, ids=[c["id"] for c in ATTENTION_CASES + VARLEN_CASES])
def test_cuda_circuit_attention_matches_reference(attention_ext, case, dtype):
    check_attention_case(attention_ext, case, dtype, torch.device("cuda"))
    torch.cuda.synchronize()


def test_cuda_circuit_attention_varlen_matches_dense(attention_ext):
    """One packed batch of equal lengths is the dense batch, bit for bit (the same kernels, other strides)."""
    gen = torch.Generator().manual_seed(7)
    B, H, Hkv, Sq, Sk, D, R, Rv = 3, 4, 2, 19, 23, 40, 8, 3
    dense = [torch.randn(B, h, S, w, generator=gen).cuda() for h, S, w in
             ((H, Sq, D), (Hkv, Sk, D), (Hkv, Sk, D), (H, Sq, R), (Hkv, Sk, R), (Hkv, Sk, Rv))]
    packed = [t.transpose(1, 2).reshape(-1, t.shape[1], t.shape[3]).contiguous() for t in dense]
    cu_q, cu_k = _cu_seqlens([Sq] * B, "cuda"), _cu_seqlens([Sk] * B, "cuda")
    out, out_c, lse = attention_ext.circuit_attention_forward(*dense, None, None, Sq, Sk, True, 0.3)
    p_out, p_out_c, p_lse = attention_ext.circuit_attention_forward(*packed, cu_q, cu_k, Sq, Sk, True, 0.3)
    assert torch.equal(p_out, out.transpose(1, 2).reshape(-1, H, D))
    assert torch.equal(p_out_c, out_c.transpose(1, 2).reshape(-1, H, Rv))
    assert torch.equal(p_lse, lse.permute(1, 0, 2).reshape(H, -1))


def _small_attention_inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    shapes = dict(q=(2, 4, 5, 8), k=(2, 2, 7, 8), v=(2, 2, 7, 8), q_c=(2, 4, 5, 3), k_c=(2, 2, 7, 3), v_c=(2, 2, 7, 2))
    return {n: torch.randn(*s, generator=gen).to(dtype).cuda() for n, s in shapes.items()}


@pytest.mark.parametrize(
    "change,argument",
    [
        (lambda a: a.update(k=a["k"].double()), "k"),
        (lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double(), q_c=a["q_c"].double(),
                            k_c=a["k_c"].double(), v_c=a["v_c"].double()), "q"),
        (lambda a: a.update(q=a["q"].cpu()), "q"),
        (lambda a: a.update(v=a["v"][..., :-1]), "v"),
        (lambda a: a.update(k=torch.cat([a["k"]] * 3, 1)[:, :3], v=torch.cat([a["v"]] * 3, 1)[:, :3]), "k"),
        (lambda a: a.update(k_c=None), "k_c"),
        (lambda a: a.update(q_c=None), "q_c"),
        (lambda a: a.update(k_c=a["k_c"][..., :-1]), "k_c"),
        (lambda a: a.update(v_c=a["v_c"][:, :1]), "v_c"),
        (lambda a: a.update(q_c=a["q_c"].cpu()), "q_c"),
    ],
)
def test_cuda_circuit_attention_rejects_bad_inputs(attention_ext, change, argument):
    args = _small_attention_inputs()
    change(args)
    with pytest.raises(RuntimeError, match=f"^{argument}:"):
        attention_ext.circuit_attention_forward(*(args[n] for n in _ATTENTION_NAMES), None, None, 5, 7, False, 0.5)


def test_cuda_circuit_attention_backward_rejects_bad_inputs(attention_ext):
    a = _small_attention_inputs()
    args = [a[n] for n in _ATTENTION_NAMES]
    dense = (None, None, 5, 7, True, 0.5)
    out, out_c, lse = attention_ext.circuit_attention_forward(*args, *dense)
    with pytest.raises(RuntimeError, match="^lse:"):  # float32 inputs keep float64 statistics
        attention_ext.circuit_attention_backward(out, out_c, *args, out, out_c, lse.float(), *dense)
    with pytest.raises(RuntimeError, match="^grad_out_c:"):
        attention_ext.circuit_attention_backward(out, out_c[..., :1], *args, out, out_c, lse, *dense)
    with pytest.raises(RuntimeError, match="^grad_out:"):
        attention_ext.circuit_attention_backward(out[:, :, :-1], out_c, *args, out, out_c, lse, *dense)


def test_cuda_circuit_attention_varlen_rejects_bad_inputs(attention_ext):
    gen = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(n, 2, 4, generator=gen).cuda() for n in (8, 11, 11))
    cu_q, cu_k = _cu_seqlens([3, 5], "cuda"), _cu_seqlens([4, 7], "cuda")
    no_corrections = (None, None, None)
    with pytest.raises(RuntimeError, match="^cu_seqlens_q:"):
        attention_ext.circuit_attention_forward(q, k, v, *no_corrections, cu_q.long(), cu_k, 5, 7, True, 0.5)
    with pytest.raises(RuntimeError, match="^cu_seqlens_k:"):
        attention_ext.circuit_attention_forward(q, k, v, *no_corrections, cu_q, cu_k[:-1], 5, 7, True, 0.5)
    with pytest.raises(RuntimeError, match="^cu_seqlens_k:"):  # one of the two offsets: neither layout
        attention_ext.circuit_attention_forward(q, k, v, *no_corrections, cu_q, None, 5, 7, True, 0.5)
    with pytest.raises(RuntimeError, match="^k:"):
        attention_ext.circuit_attention_forward(q, k[..., :3], v, *no_corrections, cu_q, cu_k, 5, 7, True, 0.5)
    with pytest.raises(RuntimeError, match="^max_seqlen_k:"):
        attention_ext.circuit_attention_forward(q, k, v, *no_corrections, cu_q, cu_k, 5, -1, True, 0.5)
