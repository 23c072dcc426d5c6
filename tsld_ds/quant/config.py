"""QuantConfig: which weight quantizer to use, validated once at construction."""

from dataclasses import asdict, dataclass

VALID_BITS = (2, 4, 8)
GRANULARITIES = ("channel", "tensor", "group")
# Methods and the bit widths each one supports.
METHOD_BITS = {
    "twn": (2,),  # ternary by construction
    "absmean": (2,),  # ternary by construction
    "pact": VALID_BITS,
    # At 2 bits an asymmetric grid has 4 levels, not the symmetric ternary grid that the packed
    # format and the paper assume, so min-max is refused there.
    "minmax": (4, 8),
}
DEFAULT_METHOD = {2: "twn", 4: "minmax", 8: "minmax"}


@dataclass(frozen=True)
class QuantConfig:
    """Weight quantization settings (activations stay in 16 bits).

    bits: 2 (ternary), 4 or 8. Full precision (16) is not a QuantConfig: the caller skips
        quantization altogether.
    method: "twn" | "absmean" (2 bits), "minmax" (4/8 bits), "pact" (any bits, learned scale).
        None picks the default for `bits`: "twn" for 2, "minmax" for 4 and 8.
    granularity: statistics per output "channel" (row), per "tensor", or per "group" of
        `group_size` consecutive input columns within a row (the last group may be shorter).
    init_scale: initial value of PACT's learned scale γ.
    """

    bits: int = 2
    method: str | None = None
    granularity: str = "channel"
    group_size: int = -1
    init_scale: float = 0.7

    def __post_init__(self):
        if self.bits not in VALID_BITS:
            raise ValueError(
                f"bits must be one of {', '.join(map(str, VALID_BITS))} (16 means no quantization "
                f"and is handled by the caller), got {self.bits}"
            )
        if self.method is None:
            object.__setattr__(self, "method", DEFAULT_METHOD[self.bits])  # frozen dataclass
        if self.method not in METHOD_BITS:
            raise ValueError(f"method must be one of {sorted(METHOD_BITS)}, got {self.method!r}")
        if self.bits not in METHOD_BITS[self.method]:
            raise ValueError(
                f"method {self.method!r} supports bits {METHOD_BITS[self.method]}, "
                f"got bits={self.bits}"
                + ("; for 2 bits use 'twn', 'absmean' or 'pact'" if self.method == "minmax" else "")
            )
        if self.granularity not in GRANULARITIES:
            raise ValueError(
                f"granularity must be one of {GRANULARITIES}, got {self.granularity!r}"
            )
        if self.granularity == "group" and self.group_size <= 0:
            raise ValueError(f"granularity='group' needs group_size > 0, got {self.group_size}")
        if self.granularity != "group" and self.group_size > 0:
            raise ValueError(
                f"group_size={self.group_size} is only meaningful with granularity='group' "
                f"(got granularity={self.granularity!r})"
            )
        if self.method == "pact" and not self.init_scale > 0:
            raise ValueError(f"init_scale must be > 0, got {self.init_scale}")

    def scale_shape(self, out_features: int, in_features: int) -> tuple:
        """Shape of PACT's learned scale γ for a weight [out_features, in_features]."""
        if self.granularity == "tensor":
            return (1, 1)
        if self.granularity == "channel":
            return (out_features, 1)
        return (out_features, -(-in_features // self.group_size))  # ceil: ragged last group

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        return cls(**d)
