"""What `launch/eval.py` evaluates: a training run (its exported `hf/` model, scored on the run's
own validation data by default), a packed directory (`tsld_ds.load_packed`), or any Hugging Face
model directory or name (stock `AutoModelForCausalLM`)."""
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM

from tsld_ds.errors import UsageError
from tsld_ds.models import (
    check_causal_lm,
    check_model_source,
    load_tokenizer,
    read_config,
    vocab_size_of,
)
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


def load_eval_model(name_or_path: str, dtype: torch.dtype, device="cpu", *,
                    tokenizer: str | None = None) -> EvalModel:
    """The model and its tokenizer, `tokenizer` where given; the tokenizer loads first, so that a
    model without one is refused before it loads."""
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
    source = str(path) if path.exists() else name_or_path
    check_model_source(source, "model")
    check_causal_lm(read_config(source, "model"), "model", source)
    given = tokenizer is not None
    tokenizer = load_tokenizer(tokenizer) if given else _own_tokenizer(source)
    if read_quantization_config(path) is not None:
        model, kind = load_packed(path, device=device, dtype=dtype), "packed"
    else:
        try:
            model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
        except (OSError, ValueError) as e:
            raise UsageError(f"cannot load model '{name_or_path}': {e}") from None
        model = model.to(device)
    if given and len(tokenizer) > vocab_size_of(model):  # ids past the lm_head: an IndexError
        raise UsageError(f"--tokenizer has {len(tokenizer)} tokens, more than the "
                         f"{vocab_size_of(model)} that model '{name_or_path}' predicts")
    return EvalModel(model=model.eval(), tokenizer=tokenizer, kind=kind, path=str(path),
                     run_config=run_config)


def _own_tokenizer(source: str):
    """A model's own tokenizer. Where a model directory has none (neither file a tokenizer is
    saved as), the refusal says so, not what transformers tried instead (sentencepiece)."""
    try:
        return load_tokenizer(source)
    except UsageError:
        path = Path(source).expanduser()
        if path.is_dir() and not any((path / name).is_file()
                                     for name in ("tokenizer_config.json", "tokenizer.json")):
            raise UsageError(f"model '{source}' has no tokenizer (no tokenizer_config.json or "
                             "tokenizer.json): pass --tokenizer, the tokenizer it was trained "
                             "with") from None
        raise
