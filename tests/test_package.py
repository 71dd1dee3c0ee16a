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
import torch

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
    # no other `kernels` anywhere (-S: no site-packages): a module that says so at any use (what transformers'
    # availability probe reads as "not installed": no __file__, no __version__)
    code = ("import sys; sys.path[:0] = [sys.argv[1]]\nimport kernels\nprint(getattr(kernels, '__file__', None))\n"
            "kernels.get_kernel")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    proc = _python("-S", "-c", code, str(ROOT), cwd=elsewhere)
    assert proc.stdout.strip() == "None", proc.stderr
    assert "AttributeError" in proc.stderr and "recursive_kernels" in proc.stderr, proc.stderr


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
            "from recursive_kernels import backends; print(recursive_kernels.__file__); "
            "print(backends.report()['cpp']); "
            "sys.argv[1:] = ['info']; runpy.run_module('recursive', run_name='__main__')")
    proc = subprocess.run([python, "-c", code], capture_output=True, text=True, cwd=tmp_path, timeout=120,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    location, cpp, *info = proc.stdout.splitlines()
    assert Path(location).resolve().is_relative_to(site_folder.resolve())
    assert cpp.startswith("not built at install: its build failed"), cpp
    assert any(line.startswith("  cpp     unavailable: not built at install") for line in info), info


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="two pip installs take minutes of a lent GPU's time; "
                    "the machines without one (CI) run this")
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


def _site_without_hub_kernels(tmp_path: Path) -> Path:
    """A folder of links to this interpreter's site-packages without Hugging Face's ``kernels`` and without this
    package's install, plus this checkout's folders under the package's import names: the packages of an
    environment where ``kernels`` is not installed (read with ``python -S``, no ``.pth`` hook)."""
    site_folder = tmp_path / "site"
    site_folder.mkdir()
    for outer in map(Path, site.getsitepackages()):
        for entry in outer.iterdir() if outer.is_dir() else ():
            name = entry.name
            hidden = (name == "kernels" or name.startswith("kernels-") or name in OURS or name.endswith(".pth")
                      or name.startswith(("recursive_kernels-", "recursive_kernels.", "__editable__")))
            if not hidden and not (site_folder / name).exists():
                (site_folder / name).symlink_to(entry)
    (site_folder / "recursive_kernels").symlink_to(ROOT / "kernels")
    (site_folder / "recursive_benchmarks").symlink_to(ROOT / "benchmarks")
    return site_folder


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="transformers is not installed")
@pytest.mark.parametrize("first", ["recursive", "transformers"])
def test_checkout_root_without_hub_kernels_imports_transformers(first, tmp_path):
    """From the checkout's root, where the folder kernels/ is findable as ``kernels``, and Hugging Face's is not
    installed: transformers imports its models (its probe for ``kernels`` says "not installed") whichever comes
    first, and ``import kernels`` says "not installed" too."""
    site_folder = _site_without_hub_kernels(tmp_path)
    imports = ["import recursive", "from transformers import LlamaConfig"]
    code = "\n".join([f"import sys; sys.path.insert(1, {str(site_folder)!r})",
                      *(imports if first == "recursive" else imports[::-1]),
                      "from transformers.utils import is_kernels_available",
                      "print(LlamaConfig.model_type, is_kernels_available())",
                      "import kernels",
                      "print(getattr(kernels, '__file__', None))",
                      "kernels.get_kernel"])
    proc = _python("-S", "-c", code, cwd=ROOT, timeout=300)
    lines = proc.stdout.split()
    assert lines[:2] == ["llama", "False"], proc.stderr
    if first == "recursive":  # the name is marked absent: no module
        assert proc.returncode == 1 and "ModuleNotFoundError: import of kernels halted" in proc.stderr, proc.stderr
    else:  # transformers found the folder first: a module that says what it is at any use
        assert lines[2] == "None" and "Hugging Face's kernels is not installed" in proc.stderr, proc.stderr
