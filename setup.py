"""Build and install recursive-kernels.

Installs three packages from the project's folders: ``recursive_kernels`` (the ops, from ``kernels/``; the name
``kernels`` belongs to Hugging Face's hub-kernels distribution), ``recursive`` (the modules, models and command
line) and ``recursive_benchmarks`` (the benchmark harness behind ``python -m recursive bench``, from
``benchmarks/``). It builds the compiled backends against the installed torch with torch.utils.cpp_extension
and ninja, hence ``pip install --no-build-isolation``:

- ``recursive_kernels._C`` (C++/OpenMP, CPU) from ``csrc/*.cpp``, always attempted;
- ``recursive_kernels._C_cuda`` from ``csrc/cuda``, attempted where torch has CUDA and a CUDA toolkit with its
  headers is found whose major version is torch's (``CUDA_HOME``, else the toolkit of the ``nvcc`` on PATH).

torch chooses the C++ standard (C++17 up to torch 2.13, C++20 from 2.14). A backend that is not attempted or
fails to build is left out with one warning; the install goes on, and the reason is recorded in
``recursive_kernels/_build.json``, which ``python -m recursive info`` shows.
"""

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import find_packages, setup

PACKAGE_DIRS = {"recursive_kernels": "kernels", "recursive_benchmarks": "benchmarks"}  # import name -> folder
BUILD_RECORD = "_build.json"  # {extension name: why it was left out}; read by recursive_kernels.backends
CPU_EXTENSION, CUDA_EXTENSION = "recursive_kernels._C", "recursive_kernels._C_cuda"


def _warn(message):
    print(f"recursive-kernels: WARNING: {message}", file=sys.stderr)


def _cuda_arch_flags():
    """sm_80 and sm_90 machine code plus sm_90 PTX, unless TORCH_CUDA_ARCH_LIST names the targets
    (torch then adds the flags; one architecture builds in half the time)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90"]


def _has_cuda_headers(root):
    patterns = [os.path.join(root, "include", "cuda_runtime.h"),
                os.path.join(root, "targets", "*", "include", "cuda_runtime.h")]
    return any(glob.glob(pattern) for pattern in patterns)


def _nvcc_toolkit(nvcc):
    """The toolkit folder of ``nvcc``, also when the one on PATH is a wrapper script or a link: nvcc names its
    own folder in a dry run (``#$ _HERE_=<toolkit>/bin``)."""
    try:
        # a dry run prints its set-up, then what it would run (nothing runs, the file need not exist)
        out = subprocess.run([nvcc, "--dryrun", "-c", "probe.cu"], capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    match = re.search(r"^#\$ _HERE_=(.+)$", out.stdout + out.stderr, re.MULTILINE)
    bin_folder = match.group(1).strip() if match else os.path.dirname(os.path.realpath(nvcc))
    return os.path.dirname(bin_folder)


def _cuda_toolkit():
    """(toolkit folder, None), or (None, why no usable toolkit was found)."""
    tried = []
    for variable in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(variable):
            tried.append(os.environ[variable])
    nvcc = shutil.which("nvcc")
    if nvcc:
        tried.append(_nvcc_toolkit(nvcc))
    tried.append("/usr/local/cuda")
    for root in filter(None, tried):
        if _has_cuda_headers(root) and os.path.exists(os.path.join(root, "bin", "nvcc")):
            return root, None
    return None, f"no CUDA toolkit with nvcc and cuda_runtime.h (tried {', '.join(filter(None, tried))})"


def _toolkit_version(root):
    out = subprocess.run([os.path.join(root, "bin", "nvcc"), "--version"], capture_output=True, text=True, timeout=60)
    match = re.search(r"release (\d+)\.(\d+)", out.stdout)
    return match.group(0).split()[1] if match else None


def _cuda_left_out(torch):
    """Why the CUDA extension is not attempted, or None; points torch at the toolkit it should use."""
    if os.environ.get("RECURSIVE_KERNELS_NO_CUDA") == "1":
        return "RECURSIVE_KERNELS_NO_CUDA=1"
    if not torch.version.cuda:
        return f"torch {torch.__version__} is built without CUDA"
    root, why = _cuda_toolkit()
    if why:
        return why
    version = _toolkit_version(root)
    if version is None or version.split(".")[0] != torch.version.cuda.split(".")[0]:
        return f"the CUDA toolkit in {root} is {version}, torch {torch.__version__} needs CUDA {torch.version.cuda}"
    os.environ["CUDA_HOME"] = root  # torch.utils.cpp_extension reads it at import
    return None


def _build_setup():
    """(extensions, cmdclass), with the backends that cannot be built recorded as left out."""
    try:
        import torch
    except ImportError:
        _warn("torch is not importable at build time; no compiled backend is built (install torch first and use "
              "pip install --no-build-isolation)")
        return [], {}
    left_out = {}
    cuda_reason = _cuda_left_out(torch)
    from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension

    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    extensions = [CppExtension(CPU_EXTENSION, sorted(glob.glob("csrc/*.cpp")), extra_compile_args=["-O3", *openmp],
                               extra_link_args=openmp)]
    if cuda_reason:
        left_out[CUDA_EXTENSION] = cuda_reason
    else:
        extensions.append(CUDAExtension(
            CUDA_EXTENSION, sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp")),
            extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", *_cuda_arch_flags()]},
        ))

    class OptionalBuildExtension(BuildExtension):
        """Builds each extension on its own (torch's checks included); one that fails is left out, with its
        reason in the build record, and the install goes on."""

        def build_extensions(self):
            wanted, built = self.extensions, []
            for extension in wanted:
                self.extensions = [extension]
                try:
                    super().build_extensions()
                except Exception as exc:  # compilers and torch's checks raise many kinds of errors
                    left_out[extension.name] = f"its build failed ({type(exc).__name__}: {exc}); rebuild with " \
                                               "pip install -v to see the compiler's messages"
                else:
                    built.append(extension)
            self.extensions = built  # what gets copied to the source folder (editable) and installed

        def run(self):
            super().run()
            for name, why in left_out.items():
                _warn(f"{name} is left out: {why}; that backend will be unavailable")
            folders = [os.path.join(self.build_lib, "recursive_kernels")]
            if self.inplace:  # an editable install runs from the source folder
                folders.append(PACKAGE_DIRS["recursive_kernels"])
            for folder in folders:
                os.makedirs(folder, exist_ok=True)
                with open(os.path.join(folder, BUILD_RECORD), "w") as f:
                    json.dump(left_out, f, indent=1)

    return extensions, {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _build_setup()

setup(
    name="recursive-kernels",
    version="0.1.0",
    description="Fused kernels and modules for recursive (weight-sharing) transformers",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=[*PACKAGE_DIRS, *find_packages(include=["recursive", "recursive.*"])],
    package_dir=PACKAGE_DIRS,
    package_data={"recursive_kernels": ["triton_tuning.json"]},  # stored autotuning choices, when a GPU run wrote some
    python_requires=">=3.10",
    install_requires=["torch>=2.11", "numpy>=1.24", "safetensors>=0.4", "triton>=3.6; platform_system == 'Linux'"],
    extras_require={
        "test": ["pytest>=7", "pytest-benchmark", "transformers>=4.45", "peft>=0.13", "matplotlib>=3.5"],
        "bench": ["transformers>=4.45", "peft>=0.13"],  # the peers the benchmarks time beside ours
        "plot": ["matplotlib>=3.5"],  # train --plot
        "reproduce": ["transformers>=4.45", "matplotlib>=3.5"],  # its conversions and figures
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["recursive=recursive.__main__:main"]},
)
