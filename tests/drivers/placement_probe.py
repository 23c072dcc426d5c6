"""Driver of tests/test_devices.py: one real 1-rank QAT run (DeepSpeed's CPU accelerator, gloo)
and a stand-alone `model_perplexity`, in this process, recording whether every batch tensor that
reaches a model or a loss came out of `tsld_ds.devices.to_device`.

    python tests/drivers/placement_probe.py REPORT.json -- TRAIN_OPTIONS... --eval_model DIR

Patched here (tests only): `to_device` records what it returns; the decoder bodies' forward
(student, teacher and evaluation models all call it with `input_ids=`) and the loss entry
points (`Objective.__call__` for training, the fused cross-entropy for every perplexity: every
use of labels) check their tensors against that record. Writes {"checked": {...},
"unplaced": [...]}.
"""
import json
import os
import sys
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import tsld_ds.devices as devices  # noqa: E402

placed: set = set()
kept: list = []  # every placed tensor stays alive, so no later tensor can reuse its memory
checked: dict = {}
unplaced: list = []
_real_to_device = devices.to_device


def _recording_to_device(batch, device):
    out = _real_to_device(batch, device)
    placed.update((t.data_ptr(), tuple(t.shape)) for t in out.values())
    kept.extend(out.values())
    return out


def _check(where: str, name: str, tensor) -> None:
    # (the capacity planner's forward on the meta device holds no data and goes nowhere)
    if not isinstance(tensor, torch.Tensor) or tensor.is_meta:
        return
    checked[where] = checked.get(where, 0) + 1
    if (tensor.data_ptr(), tuple(tensor.shape)) not in placed:
        ours = [f for f in traceback.extract_stack() if "/tsld_ds/" in f.filename]
        at = f" (from {ours[-1].filename.split('/tsld_ds/')[-1]}:{ours[-1].lineno})" if ours else ""
        unplaced.append(f"{where}: {name} {tuple(tensor.shape)} did not pass through to_device"
                        + at)


def _checking(where: str, fn, name: str, position: int):
    """`fn` checking its argument `name` (or positional argument `position`) first."""
    def wrapper(*args, **kwargs):
        _check(where, name, kwargs[name] if name in kwargs else
               (args[position] if 0 <= position < len(args) else None))
        return fn(*args, **kwargs)
    return wrapper


def main() -> int:
    report_path, rest = sys.argv[1], sys.argv[3:]  # argv[2] is "--"
    eval_model = rest[rest.index("--eval_model") + 1]
    train_argv = rest[:rest.index("--eval_model")]

    devices.to_device = _recording_to_device  # before any tsld_ds module imports it
    from transformers.models.llama import modeling_llama

    from tsld_ds.losses import FusedLinearCrossEntropyLoss, Objective
    from tsld_ds.train.cli import main as train_main

    # Methods: the positions count self. input_ids is 1; labels is 3 (after the hidden states
    # and the lm_head weight).
    modeling_llama.LlamaModel.forward = _checking("decoder body",
                                                  modeling_llama.LlamaModel.forward,
                                                  "input_ids", 1)
    Objective.__call__ = _checking("objective", Objective.__call__, "labels", 3)
    FusedLinearCrossEntropyLoss.forward = _checking(
        "cross entropy", FusedLinearCrossEntropyLoss.forward, "labels", 3)
    code = train_main(train_argv)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    from tsld_ds.evaluation.perplexity import model_perplexity, validation_blocks

    model = AutoModelForCausalLM.from_pretrained(eval_model)
    blocks = validation_blocks(AutoTokenizer.from_pretrained(eval_model),
                               train_argv[train_argv.index("--dataset") + 1], block_size=32)
    model_perplexity(model, blocks, batch_size=2, max_blocks=4)
    Path(report_path).write_text(json.dumps({"train_exit": code, "checked": checked,
                                             "unplaced": unplaced}))
    return 0


if __name__ == "__main__":
    status = main()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)  # as launch/train.py does: no teardown of gloo's threads
