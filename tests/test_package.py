"""The package as users install it: its import names beside Hugging Face's ``kernels`` distribution (which
transformers >= 5.25 requires), ``python -m recursive info``, and installs whose compiled backend fails to build."""

import importlib.util
import os
import shutil
import site
import subprocess
import sys
import sysconfig
import venv
from pathlib import Path

import pytest

import recursive_kernels

ROOT = Path(__file__).resolve().parents[1]
IMPORT_ALL = ("import kernels, recursive_kernels, recursive; "
              "print(kernels.__file__); print(recursive_kernels.lowrank_linear.__module__); "
              "print(recursive.RecursiveForCausalLM.__name__)")


def _python(*args, cwd, env=None, timeout=300):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, timeout=timeout,
                          env={**os.environ, **(env or {})})


@pytest.mark.skipif(importlib.util.find_spec("kernels") is None, reason="Hugging Face's kernels is not installed")
@pytest.mark.parametrize("where", ["checkout", "elsewhere"])
def test_hub_kernels_and_this_package_import_in_one_process(where, tmp_path):
    """From the checkout's root (on sys.path, as under ``python -m``) the folder ``kernels/`` does not hide
    Hugging Face's package of that name."""
    proc = _python("-c", IMPORT_ALL, cwd=ROOT if where == "checkout" else tmp_path)
    assert proc.returncode == 0, proc.stderr
    hub_file, op_module, model = proc.stdout.split()
    assert Path(hub_file).resolve().parent != ROOT / "kernels"
    assert (op_module, model) == ("recursive_kernels.lowrank_linear", "RecursiveForCausalLM")


def test_source_folder_imported_as_kernels_hands_the_name_on(tmp_path):
    foreign = tmp_path / "kernels"
    foreign.mkdir()
    (foreign / "__init__.py").write_text("NAME = 'foreign'\n")
    code = "import sys; sys.path[:0] = sys.argv[1:]; import kernels; print(kernels.NAME)"
    proc = _python("-c", code, str(ROOT), str(tmp_path), cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "foreign", proc.stderr
    # no other `kernels` anywhere (-S: no site-packages): a clear error, and the name is left free
    code = ("import sys; sys.path[:0] = [sys.argv[1]]\ntry:\n    import kernels\nexcept ModuleNotFoundError as e:\n"
            "    print(e.name, 'kernels' in sys.modules, e)")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _python("-S", "-c", code, str(ROOT), cwd=elsewhere)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("kernels False ") and "recursive_kernels" in proc.stdout, proc.stdout


def test_info_lists_versions_and_every_backend():
    proc = _python("-m", "recursive", "info", cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    for module in ("torch", "triton", "numpy", "transformers"):
        assert any(line.startswith(module + " ") for line in lines), proc.stdout
    for name in recursive_kernels.backends.BACKENDS:
        assert any(line.strip().startswith(name + " ") and ("available" in line) for line in lines), proc.stdout


def _source_copy(tmp_path: Path) -> Path:
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "*.so", "_build.json", "__pycache__", ".pytest_cache", ".benchmarks"))
    return source


OURS = {"recursive", "recursive_kernels", "recursive_benchmarks"}


def _environment_seeing_this_one(tmp_path: Path) -> str:
    """A new virtual environment that imports what this interpreter's site-packages hold (torch, pip,
    setuptools) through links, but neither this package, however it is installed here, nor any start-up hook
    (``.pth``): a developer's install of the package would otherwise answer imports that a tested install lacks.
    Returns its python."""
    environment = tmp_path / "venv"
    venv.create(environment)
    inner = Path(sysconfig.get_path("purelib", vars={"base": str(environment), "platbase": str(environment)}))
    for outer in map(Path, site.getsitepackages()):
        for entry in outer.iterdir() if outer.is_dir() else ():
            name = entry.name
            ours = name in OURS or name.startswith(("recursive_kernels-", "__editable__"))
            if not (ours or name.endswith(".pth") or (inner / name).exists()):
                (inner / name).symlink_to(entry)
    return str(environment / "bin" / "python")


def _installed_without_cpp(python: str, site_folder: Path, tmp_path: Path, env=None):
    """The installed package (run from outside any checkout) imports, names why cpp is missing, and its
    benchmark harness and command line run."""
    code = ("import sys, runpy, recursive, recursive_kernels, recursive_benchmarks.runner; "
            "from recursive_kernels import backends; print(recursive_kernels.__file__); print(backends.report()['cpp']); "
            "sys.argv[1:] = ['info']; runpy.run_module('recursive', run_name='__main__')")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    location, cpp, *info = proc.stdout.splitlines()
    assert Path(location).resolve().is_relative_to(site_folder.resolve())
    assert cpp.startswith("not built at install: its build failed"), cpp
    assert any(line.startswith("  cpp     unavailable: not built at install") for line in info), info


@pytest.mark.slow
def test_a_failed_cpp_build_still_installs(tmp_path):
    """CXX=false makes every C++ compile fail: a normal install and an editable one both go through, leave the
    backend out, and record why; nothing installs a top-level ``kernels``."""
    source = _source_copy(tmp_path)
    python = _environment_seeing_this_one(tmp_path)
    env = {**os.environ, "CXX": "false", "RECURSIVE_KERNELS_NO_CUDA": "1", "PIP_NO_INDEX": "1"}

    def pip_install(*args):
        proc = subprocess.run([python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", *args],
                              capture_output=True, text=True, cwd=tmp_path, env=env, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]

    target = tmp_path / "target"
    pip_install("--target", str(target), str(source))
    assert (target / "recursive_kernels" / "__init__.py").exists() and not (target / "kernels").exists()
    assert not list(target.glob("recursive_kernels/_C*"))
    _installed_without_cpp(python, target, tmp_path, {"PYTHONPATH": str(target)})

    pip_install("-e", str(source))
    _installed_without_cpp(python, source, tmp_path)
