"""Packed integer weights: the one layout shared by the packer, the Triton kernels
(`kernels/packed_matmul.py`), their PyTorch reference (`packed_linear_reference`, here) and the
checkpoint converter.

The layout is compressed-tensors' "pack-quantized" format (what transformers and vLLM load), for
a Linear weight W of shape [N, K] = [out_features, in_features] quantized to b bits, b in
{2, 4, 8}:

* Codes q are signed integers in [-2^(b-1), 2^(b-1) - 1]; a ternary weight uses q in {-1, 0, 1}.
  A code is stored unsigned, as u = q + 2^(b-1) (ternary -1/0/+1 -> 1/2/3).
* ``weight_packed``: int32 [N, ceil(K*b/32)]. Each word holds 32/b consecutive elements of a row:
  element k sits in word k // (32/b) at bits [b*j, b*j + b) with j = k % (32/b), the first element
  in the least significant bits. No value straddles two words. When K is not a multiple of 32/b
  the unused high bits of the row's last word are zero.
* ``weight_scale``: float [N, G]. G = 1 for one scale per output channel; G = ceil(K/group_size)
  for groups of ``group_size`` consecutive input columns (the last group may be shorter). Its
  dtype is the writer's choice (the model dtype in checkpoints); the kernels read float32.
* ``weight_zero_point`` (asymmetric weights only): signed zero points zp [N, G], offset to unsigned
  like the codes and packed along N: int32 [ceil(N*b/32), G], the zero point of row n in word
  n // (32/b) of its group's column at bits [b*(n % (32/b)), ...). Symmetric weights have none.
* ``weight_shape``: int64 [2] = (N, K).

Dequantization: W[n, k] = (q[n, k] - zp[n, g]) * scale[n, g] with g = k // group_size (zp = 0
when symmetric); in stored form (u - u_zp) * scale with u_zp = 2^(b-1) when symmetric.

The QAT quantizers map onto it exactly: TWN / absmean ternary weights are q in {-1, 0, 1} with
scale alpha; min-max weights with unsigned code c in [0, 2^b - 1] and zero point z are
q = c - 2^(b-1), zp = z - 2^(b-1), so the stored nibbles are c and z themselves. A per-tensor
scale is written as a per-channel scale repeated over the rows.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

SUPPORTED_BITS = (2, 4, 8)
PACKED_DTYPE = torch.int32


def values_per_word(bits: int) -> int:
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    return 32 // bits


def packed_words(num_values: int, bits: int) -> int:
    """int32 words that hold `num_values` b-bit values."""
    return -(-num_values // values_per_word(bits))


def num_groups(in_features: int, group_size: int | None) -> int:
    """Scale columns: 1 per channel (`group_size` None), else ceil(K / group_size)."""
    return 1 if group_size is None else -(-in_features // group_size)


def pack_int32(codes: Tensor, bits: int) -> Tensor:
    """Pack signed codes [R, C] along the last dim into int32 [R, ceil(C*bits/32)]."""
    per = values_per_word(bits)
    if codes.dim() != 2 or codes.dtype.is_floating_point or codes.dtype == torch.bool:
        raise ValueError(f"expected 2-D integer codes, got {codes.dtype} {tuple(codes.shape)}")
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    if codes.numel() and (codes.min() < lo or codes.max() > hi):
        raise ValueError(f"{bits}-bit codes must lie in [{lo}, {hi}]")
    rows, cols = codes.shape
    u = codes.to(torch.int64) + (1 << (bits - 1))
    u = F.pad(u, (0, (-cols) % per)).view(rows, -1, per)
    shifts = torch.arange(per, device=codes.device, dtype=torch.int64) * bits
    words = (u << shifts).sum(-1)  # disjoint bit fields: the sum is their OR, < 2^32
    return torch.where(words >= 2**31, words - 2**32, words).to(PACKED_DTYPE)


def unpack_int32(packed: Tensor, bits: int, num_values: int) -> Tensor:
    """Inverse of `pack_int32`: int8 codes [R, num_values]."""
    per = values_per_word(bits)
    if packed.dtype != PACKED_DTYPE or packed.dim() != 2:
        raise ValueError(f"expected 2-D int32 words, got {packed.dtype} {tuple(packed.shape)}")
    if packed.shape[1] != packed_words(num_values, bits):
        raise ValueError(f"{packed.shape[1]} words cannot hold exactly {num_values} values")
    shifts = torch.arange(per, device=packed.device, dtype=torch.int32) * bits
    u = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # the mask drops sign extension
    u = u.reshape(packed.shape[0], -1)[:, :num_values]
    return (u - (1 << (bits - 1))).to(torch.int8)


def pack_zero_point(zero_point: Tensor, bits: int) -> Tensor:
    """Signed zero points [N, G] -> int32 [ceil(N*bits/32), G] (packed along N)."""
    return pack_int32(zero_point.t(), bits).t().contiguous()


def unpack_zero_point(packed: Tensor, bits: int, out_features: int) -> Tensor:
    """Inverse of `pack_zero_point`: int8 [N, G]."""
    return unpack_int32(packed.t().contiguous(), bits, out_features).t().contiguous()


def dequantize_packed(
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    bits: int,
    group_size: int | None,
    in_features: int,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """The weight [N, K] that the packed tensors stand for, computed and returned in `dtype`."""
    out_features = weight_packed.shape[0]
    q = unpack_int32(weight_packed, bits, in_features).to(dtype)
    # Column k of the weight uses scale column k // group_size.
    cols = torch.arange(in_features, device=q.device) // (group_size or max(in_features, 1))
    if weight_zero_point is not None:
        q = q - unpack_zero_point(weight_zero_point, bits, out_features).to(dtype)[:, cols]
    return q * weight_scale.to(dtype)[:, cols]


def packed_linear_reference(
    x: Tensor,
    weight_packed: Tensor,
    weight_scale: Tensor,
    weight_zero_point: Tensor | None,
    bias: Tensor | None,
    bits: int,
    group_size: int | None,
) -> Tensor:
    """x [..., K] @ W^T + bias with W dequantized from the packed tensors: the reference of the
    W2A16 / W4A16 kernels, and what runs where they do not. Like them it accumulates in float32
    (float64 for float64 x) and rounds once to x's dtype."""
    compute = torch.float64 if x.dtype == torch.float64 else torch.float32
    weight = dequantize_packed(
        weight_packed, weight_scale, weight_zero_point, bits, group_size, x.shape[-1], compute
    )
    out = F.linear(x.to(compute), weight, None if bias is None else bias.to(compute))
    return out.to(x.dtype)


@dataclass(frozen=True)
class PackedWeight:
    """One packed Linear weight; field names are compressed-tensors' state-dict keys."""

    weight_packed: Tensor
    weight_scale: Tensor
    weight_shape: tuple[int, int]
    bits: int
    group_size: int | None = None  # None: one scale per output channel
    weight_zero_point: Tensor | None = None  # None: symmetric

    def __post_init__(self):
        n, k = self.weight_shape
        if self.group_size is not None and self.group_size <= 0:
            raise ValueError(f"group_size must be positive or None, got {self.group_size}")
        expect = {
            "weight_packed": (n, packed_words(k, self.bits)),
            "weight_scale": (n, num_groups(k, self.group_size)),
        }
        if self.weight_zero_point is not None:
            expect["weight_zero_point"] = (packed_words(n, self.bits), expect["weight_scale"][1])
        for name, shape in expect.items():
            got = tuple(getattr(self, name).shape)
            if got != shape:
                raise ValueError(f"{name} must have shape {shape}, got {got}")
        if self.weight_packed.dtype != PACKED_DTYPE:
            raise ValueError(f"weight_packed must be int32, got {self.weight_packed.dtype}")

    @property
    def symmetric(self) -> bool:
        return self.weight_zero_point is None

    def codes(self) -> Tensor:
        """Signed codes q, int8 [N, K]."""
        return unpack_int32(self.weight_packed, self.bits, self.weight_shape[1])

    def dequantize(self, dtype: torch.dtype = torch.float32) -> Tensor:
        return dequantize_packed(
            self.weight_packed, self.weight_scale, self.weight_zero_point,
            self.bits, self.group_size, self.weight_shape[1], dtype,
        )

    def nbytes(self) -> int:
        """Bytes of the packed tensors (codes, scales, zero points)."""
        tensors = [self.weight_packed, self.weight_scale, self.weight_zero_point]
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def state_dict(self) -> dict[str, Tensor]:
        sd = {
            "weight_packed": self.weight_packed,
            "weight_scale": self.weight_scale,
            "weight_shape": torch.tensor(self.weight_shape, dtype=torch.int64,
                                         device=self.weight_packed.device),
        }
        if self.weight_zero_point is not None:
            sd["weight_zero_point"] = self.weight_zero_point
        return sd

    @classmethod
    def from_state_dict(
        cls, sd: dict[str, Tensor], bits: int, group_size: int | None = None
    ) -> "PackedWeight":
        return cls(
            weight_packed=sd["weight_packed"],
            weight_scale=sd["weight_scale"],
            weight_shape=tuple(int(v) for v in sd["weight_shape"]),
            bits=bits,
            group_size=group_size,
            weight_zero_point=sd.get("weight_zero_point"),
        )


def pack_weight(
    codes: Tensor,
    scale: Tensor,
    bits: int,
    zero_point: Tensor | None = None,
    group_size: int | None = None,
) -> PackedWeight:
    """Pack signed codes [N, K] with scale [N, G] (and signed zero points [N, G] if asymmetric)."""
    n, k = codes.shape
    return PackedWeight(
        weight_packed=pack_int32(codes, bits),
        weight_scale=scale,
        weight_shape=(n, k),
        bits=bits,
        group_size=group_size,
        weight_zero_point=None if zero_point is None else pack_zero_point(zero_point, bits),
    )
