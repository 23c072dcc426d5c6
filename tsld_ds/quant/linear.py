"""QuantLinear: a Linear (or GPT-2 Conv1D) whose weight is fake-quantized on the fly."""


import torch
import torch.nn.functional as F
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from ..ops import fused_quantize
from .config import QuantConfig
from .quantizers import quantize_weight


def _fake_quant(weight: Tensor, scale: Tensor | None, cfg: QuantConfig, transposed: bool) -> Tensor:
    """The quantized weight in nn.Linear layout [out_features, in_features]: the Triton kernels
    where they run (a GPU), else the PyTorch quantizer; the same values and gradients."""
    w = weight.t() if transposed else weight
    wq = fused_quantize(w, cfg, scale)
    return wq if wq is not None else quantize_weight(w, cfg, scale)


class _QuantLinearFunction(torch.autograd.Function):
    """y = x · Q(W)ᵀ + b that keeps only x and references to the parameters for backward.

    Under ZeRO-3 the gathered weight is released after forward and gathered again for backward;
    saving Q(W) would keep a full-size copy alive in between, so backward recomputes it. The
    parameters are held as the Parameter objects, not saved tensors: non-reentrant checkpointing
    keeps each saved tensor as a detached alias of its storage, which would pin the gathered
    weight that ZeRO-3 releases by swapping `param.data`, from the recompute to the backward (a
    block's whole weights per rank). Straight-through methods (dQ/dW = I) take W's gradient as
    Q(W)'s, and Q(W) lives only for the input's gradient: backward holds one weight-sized buffer
    at a time. PACT differentiates its quantizer with autograd (γ needs it).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, scale, cfg, transposed):
        ctx.save_for_backward(x)
        ctx.params = (weight, bias, scale)
        ctx.cfg, ctx.transposed = cfg, transposed
        return F.linear(x, _fake_quant(weight, scale, cfg, transposed), bias)

    @staticmethod
    def backward(ctx, grad_out):
        (x,), (weight, _, scale) = ctx.saved_tensors, ctx.params
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        grad_out_2d = grad_out.reshape(-1, grad_out.shape[-1])
        x_2d = x.reshape(-1, x.shape[-1])
        grad_b = grad_out_2d.sum(0) if need_b else None
        grad_x = grad_w = grad_s = None
        if scale is None:
            if need_x:
                grad_x = grad_out.matmul(_fake_quant(weight, None, ctx.cfg, ctx.transposed))
            if need_w:  # laid out as the weight is, so autograd accumulates it without a copy
                grad_w = (x_2d.t().matmul(grad_out_2d) if ctx.transposed
                          else grad_out_2d.t().matmul(x_2d))
            return grad_x, grad_w, grad_b, None, None, None

        with torch.enable_grad():
            w = weight.detach().requires_grad_(need_w)
            s = scale.detach().requires_grad_(need_s)
            wq = _fake_quant(w, s, ctx.cfg, ctx.transposed)
        grad_x = grad_out.matmul(wq.detach()) if need_x else None
        if need_w or need_s:
            grad_wq = grad_out_2d.t().matmul(x_2d)
            wrt = [t for t, need in ((w, need_w), (s, need_s)) if need]
            grads = iter(torch.autograd.grad(wq, wrt, grad_wq))
            grad_w = next(grads) if need_w else None
            grad_s = next(grads) if need_s else None
        return grad_x, grad_w, grad_b, grad_s, None, None


class QuantLinear(nn.Module):
    """Drop-in replacement for nn.Linear or transformers' Conv1D with a fake-quantized weight.

    Takes over the original module's `weight` and `bias` Parameter objects (so ZeRO-3
    partitioning and the optimizer see the same tensors) and never reads their data or shape
    here: under `deepspeed.zero.Init` they are already partitioned. Conv1D stores its weight
    [in, out] (`transposed=True`); quantization is still per output channel. For "pact" the module
    owns the learned scale γ as the Parameter `scale`.
    """

    def __init__(self, module: nn.Module, cfg: QuantConfig):
        super().__init__()
        if isinstance(module, Conv1D):
            self.in_features, self.out_features, self.transposed = module.nx, module.nf, True
        elif isinstance(module, nn.Linear):
            self.in_features, self.out_features = module.in_features, module.out_features
            self.transposed = False
        else:
            raise TypeError("QuantLinear replaces nn.Linear or Conv1D, got "
                            f"{type(module).__name__}")
        self.cfg = cfg
        self.weight = module.weight
        self.bias = module.bias
        if cfg.method == "pact":
            shape = cfg.scale_shape(self.out_features, self.in_features)
            self.scale = nn.Parameter(
                torch.full(shape, cfg.init_scale, dtype=self.weight.dtype,
                           device=self.weight.device)
            )
        else:
            self.register_parameter("scale", None)

    def forward(self, x: Tensor) -> Tensor:
        return _QuantLinearFunction.apply(
            x, self.weight, self.bias, self.scale, self.cfg, self.transposed
        )

    def quantized_weight(self) -> Tensor:
        """The fake-quantized weight in nn.Linear layout [out_features, in_features]. Under ZeRO-3,
        call it inside `deepspeed.zero.GatheredParameters([self.weight, self.scale])`."""
        return _fake_quant(self.weight, self.scale, self.cfg, self.transposed)

    def extra_repr(self) -> str:
        group = f", group_size={self.cfg.group_size}" if self.cfg.granularity == "group" else ""
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, bits={self.cfg.bits}, method={self.cfg.method}, "
            f"granularity={self.cfg.granularity}{group}, transposed={self.transposed}"
        )
