"""DeepSpeed configs as every command reads them: checked against the world size and what
DeepSpeed can build, the sizes a config leaves to the model ("auto") filled from its shape, and
the teacher's inference engine config derived from the student's. Training and tsld-estimate read
a config through the same checks, so that each refuses what the other refuses."""
import copy
import json
import math
import sys

import torch
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

from tsld_ds.errors import UsageError
from tsld_ds.models import read_config
from tsld_ds.run.distributed import launched_world_size


def read_ds_config(path: str, world: int | None = None) -> dict:
    """The DeepSpeed config at `path`, checked: its batch sizes agree with the world size (the
    launcher's, unless `world` is given; gradient_accumulation_steps is derived from
    train_batch_size when only that is given) and its optimizer is one DeepSpeed can build."""
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"DeepSpeed config '{path}' does not exist") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"DeepSpeed config '{path}' is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "train_micro_batch_size_per_gpu" not in config:
        raise UsageError(f"DeepSpeed config '{path}' must set train_micro_batch_size_per_gpu")
    _check_batch_sizes(config, path, world or launched_world_size())
    _check_honoured(config, path)
    optimizer = config.get("optimizer", {}).get("type")
    if optimizer is not None and optimizer.lower() not in DEEPSPEED_OPTIMIZERS and \
            getattr(torch.optim, optimizer, None) is None:
        raise UsageError(f"DeepSpeed config '{path}': unknown optimizer type '{optimizer}'; "
                         f"DeepSpeed builds {', '.join(DEEPSPEED_OPTIMIZERS)} or a torch.optim "
                         "class by its name (e.g. AdamW, SGD)")
    if config.get("zero_optimization", {}).get("stage", 0) != 3:
        print(f"warning: {path} is not ZeRO stage 3; parameters will not be partitioned",
              file=sys.stderr)
    return config


def _check_honoured(config: dict, path: str) -> None:
    """Refuses what DeepSpeed would take otherwise than written (or fail on after the models
    load): the run's schedule is its own (--lr_schedule, --warmup_steps), clipping is a finite
    norm, one ZeRO stage of 0-3, one half precision."""
    if "scheduler" in config:
        raise UsageError(f"DeepSpeed config '{path}': a \"scheduler\" block is not used; tsld-ds "
                         "runs its own schedule (--lr, --lr_schedule, --warmup_steps): drop it")
    clipping = config.get("gradient_clipping", 0.0)
    if isinstance(clipping, bool) or not isinstance(clipping, (int, float)) \
            or not math.isfinite(clipping) or clipping < 0:
        raise UsageError(f"DeepSpeed config '{path}': gradient_clipping must be a finite number "
                         f">= 0 (0: off), got {clipping!r}")
    stage = config.get("zero_optimization", {}).get("stage", 0)
    if isinstance(stage, bool) or stage not in (0, 1, 2, 3):
        raise UsageError(f"DeepSpeed config '{path}': zero_optimization.stage must be 0, 1, 2 "
                         f"or 3, got {stage!r}")
    if all(config.get(half, {}).get("enabled") for half in ("fp16", "bf16")):
        raise UsageError(f"DeepSpeed config '{path}': fp16 and bf16 are both enabled; enable one")


# ZeRO-3 sizes a config may leave to the model, as Hugging Face's Trainer fills them ("auto").
AUTO_SIZES = ("reduce_bucket_size", "stage3_prefetch_bucket_size",
              "stage3_param_persistence_threshold", "stage3_max_live_parameters",
              "stage3_max_reuse_distance")

# No bucket or look-ahead limit is set below this many elements (40 MB in fp32): one that small
# saves no memory worth having, and splits the gathers and reduce-scatters into collectives that
# are all latency (the built-in model at two ranks: docs/benchmarks.md).
ZERO_SIZE_FLOOR = 10**7


def resolve_zero_sizes(config: dict, model: str, world: int, what: str = "--model") -> dict:
    """`config` with its "auto" ZeRO sizes filled from `model`'s width h and its blocks' largest
    weight w (h x intermediate size). As transformers' Trainer fills them: reduce bucket h^2 and
    prefetch bucket 0.9 h^2 elements (DeepSpeed's constants, 5e8 and 5e7, exceed a small model,
    and its reduce bucket is allocated whole), parameters of at most 10 h elements kept whole on
    every rank. Beyond the Trainer: at most 2 w elements gathered at once, since every module's
    forward, containers included, prefetches one more bucket until that limit (DeepSpeed's 1e9
    lets a 7B block's weights all be gathered ahead), and a parameter kept gathered for a reuse
    only within h^2 elements, so that a checkpointed block's recompute does not hold its weights
    until their backward. None of these below ZERO_SIZE_FLOOR. With one rank, sharding saves
    nothing unless parameters are offloaded: every parameter is kept whole (no gathers)."""
    zero = config.get("zero_optimization", {})
    auto = [key for key in AUTO_SIZES if zero.get(key) == "auto"]
    if not auto:
        return config
    model_config = read_config(model, what)
    hidden = model_config.hidden_size
    largest = hidden * (getattr(model_config, "intermediate_size", None) or 4 * hidden)
    persist_all = world == 1 and not zero.get("offload_param")
    sizes = {"reduce_bucket_size": max(hidden * hidden, ZERO_SIZE_FLOOR),
             "stage3_prefetch_bucket_size": max(int(0.9 * hidden * hidden), ZERO_SIZE_FLOOR),
             "stage3_max_live_parameters": max(2 * largest, ZERO_SIZE_FLOOR),
             "stage3_max_reuse_distance": max(hidden * hidden, ZERO_SIZE_FLOOR),
             "stage3_param_persistence_threshold": sys.maxsize if persist_all else 10 * hidden}
    zero.update({key: sizes[key] for key in auto})
    return config


def _check_batch_sizes(config: dict, path: str, world: int) -> None:
    micro = config["train_micro_batch_size_per_gpu"]
    accumulation = config.get("gradient_accumulation_steps")
    for name, value in (("train_micro_batch_size_per_gpu", micro),
                        ("gradient_accumulation_steps", accumulation)):
        if value is not None and not (isinstance(value, int) and value >= 1):
            raise UsageError(f"DeepSpeed config '{path}': {name} must be a whole number >= 1, "
                             f"got {value!r}")
    total = config.get("train_batch_size")
    if total is None:
        return
    if accumulation is None and isinstance(total, int) and total % (micro * world) == 0:
        config["gradient_accumulation_steps"] = total // (micro * world)
    elif total != micro * (accumulation or 1) * world:
        given = accumulation if accumulation is not None else "1 (not set)"
        raise UsageError(
            f"DeepSpeed config '{path}': train_batch_size {total} is not "
            f"train_micro_batch_size_per_gpu {micro} x gradient_accumulation_steps {given} x "
            f"{world} rank(s) = {micro * (accumulation or 1) * world}; drop train_batch_size or "
            "make the three agree")


def checkpoints_on_host(ds_config: dict, path: str, gradient_checkpointing: bool) -> bool:
    """Whether the DeepSpeed config's `activation_checkpointing` asks for the block inputs kept
    for the recompute to wait in host memory (`cpu_checkpointing`). Its `partition_activations`
    splits them across tensor-parallel ranks, which a ZeRO-3 run has none of: refused."""
    section = ds_config.get("activation_checkpointing", {})
    if section.get("partition_activations"):
        raise UsageError(f"DeepSpeed config '{path}': activation_checkpointing."
                         "partition_activations splits checkpoints across tensor-parallel ranks, "
                         "which tsld-ds does not use; drop it (cpu_checkpointing works)")
    on_host = bool(section.get("cpu_checkpointing"))
    if on_host and not gradient_checkpointing:
        raise UsageError(f"DeepSpeed config '{path}': activation_checkpointing.cpu_checkpointing "
                         "acts on checkpointed blocks; add --gradient_checkpointing")
    return on_host


# Keys of a student DeepSpeed config that also describe how the teacher must run.
_SHARED_KEYS = ("train_micro_batch_size_per_gpu", "bf16", "fp16", "steps_per_print",
                "wall_clock_breakdown")


# What the derived ZeRO-3 config leaves to the teacher's shape (resolve_zero_sizes fills them):
# without a bound on what is gathered at once, DeepSpeed's prefetch gathers a 7B block's weights
# all ahead of their use.
_TEACHER_AUTO_SIZES = {key: "auto" for key in ("stage3_prefetch_bucket_size",
                                                "stage3_param_persistence_threshold",
                                                "stage3_max_live_parameters")}


def teacher_ds_config(student_config: dict, teacher_config: dict | None = None) -> dict:
    """The teacher's engine config: the given one, or ZeRO-3 inference derived from the student's.

    Precision and logging follow the student's where the given config does not set them; the
    micro-batch always does (both engines see the same batches). The derived ZeRO-3 config also
    takes the student's offload_param and memory_efficient_linear: DeepSpeed's memory-efficient
    linear replaces torch's F.linear for the whole process, the student's layers included. Its
    gather sizes are "auto", for the caller to fill from the teacher's shape
    (`resolve_zero_sizes`)."""
    config = {k: copy.deepcopy(v) for k, v in student_config.items() if k in _SHARED_KEYS}
    if teacher_config is not None and ("bf16" in teacher_config or "fp16" in teacher_config):
        config.pop("bf16", None)   # a config that sets its precision sets all of it
        config.pop("fp16", None)
    if teacher_config is None:
        teacher_config = {"zero_optimization": {"stage": 3, **_TEACHER_AUTO_SIZES}}
        student_zero = student_config.get("zero_optimization", {})
        for key in ("offload_param", "memory_efficient_linear"):
            if key in student_zero:
                teacher_config["zero_optimization"][key] = copy.deepcopy(student_zero[key])
    config.update(copy.deepcopy(teacher_config))
    for key in ("optimizer", "scheduler", "train_batch_size", "gradient_accumulation_steps"):
        config.pop(key, None)
    config["train_micro_batch_size_per_gpu"] = student_config["train_micro_batch_size_per_gpu"]
    config["gradient_accumulation_steps"] = 1
    return config
