import glob
import os
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

# The CUDA sources also travel inside the package (tsld_ds/kernel_sources/ of a wheel), so that
# any install can JIT-compile them when no ahead-of-time build was made; an editable install
# reads kernels/ of the checkout. tsld_ds/ops/_extension.py looks in both.
KERNEL_SOURCES = sorted(glob.glob("kernels/*.cpp") + glob.glob("kernels/*.cu")
                        + glob.glob("kernels/*.cuh") + glob.glob("kernels/*.h"))


class BuildPyWithKernelSources(build_py):
    def run(self):
        super().run()
        target = os.path.join(self.build_lib, "tsld_ds", "kernel_sources")
        os.makedirs(target, exist_ok=True)
        for source in KERNEL_SOURCES:
            shutil.copy2(source, target)


def kernel_extensions():
    """Ahead-of-time build of kernels/ into tsld_ds._kernels. TSLD_BUILD_KERNELS=1 forces it,
    =0 skips it; unset: built when torch has CUDA and the toolkit is found, else the kernels are
    JIT-compiled on first use. Needs torch at build time: pip install --no-build-isolation -e ."""
    choice = os.environ.get("TSLD_BUILD_KERNELS", "").strip().lower()
    if choice in ("0", "false", "no"):
        return [], {}
    forced = choice in ("1", "true", "yes")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        if forced:
            raise
        return [], {}
    if not (torch.version.cuda and CUDA_HOME):
        if forced:
            raise RuntimeError("TSLD_BUILD_KERNELS=1 needs a CUDA build of torch and the CUDA "
                               f"toolkit (torch.version.cuda={torch.version.cuda}, "
                               f"CUDA_HOME={CUDA_HOME})")
        return [], {}
    extension = CUDAExtension(
        name="tsld_ds._kernels",
        sources=["kernels/bindings.cpp", *sorted(glob.glob("kernels/*.cu"))],
        include_dirs=["kernels"],
        extra_compile_args={"cxx": ["-O3"], "nvcc": ["-O3", "-lineinfo"]},
    )
    return [extension], {"build_ext": BuildExtension}


ext_modules, cmdclass = kernel_extensions()
cmdclass["build_py"] = BuildPyWithKernelSources

setup(
    name="tsld-ds",
    version="0.1.0",
    description="Ternary / 4-bit quantization-aware training of causal LMs with token-scaled "
    "logit distillation (TSLD) on DeepSpeed ZeRO-3",
    packages=find_packages(include=["tsld_ds", "tsld_ds.*"]),
    package_data={"tsld_ds": ["assets/**/*"]},
    include_package_data=True,
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    python_requires=">=3.9",
    install_requires=[
        # Any torch >= 2.1 works; CPU-only machines pin the CPU wheel before installing this.
        "torch>=2.1",
        "deepspeed>=0.14",
        "accelerate>=1.1",  # transformers needs it for HfDeepSpeedConfig (ZeRO-3 loading)
        "transformers>=4.56",  # config.dtype (before: torch_dtype)
        "datasets>=2.19",
        "sentencepiece",
        "safetensors",
        "gguf",  # launch/convert.py --format gguf (llama.cpp's TQ2_0 and Q4_1 tensors)
        "tqdm",
    ],
    extras_require={
        # compressed-tensors: interop checks of the packed format; lm-eval: eval.py --tasks on
        # a local task; matplotlib: test_reproduce; setuptools >= 70.1 builds wheels itself
        # (tests/ops/test_kernel_sources.py builds one)
        "test": ["pytest", "compressed-tensors", "lm-eval", "matplotlib", "setuptools>=70.1"],
        "results": ["matplotlib"],  # benchmarks/reproduce.py's plots
        "gpu": ["flash-attn", "bitsandbytes", "ninja"],
    },
    entry_points={
        "console_scripts": [
            "tsld-train=tsld_ds.train.cli:run",
            "tsld-cache=tsld_ds.teacher.cache_cli:run",
            "tsld-estimate=tsld_ds.capacity.cli:run",
            "tsld-convert=tsld_ds.convert.cli:main",
            "tsld-eval=tsld_ds.evaluation.cli:main",
        ]
    },
)
