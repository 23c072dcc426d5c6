"""Loading a packed directory (`launch/convert.py --format packed`) as a ready causal LM whose
quantized Linears stay packed: `PackedTernaryLinear` / `PackedInt4Linear` run the W2A16 / W4A16
kernels on a GPU and the PyTorch reference elsewhere; everything else is a stock Hugging Face
model."""
import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from tsld_ds.errors import UsageError
from tsld_ds.packed.linear import PackedInt4Linear, PackedLinear, PackedTernaryLinear

PACKED_CLASSES = {2: PackedTernaryLinear, 4: PackedInt4Linear}


def read_quantization_config(path) -> dict | None:
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


def load_packed(path, device=None, dtype: torch.dtype | None = None):
    """A packed directory as a ready causal LM: its quantized Linears are `PackedTernaryLinear` /
    `PackedInt4Linear` (Triton kernels on a GPU, the PyTorch reference elsewhere), the rest a stock
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
