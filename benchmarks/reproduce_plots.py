"""Figures of docs/results.md (matplotlib, Agg backend: files only, no display needed)."""
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after choosing the backend)
import torch  # noqa: E402
from reproduce_report import RunResults  # noqa: E402
from teacher_confidence import TeacherConfidence  # noqa: E402


def plot_curves(results: Sequence[RunResults], teacher_ppl: float | None, path: Path,
                title: str) -> None:
    """Validation perplexity against step, one line per run (mean over its seeds)."""
    fig, ax = plt.subplots(figsize=(7, 4.5))
    lowest, highest = float("inf"), 0.0
    for r in results:
        steps, ppls = zip(*r.mean_curve())
        lowest, highest = min(lowest, *ppls), max(highest, *ppls)
        ax.plot(steps, ppls, marker="o", markersize=3, label=f"{r.spec.label} ({r.spec.name})")
    if highest > 1.5 * lowest:  # an outlier run would flatten the others on a linear axis
        ax.set_yscale("log")
    if teacher_ppl is not None:
        ax.axhline(teacher_ppl, color="black", linestyle="--", linewidth=1,
                   label=f"FP teacher {teacher_ppl:.2f}")
    ax.set(xlabel="optimizer step", ylabel="validation perplexity", title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_train_and_validation(results: Sequence[RunResults], teacher: tuple[float, float],
                              steps_per_epoch: int, path: Path, title: str) -> None:
    """Validation (left) and training-block (right) perplexity against epoch, one line per run
    (mean over its seeds), with the fine-tuned teacher's (validation, training) perplexity."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for ax, which, what, reference in zip(axes, ("curve", "train_curve"),
                                          ("validation", "training-block"), teacher):
        for r in results:
            points = r.mean_curve(which)
            if points:
                steps, ppls = zip(*points)
                ax.plot([s / steps_per_epoch for s in steps], ppls, marker="o", markersize=2,
                        label=f"{r.spec.label} ({r.spec.name})")
        if reference is not None:
            ax.axhline(reference, color="black", linestyle="--", linewidth=1,
                       label=f"FP teacher {reference:.2f}")
        ax.set_yscale("log")
        ax.set(xlabel="epoch", ylabel=f"{what} perplexity", title=f"{title}: {what}")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_confidence(stats: TeacherConfidence, path: Path, bins: int = 40,
                    what: str = "validation") -> None:
    """Histogram of the teacher's CE on the actual next token (its confidence: low CE = sure),
    and the mean TSLD weight (relative to uniform) that tokens of each bin get, per temperature."""
    ce = stats.teacher_ce
    edges = torch.linspace(0, ce.quantile(0.999).item(), bins + 1)
    which = torch.bucketize(ce, edges[1:-1])  # bin index of every token (the last bin is open)
    centers = (edges[:-1] + edges[1:]) / 2
    counts = torch.bincount(which, minlength=bins)
    filled = counts > 0
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.bar(centers.numpy(), (counts / len(ce)).numpy(), width=(edges[1] - edges[0]).item(),
           color="0.8")
    ax.set(xlabel="teacher CE on the next token, -log p_T(y)  (left: confident)",
           ylabel=f"fraction of {what} tokens",
           title=f"Teacher confidence on {len(ce)} {what} tokens "
           f"(sequences of {stats.block_size})")
    scale_ax = ax.twinx()
    for temperature, scale in stats.relative_scale.items():
        mean = torch.bincount(which, weights=scale.double(), minlength=bins)[filled] \
            / counts[filled]
        scale_ax.plot(centers[filled].numpy(), mean.numpy(), marker=".",
                      label=f"TSLD scale, τ = {temperature:g}")
    scale_ax.axhline(1.0, color="black", linestyle=":", linewidth=1, label="uniform (logit KD)")
    scale_ax.set_yscale("log")
    scale_ax.set_ylabel("token weight × tokens in its sequence (mean per bin)")
    scale_ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
