"""Optional GPU packages (`pip install -e ".[gpu]"`): a clear error naming the extra when an
option needs one that is missing."""
import importlib
import importlib.util

import torch

from tsld_ds.errors import UsageError

_GPU_EXTRA = "pip install -e \".[gpu]\" (or pip install {package})"


def require(module: str, package: str, option: str):
    if not torch.cuda.is_available():
        raise UsageError(f"{option} needs a CUDA GPU; none is available here")
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"{option} needs the {package} package: "
                         + _GPU_EXTRA.format(package=package))
    return importlib.import_module(module)


def check_options(attn_implementation: str | None, optimizer: str) -> None:
    """Fails fast, before any process group or model exists."""
    if attn_implementation == "flash_attention_2":
        require("flash_attn", "flash-attn", "--attn_implementation flash_attention_2")
    if optimizer == "adamw_8bit":
        require("bitsandbytes", "bitsandbytes", "--optimizer adamw_8bit")


def adamw_8bit(params, ds_config: dict, lr: float):
    """bitsandbytes' 8-bit AdamW with the betas/eps/weight decay of the DeepSpeed config's
    optimizer section (which it replaces)."""
    bnb = require("bitsandbytes", "bitsandbytes", "--optimizer adamw_8bit")
    hyper = dict(ds_config.get("optimizer", {}).get("params", {}))
    hyper["lr"] = lr
    allowed = ("lr", "betas", "eps", "weight_decay")
    return bnb.optim.AdamW8bit(params, **{k: v for k, v in hyper.items() if k in allowed})
