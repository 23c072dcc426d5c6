"""Builds the DeepSpeed ops the end-to-end tests' runs load (its Adam for the accelerator, and the
CPU Adam of optimizer offload) into TORCH_EXTENSIONS_DIR: what every rank would otherwise
JIT-compile on first use, done once per venv. tests/conftest.py starts it beside the tests that
start no process; a rank that needs an op while it builds waits for the build's lock.

    python tests/drivers/build_deepspeed_ops.py
"""
from deepspeed.accelerator import get_accelerator

for name in ("FusedAdamBuilder", "CPUAdamBuilder"):
    builder = get_accelerator().create_op_builder(name)
    if builder is not None and builder.is_compatible():
        builder.load(verbose=False)
        print(f"{builder.NAME}: built", flush=True)
