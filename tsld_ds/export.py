"""Writing a trained student as a plain Hugging Face model directory ("fake-quant" format).

Each quantized Linear's weight is replaced by its dequantized quantized value, so stock
`AutoModelForCausalLM.from_pretrained` loads exactly the model that was evaluated in training,
without importing tsld_ds.
"""
from pathlib import Path

import torch
import torch.distributed as dist

from tsld_ds.quant import QuantLinear, quantize_weight


def fake_quant_state_dict(model, state_dict: dict, prefix: str = "") -> dict:
    """`state_dict` (full tensors, keys under `prefix`) with quantized Linears' weights replaced
    by their fake-quant values; learned quantizer parameters are dropped. Keys lose `prefix`."""
    out = {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    for name, module in model.named_modules():
        if not isinstance(module, QuantLinear):
            continue
        extra = [n for n, _ in module.named_parameters(recurse=False) if n not in ("weight", "bias")]
        scale = out.pop(f"{name}.{extra[0]}") if extra else None
        for n in extra[1:]:
            out.pop(f"{name}.{n}")
        weight = out[f"{name}.weight"]
        rows = weight.t() if module.transposed else weight  # quantizers see [out, in]
        with torch.no_grad():
            quantized = quantize_weight(rows, module.cfg, scale)
        out[f"{name}.weight"] = (quantized.t() if module.transposed else quantized).contiguous()
    return out


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def export_hf(engine, model, tokenizer, out_dir, *, dtype: str | None = None,
              prefix: str = "model.") -> Path:
    """Gathers the engine's (ZeRO-3 partitioned) weights layer by layer onto rank 0 and writes
    `out_dir` with config, tokenizer and safetensors (in `dtype`, default the training dtype).
    Call on every rank."""
    state_dict = engine._zero3_consolidated_16bit_state_dict() \
        if engine.zero_optimization_partition_weights() else engine.module.state_dict()
    out_dir = Path(out_dir)
    if dist.get_rank() == 0:
        weights = fake_quant_state_dict(model, state_dict, prefix)
        if dtype is not None:
            # Quantize first, then cast: the exported values are the ones training evaluated.
            weights = {k: v.to(DTYPES[dtype]) if v.is_floating_point() else v
                       for k, v in weights.items()}
        if dtype is not None:
            model.config.dtype = DTYPES[dtype]
        model.save_pretrained(out_dir, state_dict=weights, safe_serialization=True)
        tokenizer.save_pretrained(out_dir)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out_dir)
    dist.barrier()
    return out_dir
