"""Build peftkern and its extension peftkern._C.

C++ CPU kernels are always built; CUDA kernels (csrc/cuda) only when torch is a CUDA build and
nvcc is found. PEFTKERN_NO_EXT=1 skips the extension (pure Python + Triton then).
Install with `pip install --no-build-isolation -e .` so the extension builds against your torch.
"""
import glob
import os
import shutil

from setuptools import find_packages, setup

CUDA_ARCHS = ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90a,code=sm_90a"]


def _extensions():
    if os.environ.get("PEFTKERN_NO_EXT") == "1":
        return [], {}
    import torch
    from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

    root = os.path.dirname(os.path.abspath(__file__))
    cxx = ["-O3", "-std=c++17", "-fopenmp", "-ffp-contract=off"]
    kw = dict(
        name="peftkern._C",
        sources=["csrc/bindings.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp")),
        include_dirs=[os.path.join(root, "csrc", "include"), os.path.join(root, "csrc")],
        extra_link_args=["-fopenmp"],
    )
    nvcc = shutil.which("nvcc") or (CUDA_HOME and os.path.join(CUDA_HOME, "bin", "nvcc"))
    if torch.version.cuda and nvcc and os.path.exists(nvcc):
        kw["sources"] += sorted(glob.glob("csrc/cuda/*.cu"))
        ext = CUDAExtension(**kw, define_macros=[("PEFTKERN_WITH_CUDA", None)],
                            extra_compile_args={"cxx": cxx, "nvcc": ["-O3", "-std=c++17"] + CUDA_ARCHS})
    else:
        ext = CppExtension(**kw, extra_compile_args=cxx)
    return [ext], {"build_ext": BuildExtension}


ext_modules, cmdclass = _extensions()

setup(
    name="peftkern",
    version="0.1.0",
    description="Fused Triton and C++/CUDA kernels for LoRA, QLoRA and AdaLoRA",
    packages=find_packages(include=["peftkern", "peftkern.*"]) + ["peftkern.kernels"],
    package_dir={"peftkern.kernels": "kernels"},
    python_requires=">=3.10",
    install_requires=["torch>=2.4", "triton>=3.0", "numpy", "safetensors"],
    extras_require={
        "bnb": ["bitsandbytes>=0.46"],
        "peft": ["peft", "transformers"],
        "test": ["pytest", "pytest-benchmark", "bitsandbytes>=0.46", "peft", "transformers"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
)
