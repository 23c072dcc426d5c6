"""tsld-ds: ternary / 4-bit quantization-aware training with token-scaled logit distillation."""

__version__ = "0.1.0"
