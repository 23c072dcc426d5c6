"""The quantized layers' Triton kernels (kernels/, installed as `tsld_ds.kernels`): their
launchers, autograd and dispatch. Each op returns None where the kernels do not run (a CPU
tensor, no Triton, TSLD_DISABLE_KERNELS=1, ...), and its caller then runs the PyTorch reference:

- `fused_quantize(weight, cfg, scale)`: QuantLinear's fake-quantized weight (reference:
  `tsld_ds.quant.quantize_weight`).
- `packed_matmul(x, ...)`: W2A16 / W4A16 matmul on packed weights (reference:
  `tsld_ds.packed.format.packed_linear_reference`).
- `kernels_info()` / `kernels_summary()`: which implementation runs here, and why.

This package imports nothing from tsld_ds.quant or tsld_ds.packed, which sit above it.
"""

from .backend import kernels_info, kernels_summary
from .matmul import packed_matmul
from .quantize import fused_quantize

__all__ = ["fused_quantize", "kernels_info", "kernels_summary", "packed_matmul"]
