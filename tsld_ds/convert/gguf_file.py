"""GGUF for llama.cpp (docs/method.md §5.3): ternary Linears as TQ2_0, embeddings and output head F16,
norms F32, hyper-parameters and the SentencePiece-style vocabulary in the metadata.

TQ2_0 keeps one fp16 scale per block of 256 weights along a row and codes trit + 1, so a
ternary weight with one alpha per row (or per tensor, or per group of a multiple of 256 columns)
is stored exactly, up to the fp16 rounding of alpha; anything else is refused.
"""
import json
from pathlib import Path
from typing import Iterable, Optional

import gguf
import torch

from tsld_ds.convert.report import Report
from tsld_ds.errors import UsageError
from tsld_ds.quant import QuantConfig, quantized_modules

TQ2_0 = gguf.GGMLQuantizationType.TQ2_0
TQ2_0_BLOCK = gguf.GGML_QUANT_SIZES[TQ2_0][0]
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA}


def check_supported(model, cfg: Optional[QuantConfig], tokenizer) -> None:
    """Refuse, before any weight is read, what TQ2_0 or llama.cpp cannot hold exactly."""
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise UsageError(f"--format gguf supports LLaMA-architecture models; this run's model is "
                         f"'{model_type}' (use --format hf or packed)")
    if cfg is None or cfg.bits != 2:
        raise UsageError("--format gguf writes ternary (--bits 2) weights as TQ2_0; this run has "
                         f"{'no quantized weights' if cfg is None else f'{cfg.bits}-bit weights'} "
                         "(use --format packed)")
    if cfg.granularity == "group" and cfg.group_size % TQ2_0_BLOCK:
        raise UsageError(f"TQ2_0 has one scale per {TQ2_0_BLOCK} weights of a row; per-group "
                         f"scales of {cfg.group_size} columns do not fit (use --format packed)")
    short = [(name, m.in_features) for name, m in quantized_modules(model)
             if m.in_features % TQ2_0_BLOCK]
    if short:
        raise UsageError(f"TQ2_0 stores rows in blocks of {TQ2_0_BLOCK} weights; {len(short)} "
                         f"quantized Linears have rows of another length (e.g. {short[0][0]}: "
                         f"{short[0][1]}) (use --format packed)")
    rope = getattr(model.config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UsageError(f"--format gguf writes plain RoPE; this model uses "
                         f"'{rope['rope_type']}' rope scaling")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if backend["type"] != "BPE" or not backend.get("byte_fallback"):
        raise UsageError("--format gguf writes SentencePiece-style vocabularies (BPE with byte "
                         "fallback, as LLaMA's); this tokenizer is not one")


def rope_rows_to_ggml(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Hugging Face's rotary layout (each head's first half
    rotates with its second half) to GGML's (adjacent pairs rotate together)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def _add_hyperparameters(writer: gguf.GGUFWriter, config) -> None:
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0)))
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_TQ2_0)


def _add_vocabulary(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """llama.cpp's SentencePiece vocabulary: pieces with their '▁', byte tokens, control tokens,
    and scores that rank merges. SentencePiece numbers its BPE pieces in merge order, so -id is
    their score; rows of the embedding past the tokenizer's vocabulary become unused pads."""
    pieces = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
    special = set(tokenizer.all_special_ids)
    tokens, scores, types = [], [], []
    for token_id in range(vocab_size):
        piece = pieces[token_id] if token_id < len(pieces) else f"[PAD{token_id}]"
        if token_id >= len(pieces):
            kind = gguf.TokenType.UNUSED
        elif token_id == tokenizer.unk_token_id:
            kind = gguf.TokenType.UNKNOWN
        elif token_id in special:
            kind = gguf.TokenType.CONTROL
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            kind = gguf.TokenType.BYTE
        else:
            kind = gguf.TokenType.NORMAL
        tokens.append(piece.encode("utf-8"))
        scores.append(-float(token_id) if kind == gguf.TokenType.NORMAL else 0.0)
        types.append(kind)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    for name in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tokenizer, f"{name}_token_id")
        if token_id is not None:
            getattr(writer, f"add_{name}_token_id")(token_id)
    writer.add_add_bos_token(bool(getattr(tokenizer, "add_bos_token", False)))


def write_gguf(model, tensors: Iterable, tokenizer, out_file: Path, report: Report) -> None:
    config = model.config
    arch = ARCHITECTURES[config.model_type]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(Path(getattr(config, "_name_or_path", "") or out_file.stem).name)
    _add_hyperparameters(writer, config)
    _add_vocabulary(writer, tokenizer, config.vocab_size)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, tensor, module in tensors:
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd
        gguf_name = names.get_name(name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise UsageError(f"tensor '{name}' has no GGUF name in llama.cpp's LLaMA layout")
        data = tensor.float()
        projection = name.rsplit(".", 2)[-2]
        if projection in heads:
            data = rope_rows_to_ggml(data, heads[projection])
        if module is not None:
            blocks = gguf.quants.quantize(data.numpy(), TQ2_0)
            writer.add_tensor(gguf_name, blocks, raw_dtype=TQ2_0)
            stored = torch.from_numpy(gguf.quants.dequantize(blocks, TQ2_0))
            report.add_quantized(name, stored, module.cfg, blocks.nbytes)
        elif data.dim() == 1:
            writer.add_tensor(gguf_name, data.numpy())  # norms: F32
        else:
            writer.add_tensor(gguf_name, data.to(torch.float16).numpy())
        report.add_tensor()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

