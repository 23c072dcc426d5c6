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
