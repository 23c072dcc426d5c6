"""Run logs on rank 0: one JSON line per logging step, TensorBoard when it is installed; the loss
terms and timing between two such lines; and the run's summary."""
import json
import time
from collections.abc import Callable
from dataclasses import MISSING, dataclass, fields
from pathlib import Path

import torch
import torch.distributed as dist

from tsld_ds.files import write_atomically


class StepWindow:
    """Loss terms and timing accumulated between two metric lines, averaged over ranks; and the
    run's tokens/s over all its steps. The sums stay on the engine's device: the host reads them
    once per metric line, not per micro-batch."""

    def __init__(self, tokens_per_micro_step: int):
        self.tokens_per_micro_step = tokens_per_micro_step
        self.total_tokens, self.total_seconds = 0, 0.0
        self._new_step = 0  # micro-steps of the step in progress
        self._reset()

    def _reset(self) -> None:
        self.sums, self.micro_steps, self.seconds = {}, 0, 0.0

    def add(self, terms: dict) -> None:
        for name, value in terms.items():
            value = value.double()
            self.sums[name] = self.sums[name] + value if name in self.sums else value
        self.micro_steps += 1
        self._new_step += 1

    def step_done(self, seconds: float) -> None:
        self.seconds += seconds
        self.total_seconds += seconds
        self.total_tokens += self.tokens_per_micro_step * self._new_step
        self._new_step = 0

    def close(self) -> dict:
        """The window's mean loss terms over ranks and micro-batches (a collective), then a new
        window."""
        values = torch.stack(list(self.sums.values()))
        dist.all_reduce(values)
        values /= dist.get_world_size() * self.micro_steps
        record = dict(zip(self.sums, values.tolist()))
        self.tokens_per_s = self.tokens_per_micro_step * self.micro_steps / self.seconds
        self._reset()
        return record

    @property
    def tokens_per_s_overall(self) -> float:
        return self.total_tokens / max(self.total_seconds, 1e-9)


class MetricsLog:
    """metrics.jsonl (and TensorBoard) of a run, a line every `every` steps, each step logged
    once: a resumed run keeps the records up to its checkpoint's step and logs the later ones
    again; a new run starts both anew (a run that left no checkpoint cannot be continued).
    Written by rank 0 (`enabled`); every rank takes part in its collectives."""

    def __init__(self, output_dir, enabled: bool, every: int, resumed_step: int | None = None):
        self.enabled, self.every = enabled, every
        self.file = None
        self.tensorboard = None
        self.kept = []  # the records a resumed run keeps, as dicts
        if not enabled:
            return
        path = Path(output_dir)
        self.path = path / "metrics.jsonl"
        kept = []
        if resumed_step is not None and self.path.is_file():
            kept = [line for line in self.path.read_text(errors="replace").splitlines(True)
                    if _step_of(line) is not None and _step_of(line) <= resumed_step]
        self.kept = [json.loads(line) for line in kept]
        write_atomically(self.path, "".join(kept))
        self.file = open(self.path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(path / "tensorboard"),
                                             purge_step=(resumed_step or 0) + 1)
        except ImportError:  # tensorboard is optional
            self.tensorboard = None

    def earliest(self, key: str):
        """The first kept record's value of `key` (None if none has it; on ranks that do not
        log)."""
        return next((r[key] for r in self.kept if key in r), None)

    def step_done(self, step: int, window: StepWindow, *, last: bool,
                  extra: Callable[[], dict]) -> dict | None:
        """Logs the window's line when this step is due one (every `every` steps, and the last
        or stopping step), with `extra()`'s values; returns it (None when not due)."""
        if step % self.every != 0 and not last:
            return None
        record = {**window.close(), **extra()}
        record["tokens_per_s"] = window.tokens_per_s
        self.log(step, **record)
        return record

    def log(self, step: int, **values) -> None:
        if not self.enabled:
            return
        record = {"step": step, "time": round(time.time(), 3), **values}
        self.file.write(json.dumps(record) + "\n")
        if self.tensorboard is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.tensorboard.add_scalar(key, value, step)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        if self.tensorboard is not None:
            self.tensorboard.close()


def _step_of(line: str) -> int | None:
    """A complete record's step; None for a torn or damaged line (a crash mid-write)."""
    try:
        return json.loads(line)["step"] if line.endswith("\n") else None
    except (ValueError, KeyError, TypeError):
        return None


@dataclass
class RunSummary:
    """What `train()` returns. A completed run also writes it to OUTPUT_DIR/summary.json (the
    fields that are set) and prints `format()`; a run stopped by a signal has `stopped_by` and no
    summary.json, which is what tells launch/slurm/train.sbatch to requeue it."""

    world_size: int
    kd: str
    bits: int
    quantization: dict | None
    teacher_numel: int | None = None
    teacher_numel_this_rank: int | None = None
    teacher_ppl: float | None = None
    student_ppl_before: float | None = None
    student_ppl_after: float | None = None
    checkpoint: str | None = None
    hf_model: str | None = None
    steps: int = 0
    tokens_per_s: float | None = None
    wall_time_s: float | None = None
    metrics: str | None = None
    stopped_by: str | None = None   # the stop signal's name

    def as_json(self) -> dict:
        """Every field that is set, and the four that always are (`quantization` is null for a
        full-precision run)."""
        return {f.name: getattr(self, f.name) for f in fields(self)
                if getattr(self, f.name) is not None or f.default is MISSING}

    def format(self) -> str:
        def ppl(value):
            return f"{value:.3f}" if value is not None else "n/a"

        bits = "full precision" if self.bits == 16 else (
            f"{self.bits}-bit {self.quantization['method']} per "
            f"{self.quantization['granularity']}")
        stage = "training" if self.bits == 16 else "QAT"
        lines = [
            "", "=" * 64,
            f"tsld-ds run summary ({bits}, --kd {self.kd}, {self.world_size} rank(s))",
            f"  {'teacher perplexity':<36}{ppl(self.teacher_ppl)}",
            f"  {'student perplexity before ' + stage:<36}{ppl(self.student_ppl_before)}",
            f"  {'student perplexity after ' + stage:<36}{ppl(self.student_ppl_after)}",
            f"  steps {self.steps}, {self.tokens_per_s:.0f} tokens/s, wall time "
            f"{self.wall_time_s:.0f} s",
            f"  checkpoint   {self.checkpoint}",
        ]
        if self.hf_model:
            lines.append(f"  HF model     {self.hf_model}")
        lines += [f"  metrics      {self.metrics}", "=" * 64]
        return "\n".join(lines)
