"""W2A16 / W4A16 linear on packed weights (tsld_ds.packed.format): the CUDA kernel
(kernels/packed_matmul.cu) where it applies, else the PyTorch reference."""

from typing import Optional

import torch
from torch import Tensor

from ._extension import extension, matmul_supported
from .reference import packed_linear_reference

KERNEL_DTYPES = (torch.float16, torch.bfloat16)


def packed_matmul_kernel(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Optional[Tensor],
    bias: Optional[Tensor],
    bits: int,
    group_size: Optional[int],
    *,
    out: Optional[Tensor] = None,
) -> Tensor:
    """Run the CUDA kernel: x [M, K] (fp16/bf16) -> [M, N]; weight_scale float32."""
    module = extension()
    if module is None:
        raise RuntimeError("tsld_ds CUDA kernels are unavailable; see tsld_ds.ops.kernels_info()")
    x = x.contiguous()
    if out is None:
        out = torch.empty(x.shape[0], weight_packed.shape[0], dtype=x.dtype, device=x.device)
    stream = torch.cuda.current_stream(x.device).cuda_stream
    module.packed_matmul(x, weight_packed, weight_scale, weight_zero_point, bias, out, bits,
                         group_size or -1, stream)
    return out


def _kernel_applies(x: Tensor, bits: int, group_size: Optional[int]) -> bool:
    return (
        x.is_cuda
        and x.dtype in KERNEL_DTYPES
        and bits in (2, 4)
        and (group_size is None or group_size % 16 == 0)
        and not (torch.is_grad_enabled() and x.requires_grad)  # the kernel has no backward
        and extension() is not None
        and matmul_supported(x.device)
    )


def packed_linear(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Optional[Tensor] = None,
    bias: Optional[Tensor] = None,
    *,
    bits: int,
    group_size: Optional[int] = None,
) -> Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] with W given by its packed tensors."""
    if not _kernel_applies(x, bits, group_size):
        return packed_linear_reference(
            x, weight_packed, weight_scale, weight_zero_point, bias, bits, group_size
        )
    scale = weight_scale if weight_scale.dtype == torch.float32 else weight_scale.float()
    bias = None if bias is None else bias.to(x.dtype)
    out = packed_matmul_kernel(
        x.reshape(-1, x.shape[-1]), weight_packed, scale, weight_zero_point, bias, bits, group_size
    )
    return out.view(*x.shape[:-1], out.shape[-1])
