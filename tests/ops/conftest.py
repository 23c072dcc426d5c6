"""Fixtures of the Triton kernels' tests: the device the kernels run on here, random inputs whose
sums are exact, and the comparison of a kernel's output with its reference's."""
import os

import pytest
import torch


@pytest.fixture(scope="session")
def kernel_device():
    """Where the kernels run: compiled on CUDA, else on the CPU in Triton's interpreter
    (tests/conftest.py sets TRITON_INTERPRET=1 where there is no GPU)."""
    pytest.importorskip("triton", reason="the kernels' tests need Triton: pip install -e .[test]")
    if os.environ.get("TRITON_INTERPRET") == "1":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        pytest.skip("TRITON_INTERPRET is off and there is no CUDA device")
    return torch.device("cuda")


@pytest.fixture
def dyadic():
    """dyadic(shape, generator, steps, scale): random multiples of `scale` (a power of two) from
    -steps to steps of them, in float32. Their sums and products are exact in float32 in any order
    while they stay below 2^24 times their resolution, so a kernel that sums in another order than
    torch still matches it to the bit."""

    def make(shape, generator, steps, scale):
        return torch.randint(-steps, steps + 1, shape, generator=generator).float() * scale

    return make


@pytest.fixture
def assert_rounds_as_reference():
    """assert_rounds_as_reference(out, ref): equal to the bit, except bf16 in the interpreter,
    whose float32 -> bf16 conversion truncates instead of rounding: there within one bf16 ulp."""

    def check(out, ref):
        out, ref = out.cpu(), ref.cpu()
        assert out.dtype == ref.dtype and out.shape == ref.shape
        if out.dtype == torch.bfloat16 and os.environ.get("TRITON_INTERPRET") == "1":
            ulp = torch.ldexp(torch.ones_like(ref, dtype=torch.float32),
                              torch.frexp(ref.float()).exponent - 8)
            off = (out.float() - ref.float()).abs() > ulp
        else:
            off = out != ref
        assert not off.any(), (f"{int(off.sum())} of {off.numel()} elements differ, first at "
                               f"{tuple(off.nonzero()[0].tolist())}: "
                               f"{out[off][0]} vs {ref[off][0]}")

    return check
