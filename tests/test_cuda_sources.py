"""Checks of the CUDA fallback backend's sources in ``csrc/cuda`` (the ``kernels._C_cuda`` extension).

On any machine:
  * the kernels (``lowrank_linear_kernels.cu``, plain CUDA C++) compile with nvcc for sm_90, without
    warnings, also with the flags torch's CUDAExtension adds (its -D__CUDA_NO_HALF_OPERATORS__ family);
  * the binding (``extension_cuda.cpp``) passes a C++ syntax check against torch's headers.
On a machine with a CUDA device (skipped otherwise): the extension is built with
``torch.utils.cpp_extension.load`` and its ``lowrank_linear_forward`` / ``lowrank_linear_backward`` are
checked against the float64 reference ``kernels.reference.lowrank_linear_ref`` (float32, float16, bfloat16;
plain, single-adapter, per-row and top-2 gated modes; -1 slots, M = 0, non-contiguous operands).
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

from kernels.reference import lowrank_linear_ref

ROOT = pathlib.Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "csrc" / "cuda"
KERNELS_CU = CUDA_DIR / "lowrank_linear_kernels.cu"
BINDING = CUDA_DIR / "extension_cuda.cpp"
OUR_FILES = ("lowrank_linear_kernels.cu", "lowrank_linear_kernels.h", "extension_cuda.cpp")
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


def test_kernels_compile_with_nvcc(tmp_path):
    nvcc = _nvcc()
    cmd = [nvcc, "-c", "-std=c++17", "-gencode=arch=compute_90,code=sm_90",
           "-o", str(tmp_path / "lowrank_linear_kernels.o"), str(KERNELS_CU)]
    proc = _run(cmd)
    assert proc.returncode == 0, _report(cmd, proc)
    assert (tmp_path / "lowrank_linear_kernels.o").stat().st_size > 0
    assert "warning" not in (proc.stdout + proc.stderr).lower(), _report(cmd, proc)


def test_kernels_compile_with_torch_extension_flags(tmp_path):
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
           "-o", str(tmp_path / "lowrank_linear_kernels.o"), str(KERNELS_CU)]
    proc = _run(cmd)
    assert proc.returncode == 0, _report(cmd, proc)
    assert not _warnings_about_our_files(proc.stdout + proc.stderr), _report(cmd, proc)
    assert "warning" not in (proc.stdout + proc.stderr).lower(), _report(cmd, proc)


@pytest.mark.parametrize("std", ["c++17", "c++20"])
def test_binding_syntax(std):
    cxx = shutil.which("g++") or shutil.which("c++")
    if cxx is None:
        pytest.skip("no C++ compiler (g++ / c++) on PATH")
    cuda_include = _cuda_include_dir()
    if cuda_include is None:
        pytest.skip("the CUDA toolkit headers (cuda_runtime_api.h) are not installed; the binding includes them "
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
    cmd.append(str(BINDING))
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
    y = lowrank_linear_ref(leaves["x"], leaves["weight"], leaves.get("bias"), leaves.get("lora_a"), leaves.get("lora_b"),
                  indices, leaves.get("gates"), inp["scaling"], inp["adapter"])
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
    assert torch.isfinite(ours).all(), f"{name}: non-finite values"
    err = _error(ours, ref64)
    scale = _norm(ref64)
    if dtype == torch.float32:
        assert err <= 1e-5 * scale + 1e-30, f"{name}: relative error {err / max(scale, 1e-30):.3g} > 1e-5"
    else:
        eager_err = _error(eager, ref64)
        bound = 2.0 * eager_err + 1e-5 * scale
        assert err <= bound, (f"{name}: error {err:.4g} > 2 x eager {dtype} error {eager_err:.4g} "
                              f"(+1e-5 x norm {scale:.4g})")


def check_case(mod, case, dtype, device, seed=0):
    """Run the backend `mod` (forward + backward) on one case and compare with the references."""
    inp = _make_inputs(case, dtype, device, seed)
    x, weight, bias = inp["x"], inp["weight"], inp["bias"]
    lora_a, lora_b, indices, gates = inp["lora_a"], inp["lora_b"], inp["indices"], inp["gates"]
    scaling, adapter, grad_y = inp["scaling"], inp["adapter"], inp["grad_y"]
    M, N = x.shape[0], weight.shape[0]
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


@pytest.fixture(scope="module")
def cuda_ext(tmp_path_factory):
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device: the CUDA backend's numerics are checked on GPU machines only")
    from torch.utils import cpp_extension

    if cpp_extension.is_ninja_available():
        build_dir = tmp_path_factory.mktemp("cuda_ext_build")
        return cpp_extension.load(
            name="recursive_kernels_cuda_sources_test",
            sources=[str(KERNELS_CU), str(BINDING)],
            extra_include_paths=[str(CUDA_DIR)],
            extra_cflags=["-O3"],
            extra_cuda_cflags=["-O3"],
            build_directory=str(build_dir),
            verbose=False,
        )
    try:  # no ninja: fall back to an installed build of the same sources
        return importlib.import_module("kernels._C_cuda")
    except Exception as exc:
        pytest.skip(f"ninja is not available to build the extension and kernels._C_cuda does not import ({exc})")


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
