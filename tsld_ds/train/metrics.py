"""Run logs on rank 0: one JSON line per logging step, TensorBoard when it is installed; and the
run's summary."""
import json
import os
import time
from dataclasses import MISSING, dataclass, fields
from pathlib import Path
from typing import Optional


class MetricsLog:
    """metrics.jsonl (and TensorBoard) of a run, each step logged once: a resumed run keeps the
    records up to its checkpoint's step and logs the later ones again; a new run starts both
    anew (a run that left no checkpoint cannot be continued)."""

    def __init__(self, output_dir, enabled: bool, resumed_step: int | None = None):
        self.enabled = enabled
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
        tmp = self.path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(kept))
        os.replace(tmp, self.path)
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
    quantization: Optional[dict]
    teacher_numel: Optional[int] = None
    teacher_numel_this_rank: Optional[int] = None
    teacher_ppl: Optional[float] = None
    student_ppl_before: Optional[float] = None
    student_ppl_after: Optional[float] = None
    checkpoint: Optional[str] = None
    hf_model: Optional[str] = None
    steps: int = 0
    tokens_per_s: Optional[float] = None
    wall_time_s: Optional[float] = None
    metrics: Optional[str] = None
    stopped_by: Optional[str] = None   # the stop signal's name

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
