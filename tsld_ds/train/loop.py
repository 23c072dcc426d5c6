"""One QAT run, top to bottom.

build both engines -> perplexity before -> optimizer steps (each: per micro-batch, teacher outputs
-> student forward with the loss -> backward -> engine step; then metrics, periodic eval and
checkpoints) -> perplexity after, final checkpoint, Hugging Face export, summary.

A stop signal (SIGUSR1/SIGTERM: preemption, time limit) ends the run after the current step with a
checkpoint; a NaN/inf loss skips the batch on every rank, and too many in a row stop the run, also
with a checkpoint.
"""
import json
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from tsld_ds.data import make_dataloader
from tsld_ds.devices import pins_memory, to_device
from tsld_ds.export import export_hf
from tsld_ds.train import checkpoint as ckpt
from tsld_ds.train import fault_injection
from tsld_ds.train import universal
from tsld_ds.train.args import loss_chunks
from tsld_ds.train.build import Run, build_run
from tsld_ds.train.evaluate import perplexity
from tsld_ds.train.metrics import MetricsLog, format_summary
from tsld_ds.train.nonfinite import NonFiniteGuard, NonFiniteLoss
from tsld_ds.train.signals import StopSignals
from tsld_ds.train.student import summed_nll


def micro_step(run: Run, batch: dict, nonfinite: NonFiniteGuard, step: int, *, want_logits: bool,
               want_layers: bool) -> dict | None:
    """One micro-batch: teacher outputs -> student forward and loss -> backward -> engine step
    (DeepSpeed applies the optimizer at the gradient-accumulation boundary). Returns the loss
    terms (detached, on the engine's device), or None when the loss is NaN/inf on some rank: then
    no rank runs backward."""
    batch = to_device(batch, run.engine.device)
    input_ids, labels = batch["input_ids"], batch["labels"]
    if run.teacher is None:
        losses = run.engine(input_ids, labels)
    else:
        with run.teacher.outputs(input_ids, want_logits=want_logits, want_layers=want_layers) as t:
            losses = run.engine(input_ids, labels, t)
    losses = fault_injection.poison_losses(losses)
    if not nonfinite.all_finite(losses, step):
        return None
    run.engine.backward(losses["loss"])
    run.engine.step()
    return {name: value.detach() for name, value in losses.items()}


def student_perplexity(run: Run, args) -> float:
    def nll(input_ids, labels):
        return run.engine(input_ids, labels, nll_only=True)

    run.engine.eval()
    ppl = perplexity(nll, run.val_blocks, run.micro_batch, device=run.engine.device,
                     max_blocks=args.eval_max_blocks)
    run.engine.train()
    return ppl


def teacher_perplexity(run: Run, args) -> float:
    def nll(input_ids, labels):
        with run.teacher.outputs(input_ids) as t:
            return summed_nll(t.hidden, t.weight, t.bias, labels, loss_chunks(args))

    return perplexity(nll, run.val_blocks, run.micro_batch, device=run.engine.device,
                      max_blocks=args.eval_max_blocks)


class StepWindow:
    """Loss terms and timing accumulated between two metric lines, averaged over ranks. The sums
    stay on the engine's device: the host reads them once per metric line, not per micro-batch."""

    def __init__(self):
        self.sums, self.micro_steps, self.seconds = {}, 0, 0.0

    def add(self, terms: dict) -> None:
        for name, value in terms.items():
            value = value.double()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.micro_steps += 1

    def mean_over_ranks(self) -> dict:
        values = torch.stack(list(self.sums.values()))
        dist.all_reduce(values)
        values /= dist.get_world_size() * self.micro_steps
        return dict(zip(self.sums, values.tolist()))


def train(args, stop: StopSignals) -> dict:
    wall_start = time.time()
    run = build_run(args)
    engine, sampler = run.engine, run.sampler
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0

    step = 0
    if args.resume:
        resume_from = ckpt.resolve_resume(args.resume, args.output_dir)
        state = universal.load_checkpoint(engine, resume_from)  # at any world size
        step = state["step"]
        sampler.load_state_dict(state["sampler"])
    else:
        torch.manual_seed(args.seed + rank)  # dropout differs across ranks, data order does not
    epoch, consumed = sampler.state_dict()["epoch"], sampler.state_dict()["consumed"]
    if is_main:
        Path(args.output_dir).mkdir(parents=True, exist_ok=True)
        (Path(args.output_dir) / "args.json").write_text(json.dumps(vars(args), indent=2))
        # Written when the run completes: launch/slurm/train.sbatch requeues the job until then.
        (Path(args.output_dir) / "summary.json").unlink(missing_ok=True)
    dist.barrier()
    log = MetricsLog(args.output_dir, enabled=is_main)

    summary = {"world_size": world, "kd": args.kd, "bits": args.bits,
               "quantization": run.quant_config.to_dict() if run.quant_config else None}
    if run.teacher is not None:
        summary.update(run.teacher.partitioning())
        summary["teacher_ppl"] = teacher_perplexity(run, args)
    if step == 0:
        summary["student_ppl_before"] = student_perplexity(run, args)
        log.log(0, eval_ppl=summary["student_ppl_before"], teacher_ppl=summary.get("teacher_ppl"))

    loader = make_dataloader(run.train_blocks, run.micro_batch, sampler,
                             pin_memory=pins_memory(engine.device))
    batches = iter(loader)
    want_logits = args.loss_impl == "naive" or args.kd == "l2l"
    want_layers = args.kd == "l2l"
    tokens_per_micro_step = run.micro_batch * args.block_size * world
    progress = tqdm(total=run.total_steps, initial=step, disable=not is_main,
                    desc="QAT" if run.quant_config else "train", dynamic_ncols=True)
    window = StepWindow()
    nonfinite = NonFiniteGuard(args.max_nonfinite_batches)
    saver = ckpt.CheckpointSaver(engine, args.output_dir, saved_step=step if args.resume else None)
    stopping = None  # the stop signal all ranks agreed on
    train_seconds, train_tokens = 0.0, 0
    engine.train()
    while step < run.total_steps:
        started = time.time()
        lr = run.scheduler.get_last_lr()[0]  # the rate this step uses
        for _ in range(run.accumulation):
            terms = None
            while terms is None:  # a batch with a NaN/inf loss on any rank is dropped on all ranks
                try:
                    batch = next(batches)
                except StopIteration:  # next epoch: a new seeded order
                    epoch, consumed = epoch + 1, 0
                    sampler.set_epoch(epoch)
                    batches = iter(loader)
                    batch = next(batches)
                consumed += run.micro_batch
                try:
                    terms = micro_step(run, batch, nonfinite, step + 1, want_logits=want_logits,
                                       want_layers=want_layers)
                except NonFiniteLoss:  # stop, with the weights of the last good step saved
                    saver.save(step, _client_state(step, epoch, consumed))
                    raise
            window.add(terms)
        step += 1
        seconds = time.time() - started
        window.seconds += seconds
        train_seconds += seconds
        train_tokens += tokens_per_micro_step * run.accumulation
        stopping = stop.agreed(engine.device)

        if step % args.log_every == 0 or step == run.total_steps or stopping:
            record = window.mean_over_ranks()
            record.update(lr=lr, grad_norm=_grad_norm(engine), epoch=epoch,
                          tokens_per_s=tokens_per_micro_step * window.micro_steps / window.seconds)
            log.log(step, **record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            window = StepWindow()
        progress.update(1)
        if stopping:
            break
        if args.eval_every and step % args.eval_every == 0 and step < run.total_steps:
            ppl = student_perplexity(run, args)
            log.log(step, eval_ppl=ppl)
            progress.write(f"step {step}: validation perplexity {ppl:.3f}")
        if args.save_every and step % args.save_every == 0 and step < run.total_steps:
            saver.save(step, _client_state(step, epoch, consumed))
    progress.close()
    if stopping:
        path = saver.save(step, _client_state(step, epoch, consumed))
        if is_main:
            print(f"stopped on {stopping} after step {step} of {run.total_steps}; checkpoint "
                  f"{path}; continue with --resume latest", flush=True)
        log.close()
        return {"stopped_by": stopping, "steps": step, "checkpoint": str(path)}

    summary["student_ppl_after"] = student_perplexity(run, args)
    log.log(step, eval_ppl=summary["student_ppl_after"])
    summary["checkpoint"] = str(saver.save(step, _client_state(step, epoch, consumed)))
    if not args.no_export:
        summary["hf_model"] = str(export_hf(engine, run.student_model, run.tokenizer,
                                            Path(args.output_dir) / "hf", dtype=args.export_dtype))
    summary.update(steps=step, tokens_per_s=train_tokens / max(train_seconds, 1e-9),
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
