"""What a conversion reads: a training run's DeepSpeed checkpoint, consolidated on the CPU, and
the student's module layout rebuilt from the run's options — no GPU, no process group, no engine.

The consolidation is DeepSpeed's own (`deepspeed.utils.zero_to_fp32`, ZeRO-2 and ZeRO-3, any
world size) in its lazy mode: the fp32 master shards stay memory-mapped and each full tensor is
assembled only when the writer asks for it, so host memory holds at most the output copy plus
one tensor.
"""
import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from transformers import AutoModelForCausalLM

from tsld_ds.errors import UsageError
from tsld_ds.models import load_tokenizer, read_config, torch_dtype_of
from tsld_ds.quant import quantize_model
from tsld_ds.run import checkpoint as ckpt
from tsld_ds.run.config import ARGS_FILE, RunConfig
from tsld_ds.run.options import read_run_config
from tsld_ds.run.universal import MODEL_STATES, model_states_header

# The DistillationStudent that the engine trains holds the Hugging Face model as `.model`.
STUDENT_PREFIX = "model."
# The run options that rebuild the student's quantized layers.
QUANTIZER_OPTIONS = ("bits", "quant_method", "granularity", "group_size", "init_scale")


@dataclass
class TrainedCheckpoint:
    path: Path          # OUTPUT_DIR/checkpoints/step_N: DeepSpeed's files
    config: RunConfig   # the run's, with the quantizer the checkpoint itself records
    header: dict        # rank 0's model-states file without the module weights

    @property
    def training_dtype(self) -> torch.dtype:
        return torch_dtype_of(self.header.get("ds_config") or {})

    @property
    def step(self) -> int:
        return self.header.get("step", self.header.get("global_steps", 0))


def find_checkpoint(path) -> TrainedCheckpoint:
    """A run directory (its latest checkpoint), its `checkpoints/` folder, or one
    `checkpoints/step_N` directory."""
    path = Path(path).expanduser()
    if not path.exists():
        raise UsageError(f"--checkpoint '{path}' does not exist")
    if ckpt.checkpoint_dir(path).is_dir():
        path = ckpt.checkpoint_dir(path)
    if (path / ckpt.LATEST).is_file():
        path = path / (path / ckpt.LATEST).read_text().strip()
    if not path.is_dir() or not sorted(path.glob(MODEL_STATES)):
        raise UsageError(f"--checkpoint '{path}' is not a tsld-ds run directory nor a DeepSpeed "
                         "checkpoint (no *model_states.pt files)")
    run_dir = path.parent.parent
    if not (run_dir / ARGS_FILE).is_file():
        raise UsageError(f"checkpoint '{path}' has no {ARGS_FILE} in its run directory "
                         f"'{run_dir}': the student's layout cannot be rebuilt")
    # The checkpoint's own quantizer, where it records it: args.json is the latest run's (whose
    # paths name the same model, or the resume would have refused it).
    saved = ckpt.saved_options(path) or {}
    config = read_run_config(run_dir).replace(**{k: saved[k] for k in QUANTIZER_OPTIONS
                                                 if saved.get(k) is not None})
    return TrainedCheckpoint(path=path, config=config, header=model_states_header(path))


def consolidated_weights(checkpoint: TrainedCheckpoint) -> dict:
    """{engine parameter name: lazy full fp32 tensor} from the partitioned master weights."""
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # DeepSpeed narrates every phase
            return get_fp32_state_dict_from_zero_checkpoint(
                str(checkpoint.path.parent), tag=checkpoint.path.name, lazy_mode=True)
    except (ValueError, FileNotFoundError, KeyError) as e:
        raise UsageError(f"cannot consolidate checkpoint '{checkpoint.path}': {e}") from None


class NonFiniteWeights(Exception):
    """A weight read from the checkpoint holds NaN or inf."""


class _Finite:
    """A lazy checkpoint tensor that refuses, when materialized, values that are not finite."""

    def __init__(self, lazy):
        self.lazy = lazy

    def contiguous(self) -> torch.Tensor:
        tensor = self.lazy.contiguous()
        if not torch.isfinite(tensor).all():
            raise NonFiniteWeights
        return tensor


def finite_checked(weights: dict) -> dict:
    """`weights` (`consolidated_weights`) whose tensors raise NonFiniteWeights as they are read:
    a conversion stops before it writes such a weight, and reads a sound checkpoint only once.
    Tied entries stay one object."""
    checked = {}
    return {name: checked.setdefault(id(value), _Finite(value)) for name, value in weights.items()}


def nonfinite_tensors(weights: dict) -> tuple[list[str], int]:
    """(names of `weights`' tensors that hold NaN or inf, number of tensors), a tied tensor
    counted once, under its first name."""
    seen, found = set(), []
    for name, value in weights.items():
        if id(value) not in seen:
            seen.add(id(value))
            if not torch.isfinite(value.contiguous()).all():
                found.append(name)
    return found, len(seen)


def student_skeleton(config: RunConfig):
    """The student's Hugging Face model on the meta device (no memory), with the QuantLinears
    the run trained: the module names and quantizer settings that the weights belong to."""
    model_config = read_config(config.model, "the run's --model")
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config)
    if config.quant_config is not None:
        quantize_model(model, config.quant_config)
    return model


def run_tokenizer(config: RunConfig):
    return load_tokenizer(config.tokenizer_name)
