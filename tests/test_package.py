"""The import name `kernels` is shared with Hugging Face's hub-kernels distribution (a requirement of
transformers >= 5.25): with both installed, one hides the other. The package says so instead of failing
with an unrelated ImportError."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import kernels

ROOT = Path(__file__).resolve().parents[1]


def test_hub_kernels_distribution_beside_this_package_warns(tmp_path, monkeypatch):
    dist_info = tmp_path / "kernels-0.19.1.dist-info"
    dist_info.mkdir()
    (dist_info / "METADATA").write_text("Metadata-Version: 2.1\nName: kernels\nVersion: 0.19.1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.warns(UserWarning, match=r"`kernels` 0\.19\.1 .*transformers < 5\.25"):
        kernels._warn_if_hub_kernels_installed()


def test_recursive_names_a_foreign_kernels_package_that_hides_ours(tmp_path):
    foreign = tmp_path / "kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    proc = subprocess.run([sys.executable, "-c", "import recursive"], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr and str(foreign / "__init__.py") in proc.stderr, proc.stderr


def test_info_lists_versions_and_every_backend():
    proc = subprocess.run([sys.executable, "-m", "recursive", "info"], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for module in ("torch", "triton", "numpy", "transformers"):
        assert any(line.startswith(module + " ") for line in lines), proc.stdout
    for name in kernels.backends.BACKENDS:
        assert any(line.strip().startswith(name + " ") and ("available" in line) for line in lines), proc.stdout
