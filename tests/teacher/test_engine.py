"""tsld_ds/teacher/engine.py: the teacher's engine config derived from the student's."""
import json

from helpers import REPO

from tsld_ds.run.ds_config import teacher_ds_config

STUDENT = {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 8,
           "bf16": {"enabled": True}, "optimizer": {"type": "AdamW", "params": {}},
           "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"}},
           "steps_per_print": 10}


def test_derived_config_is_zero3_inference_in_the_students_precision():
    config = teacher_ds_config(STUDENT)
    assert config == {"train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": 1,
                      "bf16": {"enabled": True}, "steps_per_print": 10,
                      "zero_optimization": {"stage": 3, "offload_param": {"device": "cpu"},
                                            "stage3_prefetch_bucket_size": "auto",
                                            "stage3_param_persistence_threshold": "auto",
                                            "stage3_max_live_parameters": "auto"}}


def test_derived_gather_sizes_follow_the_teachers_shape():
    from tsld_ds.run.ds_config import resolve_zero_sizes
    teacher = REPO / "tsld_ds" / "assets" / "model_configs" / "llama-2-7b"
    model = json.loads((teacher / "config.json").read_text())
    zero = resolve_zero_sizes(teacher_ds_config(STUDENT), str(teacher), 2)["zero_optimization"]
    # the teacher's own width, not DeepSpeed's constants (5e7, 1e5, 1e9)
    assert zero["stage3_prefetch_bucket_size"] == int(0.9 * model["hidden_size"] ** 2)
    assert zero["stage3_param_persistence_threshold"] == 10 * model["hidden_size"]
    assert zero["stage3_max_live_parameters"] == \
        2 * model["hidden_size"] * model["intermediate_size"]


def test_given_config_keeps_its_own_keys_and_inherits_the_rest():
    given = {"train_micro_batch_size_per_gpu": 1, "optimizer": {"type": "SGD"},
             "zero_optimization": {"stage": 3, "zero_hpz_partition_size": 8}}
    config = teacher_ds_config(STUDENT, given)
    assert config["bf16"] == {"enabled": True}                 # inherited
    assert config["zero_optimization"] == given["zero_optimization"]   # its own, not offloaded
    assert config["train_micro_batch_size_per_gpu"] == 4       # the student's batches
    assert "optimizer" not in config
    fp16 = teacher_ds_config(STUDENT, {**given, "fp16": {"enabled": True}})
    assert fp16["fp16"] == {"enabled": True} and "bf16" not in fp16   # not both
