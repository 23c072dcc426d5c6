"""Everything a run needs before its first step, top to bottom in `build_run`: checked inputs, the
process group and seeds, where a resume starts, tokenizer and data, the objective, the teacher's
inference engine and the quantized student's training engine."""
import json
import math
import os
import random
import socket
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from datetime import timedelta

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.config import DEEPSPEED_OPTIMIZERS

from tsld_ds import gpu_extras
from tsld_ds.data import ResumableDistributedSampler, check_tokenizers_match, dataset_rows
from tsld_ds.capacity.estimate import Setup, model_shape
from tsld_ds.capacity.placement import choose_teacher_config
from tsld_ds.devices import (local_world_size, memory_per_rank, pins_memory, set_local_device,
                             set_threads_per_rank)
from tsld_ds.errors import UsageError
from tsld_ds.losses import Objective
from tsld_ds.models import (check_block_size, check_gradient_checkpointing, check_model_source,
                            check_same_vocabulary, load_causal_lm, load_tokenizer, torch_dtype_of,
                            vocab_size_of)
from tsld_ds.quant import QuantConfig, quantize_model
from tsld_ds.teacher import CacheIdentity, TeacherCache, TeacherEngine, teacher_ds_config
from tsld_ds.teacher.cache import read_manifest
from tsld_ds.train import checkpoint as ckpt
from tsld_ds.train import universal
from tsld_ds.train.args import objective_of, quant_config_of
from tsld_ds.train.schedule import lr_lambda
from tsld_ds.train.student import DistillationStudent


@dataclass
class Run:
    engine: object                 # DeepSpeed engine around DistillationStudent
    scheduler: object
    lr_multiplier: object          # step -> the scheduler's multiplier of the peak rate
    student_model: object          # the HF model inside the engine (quantized in place)
    teacher: TeacherEngine | TeacherCache | None
    tokenizer: object
    objective: Objective
    quant_config: QuantConfig | None
    train_blocks: object
    val_blocks: object
    sampler: ResumableDistributedSampler
    micro_batch: int
    accumulation: int
    total_steps: int
    resume_from: Path | None       # the checkpoint to continue from (--resume)


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
    from tsld_ds.capacity.estimate import read_config
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


def launched_world_size() -> int:
    """The world size the launcher set (DeepSpeed's and torchrun's WORLD_SIZE, Open MPI's, PMI's);
    1 for a plain `python launch/train.py`."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE"):
        if name in os.environ:
            return int(os.environ[name])
    return 1


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


# What a run writes into its --output_dir; --overwrite_output_dir removes a previous run's.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "summary.json", "hf", "args.json")


def check_inputs(args) -> Path | None:
    """Everything that can be checked before processes start talking to each other and before
    any model loads; returns the checkpoint that --resume names."""
    gpu_extras.check_options(args)
    check_model_source(args.model, "--model")
    if args.teacher:
        check_model_source(args.teacher, "--teacher")
    if args.tokenizer:
        check_model_source(args.tokenizer, "--tokenizer", marker="tokenizer_config.json")
    for name in {args.model, args.teacher or args.model}:
        check_block_size(name, args.block_size, warn=os.environ.get("RANK", "0") == "0")
    if args.gradient_checkpointing:
        check_gradient_checkpointing(args.model, "--model")
    if args.teacher and args.teacher_cache is None and objective_of(args).needs_teacher:
        check_same_vocabulary(args.model, args.teacher)
    check_writable_dir(args.output_dir)
    if args.teacher_cache is not None:
        manifest = read_manifest(args.teacher_cache)
        if manifest is None or not manifest["complete"]:
            raise UsageError(f"--teacher_cache {args.teacher_cache} holds no complete teacher "
                             "cache; build it (or finish building it) with tsld-cache")
    if args.resume is not None:
        path = ckpt.resolve_resume(args.resume, args.output_dir)
        ckpt.check_options(path, args)
        return path
    if args.overwrite_output_dir:
        _check_inputs_outside_previous_run(args)
    elif ckpt.latest_checkpoint(args.output_dir) is not None:
        raise UsageError(f"--output_dir {args.output_dir} already holds a run; pass --resume "
                         "latest to continue it or --overwrite_output_dir to start over")
    return None


def _check_inputs_outside_previous_run(args) -> None:
    """--overwrite_output_dir deletes the previous run's outputs: none of this run's inputs may
    be among them (say, the FP stage's hf/ export as --teacher of a QAT run in the same dir)."""
    doomed = [(Path(args.output_dir) / name).resolve() for name in RUN_OUTPUTS]
    for option in ("model", "teacher", "tokenizer", "dataset", "ds_config", "teacher_ds_config",
                   "teacher_cache"):
        value = getattr(args, option)
        if value is None or not Path(value).expanduser().exists():
            continue
        path = Path(value).expanduser().resolve()
        if any(path == d or d in path.parents for d in doomed):
            raise UsageError(f"--{option} {value} lies in what --overwrite_output_dir would delete "
                             f"from {args.output_dir}; move it, or write the new run elsewhere")


def check_writable_dir(path) -> None:
    """`path` is a directory that can be written, or can be created: a file is made and removed
    in it or in its nearest existing parent, and nothing is left behind."""
    path = Path(path).expanduser().absolute()
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise UsageError(f"--output_dir {path}: {existing} is a file, not a directory")
    try:
        with tempfile.TemporaryFile(dir=existing):
            pass
    except OSError as e:
        raise UsageError(f"--output_dir {path} cannot be written: {e.strerror or e} "
                         f"({existing})") from None


def init_distributed(timeout_s: float) -> None:
    """Under the DeepSpeed launcher the env is set; a plain `python launch/train.py` is 1 rank.
    A collective that waits longer than `timeout_s` (a rank died) fails instead of hanging. A
    process group the caller made (several runs in one process) is used as it is."""
    if dist.is_initialized():
        return
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        # LOCAL_SIZE as DeepSpeed's launcher sets it: without it, its CPU accelerator counts
        # devices by running `numactl` in a subprocess, dozens of times a step.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    elif os.environ["RANK"] == "0" and "TORCHELASTIC_RUN_ID" not in os.environ:
        # (under torchrun the agent itself serves the rendezvous on MASTER_PORT)
        _check_master_port_free(int(os.environ["MASTER_PORT"]))
    set_local_device(int(os.environ.get("LOCAL_RANK", 0)))
    threads = set_threads_per_rank()
    skip_shm_all_reduce()
    deepspeed.init_distributed(timeout=timedelta(seconds=timeout_s))
    if dist.get_rank() == 0:
        print(threads, flush=True)


def skip_shm_all_reduce() -> None:
    """DeepSpeed's CPU accelerator JIT-compiles a shared-memory all-reduce when its process group
    starts (two C++ files, about a minute on first use) and maps a 66 MB buffer per rank in
    /dev/shm that it never unlinks. It serves only `inference_all_reduce` (tensor-parallel
    inference), which tsld-ds never calls: marked incompatible, it is neither built nor mapped.
    Other accelerators have no such op."""
    builder = get_accelerator().get_op_builder("ShareMemCommBuilder")
    if builder is not None:
        deepspeed.ops.__compatible_ops__[builder.NAME] = False


def _check_master_port_free(port: int) -> None:
    """Rank 0 serves the rendezvous on MASTER_PORT: another process listening there (another
    run) would otherwise look like a lost rank."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the rendezvous store binds
        try:
            s.bind(("", port))
        except OSError:
            raise UsageError(f"the master port {port} is in use by another process (another "
                             "run?); pick a free one with the launcher's --master_port") from None


def seed_everything(seed: int) -> None:
    """The one place a run seeds Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_blocks(args, tokenizer):
    """Tokenized train and validation rows (`tsld_ds.data.dataset_rows`). Rank 0 builds the
    datasets cache first and tells the others whether it worked, so a bad dataset stops every rank
    with its message."""
    def build():
        log = print if dist.get_rank() == 0 else None
        try:
            return dataset_rows(args.dataset, tokenizer, args.block_size,
                                dataset_config=args.dataset_config, text_column=args.text_column,
                                seed=args.seed, log=log)
        except (ValueError, FileNotFoundError) as e:
            raise UsageError(f"--dataset {args.dataset}: {e}") from None

    error = [None]
    if dist.get_rank() == 0:
        try:
            blocks = build()
        except UsageError as e:
            error = [str(e)]
    dist.broadcast_object_list(error, src=0)
    if error[0] is not None:
        raise UsageError(error[0])
    if dist.get_rank() != 0:
        blocks = build()
    return blocks


def on_rank_zero(compute):
    """compute() run by rank 0 and its result handed to every rank; a UsageError or OSError
    there is raised on every rank as a UsageError (none waits for a rank that failed)."""
    box = [None, None]
    if dist.get_rank() == 0:
        try:
            box = [compute(), None]
        except (UsageError, OSError) as e:
            box = [None, str(e)]
    dist.broadcast_object_list(box, src=0)
    if box[1] is not None:
        raise UsageError(box[1])
    return box[0]


def open_teacher_cache(args, tokenizer, train_rows) -> TeacherCache:
    """--teacher_cache, checked against this run (rank 0 hashes its teacher, tokenizer and rows;
    every rank refuses alike) and its shards against the manifest (each rank checks its share:
    one read of the cache in all)."""
    run = on_rank_zero(lambda: CacheIdentity.of(args.teacher or args.model, tokenizer,
                                                args.dataset, train_rows, args.block_size))
    cache = TeacherCache.open(args.teacher_cache, run)
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, cache.corrupt_shards(dist.get_rank(), dist.get_world_size()))
    problems = [line for lines in found for line in lines]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UsageError(f"--teacher_cache: {problems[0]}{more}; rebuild it with tsld-cache")
    if dist.get_rank() == 0:
        print(f"teacher outputs from {args.teacher_cache}: "
              f"{'the full distribution' if cache.topk == 0 else f'top {cache.topk}'} of "
              f"{run.teacher} on {run.rows} rows, {len(cache.shards)} shards checked",
              flush=True)
    return cache


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


def enable_gradient_checkpointing(model, *, on_host: bool = False) -> None:
    """Every decoder block of `model` recomputes its activations in backward: non-reentrant, the
    kind that composes with ZeRO-3's gathering hooks (they run again in the recompute).
    `on_host`: the block inputs kept for the recompute wait in pinned host memory."""
    # transformers 5 renamed it; 4.x has only the old name, without host offload
    enable = getattr(model, "activation_checkpointing_enable", None)
    # On the CPU accelerator they are in host memory already (and pinning needs a device).
    on_host = on_host and pins_memory(get_accelerator().device_name())
    if enable is not None:
        enable({"use_reentrant": False}, offload=on_host)
    elif on_host:
        raise UsageError("activation_checkpointing.cpu_checkpointing needs transformers 5")
    else:
        model.gradient_checkpointing_enable({"use_reentrant": False})


def _teacher_placement(args, ds_config: dict, attn_implementation: str | None):
    """`choose_teacher_config` for this run: its models, its shape, this rank's memory."""
    world, local = dist.get_world_size(), local_world_size()
    setup = Setup(num_gpus=local, num_nodes=max(1, world // local), block_size=args.block_size,
                  micro_batch=ds_config["train_micro_batch_size_per_gpu"],
                  gradient_checkpointing=args.gradient_checkpointing,
                  attn_implementation=attn_implementation or "sdpa")
    dtype = torch_dtype_of(ds_config)

    def shape(name, what):
        return model_shape(name, dtype, setup.micro_batch, args.block_size,
                           setup.attn_implementation, what=what)

    student = shape(args.model, "--model")
    # the default teacher is the student's own model: one meta-device trace serves both
    teacher = student if args.teacher in (None, args.model) else shape(args.teacher, "--teacher")
    return choose_teacher_config(student, teacher, ds_config, setup, memory_per_rank(),
                                 loss_chunk_size=args.loss_chunk_size)


def build_run(args) -> Run:
    """Checks the inputs, starts the process group and builds both engines."""
    ds_config = read_ds_config(args.ds_config)
    teacher_config = read_ds_config(args.teacher_ds_config) if args.teacher_ds_config else None
    host_checkpoints = checkpoints_on_host(ds_config, args.ds_config, args.gradient_checkpointing)
    resume_from = check_inputs(args)
    world = launched_world_size()
    ds_config = resolve_zero_sizes(ds_config, args.model, world)
    objective = objective_of(args)
    quant_config = quant_config_of(args)
    init_distributed(args.dist_timeout)
    rank, world = dist.get_rank(), dist.get_world_size()
    seed_everything(args.seed)
    if resume_from is not None:  # intact; at another world size, its universal form
        ckpt.verify(resume_from)
        universal.prepare_resume(resume_from, ds_config)

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    teacher_name = args.teacher or args.model
    if objective.needs_teacher:
        try:
            check_tokenizers_match(tokenizer, load_tokenizer(args.tokenizer or teacher_name))
        except ValueError as e:
            raise UsageError(f"teacher '{teacher_name}' and student '{args.model}' do not share "
                             f"a tokenizer: {e}") from None
    train_blocks, val_blocks = load_blocks(args, tokenizer)
    teacher = None
    if args.teacher_cache is not None:
        teacher = open_teacher_cache(args, tokenizer, train_blocks)
    runs_teacher = objective.needs_teacher and teacher is None

    # The teacher loads first: with `--teacher` defaulting to `--model` it must see the weights
    # before the student's surgery. The layer term needs attention maps: eager attention.
    attn = "eager" if objective.layers else args.attn_implementation
    if runs_teacher:
        if teacher_config is None:
            teacher_config, placement = on_rank_zero(
                lambda: _teacher_placement(args, ds_config, attn))
        else:
            placement = f"as --teacher_ds_config {args.teacher_ds_config} says"
        if rank == 0:
            print(f"teacher weights: {placement}", flush=True)
        teacher_config = resolve_zero_sizes(teacher_ds_config(ds_config, teacher_config),
                                            teacher_name, world, "--teacher")
        teacher_model = load_causal_lm(teacher_name, teacher_config,
                                       attn_implementation=attn, what="--teacher")
    student_model = load_causal_lm(args.model, ds_config, from_scratch=args.from_scratch,
                                   attn_implementation=attn, what="--model")
    if runs_teacher:
        if vocab_size_of(teacher_model) != vocab_size_of(student_model):
            raise UsageError(f"teacher '{teacher_name}' predicts {vocab_size_of(teacher_model)} "
                             f"tokens but student '{args.model}' {vocab_size_of(student_model)}: "
                             "their vocabularies differ")
        teacher = TeacherEngine(teacher_model, teacher_config)
    elif teacher is not None and teacher.vocab_size != vocab_size_of(student_model):
        raise UsageError(f"--teacher_cache {args.teacher_cache} holds a teacher of "
                         f"{teacher.vocab_size} tokens but student '{args.model}' predicts "
                         f"{vocab_size_of(student_model)}: their vocabularies differ")
    if args.gradient_checkpointing:
        enable_gradient_checkpointing(student_model, on_host=host_checkpoints)
    if quant_config is not None:
        quantize_model(student_model, quant_config)
    student = DistillationStudent(student_model, objective)

    micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    accumulation = ds_config.get("gradient_accumulation_steps", 1)
    sampler = ResumableDistributedSampler(len(train_blocks), num_replicas=world, rank=rank,
                                          seed=args.seed)
    steps_per_epoch = len(sampler) // (micro_batch * accumulation)
    if steps_per_epoch == 0:
        raise UsageError(f"{len(train_blocks)} training blocks of {args.block_size} tokens are "
                         f"fewer than one optimizer step needs ({micro_batch} x {accumulation} "
                         f"x {world} ranks); use a smaller --block_size or batch")
    total_steps = args.max_steps or math.ceil(args.epochs * steps_per_epoch)

    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = None
    if args.optimizer == "adamw_8bit":
        optimizer = gpu_extras.adamw_8bit(trainable, ds_config, args.lr)
        ds_config.pop("optimizer", None)
        ds_config["zero_allow_untested_optimizer"] = True
    else:
        ds_config.setdefault("optimizer", {"type": "AdamW", "params": {}})["params"]["lr"] = args.lr
    lr_multiplier = lr_lambda(args.lr_schedule, args.warmup_steps, total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=student, model_parameters=trainable, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier))
    # Dropout differs across ranks, the data order does not; a resume restores the saved state.
    seed_everything(args.seed + rank)

    return Run(engine=engine, scheduler=scheduler, lr_multiplier=lr_multiplier,
               student_model=student_model, teacher=teacher,
               tokenizer=tokenizer, objective=objective, quant_config=quant_config,
               train_blocks=train_blocks, val_blocks=val_blocks, sampler=sampler,
               micro_batch=micro_batch, accumulation=accumulation, total_steps=total_steps,
               resume_from=resume_from)
