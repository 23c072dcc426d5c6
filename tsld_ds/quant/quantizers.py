"""Weight fake-quantizers (docs/method.md §1): each returns the dequantized weight.

Every quantizer works on a block view [rows, n_blocks, block_len] of the weight and reduces its
statistics over the last dim, so per-tensor, per-channel and per-group quantization share one
formula each. Gradients: TWN, absmean and min-max are straight-through (identity to the weight);
PACT differentiates its own formula with only the rounding straight-through, so γ learns.

The straight-through quantizers run without autograd (inside `_StraightThrough`), so they work
in place on their own temporaries: on the CPU (the GPU runs the fused kernel) a quantized weight
costs one weight-sized buffer and a mask, not three or four; at LLaMA-7B width an MLP weight is
172 MiB in fp32.
"""

from functools import partial

import torch
from torch import Tensor

from .config import QuantConfig

# Guards divisions by a statistic that is zero for an all-zero (or constant) block.
_EPS = 1e-8


class _StraightThrough(torch.autograd.Function):
    """y = fn(x) in the forward; dy/dx = identity in the backward."""

    @staticmethod
    def forward(ctx, x: Tensor, fn) -> Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx, grad: Tensor):
        return grad, None


def _twn(w: Tensor, bits: int) -> Tensor:
    """Ternary weight networks: Δ = 0.7·mean|W|, α = mean(|W| where |W| > Δ).

    One weight-sized buffer holds |W|, then the kept mask's count, then the result: a reduction
    over a bool mask would first materialize it as int64, twice the weight's size.
    """
    buf = w.abs()
    drop = buf <= 0.7 * buf.mean(-1, keepdim=True)
    kept_sum = buf.masked_fill_(drop, 0.0).sum(-1, keepdim=True)
    # The kept mask as 0/1 in float32 or wider: exact counts up to 2^24 elements a block.
    kept = buf.copy_(drop).neg_().add_(1.0).sum(-1, keepdim=True)
    # An all-zero block keeps nothing: α = 0/1, not 0/0.
    alpha = kept_sum / kept.clamp_min(1)
    return torch.sign(w, out=buf).mul_(alpha).masked_fill_(drop, 0.0)


def _absmean(w: Tensor, bits: int) -> Tensor:
    """BitNet b1.58 ternary: α = mean|W|, Wq = α·clamp(round(W/α), -1, 1)."""
    alpha = w.abs().mean(-1, keepdim=True).clamp_min(_EPS)
    return (w / alpha).round_().clamp_(-1, 1).mul_(alpha)


def _minmax(w: Tensor, bits: int) -> Tensor:
    """Asymmetric uniform grid of 2^bits levels spanning [min, max]."""
    qmax = 2**bits - 1
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = ((hi - lo) / qmax).clamp_min(_EPS)  # a constant block (max == min) maps onto itself
    zero = (-lo / scale).round()
    return (w / scale).round_().add_(zero).clamp_(0, qmax).sub_(zero).mul_(scale)


# All take (blocks, bits); the ternary ones ignore bits, which QuantConfig pins to 2.
_STRAIGHT_THROUGH_QUANTIZERS = {"twn": _twn, "absmean": _absmean, "minmax": _minmax}


def _pact(w: Tensor, gamma: Tensor, bits: int) -> Tensor:
    """PACT+ / QuantGPT learned scale: c = γ·mean|W|, Wq = c·round(clip(W, -c, c)/c·n)/n.

    mean|W| is taken as a detached statistic: W then gets exactly the clipped straight-through
    gradient (1 inside [-c, c], 0 outside) and the range is learned through γ alone.
    """
    n = 2 ** (bits - 1) - 1
    clip = (gamma * w.detach().abs().mean(-1, keepdim=True)).clamp_min(_EPS)
    levels = _StraightThrough.apply(torch.clamp(w, -clip, clip) / clip * n, torch.round)
    return clip * levels / n


def _blocks(w: Tensor, cfg: QuantConfig) -> list[Tensor]:
    """Views of w [rows, cols] as blocks [rows', n_blocks, block_len] over which statistics are
    taken. A ragged last group becomes a second, narrower part so that its statistics cover the
    real elements only."""
    if cfg.granularity == "tensor":
        return [w.reshape(1, 1, -1)]
    if cfg.granularity == "channel":
        return [w.unsqueeze(1)]
    rows, cols = w.shape
    full = cols - cols % cfg.group_size
    parts = [w[:, :full].reshape(rows, -1, cfg.group_size)] if full else []
    if full < cols:
        parts.append(w[:, full:].unsqueeze(1))
    return parts


def quantize_weight(w: Tensor, cfg: QuantConfig, scale: Tensor | None = None) -> Tensor:
    """Fake-quantized copy of a weight laid out [out_features, in_features], in w's dtype.

    `scale` is PACT's γ, of shape `cfg.scale_shape(out_features, in_features)`; other methods take
    none. Statistics are computed in at least float32.
    """
    if (scale is not None) != (cfg.method == "pact"):
        raise ValueError(f"method {cfg.method!r} {'needs' if scale is None else 'takes no'} scale")
    if w.dim() != 2:
        raise ValueError(f"expected a 2-D weight [out_features, in_features], got {tuple(w.shape)}")
    compute_dtype = torch.promote_types(w.dtype, torch.float32)
    parts = _blocks(w.to(compute_dtype), cfg)
    if scale is None:
        quantize = _STRAIGHT_THROUGH_QUANTIZERS[cfg.method]
        parts = [_StraightThrough.apply(p, partial(quantize, bits=cfg.bits)) for p in parts]
    else:
        expected = cfg.scale_shape(*w.shape)
        if tuple(scale.shape) != expected:
            raise ValueError(f"PACT scale must have shape {expected}, got {tuple(scale.shape)}")
        # γ [rows', n_blocks] lines up with the blocks; split it like the ragged group parts.
        gammas = scale.to(compute_dtype).unsqueeze(-1).split([p.shape[1] for p in parts], dim=1)
        parts = [_pact(p, g, cfg.bits) for p, g in zip(parts, gammas)]
    rows = [p.reshape(w.shape[0], -1) for p in parts]
    wq = rows[0] if len(rows) == 1 else torch.cat(rows, dim=1)
    return wq.to(w.dtype)
