"""Quantizers, QuantConfig and QuantLinear against direct restatements of their formulas."""

import weakref

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten
from torch.utils.checkpoint import checkpoint
from transformers.pytorch_utils import Conv1D

from tsld_ds.quant import QuantConfig, QuantLinear, quantize_weight


@pytest.fixture(autouse=True)
def float64_by_default():
    """Tight comparisons; restored afterwards so that other test modules are unaffected."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(previous)


# --- Reference formulas, one block (a 1-D tensor of real elements) at a time -------------------


def ref_twn(b, bits):
    delta = 0.7 * b.abs().mean()
    kept = b.abs() > delta
    alpha = b.abs()[kept].mean() if kept.any() else 0.0
    return torch.where(kept, alpha * torch.sign(b), torch.zeros_like(b))


def ref_absmean(b, bits):
    alpha = b.abs().mean()
    return alpha * torch.clamp(torch.round(b / alpha), -1, 1)


def ref_minmax(b, bits):
    levels = 2**bits - 1
    scale = (b.max() - b.min()) / levels
    zero = torch.round(-b.min() / scale)
    return (torch.clamp(torch.round(b / scale) + zero, 0, levels) - zero) * scale


def ref_pact(b, gamma, bits):
    """PACT written out with torch.where and an explicit STE round, differentiable in b and γ."""
    n = 2 ** (bits - 1) - 1
    c = gamma * b.detach().abs().mean()
    clipped = torch.where(b > c, c, torch.where(b < -c, -c, b))
    x = clipped / c * n
    rounded = x + (torch.round(x) - x).detach()
    return c * rounded / n


REF = {"twn": ref_twn, "absmean": ref_absmean, "minmax": ref_minmax}


def block_slices(shape, cfg):
    """(row slice, column slice, γ index) of every statistics block, by plain enumeration."""
    rows, cols = shape
    if cfg.granularity == "tensor":
        return [(slice(None), slice(None), (0, 0))]
    if cfg.granularity == "channel":
        return [(slice(r, r + 1), slice(None), (r, 0)) for r in range(rows)]
    size = cfg.group_size
    return [
        (slice(r, r + 1), slice(c, c + size), (r, c // size))
        for r in range(rows)
        for c in range(0, cols, size)
    ]


def reference_quantize(w, cfg, scale=None):
    out = torch.zeros_like(w)
    for rows, cols, g in block_slices(w.shape, cfg):
        block = w[rows, cols].reshape(-1)
        if cfg.method == "pact":
            q = ref_pact(block, scale[g], cfg.bits)
        else:
            q = REF[cfg.method](block, cfg.bits)
        out[rows, cols] = q.reshape(w[rows, cols].shape)
    return out


# --- Cases -------------------------------------------------------------------------------------

METHODS = [(2, "twn"), (2, "absmean"), (4, "minmax"), (8, "minmax"), (2, "pact"), (4, "pact")]
GRANULARITIES = [("channel", -1), ("tensor", -1), ("group", 8), ("group", 16)]
SHAPES = [(7, 13), (5, 37), (1, 29), (4, 32)]  # 13, 37, 29 leave a ragged last group


def make_config(bits, method, granularity, group_size):
    return QuantConfig(bits=bits, method=method, granularity=granularity, group_size=group_size)


def random_scale(cfg, shape, generator):
    """A γ away from its initial value, so that per-block γ indexing matters."""
    if cfg.method != "pact":
        return None
    return 0.5 + torch.rand(cfg.scale_shape(*shape), generator=generator)


all_cases = pytest.mark.parametrize(
    "bits,method,granularity,group_size,shape",
    [(*m, *g, s) for m in METHODS for g in GRANULARITIES for s in SHAPES],
)


@all_cases
def test_quantize_weight_matches_formula(bits, method, granularity, group_size, shape):
    cfg = make_config(bits, method, granularity, group_size)
    gen = torch.Generator().manual_seed(0)
    w = torch.randn(shape, generator=gen)
    scale = random_scale(cfg, shape, gen)
    torch.testing.assert_close(quantize_weight(w, cfg, scale), reference_quantize(w, cfg, scale))


@all_cases
def test_levels_per_block(bits, method, granularity, group_size, shape):
    cfg = make_config(bits, method, granularity, group_size)
    gen = torch.Generator().manual_seed(1)
    w = torch.randn(shape, generator=gen)
    wq = quantize_weight(w, cfg, random_scale(cfg, shape, gen))
    # Symmetric grids (ternary, PACT) have 2^(b-1)·2 - 1 levels; min-max has 2^b.
    max_levels = 2**bits if method == "minmax" else 2**bits - 1
    for rows, cols, _ in block_slices(shape, cfg):
        assert len(torch.unique(wq[rows, cols])) <= max_levels


@all_cases
def test_gradients(bits, method, granularity, group_size, shape):
    cfg = make_config(bits, method, granularity, group_size)
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(shape, generator=gen, requires_grad=True)
    grad_out = torch.randn(shape, generator=gen)
    scale = random_scale(cfg, shape, gen)
    if scale is None:  # straight-through: identity to the weight
        (grad_w,) = torch.autograd.grad(quantize_weight(w, cfg), w, grad_out)
        torch.testing.assert_close(grad_w, grad_out)
        return
    scale.requires_grad_()
    grads = torch.autograd.grad(quantize_weight(w, cfg, scale), (w, scale), grad_out)
    ref_grads = torch.autograd.grad(reference_quantize(w, cfg, scale), (w, scale), grad_out)
    torch.testing.assert_close(grads, ref_grads)
    assert grads[1].abs().sum() > 0  # γ does learn


@pytest.mark.parametrize("bits,method", METHODS)
@pytest.mark.parametrize("granularity,group_size", GRANULARITIES)
def test_zero_and_constant_blocks_stay_finite(bits, method, granularity, group_size):
    cfg = make_config(bits, method, granularity, group_size)
    w = torch.randn(3, 32)
    w[0] = 0.0
    w[1] = -0.3
    scale = random_scale(cfg, w.shape, torch.Generator().manual_seed(3))
    wq = quantize_weight(w, cfg, scale)
    assert torch.isfinite(wq).all()
    assert (wq[0] == 0).all()
    if method != "pact" and granularity != "tensor":  # PACT clips a constant row to γ·|w|
        torch.testing.assert_close(wq[1], w[1])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_low_precision_weights_use_float32_statistics(dtype):
    cfg = QuantConfig(bits=4, granularity="group", group_size=16)
    w = torch.randn(6, 40).to(dtype)
    wq = quantize_weight(w, cfg)
    assert wq.dtype == dtype
    torch.testing.assert_close(wq, quantize_weight(w.float(), cfg).to(dtype), rtol=0, atol=0)


def test_scale_must_match_method_and_shape():
    w = torch.randn(4, 8)
    with pytest.raises(ValueError, match="needs scale"):
        quantize_weight(w, QuantConfig(method="pact"))
    with pytest.raises(ValueError, match="takes no scale"):
        quantize_weight(w, QuantConfig(), torch.ones(4, 1))
    with pytest.raises(ValueError, match=r"shape \(4, 1\)"):
        quantize_weight(w, QuantConfig(method="pact"), torch.ones(1, 1))


# --- QuantConfig -------------------------------------------------------------------------------


def test_default_methods():
    assert QuantConfig().method == "twn"
    assert QuantConfig(bits=4).method == "minmax"
    assert QuantConfig(bits=8).method == "minmax"


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(bits=3), "bits must be one of 2, 4, 8"),
        (dict(bits=16), "bits must be one of 2, 4, 8"),
        (dict(bits=4, method="twn"), "'twn' supports bits \\(2,\\)"),
        (dict(bits=4, method="absmean"), "'absmean' supports bits \\(2,\\)"),
        (dict(bits=2, method="minmax"), "for 2 bits use 'twn', 'absmean' or 'pact'"),
        (dict(method="lsq"), "method must be one of"),
        (dict(granularity="row"), "granularity must be one of"),
        (dict(granularity="group"), "granularity='group' needs group_size > 0"),
        (dict(group_size=64), "only meaningful with granularity='group'"),
        (dict(method="pact", init_scale=0.0), "init_scale must be > 0"),
    ],
)
def test_bad_configs_raise(kwargs, message):
    with pytest.raises(ValueError, match=message):
        QuantConfig(**kwargs)


def test_config_dict_round_trip():
    cfg = QuantConfig(bits=4, method="pact", granularity="group", group_size=32, init_scale=0.5)
    assert cfg.to_dict()["method"] == "pact"
    assert QuantConfig.from_dict(cfg.to_dict()) == cfg


# --- QuantLinear -------------------------------------------------------------------------------

IN, OUT = 13, 7
LINEAR_CONFIGS = [
    QuantConfig(bits=2),
    QuantConfig(bits=2, method="absmean", granularity="tensor"),
    QuantConfig(bits=4, granularity="group", group_size=8),
    QuantConfig(bits=2, method="pact"),
    QuantConfig(bits=4, method="pact", granularity="group", group_size=8),
    QuantConfig(bits=2, method="pact", granularity="tensor"),
]


def config_id(cfg):
    group = cfg.group_size if cfg.granularity == "group" else ""
    return f"{cfg.bits}bit-{cfg.method}-{cfg.granularity}{group}"


def make_layer(kind, bias):
    if kind == "linear":
        return nn.Linear(IN, OUT, bias=bias)
    layer = Conv1D(OUT, IN)
    nn.init.normal_(layer.bias)
    if not bias:
        layer.bias = None
    return layer


def make_quant_layer(kind, bias, cfg):
    layer = QuantLinear(make_layer(kind, bias), cfg)
    if layer.scale is not None:
        with torch.no_grad():
            layer.scale.uniform_(0.5, 1.5)
    return layer


@pytest.mark.parametrize("cfg", LINEAR_CONFIGS, ids=config_id)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
@pytest.mark.parametrize("bias", [True, False])
def test_quant_linear_matches_autograd_reference(cfg, kind, bias):
    layer = make_quant_layer(kind, bias, cfg)
    params = [p for p in (layer.weight, layer.bias, layer.scale) if p is not None]
    x = torch.randn(2, 3, IN, requires_grad=True)
    grad_out = torch.randn(2, 3, OUT)

    y = layer(x)
    grads = torch.autograd.grad(y, [x, *params], grad_out)

    weight = layer.weight.t() if kind == "conv1d" else layer.weight
    y_ref = F.linear(x, quantize_weight(weight, cfg, layer.scale), layer.bias)
    ref_grads = torch.autograd.grad(y_ref, [x, *params], grad_out)

    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(grads, ref_grads)


def test_quant_linear_frozen_weight_still_trains_scale_and_input():
    layer = make_quant_layer("linear", True, QuantConfig(method="pact"))
    layer.weight.requires_grad_(False)
    x = torch.randn(4, IN, requires_grad=True)
    layer(x).sum().backward()
    assert layer.weight.grad is None
    assert x.grad is not None and layer.scale.grad is not None and layer.bias.grad is not None


def full_size_tensors_saved(forward, weight):
    """Tensors with as many elements as `weight` that autograd saves for backward, other than
    `weight` itself."""
    saved = []

    def pack(t):
        if t.numel() == weight.numel() and t.data_ptr() != weight.data_ptr():
            saved.append(tuple(t.shape))
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        forward()
    return saved


@pytest.mark.parametrize("cfg", LINEAR_CONFIGS, ids=config_id)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_quant_linear_saves_no_quantized_weight(cfg, kind):
    layer = make_quant_layer(kind, True, cfg)
    x = torch.randn(5, IN, requires_grad=True)
    assert full_size_tensors_saved(lambda: layer(x), layer.weight) == []
    # The detector does see the quantized weight that plain autograd would keep.
    weight = layer.weight.t() if kind == "conv1d" else layer.weight
    plain = lambda: F.linear(x, quantize_weight(weight, cfg, layer.scale), layer.bias)  # noqa: E731
    assert full_size_tensors_saved(plain, layer.weight)


@pytest.mark.parametrize("cfg", LINEAR_CONFIGS, ids=config_id)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_quant_linear_saves_no_alias_of_its_parameters(cfg, kind):
    """Nothing saved for backward shares a parameter's storage: non-reentrant checkpointing keeps
    each saved tensor of the recompute as a detached alias, which would keep ZeRO-3's gathered
    weight alive after ZeRO-3 releases it (by swapping param.data) until the backward."""
    layer = make_quant_layer(kind, True, cfg)
    storages = {p.untyped_storage().data_ptr() for p in layer.parameters()}
    x = torch.randn(5, IN, requires_grad=True)
    saved = layer(x).grad_fn.saved_tensors
    assert saved and not [tuple(t.shape) for t in saved
                          if t is not None and t.untyped_storage().data_ptr() in storages]
    # Checkpointed, backward reads the parameters as they are then (ZeRO-3 has gathered them).
    y = checkpoint(layer, x, use_reentrant=False)
    grads = torch.autograd.grad(y.square().sum(), [x, *layer.parameters()])
    expected = torch.autograd.grad(layer(x).square().sum(), [x, *layer.parameters()])
    torch.testing.assert_close(grads, expected)


class PeakAllocated(TorchDispatchMode):
    """Peak bytes held at once by the storages that the ops run under it allocate: a storage counts
    from the op that creates it until no tensor on it (the op's output or a view of it) is left."""

    def __init__(self):
        super().__init__()
        self.storages = {}   # data pointer -> (bytes, weak references to the tensors on it)
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0]
                  if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or not t.untyped_storage().nbytes():
                continue
            ptr = t.untyped_storage().data_ptr()
            if ptr not in self.storages and ptr not in inputs:
                self.storages[ptr] = (t.untyped_storage().nbytes(), [])
            if ptr in self.storages:
                self.storages[ptr][1].append(weakref.ref(t))
        self.storages = {ptr: entry for ptr, entry in self.storages.items()
                         if any(ref() is not None for ref in entry[1])}
        self.peak = max(self.peak, sum(size for size, _ in self.storages.values()))
        return out


STRAIGHT_THROUGH_CONFIGS = [
    QuantConfig(bits=2), QuantConfig(bits=2, granularity="tensor"),
    QuantConfig(bits=2, granularity="group", group_size=64), QuantConfig(bits=2, method="absmean"),
    QuantConfig(bits=4), QuantConfig(bits=4, granularity="group", group_size=64),
]


@pytest.mark.parametrize("cfg", STRAIGHT_THROUGH_CONFIGS, ids=config_id)
def test_straight_through_quantizers_need_one_weight_sized_buffer(cfg):
    """Besides their result, at most a bool mask and per-block statistics (at 7B width an MLP
    weight is 172 MiB; the first TWN took three more buffers of that size, absmean one)."""
    weight = torch.randn(64, 256)
    with PeakAllocated() as allocated:
        quantize_weight(weight, cfg)
    assert allocated.peak <= 1.3 * weight.nbytes


@pytest.mark.parametrize("cfg", STRAIGHT_THROUGH_CONFIGS, ids=config_id)
@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_quant_linear_backward_holds_one_weight_sized_buffer_at_a_time(cfg, kind):
    """Q(W) for the input's gradient, then W's gradient (in W's own layout, so that autograd takes
    it without a copy); never both, and no copy of either."""
    layer = QuantLinear(nn.Linear(256, 64, bias=False) if kind == "linear" else Conv1D(64, 256),
                        cfg)
    x = torch.randn(5, 256, requires_grad=True)
    loss = layer(x).square().sum()
    with PeakAllocated() as allocated:
        loss.backward()
    assert layer.weight.grad.shape == layer.weight.shape
    # Per tensor, Conv1D's transposed weight is first flattened into one block: a copy.
    buffers = 2 if kind == "conv1d" and cfg.granularity == "tensor" else 1
    assert allocated.peak <= (buffers + 0.3) * layer.weight.nbytes + x.nbytes


def test_quant_linear_keeps_parameters_and_reads_no_weight_data():
    linear = nn.Linear(IN, OUT)
    # As under deepspeed.zero.Init: the local weight is an empty shard.
    linear.weight.data = torch.empty(0)
    layer = QuantLinear(linear,
                        QuantConfig(bits=2, method="pact", granularity="group", group_size=8))
    assert layer.weight is linear.weight and layer.bias is linear.bias
    assert (layer.in_features, layer.out_features) == (IN, OUT)
    assert layer.scale.shape == (OUT, 2)
    assert (layer.scale == 0.7).all()

    conv = Conv1D(OUT, IN)
    conv.weight.data = torch.empty(0)
    layer = QuantLinear(conv, QuantConfig(method="pact"))
    assert layer.transposed and (layer.in_features, layer.out_features) == (IN, OUT)
    assert layer.scale.shape == (OUT, 1)


def test_quantized_weight_is_per_output_channel_for_conv1d():
    conv = Conv1D(OUT, IN)
    layer = QuantLinear(conv, QuantConfig())
    wq = layer.quantized_weight()
    assert wq.shape == (OUT, IN)
    torch.testing.assert_close(wq, reference_quantize(conv.weight.t(), QuantConfig()))


def test_extra_repr_shows_quantization():
    layer = QuantLinear(nn.Linear(IN, OUT), QuantConfig(bits=4, granularity="group", group_size=8))
    text = repr(layer)
    for part in ("bits=4", "method=minmax", "granularity=group", "group_size=8", "in_features=13"):
        assert part in text
