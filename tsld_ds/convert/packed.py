"""The packed format (DESIGN §4): quantized Linears as compressed-tensors "pack-quantized" codes
and scales (`tsld_ds.packing`), everything else as in the fake-quant Hugging Face directory, and
`load_packed` that serves it with the packed Linear modules.

Codes are read off the fake-quant weight itself (the one code path that also writes `--format hf`):
every quantizer's output is, per row or group, an integer grid `step * q` (ternary: alpha * {-1, 0,
1}; min-max: scale * (code - zero)), so the step is the segment's span divided by the number of
grid intervals it covers, the largest such count that puts every value on the grid.
"""
import json
from pathlib import Path
from typing import Optional

import torch
from safetensors import safe_open
from torch import Tensor, nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from tsld_ds.errors import UsageError
from tsld_ds.packed_linear import PackedInt4Linear, PackedLinear, PackedTernaryLinear
from tsld_ds.packing import PackedWeight, pack_weight
from tsld_ds.quant import QuantConfig, quantized_modules

# Largest deviation from the grid, relative to a segment's span, still read as on it: the
# quantizers compute step * q in float32, so their values sit within a few ulps of the grid.
_GRID_TOLERANCE = 1e-5
PACKED_CLASSES = {2: PackedTernaryLinear, 4: PackedInt4Linear}


def symmetric(cfg: QuantConfig) -> bool:
    return cfg.method != "minmax"


def packed_group_size(cfg: QuantConfig) -> Optional[int]:
    """Per-tensor scales are stored per channel (repeated), so only groups have a group size."""
    return cfg.group_size if cfg.granularity == "group" else None


def _grid(segment: Tensor, bits: int, symmetric_grid: bool) -> tuple[Tensor, Tensor]:
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
        step, levels = _grid(segment, cfg.bits, symmetric(cfg))
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


def read_quantization_config(path) -> Optional[dict]:
    """The directory's compressed-tensors pack-quantized `quantization_config`, else None."""
    config_file = Path(path) / "config.json"
    if not config_file.is_file():
        return None
    config = json.loads(config_file.read_text()).get("quantization_config") or {}
    packed = (config.get("quant_method"), config.get("format")) == ("compressed-tensors",
                                                                     "pack-quantized")
    return config if packed else None


def _weights(path: Path) -> dict:
    tensors = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, framework="pt") as f:
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def load_packed(path, device=None, dtype: Optional[torch.dtype] = None):
    """A packed directory as a ready causal LM: its quantized Linears are `PackedTernaryLinear` /
    `PackedInt4Linear` (CUDA kernels on a GPU, the PyTorch reference elsewhere), the rest a stock
    Hugging Face model. `dtype` defaults to the dtype it was written in."""
    from accelerate import init_empty_weights

    path = Path(path)
    scheme = read_quantization_config(path)
    if scheme is None:
        raise UsageError(f"'{path}' is not a packed directory (no compressed-tensors "
                         "pack-quantized quantization_config in config.json)")
    weights_args = scheme["config_groups"]["group_0"]["weights"]
    bits, group_size = weights_args["num_bits"], weights_args["group_size"]
    config = AutoConfig.from_pretrained(path)
    del config.quantization_config  # built here, not by transformers' own quantizer
    dtype = dtype or config.dtype or torch.float32
    tensors = _weights(path)
    with init_empty_weights():  # parameters on the meta device, buffers (rotary tables) real
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, module in list(model.named_modules()):
        if f"{name}.weight_packed" not in tensors:
            continue
        cls = PACKED_CLASSES.get(bits, PackedLinear)
        kwargs = {} if cls is not PackedLinear else {"bits": bits}
        packed = cls(*_features(module), group_size=group_size,
                     symmetric=weights_args["symmetric"], bias=module.bias is not None,
                     dtype=dtype, **kwargs)
        tensors[f"{name}.weight_scale"] = tensors[f"{name}.weight_scale"].float()  # kernels' dtype
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, packed)
    tensors = {k: v.to(dtype) if v.is_floating_point() and not k.endswith("weight_scale") else v
               for k, v in tensors.items()}
    unexpected = model.load_state_dict(tensors, strict=False, assign=True).unexpected_keys
    model.tie_weights()  # a tied lm_head has no tensor of its own in the file
    missing = [n for n, p in model.named_parameters() if p.is_meta]
    if missing or unexpected:
        raise UsageError(f"packed directory '{path}' does not match its config: missing "
                         f"{missing[:5]}, unexpected {unexpected[:5]}")
    return model.to(device).eval() if device is not None else model.eval()


def _features(module: nn.Module) -> tuple[int, int]:
    """(in_features, out_features) of the Linear or Conv1D a packed module replaces."""
    if isinstance(module, Conv1D):
        return module.nx, module.nf
    return module.in_features, module.out_features
