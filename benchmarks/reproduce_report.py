"""Results of finished reproduce runs: per-run statistics over seeds, and docs/results.md."""
import json
import re
import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from reproduce_grid import GROUPS, KD_LABELS, RunSpec
from teacher_confidence import TeacherConfidence

FINDINGS_START, FINDINGS_END = "<!-- findings -->", "<!-- /findings -->"
FINDINGS_PLACEHOLDER = ("_No findings written yet: write them between the findings markers; "
                        "benchmarks/reproduce.py keeps them when it rewrites this page._")


@dataclass
class SeedResult:
    seed: int
    ppl_after: float
    ppl_before: float
    teacher_ppl: float | None  # absent for --kd gt, which loads no teacher
    wall_time_s: float
    curve: list[tuple[int, float]]  # (step, validation perplexity), from step 0
    train_curve: list[tuple[int, float]]  # (step, perplexity on the first training blocks)

    @property
    def best_ppl(self) -> float:
        return min(ppl for _, ppl in self.curve)

    @property
    def best_step(self) -> int:
        return min(self.curve, key=lambda point: point[1])[0]

    @property
    def train_ppl_after(self) -> float | None:
        return self.train_curve[-1][1] if self.train_curve else None


@dataclass
class RunResults:
    spec: RunSpec
    seeds: list[SeedResult]

    def mean_sd(self, field: str) -> tuple[float, float | None]:
        values = [getattr(s, field) for s in self.seeds]
        return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else None

    def mean_curve(self, which: str = "curve") -> list[tuple[int, float]]:
        """Mean perplexity over seeds at the steps every seed evaluated (`which`: "curve" for
        validation, "train_curve" for the training blocks)."""
        by_step = [dict(getattr(s, which)) for s in self.seeds]
        steps = sorted(set.intersection(*(set(c) for c in by_step)))
        return [(step, statistics.mean(c[step] for c in by_step)) for step in steps]


def read_seed_result(run_dir: Path, seed: int) -> SeedResult:
    summary = json.loads((run_dir / "summary.json").read_text())
    records = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    def curve(key):
        return sorted({r["step"]: r[key] for r in records if key in r}.items())

    return SeedResult(seed, summary["student_ppl_after"], summary["student_ppl_before"],
                      summary.get("teacher_ppl"), summary["wall_time_s"], curve("eval_ppl"),
                      curve("train_ppl"))


def teacher_perplexity(results: Sequence[RunResults]) -> float | None:
    """The FP teacher's validation perplexity as the runs measured it (they all agree)."""
    values = [s.teacher_ppl for r in results for s in r.seeds if s.teacher_ppl is not None]
    return statistics.mean(values) if values else None


def _ppl(mean: float, sd: float | None) -> str:
    return f"{mean:.2f}" if sd is None else f"{mean:.2f} ± {sd:.2f}"


def _gap(ppl: float, teacher: float | None) -> str:
    if teacher is None:
        return "n/a"
    return f"{ppl - teacher:+.2f} ({(ppl / teacher - 1) * 100:+.1f}%)"


def results_table(results: Sequence[RunResults], teacher: float | None) -> list[str]:
    """Markdown rows: the FP teacher, then per group its PTQ floor and its runs."""
    lines = ["| run | method | bits | quantizer | val PPL | gap to FP | PPL before QAT "
             "| train wall time (s) | seeds |",
             "|---|---|---|---|---|---|---|---|---|"]
    if teacher is not None:
        lines.append(f"| teacher | FP teacher | 32 | none | {teacher:.2f} | 0 | | | |")
    for group in GROUPS:
        members = [r for r in results if r.spec.group == group]
        if not members:
            continue
        if group.startswith("main"):  # the quantized student before any training
            first = members[0]
            before, _ = first.mean_sd("ppl_before")
            lines.append(f"| ptq-w{first.spec.bits} | PTQ, no training | {first.spec.bits} "
                         f"| {first.spec.quantizer} | {before:.2f} | {_gap(before, teacher)} "
                         f"| | | |")
        for r in members:
            after, sd = r.mean_sd("ppl_after")
            before, _ = r.mean_sd("ppl_before")
            wall, _ = r.mean_sd("wall_time_s")
            lines.append(f"| {r.spec.name} | {r.spec.label} | {r.spec.bits} | {r.spec.quantizer} "
                         f"| {_ppl(after, sd)} | {_gap(after, teacher)} | {before:.2f} "
                         f"| {wall:.0f} | {len(r.seeds)} |")
    return lines


def ordering(results: Sequence[RunResults], field: str = "ppl_after",
             what: str = "") -> list[str]:
    """One line per main group: its methods from best to worst by `field` (a SeedResult
    perplexity), and the paper's order check; `what` names the field in the line."""
    lines = []
    for group in ("main-w2", "main-w4"):
        members = {r.spec.name.split("-", 1)[1]: r for r in results if r.spec.group == group}
        if not members:
            continue
        means = {kd: r.mean_sd(field)[0] for kd, r in members.items()}
        ranked = " < ".join(f"{KD_LABELS[kd]} {means[kd]:.2f}"
                            for kd in sorted(means, key=means.get))
        line = f"- {group[-2:].upper()}A16{what}: {ranked}."
        if group == "main-w2" and {"tsld", "logit", "logit_gt"} <= set(means):
            holds = means["tsld"] < means["logit"] < means["logit_gt"]
            line += (" The paper's W2 order TSLD < Logit < Logit+GT "
                     f"{'holds' if holds else 'does not hold'} here.")
        elif "tsld" in means:  # the paper's W4 claim: TSLD best or tied
            best = min(means, key=means.get)
            line += (" TSLD is the best." if best == "tsld" else
                     f" TSLD is {means['tsld'] - means[best]:.2f} above the best "
                     f"({KD_LABELS[best]}).")
        spreads = [sd for r in members.values() for sd in [r.mean_sd(field)[1]] if sd]
        if spreads:
            line += f" Largest seed sd: {max(spreads):.2f}."
        lines.append(line)
    return lines


def kept_findings(path: Path) -> str:
    """The hand-written findings of an existing results page (or a placeholder)."""
    return _between(path, FINDINGS_START, FINDINGS_END) or FINDINGS_PLACEHOLDER


def kept_section(path: Path, regime: str) -> str | None:
    """The section an earlier call wrote for `regime` (REGIMES), to keep beside a new one."""
    return _between(path, *_section_marks(regime))


def _section_marks(regime: str) -> tuple[str, str]:
    return f"<!-- regime {regime} -->", f"<!-- /regime {regime} -->"


def _between(path: Path, start: str, end: str) -> str | None:
    if path.is_file():
        match = re.search(re.escape(start) + r"\n(.*?)" + re.escape(end), path.read_text(),
                          flags=re.S)
        if match:
            return match.group(1).rstrip("\n")
    return None


REGIMES = ("long", "short")  # the page's sections, in order


def results_page(sections: dict[str, str], findings: str) -> str:
    """docs/results.md: each regime's section (REGIMES order), then the findings."""
    lines = [
        "# Reproducing the TSLD comparison with tsld-ds",
        "",
        "Written by `benchmarks/reproduce.py`, one section per `--preset`, from the records of "
        "finished runs it keeps beside this page (`runs/<preset>/`: each run's options, summary "
        "and metrics, and the wall time of every call); rerun it to regenerate a section or to "
        "finish the grid (recorded runs are reused, the other section and the findings are "
        "kept). Validation perplexity is training's own evaluation (every predicted token of "
        "the validation blocks named under Setup).",
        "",
    ]
    for regime in REGIMES:
        if regime in sections:
            start, end = _section_marks(regime)
            lines += [start, sections[regime], end, ""]
    return "\n".join([*lines, "## Findings", "", FINDINGS_START, findings, FINDINGS_END, ""])


def _setup_lines(setup: dict[str, str], invocations: Sequence[dict]) -> list[str]:
    commands = "\n".join(f"# {i['date']}: {i['elapsed_s']:.0f} s, {i['ran']} runs trained, "
                         f"load average {i['load_average'][0]:.1f} at start"
                         + (f"; {i['note']}" if "note" in i else "") + f"\n{i['command']}"
                         for i in invocations)
    total = sum(i["elapsed_s"] for i in invocations)
    return [*(f"- **{key}**: {value}" for key, value in setup.items()),
            *([f"- **Wall time**: {total / 60:.1f} min over {len(invocations)} invocation(s) "
               "of:", "", "```", commands, "```"] if invocations else [])]


def short_section(*, results: Sequence[RunResults], setup: dict[str, str],
                  invocations: Sequence[dict], plots: dict[str, str],
                  confidence_lines: Sequence[str]) -> str:
    """The short preset's section: a fixed number of steps on the whole dataset."""
    teacher = teacher_perplexity(results)
    lines = [
        "## A short polish on the whole corpus (`--preset short`)",
        "",
        "### Setup",
        "",
        *_setup_lines(setup, invocations),
        "",
        "### Results",
        "",
        *results_table(results, teacher),
        "",
        "Gap to FP is against the FP teacher's perplexity; PPL before QAT is the quantized "
        "student before training (post-training quantization). With several seeds: mean ± "
        "sample standard deviation. Every run has the same budget (steps, learning rate, seeds). "
        "Train wall time is launch/train.py's own (set-up, evaluations and steps, not the "
        "DeepSpeed launcher's start).",
        "",
        *ordering(results),
        "",
        "### Validation perplexity during QAT",
        "",
        *(f"![{title}]({path})\n" for title, path in plots.items() if "val_ppl" in path),
        "### Teacher confidence and the TSLD token scale",
        "",
        *(f"![{title}]({path})\n" for title, path in plots.items() if "val_ppl" not in path),
        *confidence_lines,
    ]
    return "\n".join(lines)


@dataclass
class TeacherStage:
    """The FP stage of the long preset: the teacher before and after its fine-tuning."""
    val_before: float
    val_after: float
    train_before: float | None
    train_after: float | None

    @classmethod
    def read(cls, run_dir: Path) -> "TeacherStage":
        result = read_seed_result(run_dir, 0)
        train = [ppl for _, ppl in result.train_curve]
        return cls(result.ppl_before, result.ppl_after, train[0] if train else None,
                   train[-1] if train else None)


def long_table(results: Sequence[RunResults], stage: TeacherStage,
               steps_per_epoch: int) -> list[str]:
    """Markdown rows of the long regime: the teacher before and after the FP stage, the PTQ
    floor, then each objective's final and best validation perplexity and its training one."""
    def opt(value):
        return "" if value is None else f"{value:.2f}"

    lines = ["| run | method | final val PPL | best val PPL | best at epoch | final − best "
             "| final train-block PPL | seeds |",
             "|---|---|---|---|---|---|---|---|",
             f"| teacher (given) | FP, before the FP stage | {stage.val_before:.2f} | | | "
             f"| {opt(stage.train_before)} | |",
             f"| teacher | FP, fine-tuned on the task | {stage.val_after:.2f} | | | "
             f"| {opt(stage.train_after)} | |"]
    for r in results:
        if r.spec.group.startswith("main") and r is next(m for m in results
                                                          if m.spec.group == r.spec.group):
            lines.append(f"| ptq-w{r.spec.bits} | PTQ of the fine-tuned teacher | "
                         f"{r.mean_sd('ppl_before')[0]:.2f} | | | | | |")
        rise = [s.ppl_after - s.best_ppl for s in r.seeds]
        train = [s.train_ppl_after for s in r.seeds if s.train_ppl_after is not None]
        train_sd = statistics.stdev(train) if len(train) > 1 else None
        train_ppl = _ppl(statistics.mean(train), train_sd) if train else ""
        lines.append(
            f"| {r.spec.name} | {r.spec.label} | {_ppl(*r.mean_sd('ppl_after'))} "
            f"| {_ppl(*r.mean_sd('best_ppl'))} "
            f"| {r.mean_sd('best_step')[0] / steps_per_epoch:.1f} "
            f"| {statistics.mean(rise):+.2f} "
            f"| {train_ppl} "
            f"| {len(r.seeds)} |")
    return lines


def long_section(*, results: Sequence[RunResults], stage: TeacherStage, steps_per_epoch: int,
                 setup: dict[str, str], invocations: Sequence[dict], plots: dict[str, str],
                 confidence_lines: Sequence[str]) -> str:
    """The long preset's section: many epochs on a small task, with a fine-tuned teacher."""
    lines = [
        "## The paper's regime: long QAT on a small task (`--preset long`)",
        "",
        "### Setup",
        "",
        *_setup_lines(setup, invocations),
        "",
        "### Results",
        "",
        *long_table(results, stage, steps_per_epoch),
        "",
        "Final: after the last epoch; best: the lowest of the per-epoch evaluations, and the "
        "epoch it came at (mean over seeds); final − best: how far validation perplexity rose "
        "after its best (0: still falling). Train-block PPL is the perplexity on the first "
        "training blocks, the training curve whatever the objective. With several seeds: mean ± "
        "sample standard deviation.",
        "",
        *ordering(results, "ppl_after", ", final"),
        *ordering(results, "best_ppl", ", best"),
        "",
        "### Validation and training perplexity during QAT",
        "",
        *(f"![{title}]({path})\n" for title, path in plots.items() if "curves" in path),
        "### Teacher confidence on training and validation tokens",
        "",
        *(f"![{title}]({path})\n" for title, path in plots.items() if "curves" not in path),
        *confidence_lines,
    ]
    return "\n".join(lines)


def confidence_lines(stats: TeacherConfidence, temperature: float = 10.0,
                     what: str = "validation") -> list[str]:
    """What the teacher-confidence figure shows, in numbers (`what` tokens: the split's)."""
    confidence, scale = stats.confidence, stats.relative_scale[temperature]
    order = confidence.argsort()
    tenth = max(1, len(order) // 10)
    low, high = scale[order[:tenth]].mean().item(), scale[order[-tenth:]].mean().item()
    q05, q95 = scale.quantile(torch.tensor([0.05, 0.95], dtype=scale.dtype)).tolist()
    return [
        f"- {len(confidence)} {what} tokens in sequences of {stats.block_size}; teacher "
        f"perplexity recomputed from its logits: {stats.perplexity:.2f}.",
        f"- Teacher probability of the next token: median {confidence.median().item():.3f}; "
        f"{(confidence > 0.9).double().mean().item():.1%} of tokens above 0.9, "
        f"{(confidence < 0.1).double().mean().item():.1%} below 0.1.",
        f"- TSLD weights at τ = {temperature:g}, relative to uniform (1 = logit KD): 5th–95th "
        f"percentile {q05:.2f}–{q95:.2f}; the 10% least confident tokens get {low:.2f} on "
        f"average, the 10% most confident {high:.2f}.",
    ]
