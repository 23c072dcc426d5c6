"""The conversion summary: tensors and bytes written, and the check that every quantized Linear
holds no more distinct values per row (per group, for grouped scales) than its bit width allows."""
from dataclasses import dataclass, field
from pathlib import Path

from torch import Tensor

from tsld_ds.quant import QuantConfig

_BF16_BYTES = 2


def distinct_limit(cfg: QuantConfig) -> int:
    """Ternary codes take 3 values; b-bit codes 2^b."""
    return 3 if cfg.bits == 2 else 2**cfg.bits


def max_distinct(weight: Tensor, group_size: int | None = None) -> int:
    """Most distinct values in one row of `weight` [out, in] (or in one group of `group_size`
    consecutive columns of a row)."""
    segments = weight.split(group_size, dim=1) if group_size else [weight]
    most = 0
    for segment in segments:
        ordered = segment.sort(dim=1).values
        distinct = (ordered.diff(dim=1) != 0).sum(1) + 1
        most = max(most, int(distinct.max()))
    return most


@dataclass
class Report:
    format: str
    output: Path
    checkpoint: Path
    step: int
    quantization: dict | None
    tensors: int = 0
    quantized_linears: int = 0
    quantized_weight_bytes: int = 0
    quantized_weight_bf16_bytes: int = 0
    max_distinct_values: int = 0
    distinct_limit: int | None = None
    failures: list = field(default_factory=list)

    def add_tensor(self) -> None:
        self.tensors += 1

    def add_quantized(self, name: str, weight: Tensor, cfg: QuantConfig, stored_bytes: int) -> None:
        """A quantized Linear: `weight` [out, in] holds its final values, `stored_bytes` is what
        its weight takes in the output (codes, scales and zero points when packed)."""
        self.quantized_linears += 1
        self.quantized_weight_bytes += stored_bytes
        self.quantized_weight_bf16_bytes += weight.numel() * _BF16_BYTES
        group = cfg.group_size if cfg.granularity == "group" else None
        distinct = max_distinct(weight, group)
        self.distinct_limit = distinct_limit(cfg)
        self.max_distinct_values = max(self.max_distinct_values, distinct)
        if distinct > self.distinct_limit:
            self.failures.append(name)

    @property
    def passed(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict:
        files = [self.output] if self.output.is_file() else sorted(self.output.rglob("*"))
        # Stored size over the same weights' size in bf16: 2.0 for an fp32 hf output, about
        # 0.13 for 2-bit codes with their scales (below 1: smaller than bf16).
        size = (self.quantized_weight_bytes / self.quantized_weight_bf16_bytes
                if self.quantized_weight_bf16_bytes else None)
        group = (self.quantization or {}).get("granularity") == "group"
        return {
            "format": self.format, "output": str(self.output), "checkpoint": str(self.checkpoint),
            "step": self.step, "quantization": self.quantization, "tensors": self.tensors,
            "bytes": sum(f.stat().st_size for f in files if f.is_file()),
            "quantized_linears": self.quantized_linears,
            "quantized_weight_bytes": self.quantized_weight_bytes,
            "quantized_weight_bf16_bytes": self.quantized_weight_bf16_bytes,
            "quantized_weight_size_vs_bf16": None if size is None else round(size, 4),
            "distinct_values": {"per": "group" if group else "row",
                                "max": self.max_distinct_values, "limit": self.distinct_limit,
                                "check": "pass" if self.passed else "fail",
                                "failing": self.failures},
        }

