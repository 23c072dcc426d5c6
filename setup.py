from setuptools import find_packages, setup

setup(
    name="tsld-ds",
    version="0.1.0",
    description="Ternary / 4-bit quantization-aware training of causal LMs with token-scaled "
    "logit distillation (TSLD) on DeepSpeed ZeRO-3",
    # The Triton kernels live in the top-level kernels/ and install as tsld_ds.kernels:
    # tsld_ds/kernels is a link to ../kernels, so a checkout on sys.path (pytest, launch/*.py, an
    # editable install) imports them from where they are and a wheel carries a copy. kernels/ has
    # no __init__.py: a regular package there would shadow the PyPI package `kernels` (which
    # transformers imports) for anything run from the repository root.
    packages=[*find_packages(include=["tsld_ds", "tsld_ds.*"]), "tsld_ds.kernels"],
    package_data={"tsld_ds": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.10",
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
        # (tests/ops/test_kernel_sources.py builds one); triton: the kernels' tests run them in
        # its CPU interpreter and compile them for sm_80/sm_90 (a GPU's torch brings its own);
        # cyllama: llama.cpp (b9190) as a prebuilt manylinux2014 wheel, which runs the GGUF
        # output in the tests (llama-cpp-python builds llama.cpp from source, ~35 min here);
        # ruff, import-linter: tests/test_code_style.py runs them (ruff.toml, .importlinter),
        # pinned so that a new rule of either fails no unchanged tree
        "test": ["pytest", "compressed-tensors", "lm-eval", "matplotlib", "setuptools>=70.1",
                 "triton==3.9.0", "cyllama==0.2.18", "ruff==0.17.6", "import-linter==2.17"],
        "results": ["matplotlib"],  # benchmarks/reproduce.py's plots
        "gpu": ["flash-attn", "bitsandbytes"],
    },
    entry_points={
        "console_scripts": [
            "tsld-train=tsld_ds.train.cli:run",
            "tsld-cache=tsld_ds.cache.cli:run",
            "tsld-estimate=tsld_ds.capacity.cli:run",
            "tsld-convert=tsld_ds.convert.cli:run",
            "tsld-eval=tsld_ds.evaluation.cli:run",
        ]
    },
)
