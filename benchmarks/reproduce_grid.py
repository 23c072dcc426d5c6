"""The runs of benchmarks/reproduce.py: the paper's comparison and the ablations, one flag each.

Every run spells out its whole quantizer and objective, so its command line says what it is
without relying on launch/train.py's defaults.
"""
import fnmatch
from collections.abc import Sequence
from dataclasses import dataclass

KD_LABELS = {"gt": "GT only", "logit": "Logit", "logit_gt": "Logit+GT", "l2l": "L2L+Logit",
             "tsld": "TSLD", "tsld_nogt": "TSLD without GT"}
QUANTIZERS = {  # bits -> the paper's quantizer at that width
    2: ("twn", "TWN ternary, per channel"),
    4: ("minmax", "min-max, per channel"),
}


@dataclass(frozen=True)
class RunSpec:
    name: str          # the run's directory under --output_root and its name for --only
    group: str         # main-w2, main-w4 or ablations
    label: str         # the method column of the results table
    bits: int
    quantizer: str     # the quantizer column
    options: tuple[str, ...]  # launch/train.py options that make this run what it is


def _run(name, group, label, bits, kd="tsld", method=None, granularity="channel", quantizer=None,
         extra=()) -> RunSpec:
    method = method or QUANTIZERS[bits][0]
    options = ("--bits", str(bits), "--quant_method", method, "--granularity", granularity,
               "--kd", kd, *extra)
    return RunSpec(name, group, label, bits, quantizer or QUANTIZERS[bits][1], options)


def _main_runs(bits: int) -> list[RunSpec]:
    return [_run(f"w{bits}-{kd}", f"main-w{bits}", label, bits, kd=kd)
            for kd, label in KD_LABELS.items()]


def _ablations() -> list[RunSpec]:
    """TSLD at 2 bits with one flag changed from w2-tsld."""
    group = "ablations"
    runs = [
        _run("w2-tsld-uniform", group, "TSLD, uniform token scale", 2,
             extra=("--token_scale", "uniform")),
        _run("w2-tsld-inverse", group, "TSLD, inverse token scale", 2,
             extra=("--token_scale", "inverse")),
    ]
    runs += [_run(f"w2-tsld-t{t}", group, f"TSLD, τ = {t}", 2,
                  extra=("--kd_temperature", str(t))) for t in (1, 5, 20)]
    runs += [
        _run("w2-tsld-tensor", group, "TSLD, per-tensor TWN", 2, granularity="tensor",
             quantizer="TWN ternary, per tensor"),
        _run("w2-tsld-pact", group, "TSLD, PACT+ learned scale", 2, method="pact",
             quantizer="PACT+ learned scale, per channel"),
        _run("w2-tsld-absmean", group, "TSLD, absmean ternary", 2, method="absmean",
             quantizer="absmean ternary, per channel"),
    ]
    return runs


GRID: list[RunSpec] = _main_runs(2) + _main_runs(4) + _ablations()
GROUPS = ("main-w2", "main-w4", "ablations")


def select_runs(patterns: Sequence[str]) -> list[RunSpec]:
    """The runs named by group names, run names or shell-style patterns (all if none), in grid
    order. An entry that matches nothing is an error: a typo must not silently skip runs."""
    if not patterns:
        return list(GRID)
    chosen = set()
    for pattern in patterns:
        matched = {r.name for r in GRID
                   if r.group == pattern or fnmatch.fnmatchcase(r.name, pattern)}
        if not matched:
            names = ", ".join([*GROUPS, *(r.name for r in GRID)])
            raise ValueError(f"--only {pattern!r} matches no run; choose from {names}")
        chosen |= matched
    return [r for r in GRID if r.name in chosen]
