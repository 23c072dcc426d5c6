"""PyTorch references of the packed matmul kernels (kernels/packed_matmul.cu): dequantize the
packed weight, then one matmul. They run wherever the kernels cannot, and tests compare against
them."""

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor

from tsld_ds.packed.format import dequantize_packed


def packed_linear_reference(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Optional[Tensor],
    bias: Optional[Tensor],
    bits: int,
    group_size: Optional[int],
) -> Tensor:
    """x [..., K] @ W^T + bias with W dequantized from the packed tensors (tsld_ds.packed.format).
    Like the kernel it accumulates in float32 (float64 for float64 x) and rounds once to x's
    dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = dequantize_packed(
        weight_packed, weight_scale, weight_zero_point, bits, group_size, x.shape[-1], compute
    )
    out = F.linear(x.to(compute), weight, None if bias is None else bias.to(compute))
    return out.to(x.dtype)
