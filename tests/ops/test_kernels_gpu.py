"""The CUDA kernels against their PyTorch references on random inputs of many (odd) shapes, with
outputs poisoned (NaN) before every run, and once under compute-sanitizer. Skipped without CUDA.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from helpers import REPO
from tsld_ds.ops import (
    fused_quantize,
    kernels_info,
    packed_linear,
    packed_matmul_kernel,
    quantize_kernel,
)
from tsld_ds.ops.quantize import num_segments
from tsld_ds.packed.format import dequantize_packed, pack_weight
from tsld_ds.packed.linear import PackedInt4Linear, PackedTernaryLinear
from tsld_ds.quant import QuantConfig, quantize_weight

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DEVICE = "cuda"
NAN = float("nan")


@pytest.fixture(scope="module", autouse=True)
def cuda_kernels():
    if os.environ.get("TSLD_DISABLE_KERNELS", "0") not in ("", "0"):
        pytest.skip("TSLD_DISABLE_KERNELS is set")
    info = kernels_info()
    # On a CUDA machine a missing kernel is a failure, not a skip.
    assert info["backend"] == "cuda", f"kernels did not load: {info['reason']}"
    assert info["ops"]["packed_linear"] == "cuda", info["reason"]


# --- Fused quantize ----------------------------------------------------------------------------

QUANT_SHAPES = [(1, 1), (3, 17), (5, 100), (17, 1000), (2, 3000), (64, 4096)]
QUANT_CONFIGS = [
    QuantConfig(bits=2, method="twn"),
    QuantConfig(bits=2, method="twn", granularity="group", group_size=64),
    QuantConfig(bits=2, method="twn", granularity="group", group_size=100),  # ragged, unaligned
    QuantConfig(bits=2, method="twn", granularity="group", group_size=2048),  # block per group
    QuantConfig(bits=2, method="absmean"),
    QuantConfig(bits=2, method="absmean", granularity="group", group_size=128),
    QuantConfig(bits=4, method="minmax"),
    QuantConfig(bits=4, method="minmax", granularity="group", group_size=128),
    QuantConfig(bits=8, method="minmax", granularity="group", group_size=32),
]
DTYPE_PAIRS = [  # (weight, output)
    (torch.float32, torch.float32),
    (torch.float32, torch.bfloat16),
    (torch.float32, torch.float16),
    (torch.bfloat16, torch.bfloat16),
    (torch.float16, torch.float16),
]


def segment_width(shape, cfg):
    gs = cfg.group_size if cfg.granularity == "group" else -1
    return gs if 0 < gs < shape[1] else shape[1]


def broadcast(per_segment, shape, width):
    """Values per segment (row-major [rows * groups]) spread over the weight's [rows, cols]."""
    rows, cols = shape
    return per_segment.reshape(rows, -1)[:, torch.arange(cols, device=per_segment.device) // width]


def per_segment_sum(t, width):
    return torch.stack([block.sum(1) for block in t.split(width, dim=1)], 1).flatten()


def apply_stats(w, stats, cfg):
    """The quantizer's write step restated in torch float32 with the kernel's statistics."""
    width = segment_width(w.shape, cfg)
    a, b = broadcast(stats[:, 0], w.shape, width), broadcast(stats[:, 1], w.shape, width)
    w = w.float()
    if cfg.method == "twn":
        return torch.where(w.abs() > b, a * w.sign(), torch.zeros_like(w))
    if cfg.method == "absmean":
        return a * (w / a).round().clamp(-1, 1)
    qmax = 2**cfg.bits - 1
    return ((w / a).round() + b).clamp(0, qmax).sub(b).mul(a)


def reference_stats(w, cfg):
    """Per-segment statistics by the quantizers' float32 formulas, laid out like the kernel's."""
    width = segment_width(w.shape, cfg)
    w = w.float()
    if cfg.method == "minmax":
        lo = torch.stack([b.amin(1) for b in w.split(width, dim=1)], 1).flatten()
        hi = torch.stack([b.amax(1) for b in w.split(width, dim=1)], 1).flatten()
        scale = ((hi - lo) / (2**cfg.bits - 1)).clamp_min(1e-8)
        return torch.stack([scale, (-lo / scale).round()], 1)
    mean = torch.stack([b.abs().mean(1) for b in w.split(width, dim=1)], 1).flatten()
    if cfg.method == "absmean":
        return torch.stack([mean.clamp_min(1e-8), torch.zeros_like(mean)], 1)
    delta = 0.7 * mean
    return torch.stack([twn_alpha(w, delta, width).float(), delta], 1)


def twn_alpha(w, delta, width):
    """alpha = mean(|w| where |w| > delta) per segment, in float64, for given thresholds."""
    kept = w.float().abs() > broadcast(delta, w.shape, width)
    return (per_segment_sum(w.double().abs() * kept, width)
            / per_segment_sum(kept.double(), width).clamp_min(1))


def assert_matches_quantize_weight(out, w, cfg):
    """out is quantize_weight(w, cfg) up to the float32 summation order of the statistics:
    min-max exactly; TWN / absmean within 1e-5 of alpha (plus an output ulp), except where an
    element sits on a threshold within rounding: for TWN that moves its segment's alpha."""
    ref = quantize_weight(w, cfg).to(out.dtype)
    if cfg.method == "minmax":
        assert torch.equal(out, ref)
        return
    width = segment_width(w.shape, cfg)
    expect = reference_stats(w, cfg)
    alpha = broadcast(expect[:, 0], w.shape, width)
    # Two nearby alphas may round to neighbouring values of the output dtype: one spacing apart.
    spacing = {torch.float32: 2.0**-23, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}
    off = (out.float() - ref.float()).abs() > (spacing[out.dtype] + 1e-5) * alpha
    if cfg.method == "twn":
        delta = broadcast(expect[:, 1], w.shape, width)
        near = ((w.float().abs() - delta).abs() <= 1e-5 * delta).double()
        off &= broadcast(per_segment_sum(near, width), w.shape, width) == 0
    else:
        off &= ((w.float() / alpha).abs() - 0.5).abs() > 1e-5
    assert not off.any(), f"{off.sum().item()} elements differ beyond rounding"


@pytest.mark.parametrize("w_dtype,out_dtype", DTYPE_PAIRS)
@pytest.mark.parametrize("cfg", QUANT_CONFIGS, ids=lambda c: f"{c.method}{c.bits}-{c.group_size}")
def test_fused_quantize_matches_reference(cfg, w_dtype, out_dtype):
    gen = torch.Generator(device=DEVICE).manual_seed(0)
    gs = cfg.group_size if cfg.granularity == "group" else -1
    for shape in QUANT_SHAPES:
        w = torch.randn(shape, generator=gen, device=DEVICE).to(w_dtype)
        out = torch.full(shape, NAN, dtype=out_dtype, device=DEVICE)
        stats = torch.full((num_segments(shape, gs), 2), NAN, device=DEVICE)
        quantize_kernel(w, cfg.method, cfg.bits, gs, out=out, stats=stats)
        assert not out.isnan().any() and not stats.isnan().any(), f"unwritten output at {shape}"
        # Given its statistics, the output is the reference formula bit for bit ...
        assert torch.equal(out, apply_stats(w, stats, cfg).to(out_dtype)), shape
        # ... and the statistics are the reference's: min and max exactly, means to rounding,
        # and TWN's alpha is the mean over what the kernel's own threshold keeps.
        expect = reference_stats(w, cfg)
        if cfg.method == "minmax":
            assert torch.equal(stats, expect), shape
        elif cfg.method == "absmean":
            torch.testing.assert_close(stats, expect, rtol=1e-5, atol=1e-7)
        else:
            torch.testing.assert_close(stats[:, 1], expect[:, 1], rtol=1e-5, atol=1e-7)
            alpha = twn_alpha(w, stats[:, 1], segment_width(shape, cfg))
            torch.testing.assert_close(stats[:, 0].double(), alpha, rtol=1e-5, atol=1e-7)
        assert_matches_quantize_weight(out, w, cfg)


def test_fused_quantize_hook():
    cfg = QuantConfig(bits=2)
    w = torch.randn(33, 70, device=DEVICE, requires_grad=True)
    wq = fused_quantize(w, cfg, out_dtype=torch.bfloat16)
    assert wq.dtype == torch.bfloat16 and wq.shape == w.shape
    grad = torch.randn(33, 70, device=DEVICE, dtype=torch.bfloat16)
    wq.backward(grad)  # straight-through, like the reference
    assert torch.equal(w.grad, grad.float())
    # A non-contiguous weight (GPT-2 Conv1D's transposed view) is copied first.
    wt = torch.randn(70, 33, device=DEVICE).t()
    assert_matches_quantize_weight(fused_quantize(wt, cfg), wt, cfg)
    # Where the kernel does not apply, the caller runs the reference.
    assert fused_quantize(w, QuantConfig(bits=2, granularity="tensor")) is None
    assert fused_quantize(w, QuantConfig(bits=4, method="pact")) is None
    assert fused_quantize(w.detach().cpu(), cfg) is None
    assert fused_quantize(w.detach().half(), cfg, out_dtype=torch.bfloat16) is None


# --- Packed matmul -----------------------------------------------------------------------------

M_VALUES = [1, 2, 5, 8, 9, 16, 17, 33, 64, 130]  # GEMV with 1 and 2 tiles, then the tiled GEMM
NK_SHAPES = [(1, 16), (16, 16), (17, 33), (40, 250), (130, 1000), (300, 2050), (256, 4096)]
PACK_CASES = [  # bits, group_size, asymmetric
    (2, None, False), (2, 32, False), (2, 128, False),
    (4, None, False), (4, 16, True), (4, 128, True),
]


def random_packed(n, k, bits, group_size, asymmetric, seed):
    g = torch.Generator().manual_seed(seed)
    lo, hi = (-1, 2) if bits == 2 else (-8, 8)
    codes = torch.randint(lo, hi, (n, k), generator=g, dtype=torch.int8)
    groups = 1 if group_size is None else -(-k // group_size)
    scale = torch.rand(n, groups, generator=g) / k**0.5 + 1e-3
    zero = torch.randint(-8, 8, (n, groups), generator=g, dtype=torch.int8) if asymmetric else None
    pw = pack_weight(codes, scale, bits, zero_point=zero, group_size=group_size)
    to = dict(device=DEVICE)
    return (pw.weight_packed.to(**to), pw.weight_scale.to(**to),
            None if zero is None else pw.weight_zero_point.to(**to))


def check_close(out, x, packed, scale, zero, bias, bits, group_size):
    """|out - ref| <= one output ulp of |ref| + 1e-4 of sum |x||W| (float32 accumulation), with
    ref computed in float64."""
    w = dequantize_packed(packed, scale, zero, bits, group_size, x.shape[-1], torch.float64)
    ref = x.double() @ w.T + (0 if bias is None else bias.double())
    magnitude = x.double().abs() @ w.abs().T
    ulp = 2.0**-8 if out.dtype == torch.bfloat16 else 2.0**-11
    err = (out.double() - ref).abs()
    bound = ulp * ref.abs() + 1e-4 * magnitude + 1e-6
    assert not out.isnan().any(), "unwritten or NaN output"
    worst = (err - bound).argmax()
    e, b = err.flatten()[worst].item(), bound.flatten()[worst].item()
    assert (err <= bound).all(), f"error {e:.3e} exceeds its bound {b:.3e}"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("bits,group_size,asymmetric", PACK_CASES)
@pytest.mark.parametrize("n,k", NK_SHAPES)
def test_packed_matmul_matches_reference(n, k, bits, group_size, asymmetric, dtype):
    packed, scale, zero = random_packed(n, k, bits, group_size, asymmetric, seed=n * k)
    gen = torch.Generator(device=DEVICE).manual_seed(k)
    for m in M_VALUES:
        x = torch.randn(m, k, generator=gen, device=DEVICE).to(dtype)
        bias = torch.randn(n, generator=gen, device=DEVICE).to(dtype) if m % 2 else None
        out = torch.full((m, n), NAN, dtype=dtype, device=DEVICE)
        packed_matmul_kernel(x, packed, scale, zero, bias, bits, group_size, out=out)
        check_close(out, x, packed, scale, zero, bias, bits, group_size)


@pytest.mark.parametrize("bits,group_size,asymmetric", [(2, None, False), (4, 32, True)])
def test_packed_matmul_unaligned_inputs(bits, group_size, asymmetric):
    """x and the packed rows off their 16-byte alignment take the scalar load paths."""
    n, k = 24, 96
    packed, scale, zero = random_packed(n, k, bits, group_size, asymmetric, seed=3)
    words = packed.shape[1]
    shifted = torch.empty(n * words + 1, dtype=torch.int32, device=DEVICE)[1:].view(n, words)
    shifted.copy_(packed)
    for m in (1, 12, 40):
        buf = torch.randn(m * k + 1, device=DEVICE).bfloat16()
        x = buf[1:].view(m, k)  # 2-byte aligned only
        out = torch.full((m, n), NAN, dtype=torch.bfloat16, device=DEVICE)
        packed_matmul_kernel(x, shifted, scale, zero, None, bits, group_size, out=out)
        check_close(out, x, packed, scale, zero, None, bits, group_size)


def test_packed_linear_modules_on_gpu_match_cpu():
    torch.manual_seed(0)
    for cls, bits, group_size, asymmetric in [(PackedTernaryLinear, 2, None, False),
                                              (PackedInt4Linear, 4, 128, True)]:
        packed, scale, zero = random_packed(48, 320, bits, group_size, asymmetric, seed=bits)
        module = cls(320, 48, group_size, symmetric=not asymmetric, bias=True, device=DEVICE)
        module.weight_packed.copy_(packed)
        module.weight_scale.copy_(scale)
        if zero is not None:
            module.weight_zero_point.copy_(zero)
        module.bias.normal_()
        x = torch.randn(2, 3, 320, device=DEVICE, dtype=torch.bfloat16)
        with torch.no_grad():
            out = module(x)
        assert out.shape == (2, 3, 48) and out.dtype == torch.bfloat16
        check_close(out.view(6, 48), x.view(6, 320), packed, scale, zero, module.bias, bits,
                    group_size)
        # With autograd on x the differentiable reference runs instead.
        x.requires_grad_(True)
        module(x).sum().backward()
        assert x.grad is not None


def test_packed_linear_runs_on_the_current_stream():
    packed, scale, zero = random_packed(64, 512, 2, None, False, seed=5)
    x = torch.randn(4, 512, device=DEVICE, dtype=torch.bfloat16)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        out = packed_linear(x, packed, scale, zero, bits=2)
    torch.cuda.current_stream().wait_stream(stream)
    check_close(out, x, packed, scale, zero, None, 2, None)


# --- compute-sanitizer --------------------------------------------------------------------------

SANITIZED_RUN = """
import torch
from tsld_ds.ops import packed_matmul_kernel, quantize_kernel
from tsld_ds.packed.format import pack_weight
torch.manual_seed(0)
for shape, method, bits, gs in [((5, 100), "twn", 2, -1), ((7, 300), "minmax", 4, 64),
                                ((3, 3000), "absmean", 2, 2048)]:
    for dtype in (torch.float32, torch.bfloat16):
        quantize_kernel(torch.randn(shape, device="cuda", dtype=dtype), method, bits, gs)
for bits, gs, asym in [(2, None, False), (4, 16, True)]:
    n, k = 37, 130
    codes = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    zero = torch.randint(-8, 8, (n, -(-k // (gs or k))), dtype=torch.int8) if asym else None
    scale = torch.rand(n, -(-k // (gs or k)))
    pw = pack_weight(codes, scale, bits, zero_point=zero, group_size=gs)
    args = [t.cuda() if t is not None else None for t in
            (pw.weight_packed, pw.weight_scale, pw.weight_zero_point)]
    for m in (1, 9, 33):
        x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
        packed_matmul_kernel(x, *args, torch.randn(n, device="cuda").bfloat16(), bits, gs)
torch.cuda.synchronize()
"""


def find_sanitizer():
    found = shutil.which("compute-sanitizer")
    if found:
        return found
    candidate = Path(os.environ.get("CUDA_HOME", "/usr/local/cuda")) / "bin" / "compute-sanitizer"
    return str(candidate) if candidate.is_file() else None


@pytest.mark.parametrize("tool", ["memcheck", "racecheck"])
def test_kernels_under_compute_sanitizer(tool):
    sanitizer = find_sanitizer()
    if sanitizer is None:
        pytest.skip("compute-sanitizer not found")
    proc = subprocess.run(
        [sanitizer, f"--tool={tool}", "--error-exitcode=97", "--kernel-name", "regex:tsld",
         sys.executable, "-c", SANITIZED_RUN],
        cwd=REPO, capture_output=True, text=True, timeout=1800,
    )
    report = f"{proc.stdout[-6000:]}\n{proc.stderr[-4000:]}"
    assert proc.returncode == 0, f"compute-sanitizer --tool={tool} failed:\n{report}"
