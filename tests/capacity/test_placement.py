"""The frozen teacher's placement: replicated when tsld-estimate fits the step, else ZeRO-3."""
import json
import sys

import torch
from helpers import REPO

from tsld_ds.capacity.estimate import GiB, Setup, model_shape
from tsld_ds.capacity.placement import REPLICATED, choose_teacher_config
from tsld_ds.models import BUILTIN_MODEL
from tsld_ds.run.ds_config import resolve_zero_sizes

SETUP = Setup(num_gpus=2, num_nodes=1, block_size=128, micro_batch=4,
              gradient_checkpointing=False, attn_implementation="sdpa")


def shape(model=BUILTIN_MODEL):
    return model_shape(model, torch.float32, SETUP.micro_batch, SETUP.block_size, "sdpa")


def config(name="zero3.json", model=BUILTIN_MODEL) -> dict:
    """A shipped config as a 2-rank run of `model` resolves it."""
    return resolve_zero_sizes(json.loads((REPO / "ds_configs" / name).read_text()), model, 2)


def test_a_teacher_that_fits_is_replicated():
    chosen, why = choose_teacher_config(shape(), shape(), config(), SETUP, 8 * GiB)
    assert chosen == REPLICATED
    assert why.startswith("replicated, ZeRO stage 0") and "of 8.0" in why


def test_a_teacher_that_does_not_fit_is_sharded():
    llama = str(REPO / "tsld_ds" / "assets" / "model_configs" / "llama-2-7b")
    chosen, why = choose_teacher_config(shape(llama), shape(llama), config(model=llama), SETUP,
                                        40 * GiB)
    assert chosen is None
    assert why.startswith("ZeRO-3") and "too much to replicate" in why


def test_offloaded_parameters_keep_the_teacher_sharded_and_offloaded():
    chosen, why = choose_teacher_config(shape(), shape(), config("zero3_offload.json"), SETUP,
                                        sys.maxsize)
    assert chosen is None and "offload_param" in why
