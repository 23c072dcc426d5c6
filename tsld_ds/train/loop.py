"""One QAT run on a DeepSpeed ZeRO-3 engine, top to bottom.

set-up (config, tokenizer, data, teacher engine, quantized student engine) -> perplexity before
-> steps: teacher outputs -> student forward + loss -> backward -> optimizer step -> metrics,
periodic eval and checkpoints -> perplexity after, final checkpoint, HF export, summary.
"""
import json
import math
import os
import random
import socket
import sys
import time
from pathlib import Path

import deepspeed
import numpy as np
import torch
import torch.distributed as dist
from tqdm import tqdm

from tsld_ds.data import (ResumableDistributedSampler, check_tokenizers_match, load_text_splits,
                          make_dataloader, tokenize_and_pack)
from tsld_ds.errors import UsageError
from tsld_ds.export import export_hf
from tsld_ds.models import (check_model_source, load_causal_lm, load_tokenizer, vocab_size_of)
from tsld_ds.quant import QuantConfig, quantize_model
from tsld_ds.teacher import TeacherEngine, teacher_ds_config
from tsld_ds.train import checkpoint as ckpt
from tsld_ds.train.evaluate import perplexity
from tsld_ds.train.metrics import MetricsLog
from tsld_ds.train.schedule import lr_lambda
from tsld_ds.train.student import DistillationStudent, summed_nll


def read_ds_config(path: str) -> dict:
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise UsageError(f"DeepSpeed config '{path}' does not exist") from None
    except json.JSONDecodeError as e:
        raise UsageError(f"DeepSpeed config '{path}' is not valid JSON: {e}") from None
    if not isinstance(config, dict) or "train_micro_batch_size_per_gpu" not in config:
        raise UsageError(f"DeepSpeed config '{path}' must set train_micro_batch_size_per_gpu")
    if config.get("zero_optimization", {}).get("stage", 0) != 3:
        print(f"warning: {path} is not ZeRO stage 3; parameters will not be partitioned",
              file=sys.stderr)
    return config


def check_inputs(args) -> None:
    """Everything that can be checked before processes start talking to each other."""
    check_model_source(args.model, "--model")
    if args.teacher:
        check_model_source(args.teacher, "--teacher")
    if args.tokenizer:
        check_model_source(args.tokenizer, "--tokenizer", marker="tokenizer_config.json")
    if args.resume is None and not args.overwrite_output_dir and \
            ckpt.latest_checkpoint(args.output_dir) is not None:
        raise UsageError(f"--output_dir {args.output_dir} already holds a run; pass --resume "
                         "latest to continue it or --overwrite_output_dir to start over")


def init_distributed() -> None:
    """Under the DeepSpeed launcher the env is set; a plain `python launch/train.py` is 1 rank."""
    if "RANK" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                          MASTER_PORT=str(port))
    deepspeed.init_distributed()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_blocks(args, tokenizer):
    """Tokenized, packed train and validation blocks. Rank 0 builds the datasets cache first and
    tells the others whether it worked, so a bad dataset stops every rank with its message."""
    def build():
        try:
            train_text, val_text = load_text_splits(args.dataset, args.dataset_config,
                                                    text_column=args.text_column, seed=args.seed)
            return (tokenize_and_pack(train_text, tokenizer, args.block_size),
                    tokenize_and_pack(val_text, tokenizer, args.block_size))
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


def quant_config_of(args) -> QuantConfig | None:
    if args.bits == 16:
        return None
    try:
        return QuantConfig(bits=args.bits, method=args.quant_method, granularity=args.granularity,
                           group_size=args.group_size, init_scale=args.init_scale)
    except ValueError as e:
        raise UsageError(str(e)) from None


def train(args) -> dict:
    ds_config = read_ds_config(args.ds_config)
    teacher_config = read_ds_config(args.teacher_ds_config) if args.teacher_ds_config else None
    check_inputs(args)
    quant_config = quant_config_of(args)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0
    seed_everything(args.seed)
    wall_start = time.time()

    tokenizer = load_tokenizer(args.tokenizer or args.model)
    teacher_name = args.teacher or args.model
    uses_teacher = args.kd != "gt"
    if uses_teacher:
        try:
            check_tokenizers_match(tokenizer, load_tokenizer(args.tokenizer or teacher_name))
        except ValueError as e:
            raise UsageError(f"teacher '{teacher_name}' and student '{args.model}' do not share "
                             f"a tokenizer: {e}") from None
    train_blocks, val_blocks = load_blocks(args, tokenizer)

    # The teacher loads first: with `--teacher` defaulting to `--model` it must see the weights
    # before the student's surgery.
    attn = "eager" if args.kd == "l2l" else args.attn_implementation
    teacher = None
    if uses_teacher:
        teacher_model = load_causal_lm(teacher_name, teacher_ds_config(ds_config, teacher_config),
                                       attn_implementation=attn, what="--teacher")
    student_model = load_causal_lm(args.model, ds_config, from_scratch=args.from_scratch,
                                   attn_implementation=attn, what="--model")
    if uses_teacher:
        if vocab_size_of(teacher_model) != vocab_size_of(student_model):
            raise UsageError(f"teacher '{teacher_name}' predicts {vocab_size_of(teacher_model)} "
                             f"tokens but student '{args.model}' {vocab_size_of(student_model)}: "
                             "their vocabularies differ")
        teacher = TeacherEngine(teacher_model, teacher_ds_config(ds_config, teacher_config))
    if quant_config is not None:
        quantize_model(student_model, quant_config)
    student = DistillationStudent(student_model, kd=args.kd, temperature=args.kd_temperature,
                                  loss_impl=args.loss_impl, chunk_size=args.loss_chunk_size)

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

    ds_config.setdefault("optimizer", {"type": "AdamW", "params": {}})["params"]["lr"] = args.lr
    engine, _, _, scheduler = deepspeed.initialize(
        model=student, model_parameters=[p for p in student.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda opt: torch.optim.lr_scheduler.LambdaLR(
            opt, lr_lambda(args.lr_schedule, args.warmup_steps, total_steps)))

    step = 0
    if args.resume:
        state = ckpt.load_checkpoint(engine, ckpt.resolve_resume(args.resume, args.output_dir))
        step = state["step"]
        sampler.load_state_dict(state["sampler"])
    else:
        torch.manual_seed(args.seed + rank)  # dropout differs across ranks, data order does not
    epoch, consumed = sampler.state_dict()["epoch"], sampler.state_dict()["consumed"]
    if is_main:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "args.json").write_text(json.dumps(vars(args), indent=2))
    dist.barrier()
    log = MetricsLog(args.output_dir, enabled=is_main)

    def student_nll(input_ids, labels):
        return engine(input_ids, labels, nll_only=True)

    def teacher_nll(input_ids, labels):
        with teacher.outputs(input_ids) as t:
            return summed_nll(t.hidden, t.weight, t.bias, labels, args.loss_chunk_size)

    def evaluate(nll_fn):
        engine.eval()
        ppl = perplexity(nll_fn, val_blocks, micro_batch, max_blocks=args.eval_max_blocks)
        engine.train()
        return ppl

    summary = {"world_size": world, "kd": args.kd, "bits": args.bits,
               "quantization": quant_config.to_dict() if quant_config else None}
    if teacher is not None:
        summary.update(teacher.partitioning())
        summary["teacher_ppl"] = evaluate(teacher_nll)
    if step == 0:
        summary["student_ppl_before"] = evaluate(student_nll)
        log.log(0, eval_ppl=summary["student_ppl_before"],
                teacher_ppl=summary.get("teacher_ppl"))

    loader = make_dataloader(train_blocks, micro_batch, sampler)
    batches = iter(loader)
    tokens_per_micro = micro_batch * args.block_size * world
    progress = tqdm(total=total_steps, initial=step, disable=not is_main,
                    desc="QAT" if quant_config else "train",
                    dynamic_ncols=True)
    window = {"terms": {}, "micro": 0, "time": 0.0}
    train_time, train_tokens = 0.0, 0
    engine.train()
    while step < total_steps:
        t0 = time.time()
        lr = scheduler.get_last_lr()[0]  # the rate this step uses
        for _ in range(accumulation):
            try:
                batch = next(batches)
            except StopIteration:
                epoch, consumed = epoch + 1, 0
                sampler.set_epoch(epoch)
                batches = iter(loader)
                batch = next(batches)
            consumed += micro_batch
            input_ids, labels = batch["input_ids"], batch["labels"]
            want_logits = args.loss_impl == "naive" or args.kd == "l2l"
            if teacher is None:
                losses = engine(input_ids, labels)
            else:
                with teacher.outputs(input_ids, want_logits=want_logits,
                                     want_layers=student.wants_teacher_layers) as t:
                    losses = engine(input_ids, labels, t)
            engine.backward(losses["loss"])
            engine.step()
            for name, value in losses.items():
                window["terms"][name] = window["terms"].get(name, 0.0) + value.item()
            window["micro"] += 1
        step += 1
        elapsed = time.time() - t0
        window["time"] += elapsed
        train_time += elapsed
        train_tokens += tokens_per_micro * accumulation

        if step % args.log_every == 0 or step == total_steps:
            terms = torch.tensor(list(window["terms"].values()), dtype=torch.float64)
            dist.all_reduce(terms)
            terms /= world * window["micro"]
            record = {k: v for k, v in zip(window["terms"], terms.tolist())}
            record.update(lr=lr, grad_norm=_grad_norm(engine),
                          tokens_per_s=tokens_per_micro * window["micro"] / window["time"],
                          epoch=epoch)
            log.log(step, **record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            window = {"terms": {}, "micro": 0, "time": 0.0}
        progress.update(1)
        if args.eval_every and step % args.eval_every == 0 and step < total_steps:
            ppl = evaluate(student_nll)
            log.log(step, eval_ppl=ppl)
            progress.write(f"step {step}: validation perplexity {ppl:.3f}")
        if args.save_every and step % args.save_every == 0 and step < total_steps:
            ckpt.save_checkpoint(engine, args.output_dir, step, _client_state(step, epoch, consumed))
    progress.close()

    summary["student_ppl_after"] = evaluate(student_nll)
    log.log(step, eval_ppl=summary["student_ppl_after"])
    summary["checkpoint"] = str(ckpt.save_checkpoint(engine, args.output_dir, step,
                                                     _client_state(step, epoch, consumed)))
    if not args.no_export:
        summary["hf_model"] = str(export_hf(engine, student_model, tokenizer,
                                            Path(args.output_dir) / "hf", dtype=args.export_dtype))
    summary.update(steps=step, tokens_per_s=train_tokens / max(train_time, 1e-9),
                   wall_time_s=time.time() - wall_start,
                   metrics=str(Path(args.output_dir) / "metrics.jsonl"))
    if is_main:
        (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary, indent=2))
        print(format_summary(summary))
    log.close()
    return summary


def _client_state(step: int, epoch: int, consumed: int) -> dict:
    # The loop's own count of samples taken, not the sampler's, which a prefetching loader
    # would run ahead of.
    return {"step": step, "sampler": {"epoch": epoch, "consumed": consumed}}


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)


def format_summary(s: dict) -> str:
    def ppl(key):
        return f"{s[key]:.3f}" if s.get(key) is not None else "n/a"

    bits = "full precision" if s["bits"] == 16 else \
        f"{s['bits']}-bit {s['quantization']['method']} per {s['quantization']['granularity']}"
    lines = [
        "", "=" * 64, f"tsld-ds run summary ({bits}, --kd {s['kd']}, {s['world_size']} rank(s))",
        f"  teacher perplexity             {ppl('teacher_ppl')}",
        f"  student perplexity before QAT  {ppl('student_ppl_before')}",
        f"  student perplexity after QAT   {ppl('student_ppl_after')}",
        f"  steps {s['steps']}, {s['tokens_per_s']:.0f} tokens/s, wall time {s['wall_time_s']:.0f} s",
        f"  checkpoint   {s['checkpoint']}",
    ]
    if s.get("hf_model"):
        lines.append(f"  HF model     {s['hf_model']}")
    lines += [f"  metrics      {s['metrics']}", "=" * 64]
    return "\n".join(lines)
