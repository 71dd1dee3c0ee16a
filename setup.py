"""Build and install recursive-kernels.

Installs the packages ``kernels`` and ``recursive`` and builds the compiled backends with
torch.utils.cpp_extension and ninja: ``kernels._C`` (C++/OpenMP, CPU) from ``csrc/*.cpp`` always, and
``kernels._C_cuda`` from ``csrc/cuda`` where torch has CUDA and nvcc exists. A backend that fails to build
is left out with a warning; the package then runs on the remaining backends (the pure-PyTorch reference
always works). Build against the installed torch: ``pip install --no-build-isolation -e .``
"""

import glob
import os
import sys

from setuptools import find_packages, setup


def _cuda_arch_flags():
    """sm_80 and sm_90 machine code plus sm_90 PTX, unless TORCH_CUDA_ARCH_LIST names the targets
    (torch then adds the flags; one architecture builds in half the time)."""
    if os.environ.get("TORCH_CUDA_ARCH_LIST"):
        return []
    return ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90",
            "-gencode=arch=compute_90,code=compute_90"]


def _extensions():
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension
    except ImportError:
        print("recursive-kernels: torch is not importable at build time; building no extension "
              "(install torch first and use --no-build-isolation)", file=sys.stderr)
        return [], {}
    openmp = ["-fopenmp"] if sys.platform.startswith("linux") else []
    modules = [
        CppExtension(
            "kernels._C",
            sorted(glob.glob("csrc/*.cpp")),
            extra_compile_args=["-O3", "-std=c++17", *openmp],
            extra_link_args=openmp,
        )
    ]
    cuda_sources = sorted(glob.glob("csrc/cuda/*.cu") + glob.glob("csrc/cuda/*.cpp"))
    if torch.version.cuda and CUDA_HOME and cuda_sources and os.environ.get("RECURSIVE_KERNELS_NO_CUDA") != "1":
        modules.append(
            CUDAExtension(
                "kernels._C_cuda",
                cuda_sources,
                extra_compile_args={"cxx": ["-O3", "-std=c++17"], "nvcc": ["-O3", "-std=c++17", *_cuda_arch_flags()]},
            )
        )

    class OptionalBuildExtension(BuildExtension):
        """Build each extension on its own; one that fails is reported and left out."""

        def build_extension(self, ext):
            try:
                super().build_extension(ext)
            except Exception as exc:  # a missing compiler raises many kinds of errors
                print(f"recursive-kernels: WARNING: could not build {ext.name} ({exc}); "
                      "that backend will be unavailable", file=sys.stderr)

    return modules, {"build_ext": OptionalBuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="recursive-kernels",
    version="0.1.0",
    description="Fused kernels and modules for recursive (weight-sharing) transformers",
    long_description=open("README.md").read() if os.path.exists("README.md") else "",
    long_description_content_type="text/markdown",
    packages=find_packages(include=["kernels", "kernels.*", "recursive", "recursive.*"]),
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "numpy", "safetensors", "triton; platform_system == 'Linux'"],
    extras_require={"test": ["pytest", "pytest-benchmark", "transformers>=4.45,<5.25"]},
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={"console_scripts": ["recursive=recursive.__main__:main"]},
)
