"""Writing the fake-quant tensors of a student (`tsld_ds.quant.fake_quant.fake_quant_tensors`)
as a Hugging Face directory: dequantized (`hf`) or with packed quantized Linears (`packed`)."""
import dataclasses
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from tsld_ds.convert.packed import pack_fake_quant, quantization_config
from tsld_ds.convert.report import Report
from tsld_ds.quant.fake_quant import cast, save_hf


def _rows(tensor: torch.Tensor, module) -> torch.Tensor:
    """A quantized Linear's weight as [out_features, in_features] (GPT-2's Conv1D stores it
    transposed)."""
    return tensor.t() if module.transposed else tensor


def write_hf(model, tensors: Iterable, tokenizer, out_dir: Path,
             dtype: torch.dtype | None, report: Report) -> None:
    weights = {}
    for name, tensor, module in tensors:
        weights[name] = cast(tensor, dtype)
        if module is not None:
            stored = weights[name]
            report.add_quantized(name, _rows(stored, module), module.cfg,
                                 stored.numel() * stored.element_size())
    save_hf(model, weights, tokenizer, out_dir)
    report.tensors = count_safetensors(out_dir)


def write_packed(model, tensors: Iterable, tokenizer, out_dir: Path,
                 dtype: torch.dtype | None, report: Report) -> None:
    weights, cfg = {}, None
    for name, tensor, module in tensors:
        if module is None:
            weights[name] = cast(tensor, dtype)
            continue
        cfg = module.cfg
        packed = pack_fake_quant(_rows(tensor, module), cfg)
        packed = dataclasses.replace(packed, weight_scale=cast(packed.weight_scale, dtype))
        prefix = name[: -len("weight")]
        weights.update({prefix + key: value for key, value in packed.state_dict().items()})
        report.add_quantized(name, packed.dequantize(), cfg, packed.nbytes())
    model.config.quantization_config = quantization_config(model, cfg)
    save_hf(model, weights, tokenizer, out_dir)
    report.tensors = count_safetensors(out_dir)


def count_safetensors(out_dir: Path) -> int:
    total = 0
    for file in Path(out_dir).glob("*.safetensors"):
        with safe_open(file, framework="pt") as f:
            total += len(list(f.keys()))
    return total
