from setuptools import find_packages, setup

setup(
    name="tsld-ds",
    version="0.1.0",
    description="Ternary / 4-bit quantization-aware training of causal LMs with token-scaled "
    "logit distillation (TSLD) on DeepSpeed ZeRO-3",
    packages=find_packages(include=["tsld_ds", "tsld_ds.*"]),
    package_data={"tsld_ds": ["assets/**/*"]},
    include_package_data=True,
    python_requires=">=3.9",
    install_requires=[
        # Any torch >= 2.1 works; CPU-only machines pin the CPU wheel before installing this.
        "torch>=2.1",
        "deepspeed>=0.14",
        "accelerate>=1.1",  # transformers needs it for HfDeepSpeedConfig (ZeRO-3 loading)
        "transformers>=4.45",
        "datasets>=2.19",
        "sentencepiece",
        "safetensors",
        "tqdm",
    ],
    extras_require={
        "test": ["pytest"],
        "gpu": ["flash-attn", "bitsandbytes"],
    },
    entry_points={
        "console_scripts": [
            "tsld-train=tsld_ds.train.cli:main",
        ]
    },
)
