"""Linear layers whose weight stays packed (`tsld_ds.packed.format`) at inference: the W2A16 / W4A16
Triton kernels multiply the packed codes directly on a GPU; elsewhere the PyTorch reference
dequantizes."""


import torch
from torch import Tensor, nn

from tsld_ds.ops import packed_matmul
from tsld_ds.packed.format import (
    PackedWeight,
    dequantize_packed,
    num_groups,
    packed_linear_reference,
    packed_words,
)


def packed_linear(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None = None,
    bias: Tensor | None = None,
    *,
    bits: int,
    group_size: int | None = None,
) -> Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] with W given by its packed tensors: the kernels where
    they run (`tsld_ds.ops.packed_matmul`), else the reference."""
    out = packed_matmul(x, weight_packed, weight_scale, weight_zero_point, bias, bits=bits,
                        group_size=group_size)
    if out is None:
        out = packed_linear_reference(x, weight_packed, weight_scale, weight_zero_point, bias,
                                      bits, group_size)
    return out


class PackedLinear(nn.Module):
    """y = x W^T (+ b) with W held as compressed-tensors pack-quantized buffers: `weight_packed`
    (int32), `weight_scale` (float32, which the kernels read), `weight_zero_point` (int32, None
    when symmetric) and `weight_shape`. Inference only: no gradient reaches W."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bits: int,
        group_size: int | None = None,
        *,
        symmetric: bool = True,
        bias: bool = False,
        device=None,
        dtype: torch.dtype = torch.bfloat16,
    ):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.bits, self.group_size = bits, group_size
        groups = num_groups(in_features, group_size)
        words = packed_words(in_features, bits)
        self.register_buffer("weight_packed",
                             torch.zeros(out_features, words, dtype=torch.int32, device=device))
        self.register_buffer("weight_scale", torch.ones(out_features, groups, device=device))
        zero = None if symmetric else torch.zeros(packed_words(out_features, bits), groups,
                                                  dtype=torch.int32, device=device)
        self.register_buffer("weight_zero_point", zero)
        shape = torch.tensor([out_features, in_features], device=device)
        self.register_buffer("weight_shape", shape)
        self.bias = None
        if bias:
            zeros = torch.zeros(out_features, dtype=dtype, device=device)
            self.bias = nn.Parameter(zeros, requires_grad=False)

    @classmethod
    def from_packed(cls, weight: PackedWeight, bias: Tensor | None = None, **kwargs):
        """A module holding `weight` (and `bias`); kwargs go to the constructor (e.g. `bits` for
        PackedLinear itself)."""
        out_features, in_features = weight.weight_shape
        if bias is not None:
            kwargs["dtype"] = bias.dtype
        module = cls(in_features, out_features, group_size=weight.group_size,
                     symmetric=weight.symmetric, bias=bias is not None,
                     device=weight.weight_packed.device, **kwargs)
        if module.bits != weight.bits:
            raise ValueError(
                f"{cls.__name__} holds {module.bits}-bit weights, got {weight.bits} bits")
        module.weight_packed.copy_(weight.weight_packed)
        module.weight_scale.copy_(weight.weight_scale)
        if weight.weight_zero_point is not None:
            module.weight_zero_point.copy_(weight.weight_zero_point)
        if bias is not None:
            module.bias.copy_(bias)
        return module

    def dequantized_weight(self) -> Tensor:
        """W in float32."""
        return dequantize_packed(self.weight_packed, self.weight_scale, self.weight_zero_point,
                                 self.bits, self.group_size, self.in_features, torch.float32)

    def forward(self, x: Tensor) -> Tensor:
        return packed_linear(x, self.weight_packed, self.weight_scale, self.weight_zero_point,
                             self.bias, bits=self.bits, group_size=self.group_size)

    def extra_repr(self) -> str:
        group = "per channel" if self.group_size is None else f"group_size={self.group_size}"
        zero = "symmetric" if self.weight_zero_point is None else "asymmetric"
        return (f"in_features={self.in_features}, out_features={self.out_features}, "
                f"bits={self.bits}, {group}, {zero}, bias={self.bias is not None}")


class PackedTernaryLinear(PackedLinear):
    """W2A16: ternary codes -1/0/+1 times one scale per row (or per group)."""

    def __init__(self, in_features: int, out_features: int, group_size: int | None = None, *,
                 symmetric: bool = True, **kwargs):
        if not symmetric:
            raise ValueError("ternary weights are symmetric: they have no zero point")
        super().__init__(in_features, out_features, 2, group_size, **kwargs)


class PackedInt4Linear(PackedLinear):
    """W4A16: 4-bit codes, by default asymmetric per group of 128 with packed zero points."""

    def __init__(self, in_features: int, out_features: int, group_size: int | None = 128, *,
                 symmetric: bool = False, **kwargs):
        super().__init__(in_features, out_features, 4, group_size, symmetric=symmetric, **kwargs)
