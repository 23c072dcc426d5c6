"""One QAT run, top to bottom.

build both engines (`build.py`) -> perplexity before -> optimizer steps (each: per micro-batch,
`micro_step`: teacher outputs -> student forward with the loss -> backward -> engine step; then
metrics, periodic eval and checkpoints) -> perplexity after, final checkpoint, Hugging Face
export, summary.

A stop signal (SIGUSR1/SIGTERM: preemption, time limit) ends the run after the current step with a
checkpoint; a NaN/inf loss skips the batch on every rank, and too many in a row stop the run, also
with a checkpoint.
"""
import json
import shutil
import time
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from tsld_ds.data import EpochBatches
from tsld_ds.devices import pins_memory, to_device
from tsld_ds.evaluation.perplexity import perplexity, summed_nll
from tsld_ds.teacher import TeacherCache
from tsld_ds.train import checkpoint as ckpt
from tsld_ds.train import universal
from tsld_ds.train.args import defining_options
from tsld_ds.train.build import RUN_OUTPUTS, Run, build_run
from tsld_ds.train.export import export_hf
from tsld_ds.train.hooks import TrainHooks
from tsld_ds.train.metrics import MetricsLog, RunSummary
from tsld_ds.train.nonfinite import NonFiniteGuard, NonFiniteLoss
from tsld_ds.train.signals import StopSignals


def micro_step(run: Run, batch: dict, nonfinite: NonFiniteGuard, stop: StopSignals, step: int,
               hooks: TrainHooks) -> tuple[dict | None, str | None]:
    """One micro-batch: teacher outputs -> student forward and loss -> backward -> engine step
    (DeepSpeed applies the optimizer at the gradient-accumulation boundary). Returns the loss
    terms (detached, on the engine's device), or None when the loss is NaN/inf on some rank: then
    no rank runs backward; and the stop signal any rank has received, or None."""
    rows = batch.pop("index")  # stays on the host: a teacher cache reads its rows by it
    batch = to_device(batch, run.engine.device)
    input_ids, labels = batch["input_ids"], batch["labels"]
    if run.teacher is None:
        losses = run.engine(input_ids, labels)
    else:
        objective = run.objective
        with run.teacher.outputs(input_ids, rows=rows, want_logits=objective.wants_teacher_logits,
                                 want_layers=objective.layers) as teacher:
            losses = run.engine(input_ids, labels, teacher)
    losses = hooks.loss_terms(losses)
    values, signum = _gather_from_ranks(losses, stop.received)
    stopping = StopSignals.name(signum)
    if not nonfinite.all_finite(list(losses), values, step, dist.get_rank()):
        return None, stopping
    run.engine.backward(losses["loss"])
    run.engine.step()
    return {name: value.detach() for name, value in losses.items()}, stopping


def _gather_from_ranks(losses: dict, stop_signal: int) -> tuple[torch.Tensor, int]:
    """The one collective and host read of a micro-batch: every rank's loss terms (a [ranks,
    terms] float64 tensor on the host) for the NaN/inf check, and the largest stop signal any
    rank has received (0: none)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    # Each rank fills its own row; the sum hands every rank all ranks' values.
    values = torch.zeros(world, len(losses) + 1, dtype=torch.float64,
                         device=losses["loss"].device)
    values[rank, :-1] = torch.stack([v.detach().double() for v in losses.values()])
    values[rank, -1] = stop_signal
    dist.all_reduce(values)
    values = values.cpu()
    return values[:, :-1], int(values[:, -1].max())


def student_perplexity(run: Run, blocks, max_blocks: int | None) -> float:
    def nll(input_ids, labels):
        return run.engine(input_ids, labels, nll_only=True)

    run.engine.eval()
    ppl = perplexity(nll, blocks, run.micro_batch, device=run.engine.device,
                     max_blocks=max_blocks)
    run.engine.train()
    return ppl


def evaluate(run: Run, args) -> dict:
    """The student's validation perplexity (`eval_ppl`), and with --eval_train_blocks its
    perplexity on the first training blocks (`train_ppl`)."""
    ppls = {"eval_ppl": student_perplexity(run, run.val_blocks, args.eval_max_blocks)}
    if args.eval_train_blocks:
        ppls["train_ppl"] = student_perplexity(run, run.train_blocks, args.eval_train_blocks)
    return ppls


def teacher_perplexity(run: Run, args) -> float:
    if isinstance(run.teacher, TeacherCache):  # summed per row when the cache was built
        return run.teacher.validation_perplexity(args.eval_max_blocks)

    def nll(input_ids, labels):
        with run.teacher.outputs(input_ids) as t:
            return summed_nll(t.hidden, t.weight, t.bias, labels,
                              chunk_size=run.objective.chunk_size,
                              vocab_chunk_size=run.objective.vocab_chunk_size)

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


def train(args, stop: StopSignals, hooks: TrainHooks | None = None) -> RunSummary:
    hooks = hooks or TrainHooks()
    wall_start = time.time()
    run = build_run(args)
    hooks.run_built(run)
    engine, sampler = run.engine, run.sampler
    rank, world = dist.get_rank(), dist.get_world_size()
    is_main = rank == 0

    output_dir = Path(args.output_dir)
    needed_bytes = ckpt.checkpoint_bytes(engine)
    ckpt.check_room(output_dir, needed_bytes)
    step = 0
    if run.resume_from is not None:
        state = universal.load_checkpoint(engine, run.resume_from)  # at any world size
        step = state["step"]
        sampler.load_state_dict(state["sampler"])
        _follow_schedule(run, args.lr)
    if is_main:
        if run.resume_from is None and args.overwrite_output_dir:
            _clear_previous_run(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        (output_dir / "args.json").write_text(json.dumps(vars(args), indent=2))
        # Written when the run completes: launch/slurm/train.sbatch requeues the job until then.
        (output_dir / "summary.json").unlink(missing_ok=True)
    dist.barrier()
    log = MetricsLog(output_dir, enabled=is_main,
                     resumed_step=step if run.resume_from is not None else None)

    summary = RunSummary(world_size=world, kd=args.kd, bits=args.bits,
                         quantization=run.quant_config.to_dict() if run.quant_config else None)
    if run.teacher is not None:
        summary.teacher_numel, summary.teacher_numel_this_rank = run.teacher.partitioning()
        summary.teacher_ppl = teacher_perplexity(run, args)
    if step == 0:
        ppls = evaluate(run, args)
        summary.student_ppl_before = ppls["eval_ppl"]
        log.log(0, **ppls, teacher_ppl=summary.teacher_ppl)
    else:  # measured when the run started; its log kept it
        summary.student_ppl_before = log.earliest("eval_ppl")

    batches = EpochBatches(run.train_blocks, run.micro_batch, sampler,
                           pin_memory=pins_memory(engine.device))
    tokens_per_micro_step = run.micro_batch * args.block_size * world
    progress = tqdm(total=run.total_steps, initial=step, disable=not is_main,
                    desc="QAT" if run.quant_config else "train", dynamic_ncols=True)
    window = StepWindow()
    nonfinite = NonFiniteGuard(args.max_nonfinite_batches)
    saver = ckpt.CheckpointSaver(engine, args.output_dir,
                                 saved_step=step if run.resume_from is not None else None,
                                 options=defining_options(args), needed_bytes=needed_bytes,
                                 keep=args.keep_checkpoints, hooks=hooks)
    stopping = None  # the stop signal any rank received, as all ranks learn it together
    train_seconds, train_tokens = 0.0, 0
    engine.train()
    while step < run.total_steps:
        started = time.time()
        lr = engine.get_lr()[0]  # the rate this step uses
        for _ in range(run.accumulation):
            terms = None
            while terms is None:  # a batch with a NaN/inf loss on any rank is dropped on all ranks
                batch = next(batches)
                try:
                    terms, stopping = micro_step(run, batch, nonfinite, stop, step + 1, hooks)
                except NonFiniteLoss:  # stop, with the weights of the last good step saved
                    saver.save(step, _client_state(step, sampler))
                    raise
            window.add(terms)
        step += 1
        seconds = time.time() - started
        window.seconds += seconds
        train_seconds += seconds
        train_tokens += tokens_per_micro_step * run.accumulation

        if step % args.log_every == 0 or step == run.total_steps or stopping:
            record = window.mean_over_ranks()
            record.update(lr=lr, grad_norm=_grad_norm(engine), epoch=sampler.epoch,
                          tokens_per_s=tokens_per_micro_step * window.micro_steps / window.seconds)
            log.log(step, **record)
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
            window = StepWindow()
        progress.update(1)
        if stopping:
            break
        if args.eval_every and step % args.eval_every == 0 and step < run.total_steps:
            ppls = evaluate(run, args)
            log.log(step, **ppls)
            progress.write(f"step {step}: validation perplexity {ppls['eval_ppl']:.3f}"
                           + (f", training {ppls['train_ppl']:.3f}" if "train_ppl" in ppls
                              else ""))
        if args.save_every and step % args.save_every == 0 and step < run.total_steps:
            saver.save(step, _client_state(step, sampler))
    progress.close()
    summary.steps = step
    if stopping:
        summary.stopped_by = stopping
        summary.checkpoint = str(saver.save(step, _client_state(step, sampler)))
        if is_main:
            print(f"stopped on {stopping} after step {step} of {run.total_steps}; checkpoint "
                  f"{summary.checkpoint}; continue with --resume latest", flush=True)
        log.close()
        return summary

    ppls = evaluate(run, args)
    summary.student_ppl_after = ppls["eval_ppl"]
    log.log(step, **ppls)
    summary.checkpoint = str(saver.save(step, _client_state(step, sampler)))
    if not args.no_export:
        summary.hf_model = str(export_hf(run.student_model, run.tokenizer,
                                         Path(args.output_dir) / "hf", dtype=args.export_dtype))
    summary.tokens_per_s = train_tokens / max(train_seconds, 1e-9)
    summary.wall_time_s = time.time() - wall_start
    summary.metrics = str(Path(args.output_dir) / "metrics.jsonl")
    if is_main:
        (Path(args.output_dir) / "summary.json").write_text(json.dumps(summary.as_json(),
                                                                       indent=2))
        print(summary.format())
    log.close()
    return summary


def _follow_schedule(run: Run, peak_lr: float) -> None:
    """After a resume: this run's schedule (its --lr, --max_steps, warm-up and decay) at the
    saved step, where the checkpoint holds the old run's. The same rate when the options are."""
    run.scheduler.base_lrs = [peak_lr] * len(run.scheduler.base_lrs)
    multiplier = run.lr_multiplier(run.scheduler.last_epoch)
    for group in run.engine.optimizer.param_groups:
        group["lr"] = peak_lr * multiplier


def _clear_previous_run(output_dir: Path) -> None:
    for name in RUN_OUTPUTS:
        path = output_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _client_state(step: int, sampler) -> dict:
    return {"step": step, "sampler": sampler.state_dict()}


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
