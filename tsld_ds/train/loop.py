"""One QAT run, top to bottom.

check the inputs, start the process group and lock the output directory -> build both engines
(`build.py`) -> perplexity before -> optimizer steps (each: per micro-batch,
`micro_step`: teacher outputs -> student forward with the loss -> backward -> engine step) ->
perplexity after, final checkpoint, Hugging Face export, summary.

What happens between steps belongs to the object that owns it and its cadence: the metrics log
(`--log_every`), the evaluator (`--eval_every`), the checkpoint saver (`--save_every`), the stop
signals (SIGUSR1/SIGTERM/Ctrl-C end the run after the current step, with a checkpoint) and the
NaN/inf guard (a batch whose loss is not finite on any rank is skipped on all; too many in a row
stop the run, with a checkpoint).
"""
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
from tqdm import tqdm

from tsld_ds.data import EpochBatches
from tsld_ds.devices import pins_memory, to_device
from tsld_ds.errors import RunFailed
from tsld_ds.evaluation.perplexity import perplexity, summed_nll
from tsld_ds.models import vocab_size_of
from tsld_ds.run import checkpoint as ckpt
from tsld_ds.run import universal
from tsld_ds.run.config import RunConfig
from tsld_ds.run.distributed import init_distributed
from tsld_ds.run.lock import output_dir_lock
from tsld_ds.teacher import TeacherCache
from tsld_ds.train.build import Inputs, Run, build_run, check_inputs
from tsld_ds.train.export import export_hf
from tsld_ds.train.hooks import TrainHooks
from tsld_ds.train.metrics import MetricsLog, RunSummary, StepWindow
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


class Evaluator:
    """The student's validation perplexity (`eval_ppl`) before training, every `every` steps
    (0: never between) and after; with `train_blocks`, also its perplexity on the first training
    blocks (`train_ppl`)."""

    def __init__(self, run: Run, *, every: int, max_blocks: int | None, train_blocks: int):
        self.run, self.every = run, every
        self.max_blocks, self.train_blocks = max_blocks, train_blocks

    def due(self, step: int) -> bool:
        return bool(self.every) and step % self.every == 0 and step < self.run.total_steps

    def evaluate(self) -> dict:
        ppls = {"eval_ppl": self._perplexity(self.run.val_blocks, self.max_blocks)}
        if self.train_blocks:
            ppls["train_ppl"] = self._perplexity(self.run.train_blocks, self.train_blocks)
        return ppls

    def teacher_perplexity(self) -> float:
        run = self.run
        if isinstance(run.teacher, TeacherCache):  # summed per row when the cache was built
            return run.teacher.validation_perplexity(self.max_blocks)

        def nll(input_ids, labels):
            with run.teacher.outputs(input_ids) as t:
                return summed_nll(t.hidden, t.weight, t.bias, labels,
                                  chunk_size=run.objective.chunk_size,
                                  vocab_chunk_size=run.objective.vocab_chunk_size)

        return perplexity(nll, run.val_blocks, run.micro_batch, device=run.engine.device,
                          max_blocks=self.max_blocks)

    def _perplexity(self, blocks, max_blocks: int | None) -> float:
        engine = self.run.engine

        def nll(input_ids, labels):
            return engine(input_ids, labels, nll_only=True)

        engine.eval()
        ppl = perplexity(nll, blocks, self.run.micro_batch, device=engine.device,
                         max_blocks=max_blocks)
        engine.train()
        return ppl


@dataclass
class _Session:
    """A run's engines and the objects that own what happens between its steps."""
    run: Run
    output_dir: Path
    log: MetricsLog
    evaluator: Evaluator
    saver: ckpt.CheckpointSaver
    summary: RunSummary
    step: int   # the last step done


def train(config: RunConfig, stop: StopSignals, hooks: TrainHooks | None = None) -> RunSummary:
    """The run `config` describes, from its checked inputs to its summary, with --output_dir
    locked against a second run from before anything is written or loaded there."""
    wall_start = time.time()
    inputs = check_inputs(config)
    init_distributed(config.dist_timeout)
    with output_dir_lock(config.output_dir):
        return _train(config, inputs, stop, hooks or TrainHooks(), wall_start)


def _train(config: RunConfig, inputs: Inputs, stop: StopSignals, hooks: TrainHooks,
           wall_start: float) -> RunSummary:
    session = _start(config, inputs, stop, hooks)
    run, step = session.run, session.step
    engine, sampler = run.engine, run.sampler
    batches = EpochBatches(run.train_blocks, run.micro_batch, sampler,
                           pin_memory=pins_memory(engine.device))
    window = StepWindow(run.micro_batch * config.block_size * dist.get_world_size())
    nonfinite = NonFiniteGuard(config.max_nonfinite_batches)
    progress = tqdm(total=run.total_steps, initial=step, disable=dist.get_rank() != 0,
                    desc="QAT" if run.quant_config else "train", dynamic_ncols=True)
    stopping = None  # the stop signal any rank received, as all ranks learn it together
    engine.train()
    while step < run.total_steps:
        started = time.time()
        lr = engine.get_lr()[0]  # the rate this step uses
        for _ in range(run.accumulation):
            terms = None
            while terms is None:  # a batch with a NaN/inf loss on any rank is dropped on all ranks
                try:
                    terms, stopping = micro_step(run, next(batches), nonfinite, stop, step + 1,
                                                 hooks)
                except NonFiniteLoss:  # stop, with the weights of the last step saved if good
                    session.saver.save_if_finite(step, _client_state(step, sampler))
                    raise
            window.add(terms)
        step += 1
        window.step_done(time.time() - started)
        record = session.log.step_done(
            step, window, last=step == run.total_steps or stopping is not None,
            extra=lambda: dict(lr=lr, grad_norm=_grad_norm(engine), epoch=sampler.epoch))
        if record is not None:
            progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{lr:.2e}",
                                 tok_s=f"{record['tokens_per_s']:.0f}")
        progress.update(1)
        if stopping:
            break
        if session.evaluator.due(step):
            ppls = session.evaluator.evaluate()
            session.log.log(step, **ppls)
            progress.write(f"step {step}: validation perplexity {ppls['eval_ppl']:.3f}"
                           + (f", training {ppls['train_ppl']:.3f}" if "train_ppl" in ppls
                              else ""))
        if step < run.total_steps:
            session.saver.maybe_save(step, _client_state(step, sampler))
    progress.close()
    session.step = step
    session.summary.tokens_per_s = window.tokens_per_s_overall
    return _finish(session, config, stopping, wall_start)


def _start(config: RunConfig, inputs: Inputs, stop: StopSignals, hooks: TrainHooks) -> _Session:
    """Both engines built, a resume's state loaded, the teacher's and the student's perplexity
    before the first step (a resumed run's log kept the latter)."""
    run = build_run(config, inputs, stop)
    hooks.run_built(run)
    needed_bytes = ckpt.checkpoint_bytes(run.engine)
    ckpt.check_room(config.output_dir, needed_bytes)
    step = 0
    if run.resume_from is not None:
        state = universal.load_checkpoint(run.engine, run.resume_from)  # at any world size
        step = state["step"]
        run.sampler.load_state_dict(state["sampler"])
        _follow_schedule(run, config.lr)
    output_dir = Path(config.output_dir)
    resumed_step = step if run.resume_from is not None else None
    session = _Session(
        run=run, output_dir=output_dir, step=step,
        log=MetricsLog(output_dir, enabled=dist.get_rank() == 0, every=config.log_every,
                       resumed_step=resumed_step),
        evaluator=Evaluator(run, every=config.eval_every, max_blocks=config.eval_max_blocks,
                            train_blocks=config.eval_train_blocks),
        saver=ckpt.CheckpointSaver(run.engine, output_dir, saved_step=resumed_step,
                                   every=config.save_every, options=run.defining_options,
                                   needed_bytes=needed_bytes, keep=config.keep_checkpoints,
                                   on_files_written=hooks.checkpoint_files_written),
        summary=RunSummary(world_size=dist.get_world_size(), kd=config.kd, bits=config.bits,
                           quantization=run.quant_config.to_dict() if run.quant_config
                           else None))
    summary = session.summary
    if run.teacher is not None:
        summary.teacher_numel, summary.teacher_numel_this_rank = run.teacher.partitioning()
        summary.teacher_ppl = session.evaluator.teacher_perplexity()
    if step == 0:
        ppls = session.evaluator.evaluate()
        summary.student_ppl_before = ppls["eval_ppl"]
        session.log.log(0, **ppls, teacher_ppl=summary.teacher_ppl)
    else:  # measured when the run started; its log kept it
        summary.student_ppl_before = session.log.earliest("eval_ppl")
    return session


def _finish(session: _Session, config: RunConfig, stopping: str | None,
            wall_start: float) -> RunSummary:
    """A stopped run: its checkpoint, and no summary.json (a requeue resumes it). A completed one:
    the perplexity after, the final checkpoint, the Hugging Face export and summary.json; unless
    it learned nothing (RunFailed, after the checkpoint)."""
    run, summary, step = session.run, session.summary, session.step
    summary.steps = step
    client_state = _client_state(step, run.sampler)
    if stopping:
        summary.stopped_by = stopping
        summary.checkpoint = str(session.saver.save(step, client_state))
        if dist.get_rank() == 0:
            print(f"stopped on {stopping} after step {step} of {run.total_steps}; checkpoint "
                  f"{summary.checkpoint}; continue with --resume latest", flush=True)
        session.log.close()
        return summary
    ppls = session.evaluator.evaluate()
    summary.student_ppl_after = ppls["eval_ppl"]
    session.log.log(step, **ppls)
    summary.checkpoint = str(session.saver.save(step, client_state))
    _check_learned(summary.student_ppl_after, summary.student_ppl_before,
                   vocab_size_of(run.student_model), summary.checkpoint)
    if not config.no_export:
        summary.hf_model = str(export_hf(run.student_model, run.tokenizer,
                                         session.output_dir / "hf", dtype=config.export_dtype))
    summary.wall_time_s = time.time() - wall_start
    summary.metrics = str(session.output_dir / "metrics.jsonl")
    if dist.get_rank() == 0:
        (session.output_dir / "summary.json").write_text(json.dumps(summary.as_json(),
                                                                    indent=2))
        print(summary.format())
    session.log.close()
    return summary


def _check_learned(ppl: float, ppl_before: float, vocab_size: int, checkpoint: str) -> None:
    """A student that ends no better than a uniform guess over its vocabulary (perplexity = its
    size) and worse than it started has diverged (too high an --lr): a failure, not a result to
    export. One that started there (a random initialisation) and improved is only warned of."""
    if ppl < vocab_size:
        return
    said = (f"the student's validation perplexity after training is {ppl:.4g}, no better than "
            f"a uniform guess over its {vocab_size} tokens")
    if not ppl < ppl_before:
        raise RunFailed(f"{said}, and worse than before training ({ppl_before:.4g}): it "
                        "diverged (too high --lr?); no export written, checkpoint "
                        f"{checkpoint} kept for inspection")
    if dist.get_rank() == 0:
        print(f"warning: {said} (it started at {ppl_before:.4g}: train longer)", file=sys.stderr,
              flush=True)


def _follow_schedule(run: Run, peak_lr: float) -> None:
    """After a resume: this run's schedule (its --lr, --max_steps, warm-up and decay) at the
    saved step, where the checkpoint holds the old run's. The same rate when the options are."""
    run.scheduler.base_lrs = [peak_lr] * len(run.scheduler.base_lrs)
    multiplier = run.lr_multiplier(run.scheduler.last_epoch)
    for group in run.engine.optimizer.param_groups:
        group["lr"] = peak_lr * multiplier


def _client_state(step: int, sampler) -> dict:
    return {"step": step, "sampler": sampler.state_dict()}


def _grad_norm(engine) -> float | None:
    norm = engine.get_global_grad_norm()
    return None if norm is None else float(norm)
