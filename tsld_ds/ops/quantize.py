"""Fused weight fake-quantization (kernels/fused_quantize.cu) for QuantLinear.

The reference is `tsld_ds.quant.quantize_weight`; the kernel computes the same formulas in the
same float32 operation order, one segment (row or group) per warp or block.
"""

from typing import Optional

import torch
from torch import Tensor

from ._extension import extension

METHOD_IDS = {"twn": 0, "absmean": 1, "minmax": 2}
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def num_segments(shape, group_size: int) -> int:
    rows, cols = shape
    width = group_size if 0 < group_size < cols else cols
    return 0 if cols == 0 else rows * -(-cols // width)


def quantize_kernel(
    weight: Tensor,
    method: str,
    bits: int,
    group_size: int = -1,
    out_dtype: Optional[torch.dtype] = None,
    *,
    out: Optional[Tensor] = None,
    stats: Optional[Tensor] = None,
) -> Tensor:
    """Run the fused kernel (CUDA only). `group_size` <= 0: one segment per row. `stats`, if
    given (float32 [segments, 2]), receives each segment's statistics: TWN (alpha, delta),
    absmean (alpha, 0), min-max (scale, zero)."""
    module = extension()
    if module is None:
        raise RuntimeError("tsld_ds CUDA kernels are unavailable; see tsld_ds.ops.kernels_info()")
    weight = weight.contiguous()
    if out is None:
        out = torch.empty_like(weight, dtype=out_dtype or weight.dtype)
    stream = torch.cuda.current_stream(weight.device).cuda_stream
    module.fused_quantize(weight, out, stats, METHOD_IDS[method], bits, group_size, stream)
    return out


class _FusedQuantize(torch.autograd.Function):
    """Forward: the fused kernel. Backward: straight-through, like the reference quantizers."""

    @staticmethod
    def forward(ctx, weight, method, bits, group_size, out_dtype):
        ctx.weight_dtype = weight.dtype
        return quantize_kernel(weight.detach(), method, bits, group_size, out_dtype)

    @staticmethod
    def backward(ctx, grad):
        return grad.to(ctx.weight_dtype), None, None, None, None


def fused_quantize(
    weight: Tensor, cfg, out_dtype: Optional[torch.dtype] = None
) -> Optional[Tensor]:
    """`quantize_weight(weight, cfg)` by the fused CUDA kernel, in `out_dtype` (default: the
    weight's), straight-through differentiable; or None when the kernel does not apply (no
    kernels, a CPU tensor, PACT's learned scale, per-tensor statistics, or a cast other than
    float32 -> 16 bits): the caller then runs the reference."""
    out_dtype = out_dtype or weight.dtype
    usable = (
        weight.is_cuda
        and weight.dim() == 2
        and cfg.method in METHOD_IDS
        and cfg.granularity in ("channel", "group")
        and weight.dtype in FLOAT_DTYPES
        and out_dtype in FLOAT_DTYPES
        and (out_dtype == weight.dtype or weight.dtype == torch.float32)
    )
    if not usable or extension() is None:
        return None
    group_size = cfg.group_size if cfg.granularity == "group" else -1
    return _FusedQuantize.apply(weight, cfg.method, cfg.bits, group_size, out_dtype)
