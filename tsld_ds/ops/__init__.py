"""Custom CUDA kernels of the quantized layers, each with its PyTorch reference.

- `fused_quantize(weight, cfg)`: QuantLinear's fake-quantized weight in one fused pass (None
  where the kernel does not apply; the reference is `tsld_ds.quant.quantize_weight`).
- `packed_linear(x, ...)`: W2A16 / W4A16 matmul on packed weights (`tsld_ds.packed.format`).
- `kernels_info()` / `kernels_summary()`: which implementation runs here, and why.
Set TSLD_DISABLE_KERNELS=1 to force the references.
"""

from ._extension import kernels_info, kernels_summary
from .packed_matmul import packed_linear, packed_matmul_kernel
from .quantize import fused_quantize, quantize_kernel
from .reference import packed_linear_reference

__all__ = [
    "fused_quantize",
    "kernels_info",
    "kernels_summary",
    "packed_linear",
    "packed_linear_reference",
    "packed_matmul_kernel",
    "quantize_kernel",
]
