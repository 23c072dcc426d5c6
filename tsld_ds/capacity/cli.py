"""`tsld-estimate` / `launch/estimate.py`: will a QAT-KD run fit, and what does it move?

    tsld-estimate --model llama-2-7b --num_gpus 8 --block_size 2048 --gradient_checkpointing
"""
import argparse
import contextlib
import json
import math
import os
import sys

import torch

# DeepSpeed's logger writes to the stdout it finds when first imported (the accelerator it
# detected, ...): point it at stderr, so that --json's stdout is JSON alone.
with contextlib.redirect_stdout(sys.stderr):
    import deepspeed  # noqa: F401

from tsld_ds.capacity.estimate import GiB, Setup, estimate, model_shape
from tsld_ds.capacity.placement import choose_teacher_config
from tsld_ds.errors import EXIT_COMPLETED, UsageError
from tsld_ds.models import ASSETS, BUILTIN_MODEL, check_gradient_checkpointing, torch_dtype_of
from tsld_ds.run.cli import entry_point, run_command
from tsld_ds.run.ds_config import (
    checkpoints_on_host,
    read_ds_config,
    resolve_zero_sizes,
    teacher_ds_config,
)

SHIPPED_CONFIGS = ASSETS / "model_configs"
DEFAULT_DS_CONFIG = "ds_configs/zero3.json"   # as launch/train.py's, from the repository
NO_GPU_MEMORY_GB = 80.0


def shipped_names() -> list[str]:
    return sorted(p.name for p in SHIPPED_CONFIGS.iterdir() if (p / "config.json").is_file())


def resolve_model(name: str) -> str:
    """A shipped config's name (tsld_ds/assets/model_configs/NAME) where no such path exists."""
    if not os.path.exists(os.path.expanduser(name)) and (SHIPPED_CONFIGS / name).is_dir():
        return str(SHIPPED_CONFIGS / name)
    return name


def local_gpu_memory_gb() -> float:
    if torch.cuda.is_available():
        return torch.cuda.get_device_properties(0).total_memory / GiB
    return NO_GPU_MEMORY_GB


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="tsld-estimate",
        description="Per-GPU memory of a tsld-ds QAT-KD run and the bytes each rank all-gathers "
        "per micro-batch, from the models' configs and the DeepSpeed configs, before anything "
        "loads. The student's model states are DeepSpeed's own ZeRO-3 estimate.",
        epilog="shipped configs (--model/--teacher NAME): " + ", ".join(shipped_names()))
    p.add_argument("--model", default=BUILTIN_MODEL,
                   help="student: a shipped config's name, a local model directory or a Hugging "
                   "Face id (default: the built-in tiny LLaMA)")
    p.add_argument("--teacher", default=None,
                   help="teacher, as --model (default: --model)")
    p.add_argument("--no_teacher", action="store_true",
                   help="no teacher engine: --kd gt, or the teacher's outputs from a cache")
    p.add_argument("--ds_config", default=DEFAULT_DS_CONFIG,
                   help="the student's DeepSpeed config; it gives precision and micro-batch "
                   "(default: %(default)s)")
    p.add_argument("--teacher_ds_config", default=None,
                   help="the teacher's DeepSpeed config (default: ZeRO-3 derived from "
                   "--ds_config, as launch/train.py does)")
    p.add_argument("--num_gpus", type=int, default=8, help="GPUs per node (default: %(default)s)")
    p.add_argument("--num_nodes", type=int, default=1, help="nodes (default: %(default)s)")
    p.add_argument("--block_size", type=int, default=2048,
                   help="tokens per training block (default: %(default)s)")
    p.add_argument("--gradient_checkpointing", action="store_true",
                   help="the student recomputes its blocks' activations in backward "
                   "(default: off)")
    p.add_argument("--attn_implementation", default="sdpa",
                   choices=("eager", "sdpa", "flash_attention_2"),
                   help="attention kernel; eager keeps [L, L] scores for backward (default: "
                   "%(default)s)")
    p.add_argument("--loss_chunk_size", type=int, default=None,
                   help="tokens per chunk of the fused loss (default: launch/train.py's choice)")
    p.add_argument("--gpu_memory_gb", type=float, default=None,
                   help="memory of one GPU in GiB, 2^30 bytes: an '80 GB' GPU has about 80 "
                   "(default: this machine's first GPU's, or "
                   f"{NO_GPU_MEMORY_GB:g} without one)")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    return p


def check_args(args) -> None:
    """Values no plan can be made with, refused in one line (--block_size as training does:
    one input and one next token at least)."""
    for name, least in (("num_gpus", 1), ("num_nodes", 1), ("block_size", 2),
                        ("loss_chunk_size", 1)):
        value = getattr(args, name)
        if value is not None and value < least:
            raise UsageError(f"--{name} must be at least {least}, got {value}")
    memory = args.gpu_memory_gb
    if memory is not None and not (math.isfinite(memory) and memory > 0):
        raise UsageError(f"--gpu_memory_gb must be a positive number of GiB, got {memory:g}")


def plan(args) -> dict:
    check_args(args)
    world = args.num_gpus * args.num_nodes
    model = resolve_model(args.model)
    teacher = resolve_model(args.teacher or args.model)
    ds_config = read_ds_config(args.ds_config, world=world)
    given_teacher_config = read_ds_config(args.teacher_ds_config, world=world) \
        if args.teacher_ds_config else None
    checkpoints_on_host(ds_config, args.ds_config, args.gradient_checkpointing)
    if args.gradient_checkpointing:
        check_gradient_checkpointing(model, "--model")
    micro_batch = ds_config["train_micro_batch_size_per_gpu"]
    dtype = torch_dtype_of(ds_config)
    memory = args.gpu_memory_gb if args.gpu_memory_gb is not None else local_gpu_memory_gb()
    student = model_shape(model, dtype, micro_batch, args.block_size, args.attn_implementation)
    # After the model's own checks: the "auto" sizes read the width of any config.
    ds_config = resolve_zero_sizes(ds_config, model, world)
    setup = Setup(num_gpus=args.num_gpus, num_nodes=args.num_nodes, block_size=args.block_size,
                  micro_batch=micro_batch, gradient_checkpointing=args.gradient_checkpointing,
                  attn_implementation=args.attn_implementation)
    teacher_shape, placement = None, None
    if not args.no_teacher:
        teacher_shape = model_shape(teacher, torch_dtype_of(teacher_ds_config(
            ds_config, given_teacher_config)), micro_batch, args.block_size,
            args.attn_implementation, what="--teacher")
        if given_teacher_config is None:   # launch/train.py's choice
            given_teacher_config, placement = choose_teacher_config(
                student, teacher_shape, ds_config, setup, int(memory * GiB),
                loss_chunk_size=args.loss_chunk_size)
    teacher_config = resolve_zero_sizes(teacher_ds_config(ds_config, given_teacher_config),
                                        teacher, world, "--teacher")
    result = estimate(student, teacher_shape, ds_config, teacher_config, setup,
                      loss_chunk_size=args.loss_chunk_size)
    floor = result.student_states_bytes + setup.runtime_bytes
    if floor > memory * GiB:
        raise UsageError(
            f"the student's sharded model states alone need {floor / GiB:.1f} GiB per GPU, more "
            f"than --gpu_memory_gb {memory:g}: use more GPUs (--num_gpus, --num_nodes) or "
            "offload the optimizer (offload_optimizer, as in "
            "ds_configs/llama7b_8x40gb_offload.json)")
    zero2 = None
    if ds_config.get("zero_optimization", {}).get("stage") == 3 and not \
            ds_config["zero_optimization"].get("offload_param"):
        alternative = estimate(student, teacher_shape, at_zero_stage_2(ds_config),
                               teacher_config, setup, loss_chunk_size=args.loss_chunk_size)
        zero2 = {"total_bytes": alternative.total_bytes,
                 "fits": alternative.total_bytes <= memory * GiB}
    return {"model": args.model,
            "teacher": None if args.no_teacher else args.teacher or args.model,
            "ds_config": args.ds_config, "teacher_ds_config": args.teacher_ds_config,
            "teacher_placement": placement,
            "dtype": str(dtype).removeprefix("torch."),
            "num_gpus": args.num_gpus, "num_nodes": args.num_nodes,
            "block_size": args.block_size, "micro_batch": micro_batch,
            "gradient_checkpointing": args.gradient_checkpointing,
            "attn_implementation": args.attn_implementation, "gpu_memory_gb": memory,
            "student_params": student.params,
            "teacher_params": None if teacher_shape is None else teacher_shape.params,
            "fits": result.total_bytes <= memory * GiB, "zero2": zero2, **result.as_dict()}


def at_zero_stage_2(ds_config: dict) -> dict:
    """`ds_config` with the student at ZeRO stage 2, as ds_configs/zero2.json: parameters whole on
    every GPU, gradients and optimizer states sharded; its buckets and offload kept."""
    zero = ds_config["zero_optimization"]
    config = dict(ds_config)
    config["zero_optimization"] = {"stage": 2, **{
        k: v for k, v in zero.items() if k in ("offload_optimizer", "overlap_comm",
                                               "contiguous_gradients", "reduce_bucket_size")}}
    return config


def format_table(p: dict) -> str:
    gib = lambda n: f"{n / GiB:8.2f}"  # noqa: E731
    teacher = f"teacher {p['teacher']} ({p['teacher_params'] / 1e9:.2f}B)" if p["teacher"] \
        else "no teacher engine"
    lines = [f"student {p['model']} ({p['student_params'] / 1e9:.2f}B), {teacher}",
             f"{p['num_nodes']} node(s) x {p['num_gpus']} GPUs, {p['dtype']}, micro-batch "
             f"{p['micro_batch']} x {p['block_size']} tokens, {p['attn_implementation']}, "
             f"checkpointing {'on' if p['gradient_checkpointing'] else 'off'}",
             "", f"{'per GPU':32s} {'GiB':>8s}  {'when':16s} what"]
    lines += [f"{row['what']:32s} {gib(row['bytes'])}  {row['phase']:16s} {row['note']}"
              for row in p["rows"]]
    verdict = "fits" if p["fits"] else "does NOT fit"
    lines += [f"{'total':32s} {gib(p['total_bytes'])}  the held rows and the {p['peak_phase']} "
              f"rows, the largest phase: {verdict} in {p['gpu_memory_gb']:g} GiB"]
    if p["host_bytes_per_node"]:
        lines.append(f"{'host memory per node':32s} {gib(p['host_bytes_per_node'])}  offloaded "
                     "states (DeepSpeed's estimate)")
    lines += ["", "received per rank per micro-batch (GiB): "
              f"student all-gather {p['student_allgather_bytes'] / GiB:.2f}, reduce-scatter "
              f"{p['student_reduce_scatter_bytes'] / GiB:.2f}; teacher all-gather "
              f"{p['teacher_allgather_bytes'] / GiB:.2f} (across nodes "
              f"{p['teacher_allgather_internode_bytes'] / GiB:.2f})"]
    lines.append(f"student activations: {gib(p['activations_stored_bytes']).strip()} GiB "
                 "stored, "
                 f"{gib(p['activations_checkpointed_bytes']).strip()} GiB with "
                 "--gradient_checkpointing")
    if p["teacher_placement"]:
        lines.append(f"teacher weights: {p['teacher_placement']}, as launch/train.py chooses "
                     "without --teacher_ds_config")
    if p["zero2"] is not None and p["zero2"]["fits"]:
        lines.append(f"hint: the student fits unsharded: ZeRO stage 2 (ds_configs/zero2.json) "
                     f"needs {p['zero2']['total_bytes'] / GiB:.2f} GiB per GPU and skips "
                     "ZeRO-3's parameter gathers and hooks, faster for a model this size")
    if not p["fits"] and not p["gradient_checkpointing"]:
        lines.append("hint: --gradient_checkpointing keeps one block's activations instead of "
                     "every block's")
    return "\n".join(lines)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)

    def work() -> int:
        result = plan(args)
        print(json.dumps(result, indent=1) if args.json else format_table(result))
        return EXIT_COMPLETED

    return run_command(work)


def run() -> None:
    """Entry point of launch/estimate.py and `tsld-estimate`."""
    entry_point(main)
