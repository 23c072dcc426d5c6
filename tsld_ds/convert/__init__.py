"""Checkpoint conversion: a training run -> Hugging Face fake-quant, packed or GGUF
(`launch/convert.py`). The fake-quant weights are `tsld_ds.quant.fake_quant`'s, which the live
run's final export writes too."""
