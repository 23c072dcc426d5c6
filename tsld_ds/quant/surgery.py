"""Model surgery: swap the Linear layers of the transformer blocks for QuantLinear, in place."""

from collections.abc import Iterator, Sequence

from torch import nn
from transformers.pytorch_utils import Conv1D

from .config import QuantConfig
from .linear import QuantLinear


def _in_block(name: str) -> bool:
    # Transformer blocks live in a ModuleList, so their modules have a numeric path component
    # (model.layers.3.self_attn.q_proj, transformer.h.0.attn.c_attn); embeddings, norms, lm_head
    # and OPT's project_in/project_out do not.
    return any(part.isdigit() for part in name.split("."))


def _skipped(name: str, skip: Sequence[str]) -> bool:
    # An entry matches whole dotted components: "mlp" skips "model.layers.0.mlp.up_proj",
    # "fc1" does not skip "fc10".
    return any(f".{entry}." in f".{name}." for entry in skip)


def quantize_model(model: nn.Module, cfg: QuantConfig,
                   skip: Sequence[str] = ("lm_head",)) -> nn.Module:
    """Replace every nn.Linear / Conv1D inside the transformer blocks with a QuantLinear holding
    the same Parameter objects; modules whose name matches an entry of `skip` stay as they are.

    Run it before `deepspeed.initialize` (it may follow `deepspeed.zero.Init`). The config is
    recorded as `model.config.tsld_quantization` (a dict) when the model has a config, so it ends
    up in config.json.
    """
    targets = [name for name, _ in quantization_targets(model, skip)]
    if not targets:
        raise ValueError("quantize_model found no nn.Linear or Conv1D inside transformer blocks")
    for name in targets:
        parent_name, _, child_name = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, child_name, QuantLinear(getattr(parent, child_name), cfg))
    if getattr(model, "config", None) is not None:
        model.config.tsld_quantization = cfg.to_dict()
    return model


def quantization_targets(model: nn.Module, skip: Sequence[str] = ("lm_head",)
                         ) -> list[tuple[str, nn.Module]]:
    """(name, module) of each nn.Linear / Conv1D that `quantize_model` replaces."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, (nn.Linear, Conv1D)) and _in_block(name)
            and not _skipped(name, skip)]


def in_features(module: nn.Module) -> int:
    """Input columns of an nn.Linear or a Conv1D (GPT-2's, whose weight is [in, out])."""
    return module.weight.shape[0] if isinstance(module, Conv1D) else module.in_features


def quantized_modules(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """(qualified name, module) for every QuantLinear in the model."""
    return ((name, m) for name, m in model.named_modules() if isinstance(m, QuantLinear))
