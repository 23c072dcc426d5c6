"""Reading packed codes and scales off fake-quantized weights (tsld_ds.convert.packed), for every
quantizer, granularity and bit width QAT trains."""
import dataclasses

import pytest
import torch

from tsld_ds.convert.packed import pack_fake_quant
from tsld_ds.convert.report import max_distinct
from tsld_ds.quant import QuantConfig, quantize_weight

CASES = [
    QuantConfig(bits=2, method="twn"),
    QuantConfig(bits=2, method="twn", granularity="tensor"),
    QuantConfig(bits=2, method="twn", granularity="group", group_size=64),
    QuantConfig(bits=2, method="absmean"),
    QuantConfig(bits=2, method="pact"),
    QuantConfig(bits=4, method="pact", granularity="group", group_size=32),
    QuantConfig(bits=4, method="minmax"),
    QuantConfig(bits=4, method="minmax", granularity="group", group_size=128),
    QuantConfig(bits=8, method="minmax", granularity="group", group_size=64),
]


@pytest.mark.parametrize("cfg", CASES, ids=lambda c: f"{c.method}{c.bits}-{c.granularity}")
@pytest.mark.parametrize("shape", [(48, 256), (7, 200)])  # 200: a ragged last group
def test_packed_codes_dequantize_to_the_fake_quant_weight(cfg, shape):
    torch.manual_seed(shape[1])
    weight = torch.randn(shape) * 0.02
    scale = None
    if cfg.method == "pact":
        scale = torch.rand(cfg.scale_shape(*shape)) + 0.5  # some segments clip nothing
    fake = quantize_weight(weight, cfg, scale)
    packed = pack_fake_quant(fake, cfg)
    assert packed.bits == cfg.bits and packed.symmetric == (cfg.method != "minmax")
    if cfg.bits == 2:
        assert torch.equal(packed.dequantize(), fake)  # ternary codes are exact
        assert set(packed.codes().unique().tolist()) <= {-1, 0, 1}
    else:
        torch.testing.assert_close(packed.dequantize(), fake, rtol=0, atol=1e-5 * fake.abs().max())
    group = cfg.group_size if cfg.granularity == "group" else None
    assert max_distinct(packed.dequantize(), group) <= (3 if cfg.bits == 2 else 2**cfg.bits)


def test_all_zero_rows_pack_to_zero():
    fake = quantize_weight(torch.zeros(4, 64), QuantConfig(bits=2))
    assert torch.equal(pack_fake_quant(fake, QuantConfig(bits=2)).dequantize(), fake)


def test_4bit_group_packing_is_3_5x_smaller_than_bf16():
    cfg = QuantConfig(bits=4, method="minmax", granularity="group", group_size=128)
    fake = quantize_weight(torch.randn(256, 1024), cfg)
    packed = pack_fake_quant(fake, cfg)
    packed = dataclasses.replace(packed, weight_scale=packed.weight_scale.bfloat16())
    assert fake.numel() * 2 / packed.nbytes() >= 3.5


def test_max_distinct_counts_per_row_and_group():
    w = torch.tensor([[0.0, 1.0, 1.0, 2.0], [3.0, 3.0, 3.0, 3.0]])
    assert max_distinct(w) == 3
    assert max_distinct(w, group_size=2) == 2
