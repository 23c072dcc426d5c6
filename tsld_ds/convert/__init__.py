"""Checkpoint conversion: a training run -> Hugging Face fake-quant, packed or GGUF
(`launch/convert.py`); `fake_quant` also writes the live run's final export."""
