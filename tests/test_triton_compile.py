"""The Triton kernels compile for Hopper (sm_90) on a machine without a GPU (one with a GPU runs them instead).

``tests/triton_compile_check.py`` runs the backends' launchers with a compile-only driver (Triton's
bundled ptxas; nothing is launched). Here it runs in a subprocess (the test session sets
TRITON_INTERPRET=1, under which nothing compiles) with ``RECURSIVE_KERNELS_TRITON_AUTOTUNE=0``: every
kernel variant its quick cases reach (see ``quick()``), in the configuration a GPU test run uses, over
two processes. Every case in every dtype takes about 13 minutes on two cores, the sweep over every
autotuning configuration about 40; both run by hand: ``python tests/triton_compile_check.py --report FILE``.
"""

from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
CHECK = ROOT / "tests" / "triton_compile_check.py"


def _nvidia_tools_missing():
    try:
        import triton
    except ImportError:
        return "triton is not installed"
    bin_dir = pathlib.Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    missing = [tool for tool in ("ptxas", "cuobjdump") if not (bin_dir / tool).exists()]
    return f"triton's NVIDIA backend lacks {', '.join(missing)}" if missing else None


def _environment(**extra):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(PYTHONPATH=os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")]), **extra)
    return env


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU runs the kernels themselves (tests/test_lowrank_linear.py,"
                    " tests/test_circuit_attention.py); compiling them without launching is for machines without one")
def test_every_kernel_compiles_for_sm90_in_its_default_configuration():
    missing = _nvidia_tools_missing()
    if missing:
        pytest.skip(missing)
    proc = subprocess.run(
        [sys.executable, str(CHECK), "--arch", "90", "--quick", "--jobs", "2"],
        capture_output=True, text=True, cwd=ROOT, timeout=1800,
        env=_environment(RECURSIVE_KERNELS_TRITON_AUTOTUNE="0", TRITON_DEFAULT_FP_FUSION="1"),
    )
    assert proc.returncode == 0, f"exit status {proc.returncode}\n{proc.stdout}\n{proc.stderr[-5000:]}"
    launches = re.search(r"(\d+) launches", proc.stdout)
    assert launches and int(launches.group(1)) > 0, proc.stdout


@pytest.mark.parametrize("autotune, expect_one", [("0", True), ("1", False)])
def test_autotune_switch_sets_the_tuning_space(autotune, expect_one):
    pytest.importorskip("triton")
    code = (
        "from recursive_kernels import triton_lowrank_linear as L, triton_circuit_attention as A\n"
        "print(*(len(k.configs) for k in (L._linear_kernel, L._seg_shrink_kernel, L._seg_outer_kernel,"
        " A._fwd_kernel, A._bwd_dq_kernel, A._bwd_dkdv_kernel)))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=300,
                          env=_environment(RECURSIVE_KERNELS_TRITON_AUTOTUNE=autotune))
    assert proc.returncode == 0, proc.stderr
    counts = [int(n) for n in proc.stdout.split()]
    assert len(counts) == 6
    assert all(n == 1 for n in counts) if expect_one else all(n > 1 for n in counts), counts
