"""tsld-ds: ternary / 4-bit quantization-aware training with token-scaled logit distillation."""

__version__ = "0.1.0"


def load_packed(path, device=None, dtype=None):
    """A `--format packed` directory as a ready causal LM (see tsld_ds.packed.load)."""
    from tsld_ds.packed.load import load_packed as load

    return load(path, device=device, dtype=dtype)


def kernels_info() -> dict:
    """Which implementation the custom ops run here (Triton kernels or PyTorch references), and
    why."""
    from tsld_ds.ops import kernels_info as info

    return info()
