"""What build.py decides before any model loads: the ZeRO sizes a config leaves to the model."""
import json
import sys

import pytest
from deepspeed.runtime.config import DeepSpeedConfig
from helpers import REPO

from tsld_ds.errors import UsageError
from tsld_ds.run.ds_config import AUTO_SIZES, ZERO_SIZE_FLOOR, resolve_zero_sizes


def shipped(name: str) -> dict:
    return json.loads((REPO / "ds_configs" / name).read_text())


@pytest.mark.parametrize("world", [1, 2])
def test_auto_sizes_follow_the_model_width(world):
    llama7b = REPO / "tsld_ds" / "assets" / "model_configs" / "llama-2-7b"
    model = json.loads((llama7b / "config.json").read_text())
    hidden, intermediate = model["hidden_size"], model["intermediate_size"]
    zero = resolve_zero_sizes(shipped("zero3.json"), str(llama7b), world)["zero_optimization"]
    assert zero["reduce_bucket_size"] == hidden * hidden
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * hidden * hidden)
    # gathered at once: the largest weight of a block in use and one more as large
    assert zero["stage3_max_live_parameters"] == 2 * hidden * intermediate
    assert zero["stage3_max_reuse_distance"] == hidden * hidden
    # one rank: nothing to shard, every parameter stays whole
    assert zero["stage3_param_persistence_threshold"] == (sys.maxsize if world == 1
                                                          else 10 * hidden)


def test_auto_sizes_of_a_small_model_stop_at_the_floor(tiny_llama_dir):
    model = json.loads((tiny_llama_dir / "config.json").read_text())
    hidden, intermediate = model["hidden_size"], model["intermediate_size"]
    zero = resolve_zero_sizes(shipped("zero3.json"), str(tiny_llama_dir), 2)["zero_optimization"]
    assert 2 * hidden * intermediate < ZERO_SIZE_FLOOR    # every size from its shape is below it
    for key in ("reduce_bucket_size", "stage3_prefetch_bucket_size",
                "stage3_max_live_parameters", "stage3_max_reuse_distance"):
        assert zero[key] == ZERO_SIZE_FLOOR
    assert zero["stage3_param_persistence_threshold"] == 10 * hidden   # a per-parameter size


def test_one_rank_that_offloads_parameters_still_shards_them(tiny_llama_dir):
    hidden = json.loads((tiny_llama_dir / "config.json").read_text())["hidden_size"]
    zero = resolve_zero_sizes(shipped("zero3_offload.json"), str(tiny_llama_dir), 1)[
        "zero_optimization"]
    assert zero["stage3_param_persistence_threshold"] == 10 * hidden


def test_given_sizes_stay_and_deepspeed_reads_the_result(tiny_llama_dir):
    config = shipped("zero3.json")
    config["zero_optimization"]["reduce_bucket_size"] = 12345
    resolved = resolve_zero_sizes(config, str(tiny_llama_dir), 2)
    assert resolved["zero_optimization"]["reduce_bucket_size"] == 12345
    assert not any(v == "auto" for v in resolved["zero_optimization"].values())
    for name in ("zero3.json", "zero3_bf16.json", "zero3_offload.json", "zero3_pretrain.json",
                 "zero2.json", "teacher_zero3.json"):
        zero = DeepSpeedConfig(
            resolve_zero_sizes(shipped(name), str(tiny_llama_dir), 1)).zero_config
        assert zero.reduce_bucket_size > 0
    for name in ("zero3.json", "zero3_bf16.json", "zero3_offload.json", "zero3_pretrain.json"):
        assert set(AUTO_SIZES) <= set(shipped(name)["zero_optimization"])


def test_auto_sizes_of_a_model_that_cannot_be_read_fail_in_one_line(tmp_path):
    with pytest.raises(UsageError, match="cannot read the config of --model"):
        resolve_zero_sizes(shipped("zero3.json"), str(tmp_path / "missing"), 1)


def test_deepspeed_builds_no_shared_memory_all_reduce():
    """DeepSpeed reads its op table (`deepspeed.ops.__compatible_ops__`, docs/dependencies.md)
    before it builds the CPU shared-memory all-reduce when a process group starts; an upgrade
    that reads it elsewhere fails here, before a minute of C++ and 66 MB of /dev/shm per rank
    come back."""
    from deepspeed.comm.torch import build_shm_op

    from tsld_ds.run.distributed import skip_shm_all_reduce

    skip_shm_all_reduce()
    assert build_shm_op() is None
