"""The packed format: compressed-tensors "pack-quantized" integer weights (`format`), the Linear
modules that compute with them at inference (`linear`), and loading a packed directory as a
causal LM (`load`). Import from the submodules: `tsld_ds.ops` (the kernels' references) reads the
format, and `linear` runs those kernels."""
