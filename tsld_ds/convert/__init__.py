"""Checkpoint conversion: a training run -> Hugging Face fake-quant, packed or GGUF."""
from tsld_ds.convert.packed import load_packed

__all__ = ["load_packed"]
