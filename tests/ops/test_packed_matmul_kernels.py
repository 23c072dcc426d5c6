"""The W2A16 / W4A16 kernels (kernels/packed_matmul.py, launched by
tsld_ds.ops.matmul.packed_matmul_kernel) against their reference
(tsld_ds.packed.format.packed_linear_reference, on the CPU): the split-K GEMV (M = 1, splits
with a ragged last one) and the tiled kernel (M > 1), 2 and 4 bits, symmetric and asymmetric,
per channel and per group, with and without bias, on shapes whose rows, columns, words and groups
are no multiple of a block.

Activations, scales and biases are multiples of powers of two small enough that every product
and sum is exact in float32: the kernels' results match the reference's to the bit in float16,
in bfloat16 too when compiled, and within one bf16 ulp in the interpreter.
"""
import pytest
import torch

from tsld_ds.ops.matmul import GEMM, GEMV, gemm_block_k, packed_matmul_kernel
from tsld_ds.packed.format import pack_weight, packed_linear_reference

DTYPES = [torch.float16, torch.bfloat16]
CASES = [  # bits, group_size, asymmetric
    (2, None, False), (2, 32, False), (4, 16, True), (4, 48, True), (4, None, True),
    (4, 128, False)]
M_VALUES = [1, 2, GEMM["BLOCK_M"] + 1]


def random_packed(n, k, bits, group_size, asymmetric, seed):
    """Packed tensors of random codes, scales that are multiples of 2^-8 up to 1/16 and zero
    points."""
    gen = torch.Generator().manual_seed(seed)
    half = 1 << (bits - 1)
    codes = torch.randint(-half, half, (n, k), generator=gen, dtype=torch.int8)
    groups = 1 if group_size is None else -(-k // group_size)
    scale = torch.randint(1, 17, (n, groups), generator=gen).float() / 256
    zero = (torch.randint(-half, half, (n, groups), generator=gen, dtype=torch.int8)
            if asymmetric else None)
    pw = pack_weight(codes, scale, bits, zero_point=zero, group_size=group_size)
    return pw.weight_packed, pw.weight_scale, pw.weight_zero_point


def check(n, k, bits, group_size, asymmetric, dtype, kernel_device, dyadic, assert_same,
          m_values=M_VALUES, split_k=None):
    packed, scale, zero = random_packed(n, k, bits, group_size, asymmetric, seed=n + k)
    gen = torch.Generator().manual_seed(k)
    to = {"device": kernel_device}
    for m in m_values:
        x = dyadic((m, k), gen, 8, 2.0**-3).to(dtype)
        bias = dyadic((n,), gen, 8, 2.0**-3).to(dtype) if m % 2 else None
        out = packed_matmul_kernel(
            x.to(**to), packed.to(**to), scale.to(**to), None if zero is None else zero.to(**to),
            None if bias is None else bias.to(**to), bits, group_size, split_k=split_k)
        assert_same(out, packed_linear_reference(x, packed, scale, zero, bias, bits, group_size))


def test_the_cases_cover_both_gemm_blocks_and_ragged_shapes():
    assert {gemm_block_k(group) for _, group, _ in CASES} == {64, 16}
    assert 300 % GEMV["BLOCK_K"] and 300 % 16 and 37 % GEMV["BLOCK_N"] and 37 % GEMM["BLOCK_N"]


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("bits,group_size,asymmetric", CASES)
def test_matches_the_reference(bits, group_size, asymmetric, dtype, kernel_device, dyadic,
                               assert_rounds_as_reference):
    check(37, 300, bits, group_size, asymmetric, dtype, kernel_device, dyadic,
          assert_rounds_as_reference)


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("bits,group_size,asymmetric", [(2, None, False), (4, 48, True)])
def test_gemv_split_over_k_matches_the_reference(bits, group_size, asymmetric, dtype,
                                                 kernel_device, dyadic,
                                                 assert_rounds_as_reference):
    """1300 columns are 6 blocks of the GEMV: 4 splits of 2 blocks leave 3 splits, the last one
    ragged; the counters the splits meet on are left at zero for the next launch (the second
    call)."""
    for _ in range(2):
        check(70, 1300, bits, group_size, asymmetric, dtype, kernel_device, dyadic,
              assert_rounds_as_reference, m_values=[1], split_k=4)


def test_rows_columns_and_bias_land_where_they_belong(kernel_device):
    """One nonzero code, one nonzero activation and a bias: every output but one is the bias."""
    n, k = 21, 70
    codes = torch.zeros(n, k, dtype=torch.int8)
    codes[13, 57] = 1
    pw = pack_weight(codes, torch.full((n, 1), 0.5), 2)
    bias = torch.arange(n, dtype=torch.float16)
    for m in (1, 3):
        x = torch.zeros(m, k, dtype=torch.float16)
        x[-1, 57] = 2.0
        out = packed_matmul_kernel(x.to(kernel_device), pw.weight_packed.to(kernel_device),
                                   pw.weight_scale.to(kernel_device), None,
                                   bias.to(kernel_device), 2, None).cpu()
        expect = bias.repeat(m, 1)
        expect[-1, 13] += 1.0
        assert torch.equal(out, expect)
