"""Run logs on rank 0: one JSON line per logging step, TensorBoard when it is installed."""
import json
import time
from pathlib import Path


class MetricsLog:
    def __init__(self, output_dir, enabled: bool):
        self.enabled = enabled
        self.file = None
        self.tensorboard = None
        if not enabled:
            return
        path = Path(output_dir)
        self.path = path / "metrics.jsonl"
        self.file = open(self.path, "a", buffering=1)
        try:
            from torch.utils.tensorboard import SummaryWriter
            self.tensorboard = SummaryWriter(str(path / "tensorboard"))
        except ImportError:  # tensorboard is optional
            self.tensorboard = None

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


def format_summary(s: dict) -> str:
    def ppl(key):
        return f"{s[key]:.3f}" if s.get(key) is not None else "n/a"

    bits = "full precision" if s["bits"] == 16 else \
        f"{s['bits']}-bit {s['quantization']['method']} per {s['quantization']['granularity']}"
    stage = "training" if s["bits"] == 16 else "QAT"
    lines = [
        "", "=" * 64, f"tsld-ds run summary ({bits}, --kd {s['kd']}, {s['world_size']} rank(s))",
        f"  {'teacher perplexity':<36}{ppl('teacher_ppl')}",
        f"  {'student perplexity before ' + stage:<36}{ppl('student_ppl_before')}",
        f"  {'student perplexity after ' + stage:<36}{ppl('student_ppl_after')}",
        f"  steps {s['steps']}, {s['tokens_per_s']:.0f} tokens/s, wall time {s['wall_time_s']:.0f} s",
        f"  checkpoint   {s['checkpoint']}",
    ]
    if s.get("hf_model"):
        lines.append(f"  HF model     {s['hf_model']}")
    lines += [f"  metrics      {s['metrics']}", "=" * 64]
    return "\n".join(lines)
