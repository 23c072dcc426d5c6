"""GGUF for llama.cpp (docs/method.md §5.3): quantized Linears as TQ2_0 (ternary) or Q4_1
(4-bit), embeddings and output head F16, norms F32, hyper-parameters and the SentencePiece-style
vocabulary in the metadata.

Each llama.cpp type holds one of the QAT grids exactly, up to the fp16 rounding of its constants;
anything else is refused before a weight is read:
- TQ2_0 keeps one fp16 scale per block of 256 weights along a row and codes trit + 1, so a
  ternary weight with one alpha per row (or per tensor, or per group of a multiple of 256
  columns) is stored exactly.
- Q4_1 keeps, per block of 32 weights, an fp16 step d and an fp16 minimum m with x = d * c + m,
  c in [0, 15]: asymmetric min-max 4-bit weights in groups of 32 (step = scale, minimum =
  -zero * scale).
"""
import json
from collections.abc import Iterable
from pathlib import Path

import gguf
import torch

from tsld_ds.convert import packed
from tsld_ds.convert.outputs import GGUF_MARK
from tsld_ds.convert.packed import grid_levels
from tsld_ds.convert.report import Report
from tsld_ds.data import bos_eos_added, special_tokens_added
from tsld_ds.errors import UsageError
from tsld_ds.quant import QuantConfig, quantized_modules

TQ2_0 = gguf.GGMLQuantizationType.TQ2_0
TQ2_0_BLOCK = gguf.GGML_QUANT_SIZES[TQ2_0][0]
Q4_1 = gguf.GGMLQuantizationType.Q4_1
Q4_1_BLOCK = gguf.GGML_QUANT_SIZES[Q4_1][0]
ARCHITECTURES = {"llama": gguf.MODEL_ARCH.LLAMA}
# The llama.cpp type, its block and the file type for each supported --bits.
TYPES = {2: (TQ2_0, TQ2_0_BLOCK, gguf.LlamaFileType.MOSTLY_TQ2_0),
         4: (Q4_1, Q4_1_BLOCK, gguf.LlamaFileType.MOSTLY_Q4_1)}


def check_supported(model, cfg: QuantConfig | None, tokenizer,
                    compute_dtype: torch.dtype = torch.float32) -> None:
    """Refuse, before any weight is read, what TQ2_0, Q4_1 or llama.cpp cannot hold exactly.
    `compute_dtype`: the dtype the run's quantizers computed in. Each refusal names the formats
    that take the run instead: hf always, packed where it holds the run."""
    instead = "use --format packed or hf" if packed.holds(cfg, compute_dtype) \
        else "use --format hf"
    model_type = model.config.model_type
    if model_type not in ARCHITECTURES:
        raise UsageError(f"--format gguf supports LLaMA-architecture models; this run's model is "
                         f"'{model_type}' ({instead})")
    if cfg is None or cfg.bits not in TYPES:
        raise UsageError("--format gguf writes ternary (--bits 2) weights as TQ2_0 and 4-bit "
                         "min-max weights in groups of 32 as Q4_1; this run has "
                         f"{'no quantized weights' if cfg is None else f'{cfg.bits}-bit weights'} "
                         f"({instead})")
    if cfg.bits == 2 and cfg.granularity == "group" and cfg.group_size % TQ2_0_BLOCK:
        raise UsageError(f"TQ2_0 has one scale per {TQ2_0_BLOCK} weights of a row; per-group "
                         f"scales of {cfg.group_size} columns do not fit ({instead})")
    if cfg.bits == 4 and (cfg.method != "minmax" or cfg.granularity != "group"
                          or cfg.group_size != Q4_1_BLOCK):
        raise UsageError(f"Q4_1 has one step and one minimum per {Q4_1_BLOCK} weights of a row: "
                         f"it holds --quant_method minmax --granularity group --group_size "
                         f"{Q4_1_BLOCK} exactly; this run has --quant_method {cfg.method} "
                         f"--granularity {cfg.granularity}"
                         + (f" --group_size {cfg.group_size}" if cfg.granularity == "group" else "")
                         + f" ({instead})")
    if cfg.bits == 4 and compute_dtype != torch.float32:
        raise UsageError(f"Q4_1 holds min-max weights on an exact grid; this run computed them in "
                         f"{str(compute_dtype).removeprefix('torch.')}, which rounds them off it "
                         "(use --format hf, or train in fp32)")
    type_name, block = TYPES[cfg.bits][0].name, TYPES[cfg.bits][1]
    short = [(name, m.in_features) for name, m in quantized_modules(model)
             if m.in_features % block]
    if short:
        raise UsageError(f"{type_name} stores rows in blocks of {block} weights; {len(short)} "
                         f"quantized Linears have rows of another length (e.g. {short[0][0]}: "
                         f"{short[0][1]}) ({instead})")
    rope = getattr(model.config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise UsageError(f"--format gguf writes plain RoPE; this model uses "
                         f"'{rope['rope_type']}' rope scaling ({instead})")
    backend = json.loads(tokenizer.backend_tokenizer.to_str())["model"]
    if backend["type"] != "BPE" or not backend.get("byte_fallback"):
        raise UsageError("--format gguf writes SentencePiece-style vocabularies (BPE with byte "
                         "fallback, as LLaMA's); this tokenizer is not one")
    added_bos_eos(tokenizer)


def rope_rows_to_ggml(weight: torch.Tensor, heads: int) -> torch.Tensor:
    """Reorder q/k projection rows from Hugging Face's rotary layout (each head's first half
    rotates with its second half) to GGML's (adjacent pairs rotate together)."""
    rows = weight.shape[0]
    return weight.reshape(heads, 2, rows // heads // 2, -1).transpose(1, 2).reshape(weight.shape)


def q4_1_blocks(weight: torch.Tensor) -> torch.Tensor:
    """A min-max 4-bit weight [rows, cols] (groups of 32) as Q4_1 blocks: uint8 [rows, cols / 32
    * 20], each block d (fp16), m (fp16), then 16 bytes holding code j in the low nibble of byte
    j and code j + 16 in its high nibble. Codes count grid steps up from the block's minimum, so
    a group whose values share one sign (its zero point outside 4 bits) is held too."""
    rows, cols = weight.shape
    step, levels = grid_levels(weight.float().reshape(-1, Q4_1_BLOCK), 4, symmetric_grid=False)
    lowest = levels.amin(1, keepdim=True)
    codes = (levels - lowest).to(torch.uint8).reshape(-1, 2, Q4_1_BLOCK // 2)
    nibbles = codes[:, 0] | (codes[:, 1] << 4)
    constants = torch.cat([step, lowest * step], 1).to(torch.float16).view(torch.uint8)
    return torch.cat([constants, nibbles], 1).reshape(rows, cols // Q4_1_BLOCK * 20)


def _quantized_blocks(data: torch.Tensor, cfg: QuantConfig):
    """(llama.cpp blocks as numpy uint8, llama.cpp type) of one fake-quant weight."""
    if cfg.bits == 2:  # gguf's own TQ2_0 quantizer reproduces alpha * trit exactly
        return gguf.quants.quantize(data.numpy(), TQ2_0), TQ2_0
    return q4_1_blocks(data).numpy(), Q4_1


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


def _add_vocabulary(writer: gguf.GGUFWriter, tokenizer, vocab_size: int) -> None:
    """llama.cpp's SentencePiece vocabulary: pieces with their '▁', byte tokens, control tokens,
    and scores that rank merges. SentencePiece numbers its BPE pieces in merge order, so -id is
    their score; rows of the embedding past the tokenizer's vocabulary become unused pads.

    llama.cpp then tokenizes a text as training tokenized a document: a leading '▁' only where
    the tokenizer prepends one (`add_space_prefix`), and a BOS before it or an EOS after it only
    where the tokenizer adds one by default (the built-in one adds neither: its documents are
    separated by EOS in training's blocks; LLaMA's adds the BOS)."""
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
    writer.add_add_space_prefix(prepends_space(tokenizer))
    add_bos, add_eos = added_bos_eos(tokenizer)
    writer.add_add_bos_token(add_bos)
    writer.add_add_eos_token(add_eos)


def added_bos_eos(tokenizer) -> tuple[bool, bool]:
    """(adds a BOS before a text, adds an EOS after it) by default: llama.cpp's two keys for what
    a tokenizer adds. One that adds anything else is refused."""
    added = bos_eos_added(tokenizer)
    if added is None:
        before, after = special_tokens_added(tokenizer)
        raise UsageError(f"--format gguf: llama.cpp adds at most a BOS before a text and an EOS "
                         f"after it; this tokenizer adds {before} before and {after} after by "
                         "default (use --format hf)")
    return added


def prepends_space(tokenizer) -> bool:
    """Whether the tokenizer reads a text's first word as if a space preceded it (SentencePiece's
    `add_dummy_prefix`; a Metaspace with prepend_scheme 'first'/'always', or a Prepend
    normalizer, in `tokenizers`)."""
    pieces = tokenizer.convert_ids_to_tokens(tokenizer.encode("a", add_special_tokens=False))
    return pieces[0].startswith("▁") or pieces[0] == "<0x20>"


def write_gguf(model, tensors: Iterable, tokenizer, cfg: QuantConfig, out_file: Path,
               report: Report) -> None:
    config = model.config
    arch = ARCHITECTURES[config.model_type]
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    out_file.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(str(out_file), gguf.MODEL_ARCH_NAMES[arch])
    writer.add_name(Path(getattr(config, "_name_or_path", "") or out_file.stem).name)
    writer.add_uint64(GGUF_MARK, report.step)  # what --overwrite may replace
    _add_hyperparameters(writer, config)
    writer.add_file_type(TYPES[cfg.bits][2])
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
            blocks, quant_type = _quantized_blocks(data, module.cfg)
            writer.add_tensor(gguf_name, blocks, raw_dtype=quant_type)
            stored = torch.from_numpy(gguf.quants.dequantize(blocks, quant_type))
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

