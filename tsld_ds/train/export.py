"""The run's final Hugging Face export (OUTPUT_DIR/hf): the student's weights gathered onto rank 0
one module at a time through ZeRO-3's public `GatheredParameters`, then written by the
converter's fake-quant writer, so the live export and `launch/convert.py --format hf` are one
code path."""
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist

from tsld_ds.quant.fake_quant import DTYPES, fake_quant_state_dict, save_hf


def gathered_state_dict(model) -> dict:
    """On rank 0 {name: full tensor on the CPU} of `model`'s parameters and persistent buffers;
    {} elsewhere. One module's own parameters are gathered at a time, and a parameter shared by
    two modules (tied embeddings) is copied once, its names sharing the tensor. Call on every
    rank, at the end of training (parameters are left partitioned)."""
    is_main = dist.get_rank() == 0
    state, first_name = {}, {}
    for prefix, module in model.named_modules():
        own = list(module.named_parameters(prefix=prefix, recurse=False))
        with deepspeed.zero.GatheredParameters([p for _, p in own], modifier_rank=None):
            if not is_main:
                continue
            for name, p in own:
                if id(p) in first_name:  # tied: the tensor of its first name
                    state[name] = state[first_name[id(p)]]
                else:  # a copy: the gathered storage is released when the block ends
                    first_name[id(p)] = name
                    state[name] = p.detach().to("cpu", copy=True)
    if is_main:  # buffers are never partitioned
        parameters = {name for name, _ in model.named_parameters(remove_duplicate=False)}
        state.update((name, tensor.detach().to("cpu", copy=True))
                     for name, tensor in model.state_dict().items()
                     if name not in parameters and isinstance(tensor, torch.Tensor))
    return state


def export_hf(model, tokenizer, out_dir, *, dtype: str | None = None) -> Path:
    """Writes `out_dir` with config, tokenizer and the fake-quant weights of `model` (the
    engine's, possibly partitioned) in `dtype` (default: the training dtype). Call on every
    rank."""
    state = gathered_state_dict(model)
    out_dir = Path(out_dir)
    if dist.get_rank() == 0:
        torch_dtype = DTYPES[dtype] if dtype is not None else None
        save_hf(model, fake_quant_state_dict(model, state, dtype=torch_dtype), tokenizer,
                out_dir)
    dist.barrier()
    return out_dir
