"""The packed weight format (tsld_ds.packed.format) on CPU: exact round trips, compressed-tensors
compatibility, the matmul references and the packed Linear modules."""

import pytest
import torch
from torch import nn

from tsld_ds.packed.format import (
    PackedWeight,
    pack_int32,
    pack_weight,
    pack_zero_point,
    packed_linear_reference,
    packed_words,
    unpack_int32,
    unpack_zero_point,
)
from tsld_ds.packed.linear import PackedInt4Linear, PackedTernaryLinear

ODD_SHAPES = [(1, 1), (3, 5), (7, 17), (16, 64), (33, 100), (5, 257)]


def random_codes(shape, bits, generator=None):
    lo, hi = -(1 << (bits - 1)), 1 << (bits - 1)
    return torch.randint(lo, hi, shape, generator=generator, dtype=torch.int8)


def random_packed(n, k, bits, group_size=None, asymmetric=False, ternary=False, seed=0):
    """A PackedWeight with random codes, positive scales and (optionally) zero points."""
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8) if ternary else (
        random_codes((n, k), bits, g))
    n_groups = 1 if group_size is None else -(-k // group_size)
    scale = torch.rand(n, n_groups, generator=g) + 0.05
    zero = random_codes((n, n_groups), bits, g) if asymmetric else None
    return pack_weight(codes, scale, bits, zero_point=zero, group_size=group_size)


# --- Bit layout --------------------------------------------------------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_pack_round_trip_exact(bits, shape):
    codes = random_codes(shape, bits, torch.Generator().manual_seed(shape[0] * 1000 + shape[1]))
    packed = pack_int32(codes, bits)
    assert packed.dtype == torch.int32
    assert packed.shape == (shape[0], packed_words(shape[1], bits))
    assert torch.equal(unpack_int32(packed, bits, shape[1]), codes)


def test_bit_order_is_little_end_first():
    """Ternary -1/0/+1 are stored as 1/2/3; element j of a word sits at bits [2j, 2j+2)."""
    codes = torch.tensor([[-1, 0, 1, 1] + [0] * 12 + [1, -1]], dtype=torch.int8)
    packed = pack_int32(codes, 2)
    assert packed.shape == (1, 2)
    first = 1 | (2 << 2) | (3 << 4) | (3 << 6) | sum(2 << (2 * j) for j in range(4, 16))
    assert packed[0, 0].item() == first - 2**32  # bit 31 set: a negative int32
    assert packed[0, 1].item() == 3 | (1 << 2)  # padding bits are zero


def test_4bit_codes_are_nibbles():
    codes = torch.arange(-8, 8, dtype=torch.int8).view(2, 8)
    words = pack_int32(codes, 4).view(torch.uint8)  # little-endian host: byte i = elements 2i, 2i+1
    expect = torch.tensor([(2 * i) | ((2 * i + 1) << 4) for i in range(8)], dtype=torch.uint8)
    assert torch.equal(words.flatten(), expect)


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("n", [1, 7, 8, 9, 33])
def test_zero_point_packs_along_rows(bits, n):
    zp = random_codes((n, 3), bits, torch.Generator().manual_seed(n))
    packed = pack_zero_point(zp, bits)
    assert packed.shape == (packed_words(n, bits), 3)
    assert torch.equal(unpack_zero_point(packed, bits, n), zp)


def test_rejects_out_of_range_codes():
    with pytest.raises(ValueError, match="2-bit codes"):
        pack_int32(torch.tensor([[2]], dtype=torch.int8), 2)
    with pytest.raises(ValueError, match="bits must be one of"):
        pack_int32(torch.zeros(1, 1, dtype=torch.int8), 3)


# --- PackedWeight ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bits,group_size,asymmetric",
    [(2, None, False), (2, 32, False), (4, 128, True), (4, None, True)],
)
@pytest.mark.parametrize("shape", [(3, 5), (17, 130), (64, 256)])
def test_packed_weight_dequantize_and_state_dict(bits, group_size, asymmetric, shape):
    n, k = shape
    pw = random_packed(n, k, bits, group_size, asymmetric, seed=k)
    q = pw.codes().double()
    cols = torch.arange(k) // (group_size or k)
    if asymmetric:
        q = q - unpack_zero_point(pw.weight_zero_point, bits, n).double()[:, cols]
    expect = q * pw.weight_scale.double()[:, cols]
    assert torch.equal(pw.dequantize(torch.float64), expect)

    sd = pw.state_dict()
    assert set(sd) == {"weight_packed", "weight_scale", "weight_shape"} | (
        {"weight_zero_point"} if asymmetric else set())
    again = PackedWeight.from_state_dict(sd, bits, group_size)
    assert torch.equal(again.dequantize(torch.float64), expect)


def test_packed_weight_validates_shapes():
    pw = random_packed(4, 40, 2, group_size=16)
    with pytest.raises(ValueError, match="weight_scale must have shape"):
        PackedWeight(pw.weight_packed, pw.weight_scale[:, :2], (4, 40), 2, group_size=16)


def test_packed_bytes_vs_bf16():
    """LLaMA-7B MLP shape: ternary per channel >= 7x smaller than bf16, 4-bit g128 >= 3.5x (scales
    in bf16 as checkpoints store them; only the shapes matter here)."""
    n, k = 11008, 4096
    bf16_bytes = n * k * 2
    ternary = PackedWeight(torch.empty(n, packed_words(k, 2), dtype=torch.int32),
                           torch.empty(n, 1, dtype=torch.bfloat16), (n, k), 2)
    int4 = PackedWeight(torch.empty(n, packed_words(k, 4), dtype=torch.int32),
                        torch.empty(n, k // 128, dtype=torch.bfloat16), (n, k), 4, 128,
                        torch.empty(packed_words(n, 4), k // 128, dtype=torch.int32))
    assert bf16_bytes / ternary.nbytes() >= 7.0
    assert bf16_bytes / int4.nbytes() >= 3.5


# --- compressed-tensors interoperability (optional dependency) ---------------------------------


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("shape", ODD_SHAPES)
def test_matches_compressed_tensors_packing(bits, shape):
    helpers = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")
    codes = random_codes(shape, bits, torch.Generator().manual_seed(bits))
    theirs = helpers.pack_to_int32(codes, bits)
    assert torch.equal(pack_int32(codes, bits), theirs)
    assert torch.equal(unpack_int32(theirs, bits, shape[1]), codes)
    theirs_zp = helpers.pack_to_int32(codes, bits, packed_dim=0)
    assert torch.equal(pack_zero_point(codes, bits), theirs_zp)


@pytest.mark.parametrize(
    "bits,strategy,group_size,asymmetric",
    [(2, "channel", None, False), (4, "group", 32, True), (4, "channel", None, False)],
)
def test_compressed_tensors_decompresses_our_state_dict(bits, strategy, group_size, asymmetric):
    base = pytest.importorskip("compressed_tensors.compressors.pack_quantized.base")
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

    pw = random_packed(24, 96, bits, group_size, asymmetric, ternary=bits == 2)
    args = QuantizationArgs(num_bits=bits, symmetric=not asymmetric, strategy=strategy,
                            group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    weight = base.PackedQuantizationCompressor.decompress(pw.state_dict(), scheme)["weight"]
    torch.testing.assert_close(weight.double(), pw.dequantize(torch.float64), rtol=1e-6, atol=0)


# --- Matmul references and the packed Linear modules (CPU: the PyTorch reference path) ---------


MATMUL_CASES = [(2, None, False), (2, 32, False), (4, 128, True), (4, None, False), (4, 16, True)]


@pytest.mark.parametrize("bits,group_size,asymmetric", MATMUL_CASES)
@pytest.mark.parametrize("m,n,k", [(1, 3, 5), (4, 17, 130), (16, 64, 256), (3, 33, 100)])
def test_reference_matmul_is_x_times_dequantized_weight(bits, group_size, asymmetric, m, n, k):
    pw = random_packed(n, k, bits, group_size, asymmetric, ternary=bits == 2, seed=m + n)
    x = torch.randn(2, m, k, dtype=torch.float64)
    bias = torch.randn(n, dtype=torch.float64)
    out = packed_linear_reference(x, pw.weight_packed, pw.weight_scale, pw.weight_zero_point, bias,
                                  bits, group_size)
    assert out.shape == (2, m, n) and out.dtype == torch.float64
    expect = x @ pw.dequantize(torch.float64).T + bias
    torch.testing.assert_close(out, expect, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("cls,bits,group_size,asymmetric", [
    (PackedTernaryLinear, 2, None, False), (PackedTernaryLinear, 2, 64, False),
    (PackedInt4Linear, 4, 128, True), (PackedInt4Linear, 4, None, False)])
@pytest.mark.parametrize("bias", [False, True])
def test_packed_linear_module_equals_dense_linear(cls, bits, group_size, asymmetric, bias):
    n, k = 24, 200
    pw = random_packed(n, k, bits, group_size, asymmetric, ternary=bits == 2, seed=7)
    b = torch.randn(n) if bias else None
    module = cls.from_packed(pw, bias=b)
    dense = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        dense.weight.copy_(pw.dequantize(torch.float32))
        if bias:
            dense.bias.copy_(b)
    x = torch.randn(3, 5, k)
    assert torch.equal(module(x), dense(x))
    assert torch.equal(module.dequantized_weight(), dense.weight)
    assert "bits=%d" % bits in repr(module)

    # The buffers are a compressed-tensors state dict (plus the bias).
    again = cls(k, n, group_size, symmetric=not asymmetric, bias=bias, dtype=torch.float32)
    again.load_state_dict(module.state_dict())
    assert torch.equal(again(x), module(x))


def test_packed_linear_module_rejects_wrong_width():
    with pytest.raises(ValueError, match="holds 2-bit weights"):
        PackedTernaryLinear.from_packed(random_packed(4, 32, 4))
    with pytest.raises(ValueError, match="no zero point"):
        PackedTernaryLinear(32, 4, symmetric=False)
