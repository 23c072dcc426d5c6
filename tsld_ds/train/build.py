"""Everything a run needs before its first step, top to bottom in `build_run`: checked inputs, the
process group and seeds, where a resume starts, tokenizer and data, the objective, the teacher's
inference engine (or cache) and the quantized student's training engine."""
import math
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from datasets import Dataset
from deepspeed.accelerator import get_accelerator

from tsld_ds import gpu_extras
from tsld_ds.capacity.estimate import Setup, model_shape
from tsld_ds.capacity.placement import choose_teacher_config
from tsld_ds.data import ResumableDistributedSampler, check_tokenizers_match
from tsld_ds.devices import local_world_size, memory_per_rank, pins_memory
from tsld_ds.errors import UsageError
from tsld_ds.files import check_writable
from tsld_ds.losses import Objective
from tsld_ds.models import (
    check_block_size,
    check_causal_lm,
    check_gradient_checkpointing,
    check_model_source,
    check_same_vocabulary,
    check_weights_match_config,
    has_tokenizer,
    load_causal_lm,
    load_tokenizer,
    meta_model,
    read_config,
    torch_dtype_of,
    vocab_size_of,
)
from tsld_ds.quant import QuantConfig, in_features, quantization_targets, quantize_model
from tsld_ds.run import checkpoint as ckpt
from tsld_ds.run import universal
from tsld_ds.run.config import ARGS_FILE, RunConfig, defining_options, differing_options
from tsld_ds.run.distributed import on_rank_zero, seed_everything
from tsld_ds.run.ds_config import (
    checkpoints_on_host,
    read_ds_config,
    resolve_zero_sizes,
    teacher_ds_config,
)
from tsld_ds.run.rows import check_dataset, load_rows
from tsld_ds.teacher import CacheIdentity, TeacherCache, TeacherEngine
from tsld_ds.teacher.cache import read_manifest
from tsld_ds.train.schedule import lr_lambda
from tsld_ds.train.signals import StopSignals
from tsld_ds.train.student import DistillationStudent

# What a run writes into its --output_dir; --overwrite_output_dir removes a previous run's.
RUN_OUTPUTS = ("checkpoints", "metrics.jsonl", "tensorboard", "summary.json", "hf", ARGS_FILE)


@dataclass
class Run:
    engine: deepspeed.DeepSpeedEngine                # around the DistillationStudent
    scheduler: torch.optim.lr_scheduler.LambdaLR
    lr_multiplier: Callable[[int], float]            # step -> multiplier of the peak rate
    student_model: torch.nn.Module                   # the HF model inside the engine (quantized)
    teacher: TeacherEngine | TeacherCache | None
    tokenizer: object                                # a transformers tokenizer
    objective: Objective
    quant_config: QuantConfig | None
    train_blocks: Dataset
    val_blocks: Dataset
    sampler: ResumableDistributedSampler
    micro_batch: int
    accumulation: int
    total_steps: int
    resume_from: Path | None                         # the checkpoint to continue from
    defining_options: dict                           # what its checkpoints are bound to


@dataclass
class Inputs:
    """What `check_inputs` read and checked, for `build_run`."""
    ds_config: dict
    teacher_ds_config: dict | None
    host_checkpoints: bool       # checkpointed blocks' inputs wait in host memory
    resume_from: Path | None     # the checkpoint that --resume names


def check_inputs(config: RunConfig) -> Inputs:
    """Everything that can be checked before processes start talking to each other and before
    any model loads: the DeepSpeed configs against the options, the models' files and configs,
    the output directory and what --resume names."""
    ds_config = read_ds_config(config.ds_config)
    teacher_config = read_ds_config(config.teacher_ds_config) if config.teacher_ds_config \
        else None
    host_checkpoints = checkpoints_on_host(ds_config, config.ds_config,
                                           config.gradient_checkpointing)
    _check_ds_config_against_options(config, ds_config)
    gpu_extras.check_options(config.attn_implementation, config.optimizer)
    check_dataset(config.dataset)
    check_model_source(config.model, "--model")
    if config.teacher:
        check_model_source(config.teacher, "--teacher")
    if config.tokenizer:
        check_model_source(config.tokenizer, "--tokenizer", marker="tokenizer_config.json")
    for name in {config.model, config.teacher_name}:
        check_block_size(name, config.block_size, warn=os.environ.get("RANK", "0") == "0")
    if config.gradient_checkpointing:
        check_gradient_checkpointing(config.model, "--model")
    _check_models(config)
    check_writable(config.output_dir, "--output_dir")
    if config.teacher_cache is not None:
        _check_teacher_cache(config)
    resume_from = None
    if config.resume is not None:
        resume_from = ckpt.resolve_resume(config.resume, config.output_dir)
    elif config.overwrite_output_dir:
        _check_inputs_outside_previous_run(config)
    elif ckpt.latest_checkpoint(config.output_dir) is not None:
        raise UsageError(f"--output_dir {config.output_dir} already holds a run; pass --resume "
                         "latest to continue it or --overwrite_output_dir to start over")
    return Inputs(ds_config=ds_config, teacher_ds_config=teacher_config,
                  host_checkpoints=host_checkpoints, resume_from=resume_from)


def _check_ds_config_against_options(config: RunConfig, ds_config: dict) -> None:
    """The config's keys that options also set must agree with them; fp16 needs a GPU."""
    lr = ds_config.get("optimizer", {}).get("params", {}).get("lr")
    if lr is not None and lr != config.lr:
        raise UsageError(f"DeepSpeed config '{config.ds_config}' sets optimizer.params.lr {lr} "
                         f"but --lr is {config.lr:g}: the run's peak rate is --lr (its schedule "
                         "scales it); drop lr from the config or pass --lr " + f"{lr}")
    if ds_config.get("fp16", {}).get("enabled") and \
            get_accelerator().device_name() == "cpu":
        raise UsageError(f"DeepSpeed config '{config.ds_config}' enables fp16, which DeepSpeed's "
                         "CPU accelerator cannot train in; use bf16 (ds_configs/zero3_bf16.json) "
                         "or fp32 on this machine")


def _check_models(config: RunConfig) -> None:
    """From the models' configs and their weight files' headers, before either loads: weights of
    the shapes each config gives, causal LMs, one vocabulary for student and teacher, a
    --group_size that fits the quantized layers."""
    check_causal_lm(read_config(config.model, "--model"), "--model", config.model)
    if config.objective.needs_teacher and config.teacher_cache is None:
        check_causal_lm(read_config(config.teacher_name, "--teacher"), "--teacher",
                        config.teacher_name)
    if not config.from_scratch:
        check_weights_match_config(config.model, "--model")
    if config.objective.needs_teacher and config.teacher_cache is None:
        if config.teacher_name != config.model or config.from_scratch:
            check_weights_match_config(config.teacher_name, "--teacher")
        check_same_vocabulary(config.model, config.teacher_name)
    quant = config.quant_config
    if quant is not None and quant.granularity == "group":
        narrowest = min(in_features(module) for _, module in
                        quantization_targets(meta_model(config.model, "--model")))
        if quant.group_size > narrowest:
            raise UsageError(f"--group_size {quant.group_size} is wider than the narrowest "
                             f"quantized layer of '{config.model}' ({narrowest} input columns); "
                             f"use at most {narrowest}, or --granularity channel")


def _check_teacher_cache(config: RunConfig) -> None:
    manifest = read_manifest(config.teacher_cache)
    if manifest is None or not manifest["complete"]:
        raise UsageError(f"--teacher_cache {config.teacher_cache} holds no complete teacher "
                         "cache; build it (or finish building it) with tsld-cache")
    student_vocab = read_config(config.model, "--model").vocab_size
    if manifest["vocab_size"] != student_vocab:
        raise UsageError(f"--teacher_cache {config.teacher_cache} holds a teacher of "
                         f"{manifest['vocab_size']} tokens but student '{config.model}' predicts "
                         f"{student_vocab}: their vocabularies differ")


def _check_inputs_outside_previous_run(config: RunConfig) -> None:
    """--overwrite_output_dir deletes the previous run's outputs: none of this run's inputs may
    be among them (say, the FP stage's hf/ export as --teacher of a QAT run in the same dir)."""
    doomed = [(Path(config.output_dir) / name).resolve() for name in RUN_OUTPUTS]
    for option in ("model", "teacher", "tokenizer", "dataset", "ds_config", "teacher_ds_config",
                   "teacher_cache"):
        value = getattr(config, option)
        if value is None or not Path(value).expanduser().exists():
            continue
        path = Path(value).expanduser().resolve()
        if any(path == d or d in path.parents for d in doomed):
            raise UsageError(f"--{option} {value} lies in what --overwrite_output_dir would delete "
                             f"from {config.output_dir}; move it, or write the new run elsewhere")


def clear_previous_run(output_dir: Path) -> None:
    """--overwrite_output_dir: the previous run's outputs go (nothing else in the directory)."""
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def open_teacher_cache(path: str, identity: CacheIdentity) -> TeacherCache:
    """The teacher cache at `path`, checked against this run's `identity` and its shards against
    the manifest (each rank checks its share: one read of the cache in all)."""
    cache = TeacherCache.open(path, identity)
    found = [None] * dist.get_world_size()
    dist.all_gather_object(found, cache.corrupt_shards(dist.get_rank(), dist.get_world_size()))
    problems = [line for lines in found for line in lines]
    if problems:
        more = f" (and {len(problems) - 1} more)" if len(problems) > 1 else ""
        raise UsageError(f"--teacher_cache: {problems[0]}{more}; rebuild it with tsld-cache")
    if dist.get_rank() == 0:
        print(f"teacher outputs from {path}: "
              f"{'the full distribution' if cache.topk == 0 else f'top {cache.topk}'} of "
              f"{identity.teacher} on {identity.rows} rows, {len(cache.shards)} shards checked",
              flush=True)
    return cache


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


def _teacher_placement(config: RunConfig, ds_config: dict, attn_implementation: str | None):
    """`choose_teacher_config` for this run: its models, its shape, this rank's memory."""
    world, local = dist.get_world_size(), local_world_size()
    setup = Setup(num_gpus=local, num_nodes=max(1, world // local), block_size=config.block_size,
                  micro_batch=ds_config["train_micro_batch_size_per_gpu"],
                  gradient_checkpointing=config.gradient_checkpointing,
                  attn_implementation=attn_implementation or "sdpa")
    dtype = torch_dtype_of(ds_config)

    def shape(name, what):
        return model_shape(name, dtype, setup.micro_batch, config.block_size,
                           setup.attn_implementation, what=what)

    student = shape(config.model, "--model")
    # the default teacher is the student's own model: one meta-device trace serves both
    teacher = student if config.teacher_name == config.model else shape(config.teacher,
                                                                         "--teacher")
    return choose_teacher_config(student, teacher, ds_config, setup, memory_per_rank(),
                                 loss_chunk_size=config.loss_chunk_size)


def _resumed_checkpoint(path: Path, options: dict, ds_config: dict) -> None:
    """Refuses a checkpoint of other defining options, or a damaged one; prepares one written at
    another world size (its universal form). Collective."""
    saved = on_rank_zero(lambda: ckpt.saved_options(path))
    differing = differing_options(saved, options) if saved is not None else []
    if differing:
        raise UsageError(f"--resume {path}: the checkpoint was written with other options: "
                         f"{'; '.join(differing)}. Resume with its options, or start a new run "
                         "in another --output_dir")
    ckpt.verify(path)
    universal.prepare_resume(path, ds_config)


def build_run(config: RunConfig, inputs: Inputs, stop: StopSignals) -> Run:
    """Both engines, built in the process group `init_distributed` started, with OUTPUT_DIR
    locked by this run. A stop signal during set-up ends it at the next phase (SetupStopped)."""
    ds_config = resolve_zero_sizes(inputs.ds_config, config.model, dist.get_world_size())
    seed_everything(config.seed)
    # Each model's identity is its files' contents: rank 0 hashes them, once.
    options = on_rank_zero(lambda: defining_options(config))
    if inputs.resume_from is not None:
        _resumed_checkpoint(inputs.resume_from, options, ds_config)
    tokenizer = _tokenizer(config)
    train_blocks, val_blocks = load_rows(
        config.dataset, tokenizer, config.block_size, dataset_config=config.dataset_config,
        text_column=config.text_column, seed=config.seed)
    steps = _steps(config, ds_config, len(train_blocks))
    _prepare_output_dir(config, resumed=inputs.resume_from is not None)
    stop.check_during_setup("the data is ready")
    # The teacher loads first: with `--teacher` defaulting to `--model` it must see the weights
    # before the student's surgery. The layer term needs attention maps: eager attention.
    attn = "eager" if config.objective.layers else config.attn_implementation
    teacher = _teacher(config, tokenizer, train_blocks, ds_config, inputs.teacher_ds_config,
                       attn)
    stop.check_during_setup("the teacher is ready")
    student_model = load_causal_lm(config.model, ds_config, from_scratch=config.from_scratch,
                                   attn_implementation=attn, what="--model")
    teacher = _engine_of_teacher(config, teacher, student_model)
    if config.gradient_checkpointing:
        enable_gradient_checkpointing(student_model, on_host=inputs.host_checkpoints)
    if config.quant_config is not None:
        quantize_model(student_model, config.quant_config)
    run = _training_engine(config, DistillationStudent(student_model, config.objective),
                           ds_config, steps, teacher=teacher, tokenizer=tokenizer,
                           train_blocks=train_blocks, val_blocks=val_blocks,
                           resume_from=inputs.resume_from, options=options)
    stop.check_during_setup("the student is ready")
    return run


@dataclass
class _Steps:
    micro_batch: int
    accumulation: int
    total: int


def _steps(config: RunConfig, ds_config: dict, train_blocks: int) -> _Steps:
    """The run's optimizer steps from its batch sizes and training blocks, checked against
    --warmup_steps."""
    micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    accumulation = ds_config.get("gradient_accumulation_steps", 1)
    world = dist.get_world_size()
    steps_per_epoch = train_blocks // world // (micro_batch * accumulation)
    if steps_per_epoch == 0:
        raise UsageError(f"{train_blocks} training blocks of {config.block_size} tokens are "
                         f"fewer than one optimizer step needs ({micro_batch} x {accumulation} "
                         f"x {world} ranks); use a smaller --block_size or batch")
    total = config.max_steps or math.ceil(config.epochs * steps_per_epoch)
    if config.warmup_steps >= total:
        raise UsageError(f"--warmup_steps {config.warmup_steps} is not shorter than the run's "
                         f"{total} steps: the rate would never reach --lr; use fewer")
    return _Steps(micro_batch=micro_batch, accumulation=accumulation, total=total)


def _prepare_output_dir(config: RunConfig, *, resumed: bool) -> None:
    """Rank 0 makes --output_dir ready before any model loads: a previous run's outputs gone
    (--overwrite_output_dir), the options saved (the directory holds this run now), and no
    summary.json until the run completes (launch/slurm/train.sbatch requeues the job until
    then)."""
    if dist.get_rank() == 0:
        output_dir = Path(config.output_dir)
        if not resumed and config.overwrite_output_dir:
            clear_previous_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        config.save(output_dir)
        (output_dir / "summary.json").unlink(missing_ok=True)
    dist.barrier()


def _tokenizer(config: RunConfig):
    """The student's tokenizer: a --tokenizer must be the one the model (and the teacher, when one
    is used) was trained with where they have one, and must fit the model's vocabulary."""
    tokenizer = load_tokenizer(config.tokenizer_name)
    if config.tokenizer is not None:
        _check_tokenizer_fits(config, tokenizer)
    if config.objective.needs_teacher:
        _check_same_tokenizer(tokenizer, config.tokenizer or config.teacher_name,
                              f"teacher '{config.teacher_name}' and student '{config.model}' do "
                              "not share a tokenizer")
    return tokenizer


def _check_tokenizer_fits(config: RunConfig, tokenizer) -> None:
    vocab = read_config(config.model, "--model").vocab_size
    if len(tokenizer) > vocab:
        raise UsageError(f"--tokenizer {config.tokenizer} has {len(tokenizer)} tokens but "
                         f"'{config.model}' embeds {vocab}: it is not the model's tokenizer")
    if has_tokenizer(config.model):
        _check_same_tokenizer(tokenizer, config.model,
                              f"--tokenizer {config.tokenizer} is not the tokenizer of "
                              f"'{config.model}'")


def _check_same_tokenizer(tokenizer, other: str, refusal: str) -> None:
    try:
        check_tokenizers_match(tokenizer, load_tokenizer(other))
    except ValueError as e:
        raise UsageError(f"{refusal}: {e}") from None


def _teacher(config: RunConfig, tokenizer, train_blocks, ds_config: dict,
             teacher_config: dict | None, attn: str | None):
    """The teacher's cache (checked against this run), its loaded model for an engine (placed
    as the capacity planner chooses, unless --teacher_ds_config says), or None."""
    if config.teacher_cache is not None:
        identity = on_rank_zero(lambda: CacheIdentity.of(config.teacher_name, tokenizer,
                                                         config.dataset, train_blocks,
                                                         config.block_size))
        return open_teacher_cache(config.teacher_cache, identity)
    if not config.objective.needs_teacher:
        return None
    if teacher_config is None:
        teacher_config, placement = on_rank_zero(
            lambda: _teacher_placement(config, ds_config, attn))
    else:
        placement = f"as --teacher_ds_config {config.teacher_ds_config} says"
    if dist.get_rank() == 0:
        print(f"teacher weights: {placement}", flush=True)
    teacher_config = resolve_zero_sizes(teacher_ds_config(ds_config, teacher_config),
                                        config.teacher_name, dist.get_world_size(), "--teacher")
    model = load_causal_lm(config.teacher_name, teacher_config, attn_implementation=attn,
                           what="--teacher")
    return _LoadedTeacher(model, teacher_config)


@dataclass
class _LoadedTeacher:
    """A teacher model loaded for its engine, which is built once the student has loaded too."""
    model: torch.nn.Module
    config: dict


def _engine_of_teacher(config: RunConfig, teacher, student_model):
    """The teacher's engine (or cache), once its vocabulary is the student's (the configs and the
    cache's manifest said so before any loading; the loaded lm_heads are the truth)."""
    student_vocab = vocab_size_of(student_model)
    if isinstance(teacher, _LoadedTeacher):
        if vocab_size_of(teacher.model) != student_vocab:
            raise UsageError(f"teacher '{config.teacher_name}' predicts "
                             f"{vocab_size_of(teacher.model)} tokens but student "
                             f"'{config.model}' {student_vocab}: their vocabularies differ")
        return TeacherEngine(teacher.model, teacher.config)
    return teacher


def _training_engine(config: RunConfig, student: DistillationStudent, ds_config: dict,
                     steps: _Steps, *, teacher, tokenizer, train_blocks, val_blocks,
                     resume_from: Path | None, options: dict) -> Run:
    """The student's DeepSpeed engine with its optimizer and schedule, and the data order."""
    rank, world = dist.get_rank(), dist.get_world_size()
    sampler = ResumableDistributedSampler(len(train_blocks), num_replicas=world, rank=rank,
                                          seed=config.seed)

    trainable = [p for p in student.parameters() if p.requires_grad]
    optimizer = None
    if config.optimizer == "adamw_8bit":
        optimizer = gpu_extras.adamw_8bit(trainable, ds_config, config.lr)
        ds_config.pop("optimizer", None)
        ds_config["zero_allow_untested_optimizer"] = True
    else:
        ds_config.setdefault("optimizer", {"type": "AdamW", "params": {}})["params"]["lr"] = \
            config.lr
    lr_multiplier = lr_lambda(config.lr_schedule, config.warmup_steps, steps.total)
    engine, _, _, scheduler = deepspeed.initialize(
        model=student, model_parameters=trainable, optimizer=optimizer, config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lr_multiplier))
    # Dropout differs across ranks, the data order does not; a resume restores the saved state.
    seed_everything(config.seed + rank)
    return Run(engine=engine, scheduler=scheduler, lr_multiplier=lr_multiplier,
               student_model=student.model, teacher=teacher, tokenizer=tokenizer,
               objective=config.objective, quant_config=config.quant_config,
               train_blocks=train_blocks, val_blocks=val_blocks, sampler=sampler,
               micro_batch=steps.micro_batch, accumulation=steps.accumulation,
               total_steps=steps.total,
               resume_from=resume_from, defining_options=options)
