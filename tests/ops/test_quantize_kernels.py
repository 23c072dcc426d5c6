"""The quantize kernels (kernels/quantize.py, launched by tsld_ds.ops.quantize.fake_quantize)
against the PyTorch quantizers (tsld_ds.quant.quantize_weight, run on the CPU, whose division is
the correctly rounded one): values and gradients of TWN, absmean, min-max and PACT, per channel,
per group (ragged last group) and per tensor (chunks, ragged last chunk), with segments shorter
and longer than a block and rows that are zero or constant.

The weights are multiples of 2^-8, so the kernels' sums are the reference's to the bit in any
order and Q(W) matches exactly: float32 and float16 bit for bit, bfloat16 too when compiled and
within one bf16 ulp in the interpreter. PACT's dL/dγ sums quotients, which no order makes exact:
it is compared to float32 rounding (then the 16-bit γ's).
"""
import pytest
import torch

from tsld_ds.ops.quantize import CHUNK, LONG, SHORT, fake_quantize
from tsld_ds.quant import QuantConfig, quantize_weight

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def config(bits, method, granularity="channel", group_size=-1):
    return QuantConfig(bits=bits, method=method, granularity=granularity, group_size=group_size)


# (config, weight shape): every method in every granularity, segments shorter than SHORT's block,
# between it and LONG's, longer than LONG's (a loop with a ragged last step), and per tensor over
# two chunks.
CASES = [
    (config(2, "twn"), (7, 300)),
    (config(2, "twn"), (3, 4500)),
    (config(2, "twn", "group", 24), (5, 100)),
    (config(2, "twn", "tensor"), (5, 7000)),
    (config(2, "absmean"), (9, 100)),
    (config(2, "absmean", "group", 1000), (3, 2500)),
    (config(2, "absmean", "tensor"), (3, 5)),
    (config(4, "minmax"), (7, 300)),
    (config(4, "minmax", "group", 24), (5, 100)),
    (config(8, "minmax", "tensor"), (5, 7000)),
    (config(2, "pact"), (7, 300)),
    (config(4, "pact", "group", 24), (5, 100)),
    (config(2, "pact", "group", 1000), (3, 2500)),
    (config(8, "pact", "tensor"), (5, 7000)),
]


def test_the_cases_cover_every_launch_shape():
    lengths = [shape[1] if cfg.granularity == "channel" else cfg.group_size
               for cfg, shape in CASES if cfg.granularity != "tensor"]
    assert min(lengths) < SHORT["BLOCK"] < max(lengths) and max(lengths) > LONG["BLOCK"]
    assert max(shape[0] * shape[1] for cfg, shape in CASES if cfg.granularity == "tensor") > CHUNK


def case_id(case):
    cfg, shape = case
    group = {"channel": "", "tensor": "-tensor"}.get(cfg.granularity, f"-g{cfg.group_size}")
    return f"{cfg.method}{cfg.bits}{group}-{shape[0]}x{shape[1]}"


def weight_and_gamma(cfg, shape, dtype, dyadic, seed=0):
    """A weight of multiples of 2^-8 in [-2, 2], its row 1 zero and row 2 constant, and PACT's γ
    (None for the other methods), both in `dtype` as QuantLinear holds them."""
    gen = torch.Generator().manual_seed(seed)
    w = dyadic(shape, gen, 512, 2.0**-8)
    if shape[0] > 2:
        w[1] = 0.0
        w[2] = -0.30078125
    gamma = None
    if cfg.method == "pact":
        gamma = (0.5 + torch.rand(cfg.scale_shape(*shape), generator=gen)).to(dtype)
    return w.to(dtype), gamma


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: str(d)[6:])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_values_and_gradients_match_the_reference(case, dtype, kernel_device, dyadic,
                                                  assert_rounds_as_reference):
    cfg, shape = case
    w, gamma = weight_and_gamma(cfg, shape, dtype, dyadic)
    grad_out = dyadic(shape, torch.Generator().manual_seed(1), 64, 2.0**-6).to(dtype)
    inputs = [t for t in (w, gamma) if t is not None]
    kernel = [t.to(kernel_device, copy=True).requires_grad_() for t in inputs]
    reference = [t.requires_grad_() for t in inputs]
    out = fake_quantize(kernel[0], cfg, *kernel[1:])
    ref = quantize_weight(reference[0], cfg, *reference[1:])
    assert_rounds_as_reference(out, ref)
    out.backward(grad_out.to(kernel_device))
    ref.backward(grad_out)
    assert_rounds_as_reference(kernel[0].grad, reference[0].grad)
    if gamma is not None:
        got, expect = kernel[1].grad.cpu().float(), reference[1].grad.float()
        rtol = max(1e-5, torch.finfo(dtype).eps)
        torch.testing.assert_close(got, expect, rtol=rtol, atol=rtol * expect.abs().max().item())
        assert expect.abs().sum() > 0


def test_pact_gradients_on_the_clip_boundary(kernel_device):
    """Elements exactly at ±c, and beyond it: clamp passes the gradient to w at its bounds and
    gives it to c beyond them, as autograd of the reference does."""
    row = torch.tensor([2.0, -2.0, 1.0, -1.0, 0.5, -0.5, 0.5, 0.5])  # mean |w| = 1
    w = row.repeat(2, 1)
    gamma = torch.tensor([[2.0], [1.0]])  # c = 2 (±2 on the bound), c = 1 (±2 beyond, ±1 on it)
    grad_out = torch.linspace(-1, 1, 16).view(2, 8)
    cfg = config(2, "pact")
    kernel = [w.to(kernel_device, copy=True).requires_grad_(),
              gamma.to(kernel_device, copy=True).requires_grad_()]
    reference = [w.requires_grad_(), gamma.requires_grad_()]
    fake_quantize(kernel[0], cfg, kernel[1]).backward(grad_out.to(kernel_device))
    quantize_weight(reference[0], cfg, reference[1]).backward(grad_out)
    assert torch.equal(kernel[0].grad.cpu(), reference[0].grad)
    torch.testing.assert_close(kernel[1].grad.cpu(), reference[1].grad, rtol=1e-6, atol=1e-6)
    assert reference[0].grad[1, :2].eq(0).all() and reference[0].grad[0, :2].ne(0).all()


def test_a_transposed_weight_is_quantized_as_its_copy(kernel_device, dyadic):
    """GPT-2's Conv1D hands QuantLinear the transposed view of its weight."""
    cfg = config(4, "minmax")
    w = dyadic((300, 7), torch.Generator().manual_seed(2), 512, 2.0**-8).to(kernel_device)
    w = w.requires_grad_()
    out = fake_quantize(w.t(), cfg)
    assert torch.equal(out, fake_quantize(w.t().contiguous(), cfg))
    out.backward(torch.ones_like(out))
    assert torch.equal(w.grad, torch.ones_like(w))


def test_bad_input_is_one_clear_error(kernel_device):
    w = torch.zeros(4, 8, device=kernel_device)
    with pytest.raises(ValueError, match="nonempty 2-D float32/float16/bfloat16"):
        fake_quantize(w.double(), config(2, "twn"))
    with pytest.raises(ValueError, match=r"got torch.float32 \(4, 0\)"):
        fake_quantize(w[:, :0], config(2, "twn"))
    with pytest.raises(ValueError, match="needs scale"):
        fake_quantize(w, config(2, "pact"))
    with pytest.raises(ValueError, match=r"shape \(4, 1\)"):
        fake_quantize(w, config(2, "pact"), torch.ones(1, 1, device=kernel_device))
