"""QuantLinear's fake-quantized weight by the Triton kernels of kernels/quantize.py.

`fake_quantize(weight, cfg, scale)` is `tsld_ds.quant.quantize_weight(weight, cfg, scale)` computed
by the kernels on whatever device Triton runs them (CUDA, or the CPU under TRITON_INTERPRET=1),
with the reference's gradients: identity for the straight-through methods, PACT's gradients to
the weight and its learned scale γ by a backward kernel. `fused_quantize` is what QuantLinear
calls: the same where the kernels run on the weight's device, else None (the caller then runs the
reference).
"""


import torch
from torch import Tensor

from .backend import runs_on

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
# (BLOCK, num_warps): segments up to 256 long (groups) take one small block, longer ones loop.
SHORT, LONG = {"BLOCK": 256, "num_warps": 2}, {"BLOCK": 2048, "num_warps": 8}
# Every multiply and add rounded on its own, as torch computes the reference: Triton would
# otherwise contract a multiply and an add into an FMA.
OPTIONS = {"enable_fp_fusion": False}
CHUNK = 16 * LONG["BLOCK"]  # per tensor: elements per program
_EPS = 1e-8  # the quantizers' (and the kernels') floor of a scale


def _kernels():
    from tsld_ds.kernels import quantize  # imports Triton: only once a kernel runs

    return quantize


def _launch(segment_length: int) -> dict:
    return SHORT if segment_length <= SHORT["BLOCK"] else LONG


def _levels(method: str, bits: int) -> float:
    """The kernels' qmax: 2^b - 1 grid steps for min-max, n = 2^(b-1) - 1 for PACT."""
    return float(2**bits - 1 if method == "minmax" else 2 ** (bits - 1) - 1)


def _segments(weight: Tensor, cfg) -> tuple[int, int, int]:
    """(row length, segment length, segments per row) of the weight's segments, row-major; per
    tensor the weight is one row."""
    if cfg.granularity == "tensor":
        return weight.numel(), weight.numel(), 1
    cols = weight.shape[1]
    length = cfg.group_size if cfg.granularity == "group" and cfg.group_size < cols else cols
    return cols, length, -(-cols // length)


def quantize_kernel(weight: Tensor, cfg, gamma: Tensor | None = None
                    ) -> tuple[Tensor, Tensor | None]:
    """Q(weight) for a contiguous 2-D weight, in its dtype; with PACT's γ (float32, one per
    segment) also each segment's mean |w| (float32), which the backward takes."""
    kernels = _kernels()
    method = getattr(kernels, cfg.method.upper()).value
    qmax = _levels(cfg.method, cfg.bits)
    out = torch.empty_like(weight)
    cols, length, per_row = _segments(weight, cfg)
    segments = weight.numel() // cols * per_row
    mean = None if gamma is None else torch.empty(segments, dtype=torch.float32,
                                                   device=weight.device)
    if cfg.granularity != "tensor":
        kernels.quantize_kernel[(segments,)](weight, out, gamma, mean, cols, length, per_row,
                                             qmax, METHOD=method, **_launch(length), **OPTIONS)
        return out, mean
    numel = weight.numel()
    chunks = -(-numel // CHUNK)
    partials = torch.empty(chunks, 2, dtype=torch.float32, device=weight.device)

    def reduce(stat, totals):
        kernels.chunk_partials_kernel[(chunks,)](weight, partials, totals, numel, CHUNK,
                                                 STAT=stat, **LONG, **OPTIONS)

    if cfg.method == "minmax":
        reduce(kernels.MIN_MAX.value, None)
        totals = torch.stack([partials[:, 0].min(), partials[:, 1].max()])
    else:
        reduce(kernels.ABS_SUM.value, None)
        totals = partials[:, 0].sum(0, keepdim=True)
        if cfg.method == "twn":
            reduce(kernels.KEPT.value, totals)
            totals = torch.cat([totals, partials.sum(0)])
    kernels.chunk_quantize_kernel[(chunks,)](weight, out, gamma, mean, totals, numel, CHUNK, qmax,
                                             METHOD=method, **LONG, **OPTIONS)
    return out, mean


def pact_backward_kernel(grad: Tensor, weight: Tensor, gamma: Tensor, mean: Tensor, cfg
                         ) -> tuple[Tensor, Tensor]:
    """PACT's (dL/dW in weight's dtype, dL/dγ float32 [segments]) for the upstream gradient
    `grad` of Q(weight); `gamma` and `mean` as quantize_kernel takes and returns them."""
    kernels = _kernels()
    grad_w = torch.empty_like(weight)
    cols, length, per_row = _segments(weight, cfg)
    segments = weight.numel() // cols * per_row
    # Per tensor the one segment is split into chunks; otherwise a program takes a whole segment.
    chunk = CHUNK if cfg.granularity == "tensor" else length
    chunks = -(-length // chunk)
    grad_clip = torch.empty(segments, chunks, dtype=torch.float32, device=weight.device)
    kernels.pact_backward_kernel[(segments, chunks)](
        weight, grad.contiguous(), grad_w, gamma, mean, grad_clip, cols, length, per_row, chunk,
        chunks, _levels("pact", cfg.bits), **_launch(min(chunk, length)), **OPTIONS)
    # Through c = max(γ · mean, eps) (clamp_min passes the gradient where γ · mean >= eps).
    grad_gamma = torch.where(gamma * mean >= _EPS, grad_clip.sum(1), 0.0) * mean
    return grad_w, grad_gamma


class _StraightThrough(torch.autograd.Function):
    """Forward: the kernels. Backward: identity, like the reference's straight-through methods."""

    @staticmethod
    def forward(ctx, weight, cfg):
        return quantize_kernel(weight, cfg)[0]

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _Pact(torch.autograd.Function):
    """PACT by the kernels, differentiable in the weight and in γ as the reference is."""

    @staticmethod
    def forward(ctx, weight, gamma, cfg):
        gamma32 = gamma.detach().float().flatten()
        out, mean = quantize_kernel(weight, cfg, gamma32)
        ctx.save_for_backward(weight, gamma32, mean)
        ctx.cfg, ctx.gamma_shape, ctx.gamma_dtype = cfg, gamma.shape, gamma.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        weight, gamma32, mean = ctx.saved_tensors
        grad_w, grad_gamma = pact_backward_kernel(grad, weight, gamma32, mean, ctx.cfg)
        grad_gamma = grad_gamma.view(ctx.gamma_shape).to(ctx.gamma_dtype)
        return (grad_w if ctx.needs_input_grad[0] else None,
                grad_gamma if ctx.needs_input_grad[1] else None, None)


def fake_quantize(weight: Tensor, cfg, scale: Tensor | None = None) -> Tensor:
    """`quantize_weight(weight, cfg, scale)` (`cfg` a QuantConfig) by the kernels, with the same
    gradients; `scale` is PACT's γ of shape `cfg.scale_shape(*weight.shape)`."""
    if weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES or weight.numel() == 0:
        raise ValueError(f"the kernels quantize nonempty 2-D float32/float16/bfloat16 weights, "
                         f"got {weight.dtype} {tuple(weight.shape)}")
    if (scale is not None) != (cfg.method == "pact"):
        raise ValueError(f"method {cfg.method!r} {'needs' if scale is None else 'takes no'} scale")
    weight = weight.contiguous()
    if scale is None:
        return _StraightThrough.apply(weight, cfg)
    expected = cfg.scale_shape(*weight.shape)
    if tuple(scale.shape) != expected:
        raise ValueError(f"PACT scale must have shape {expected}, got {tuple(scale.shape)}")
    return _Pact.apply(weight, scale, cfg)


def fused_quantize(weight: Tensor, cfg, scale: Tensor | None = None) -> Tensor | None:
    """`fake_quantize` where the kernels run on the weight's device and take its dtype; else None,
    and the caller runs the reference (`tsld_ds.quant.quantize_weight`)."""
    if (not runs_on(weight) or weight.dim() != 2 or weight.dtype not in FLOAT_DTYPES
            or weight.numel() == 0):
        return None
    return fake_quantize(weight, cfg, scale)
