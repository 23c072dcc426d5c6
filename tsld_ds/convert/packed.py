"""Writing the packed format (docs/method.md §5): quantized Linears as compressed-tensors
"pack-quantized" codes and scales (`tsld_ds.packed.format`), everything else as in the fake-quant
Hugging Face directory. `tsld_ds.packed.load` serves it.

Codes are read off the fake-quant weight itself (the one code path that also writes `--format hf`):
every quantizer's output is, per row or group, an integer grid `step * q` (ternary: alpha * {-1, 0,
1}; min-max: scale * (code - zero)), so the step is the segment's span divided by the number of
grid intervals it covers, the largest such count that puts every value on the grid.
"""

import torch
from torch import Tensor, nn
from transformers.pytorch_utils import Conv1D

from tsld_ds.packed.format import PackedWeight, pack_weight
from tsld_ds.quant import QuantConfig, quantized_modules

# Largest deviation from the grid, relative to a segment's span, still read as on it: the
# quantizers compute step * q in float32, so their values sit within a few ulps of the grid.
_GRID_TOLERANCE = 1e-5


def holds(cfg: QuantConfig | None, compute_dtype: torch.dtype) -> bool:
    """Whether --format packed stores a run's quantized weights: they must lie on their grids.
    Ternary values do in any dtype; 4- and 8-bit ones only as computed in fp32 (bf16 and fp16
    round them off it). A run in full precision (`cfg` None) has no codes to pack. Told by the
    options alone: a min-max segment whose values share one sign is found only as it is written."""
    return cfg is not None and (cfg.bits == 2 or compute_dtype == torch.float32)


def symmetric(cfg: QuantConfig) -> bool:
    return cfg.method != "minmax"


def packed_group_size(cfg: QuantConfig) -> int | None:
    """Per-tensor scales are stored per channel (repeated), so only groups have a group size."""
    return cfg.group_size if cfg.granularity == "group" else None


def grid_levels(segment: Tensor, bits: int, symmetric_grid: bool) -> tuple[Tensor, Tensor]:
    """(step [rows, 1], integer levels [rows, cols]) with segment == step * levels per row."""
    if symmetric_grid:
        span, intervals = segment.abs().amax(1, keepdim=True), 2 ** (bits - 1) - 1
    else:
        span = segment.amax(1, keepdim=True) - segment.amin(1, keepdim=True)
        intervals = 2**bits - 1
    step = torch.zeros_like(span)
    levels = torch.zeros_like(segment)
    pending = span[:, 0] > 0  # an all-zero row is step 0, levels 0
    for k in range(intervals, 0, -1):
        if not pending.any():
            break
        trial = span / k
        q = torch.round(segment / trial.clamp_min(torch.finfo(segment.dtype).tiny))
        fits = ((q * trial - segment).abs() <= _GRID_TOLERANCE * span).all(1) & pending
        step[fits], levels[fits] = trial[fits], q[fits]
        pending &= ~fits
    if pending.any():
        raise ValueError(f"{int(pending.sum())} rows are not on a {bits}-bit grid")
    return step, levels


def pack_fake_quant(weight: Tensor, cfg: QuantConfig) -> PackedWeight:
    """A fake-quantized weight [out_features, in_features] as packed codes and scales."""
    weight = weight.float()
    rows, cols = weight.shape
    group = packed_group_size(cfg)
    if cfg.granularity == "tensor":
        segments = [weight.reshape(1, -1)]
    else:
        width = group or cols
        segments = list(weight.split(width, dim=1))
    steps, codes, zeros = [], [], []
    offset = 2 ** (cfg.bits - 1)
    for segment in segments:
        step, levels = grid_levels(segment, cfg.bits, symmetric(cfg))
        if not symmetric(cfg):
            # levels = code - zero with code in [0, 2^b - 1]: the lowest level is code 0.
            zero = -levels.amin(1, keepdim=True)
            if (zero < 0).any() or (zero > 2 * offset - 1).any():
                raise ValueError("a min-max segment whose values all share one sign has a zero "
                                 f"point outside {cfg.bits} bits")
            levels = levels + zero - offset
            zeros.append(zero - offset)
        steps.append(step)
        codes.append(levels)
    scale = torch.cat(steps, 1)
    codes = torch.cat(codes, 1).reshape(rows, cols).to(torch.int8)
    zero_point = torch.cat(zeros, 1).to(torch.int8) if zeros else None
    if cfg.granularity == "tensor":
        scale = scale.expand(rows, 1)
        zero_point = None if zero_point is None else zero_point.expand(rows, 1)
    return pack_weight(codes, scale.contiguous(), cfg.bits, zero_point=zero_point, group_size=group)


def quantization_config(model, cfg: QuantConfig) -> dict:
    """compressed-tensors' `quantization_config` for config.json: one weight scheme for every
    Linear, and every Linear that stayed full precision (the lm_head...) in `ignore`."""
    quantized = {name for name, _ in quantized_modules(model)}
    ignore = sorted(name for name, module in model.named_modules()
                    if isinstance(module, (nn.Linear, Conv1D)) and name not in quantized)
    group = packed_group_size(cfg)
    weights = {"num_bits": cfg.bits, "type": "int", "symmetric": symmetric(cfg),
               "strategy": "channel" if group is None else "group", "group_size": group,
               "dynamic": False}
    return {"quant_method": "compressed-tensors", "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": {"group_0": {"targets": ["Linear"], "weights": weights,
                                          "input_activations": None, "output_activations": None}},
            "ignore": ignore}
