"""Weight quantization for QAT: quantizers, QuantLinear, model surgery, and the trained
student's fake-quant weights (`fake_quant`)."""

from .config import QuantConfig
from .linear import QuantLinear
from .quantizers import quantize_weight
from .surgery import in_features, quantization_targets, quantize_model, quantized_modules

__all__ = ["QuantConfig", "QuantLinear", "quantize_weight", "quantize_model", "quantized_modules",
           "quantization_targets", "in_features"]
