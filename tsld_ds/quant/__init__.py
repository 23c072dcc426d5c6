"""Weight quantization for QAT: quantizers, QuantLinear and model surgery."""

from .config import QuantConfig
from .linear import QuantLinear
from .quantizers import quantize_weight

__all__ = ["QuantConfig", "QuantLinear", "quantize_weight"]
