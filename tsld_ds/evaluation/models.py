"""What `launch/eval.py` evaluates: a training run (its exported `hf/` model, scored on the run's
own validation data by default), a packed directory (`tsld_ds.load_packed`), or any Hugging Face
model directory or name (stock `AutoModelForCausalLM`)."""
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tsld_ds.errors import UsageError
from tsld_ds.models import check_model_source, load_tokenizer
from tsld_ds.packed.load import load_packed, read_quantization_config
from tsld_ds.run.config import ARGS_FILE, RunConfig
from tsld_ds.run.options import read_run_config


@dataclass
class EvalModel:
    model: object
    tokenizer: object
    kind: str                                # "run", "packed" or "hf"
    path: str
    run_config: RunConfig | None          # the training options, for a run directory


def load_eval_model(name_or_path: str, dtype: torch.dtype, device="cpu") -> EvalModel:
    path = Path(name_or_path).expanduser()
    run_config = None
    kind = "hf"
    if (path / ARGS_FILE).is_file():
        run_config = read_run_config(path)
        kind, path = "run", path / "hf"
        if not path.is_dir():
            raise UsageError(f"run '{name_or_path}' has no exported model in {path}; write one "
                             f"with: tsld-convert --checkpoint {name_or_path} --output "
                             f"{str(name_or_path).rstrip('/')}-hf, and evaluate that")
    check_model_source(str(path) if path.exists() else name_or_path, "model")
    if read_quantization_config(path) is not None:
        model, kind = load_packed(path, device=device, dtype=dtype), "packed"
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(
                str(path) if path.exists() else name_or_path, dtype=dtype)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load model '{name_or_path}': {e}") from None
        model = model.to(device)
    tokenizer = load_tokenizer(str(path) if path.exists() else name_or_path)
    return EvalModel(model=model.eval(), tokenizer=tokenizer, kind=kind, path=str(path),
                     run_config=run_config)
