"""Build peftkern and its C++/CUDA extension peftkern._C.

    pip install --no-build-isolation -e .      # builds against the torch already installed

The C++ CPU kernels (csrc/bindings.cpp, csrc/cpu/*.cpp) are always built. The CUDA kernels
(csrc/cuda/*.cu) are added when torch is a CUDA build and nvcc is found. PEFTKERN_NO_EXT=1 skips
the extension: peftkern then runs on Triton and its pure-PyTorch reference.
The Triton kernels live in the top-level folder kernels/ and install as peftkern.kernels.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

ROOT = os.path.dirname(os.path.abspath(__file__))
CXX_FLAGS = ["-O3", "-fopenmp", "-ffp-contract=off", "-std=c++17"]
NVCC_FLAGS = [
    "-O3", "-std=c++17",
    "-gencode", "arch=compute_80,code=sm_80",
    "-gencode", "arch=compute_90a,code=sm_90a",
    "-gencode", "arch=compute_90,code=compute_90",  # PTX: newer GPUs JIT-compile it at load
]


def _find_nvcc(cuda_home):
    if cuda_home:
        nvcc = os.path.join(cuda_home, "bin", "nvcc")
        if os.path.exists(nvcc):
            return nvcc
    return shutil.which("nvcc")


def _extensions():
    """(ext_modules, cmdclass) for setup(); empty when PEFTKERN_NO_EXT=1."""
    if os.environ.get("PEFTKERN_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    # Relative source paths: setuptools wants them relative to setup.py.
    sources = ["csrc/bindings.cpp"] + sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp")))
    cuda_sources = sorted(
        os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))
    common = dict(
        name="peftkern._C",
        include_dirs=[os.path.join(ROOT, "csrc", "include"), os.path.join(ROOT, "csrc")],
        extra_link_args=["-fopenmp"],
        py_limited_api=False,
    )
    if torch.version.cuda and cuda_sources and _find_nvcc(CUDA_HOME):
        ext = CUDAExtension(
            sources=sources + cuda_sources,
            define_macros=[("PEFTKERN_WITH_CUDA", None)],
            extra_compile_args={"cxx": CXX_FLAGS, "nvcc": NVCC_FLAGS},
            **common,
        )
    else:
        ext = CppExtension(sources=sources, extra_compile_args={"cxx": CXX_FLAGS}, **common)
    return [ext], {"build_ext": BuildExtension.with_options(no_python_abi_suffix=False)}


def _packages():
    found = find_packages(where=ROOT, include=["peftkern*"])
    return ["peftkern"] + [p for p in found if p != "peftkern"] + ["peftkern.kernels"]


ext_modules, cmdclass = _extensions()

setup(
    name="peftkern",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for LoRA, QLoRA and AdaLoRA",
    packages=_packages(),
    package_dir={"peftkern.kernels": "kernels"},
    package_data={"peftkern.ops": ["tuning.json"]},  # choices measured per GPU
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.3", "numpy", "safetensors"],  # tl.gather: 3.3
    extras_require={
        "bnb": ["bitsandbytes>=0.46"],
        "peft": ["peft", "transformers"],
        "bench": ["matplotlib", "bitsandbytes>=0.46", "peft", "transformers"],
        "test": ["pytest", "pytest-benchmark", "hypothesis", "bitsandbytes>=0.46", "peft", "transformers",
                 "matplotlib"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
