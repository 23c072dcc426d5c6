"""A trained student's final weights, and writing them as a plain Hugging Face model directory
("fake-quant" format, docs/method.md §5).

Each quantized Linear's weight is replaced by its dequantized quantized value, so stock
`AutoModelForCausalLM.from_pretrained` loads exactly the model that was evaluated in training,
without importing tsld_ds. The live run's final export (`tsld_ds.train.export`) and the offline
converter both take their weights from `fake_quant_tensors`.
"""
from collections import Counter, defaultdict
from collections.abc import Iterator
from pathlib import Path

import torch

from .linear import QuantLinear
from .quantizers import quantize_weight
from .surgery import quantized_modules

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _quantizer_parameter_names(model) -> tuple[dict, set]:
    """({QuantLinear weight name: name of its learned scale or None}, the set of every
    quantizer-only parameter name, which an exported model does not have)."""
    scales, extra = {}, set()
    for name, module in quantized_modules(model):
        own = [n for n, _ in module.named_parameters(recurse=False) if n not in ("weight", "bias")]
        scales[f"{name}.weight"] = f"{name}.{own[0]}" if own else None
        extra.update(f"{name}.{n}" for n in own)
    return scales, extra


def fake_quant_tensors(model, state_dict: dict, prefix: str = "", *,
                       compute_dtype: torch.dtype | None = None
                       ) -> Iterator[tuple[str, torch.Tensor, QuantLinear | None]]:
    """(name without `prefix`, full tensor, its QuantLinear or None) for every entry of
    `state_dict` under `prefix`: quantized Linears' weights are replaced by their fake-quant
    values (laid out as stored) and learned quantizer parameters are left out.

    Entries may be lazy (DeepSpeed's zero_to_fp32 lazy mode): each is materialized with
    `.contiguous()` when its turn comes, so the caller holds one full tensor at a time; tied entries
    (the same object under two names) are materialized once. `compute_dtype` (the training dtype)
    is what weights are cast to before quantizing, so fp32 master weights of a bf16 run give the
    values that run evaluated.
    """
    modules = dict(quantized_modules(model))
    scales, extra = _quantizer_parameter_names(model)
    repeats = Counter(id(v) for v in state_dict.values())
    shared = {}
    for key, value in state_dict.items():
        name = key[len(prefix):]
        if not key.startswith(prefix) or name in extra:
            continue  # another module's entry, or a learned scale (folded into the weight)
        if id(value) in shared:
            yield name, shared[id(value)][0], shared[id(value)][1]
            continue
        tensor = value.contiguous().detach()  # DeepSpeed saves master shards that require grad
        module = None
        if name in scales:
            module = modules[name.rpartition(".")[0]]
            scale = None if scales[name] is None else \
                state_dict[prefix + scales[name]].contiguous().detach()
            tensor = fake_quantize(tensor, module, scale, compute_dtype)
        if repeats[id(value)] > 1:
            shared[id(value)] = (tensor, module)
        yield name, tensor, module


def fake_quantize(weight: torch.Tensor, module: QuantLinear, scale: torch.Tensor | None,
                  compute_dtype: torch.dtype | None = None) -> torch.Tensor:
    """`module`'s quantizer applied to a full `weight` laid out as the module stores it."""
    if compute_dtype is not None:
        weight = weight.to(compute_dtype)
        scale = None if scale is None else scale.to(compute_dtype)
    rows = weight.t() if module.transposed else weight  # quantizers see [out, in]
    with torch.no_grad():
        quantized = quantize_weight(rows, module.cfg, scale)
    return (quantized.t() if module.transposed else quantized).contiguous()


def fake_quant_state_dict(model, state_dict: dict, *, dtype: torch.dtype | None = None) -> dict:
    """`fake_quant_tensors` of a live model's full state dict, floating tensors cast to `dtype`
    (quantize first, then cast: the written values are the ones training evaluated)."""
    return {name: cast(tensor, dtype) for name, tensor, _ in fake_quant_tensors(model, state_dict)}


def cast(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    if dtype is None or not tensor.is_floating_point():
        return tensor
    return tensor.to(dtype)


def save_hf(model, weights: dict, tokenizer, out_dir) -> Path:
    """`out_dir` with config, generation config, tokenizer and `weights` as safetensors shards.
    `model` supplies the config and the module layout (it may live on the meta device); the
    config's `dtype` is the stored floating tensors' own, so `from_pretrained` loads them as they
    are (not in the dtype the base model's config happened to name). The tokenizer says what it
    adds by default to every reader (`save_tokenizer`), as training tokenized with it."""
    from tsld_ds.data import save_tokenizer  # imports datasets: not at the CLIs' --help

    out_dir = Path(out_dir)
    stored = {t.dtype for t in weights.values() if t.is_floating_point()}
    if len(stored) != 1:
        raise ValueError(f"floating tensors of one dtype expected, got {sorted(map(str, stored))}")
    model.save_pretrained(out_dir, state_dict=_tied_as_one(model, weights),
                          safe_serialization=True)
    model.config.dtype = stored.pop()  # save_pretrained wrote the skeleton's parameters' dtype
    model.config.save_pretrained(out_dir)
    save_tokenizer(tokenizer, out_dir)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.save_pretrained(out_dir)
    return out_dir


def _tied_as_one(model, weights: dict) -> dict:
    """`weights` with the entries of parameters that `model` ties (lm_head and the embeddings)
    made one tensor: save_pretrained then stores it once, as from_pretrained expects. A
    consolidated checkpoint gives each name its own copy."""
    names_of_parameter = defaultdict(list)
    for name, parameter in model.named_parameters(remove_duplicate=False):
        names_of_parameter[id(parameter)].append(name)
    weights = dict(weights)
    for names in names_of_parameter.values():
        present = [name for name in names if name in weights]
        for name in present[1:]:
            weights[name] = weights[present[0]]
    return weights
