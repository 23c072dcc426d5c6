"""quantize_model on tiny GPT-2, OPT, GPT-Neo and LLaMA models built from configs."""

import copy

import pytest
import torch
from torch import nn
from transformers import (
    GPT2Config,
    GPT2LMHeadModel,
    GPTNeoConfig,
    GPTNeoForCausalLM,
    LlamaConfig,
    LlamaForCausalLM,
    OPTConfig,
    OPTForCausalLM,
)
from transformers.pytorch_utils import Conv1D

from tsld_ds.quant import (
    QuantConfig,
    QuantLinear,
    quantize_model,
    quantize_weight,
    quantized_modules,
)

VOCAB = 97


def tiny_gpt2():
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    return GPT2LMHeadModel(cfg), "transformer.h"


def tiny_opt():
    # word_embed_proj_dim != hidden_size adds project_in / project_out, which stay full precision.
    cfg = OPTConfig(
        vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=64, word_embed_proj_dim=16,
    )
    return OPTForCausalLM(cfg), "model.decoder.layers"


def tiny_gpt_neo():
    cfg = GPTNeoConfig(
        vocab_size=VOCAB, hidden_size=32, num_layers=2, num_heads=4, max_position_embeddings=64,
        attention_types=[[["global", "local"], 1]], window_size=8,
    )
    return GPTNeoForCausalLM(cfg), "transformer.h"


def tiny_llama():
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
    )
    return LlamaForCausalLM(cfg), "model.layers"


MODELS = [tiny_gpt2, tiny_opt, tiny_gpt_neo, tiny_llama]
CONFIGS = [
    QuantConfig(bits=2),
    QuantConfig(bits=4, granularity="group", group_size=16),
    QuantConfig(bits=2, method="pact"),
]


def build(factory):
    torch.manual_seed(0)
    model, blocks = factory()
    return model.double().eval(), blocks


def block_linears(model, blocks):
    """Qualified names of the Linear / Conv1D modules of the decoder-layer ModuleList."""
    layers = model.get_submodule(blocks)
    return {
        f"{blocks}.{name}"
        for name, m in layers.named_modules()
        if isinstance(m, (nn.Linear, Conv1D))
    }


@pytest.mark.parametrize("factory", MODELS)
def test_swaps_exactly_the_block_linears(factory):
    model, blocks = build(factory)
    expected = block_linears(model, blocks)
    params_before = {name: id(p) for name, p in model.named_parameters()}

    quantize_model(model, QuantConfig())

    assert {name for name, _ in quantized_modules(model)} == expected
    assert len(expected) >= 8  # at least 4 per block: attention and MLP
    assert not isinstance(model.get_output_embeddings(), QuantLinear)
    assert all(not isinstance(m, QuantLinear) for m in model.get_input_embeddings().modules())
    if factory is tiny_opt:
        assert isinstance(model.model.decoder.project_in, nn.Linear)
        assert isinstance(model.model.decoder.project_out, nn.Linear)
    # Same names, same Parameter objects.
    assert {name: id(p) for name, p in model.named_parameters()} == params_before


@pytest.mark.parametrize("factory", MODELS)
@pytest.mark.parametrize("cfg", CONFIGS, ids=lambda c: f"{c.bits}bit-{c.method}-{c.granularity}")
def test_output_equals_manual_fake_quant_model(factory, cfg):
    model, blocks = build(factory)
    reference = copy.deepcopy(model)
    with torch.no_grad():
        for name in block_linears(reference, blocks):
            m = reference.get_submodule(name)
            transposed = isinstance(m, Conv1D)
            w = m.weight.t() if transposed else m.weight
            gamma = None
            if cfg.method == "pact":
                gamma = torch.full(cfg.scale_shape(*w.shape), cfg.init_scale, dtype=w.dtype)
            wq = quantize_weight(w, cfg, gamma)
            m.weight.copy_(wq.t() if transposed else wq)

    quantize_model(model, cfg)
    ids = torch.randint(0, VOCAB, (2, 11), generator=torch.Generator().manual_seed(0))
    logits = model(ids).logits
    torch.testing.assert_close(logits, reference(ids).logits)
    # Quantization changed something: the comparison is not plain model vs plain model.
    assert not torch.allclose(logits, build(factory)[0](ids).logits)

    logits.sum().backward()
    for name, m in quantized_modules(model):
        assert m.weight.grad is not None, name
        assert m.scale is None or m.scale.grad is not None, name


def test_records_config_on_model_config():
    model, _ = build(tiny_llama)
    cfg = QuantConfig(bits=4, method="pact", granularity="group", group_size=16)
    quantize_model(model, cfg)
    assert QuantConfig.from_dict(model.config.tsld_quantization) == cfg
    assert '"tsld_quantization"' in model.config.to_json_string()


def test_skip_matches_whole_name_components():
    model, blocks = build(tiny_llama)
    not_mlp = {n for n in block_linears(model, blocks) if ".mlp." not in n}
    quantize_model(model, QuantConfig(), skip=("lm_head", "mlp", "self_attn.q"))
    names = {name for name, _ in quantized_modules(model)}
    assert names == not_mlp
    assert "model.layers.0.self_attn.q_proj" in names  # "self_attn.q" is not "self_attn.q_proj"


def test_model_without_blocks_is_refused():
    class NoBlocks(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 4)

    with pytest.raises(ValueError, match="no nn.Linear or Conv1D inside transformer blocks"):
        quantize_model(NoBlocks(), QuantConfig())
