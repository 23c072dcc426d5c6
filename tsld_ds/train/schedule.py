"""Learning-rate multiplier: linear warm-up, then linear or cosine decay to 0, or constant."""
import math


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int):
    def multiplier(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        progress = min(progress, 1.0)
        if schedule == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return multiplier
