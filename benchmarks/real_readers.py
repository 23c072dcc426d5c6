"""A run's outputs as third-party tools read them: the figures behind tests/convert's checks.

Converts a training run to hf, packed and gguf (into --out), then reads each back with the tools
users load them with, never with tsld-ds's own reader:
- gguf: llama.cpp's `gguf` package (GGUFReader, gguf.quants.dequantize) against the hf weights
  (q/k rows in GGML's rotary order); the largest error of each llama.cpp type, also relative to
  the largest weight of its tensor;
- the GGUF's tokenizer as transformers rebuilds it from the file's keys (with the file's
  add_space_prefix applied, which transformers' builder ignores) on the first 200 validation
  lines of the built-in corpus, against the ids training gives them; and with llama.cpp's
  default space prefix instead;
- the GGUF in llama.cpp itself (cyllama's prebuilt bindings, b9190): its own tokenization and
  every position's logits over the first 512 tokens of the validation text, against the hf
  output's (largest difference, argmax agreement, perplexity of both);
- packed: stock transformers + compressed-tensors in a fresh interpreter (4-bit with
  CompressedTensorsConfig(dequantize=True), see README), logits on validation text against the
  hf output's;
- each config.json's dtype against the dtypes of its stored tensors.

Usage: python benchmarks/real_readers.py --run runs/default [--out runs/default-readers]
Prints one JSON report.
"""
import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

import torch

# Run in a fresh interpreter: stock transformers + compressed-tensors, tsld_ds never imported.
STOCK_LOGITS = """
import sys, torch
from transformers import AutoModelForCausalLM, CompressedTensorsConfig
path, ids_file, out, dequantize = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
options = {"quantization_config": CompressedTensorsConfig(dequantize=True)} if dequantize else {}
model = AutoModelForCausalLM.from_pretrained(path, **options).eval()
with torch.no_grad():
    logits = model(torch.load(ids_file)).logits
torch.save({"logits": logits, "tsld_ds_imported": "tsld_ds" in sys.modules}, out)
"""


def stock_logits(packed_dir: Path, ids: torch.Tensor, workdir: Path, *, dequantize: bool) -> dict:
    """{"logits", "tsld_ds_imported"} of `packed_dir` loaded by stock transformers and
    compressed-tensors in a fresh interpreter. `dequantize`: compressed-tensors 0.20's load-time
    path leaves asymmetric zero points packed (an upstream defect: its own compressor writes what
    tsld-ds writes), so asymmetric 4-bit loads dequantized."""
    torch.save(ids, workdir / "ids.pt")
    subprocess.run([sys.executable, "-c", STOCK_LOGITS, str(packed_dir), str(workdir / "ids.pt"),
                    str(workdir / "logits.pt"), "1" if dequantize else "0"], check=True,
                   capture_output=True, env={**os.environ, "HF_HUB_OFFLINE": "1"})
    return torch.load(workdir / "logits.pt")


def dequantized_gguf(gguf_path: Path, hf):
    """(hf name, llama.cpp type, values read by `gguf`, hf weight in GGML's layout) for each
    tensor of the GGUF, after checking the file's architecture and vocabulary size."""
    import gguf

    from tsld_ds.convert.gguf_file import rope_rows_to_ggml

    config = hf.config
    reader = gguf.GGUFReader(gguf_path)
    assert bytes(reader.fields["general.architecture"].parts[-1]).decode() == "llama"
    assert len(reader.fields["tokenizer.ggml.tokens"].data) == config.vocab_size
    tensors = {t.name: t for t in reader.tensors}
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, config.num_hidden_layers)
    heads = {"q_proj": config.num_attention_heads, "k_proj": config.num_key_value_heads}
    for name, weight in hf.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue  # llama.cpp reuses token_embd
        tensor = tensors[names.get_name(name, try_suffixes=(".weight",))]
        values = torch.from_numpy(gguf.quants.dequantize(tensor.data, tensor.tensor_type).copy())
        expected = weight.float()
        projection = name.rsplit(".", 2)[-2]
        if projection in heads:  # q/k rows as llama.cpp's converter permutes them
            expected = rope_rows_to_ggml(expected, heads[projection])
        yield name, tensor.tensor_type, values, expected


def gguf_against_hf(gguf_path: Path, hf) -> dict:
    errors = {}
    for _, kind, values, expected in dequantized_gguf(gguf_path, hf):
        error = (values - expected).abs().max().item()
        summary = errors.setdefault(kind.name, {"tensors": 0, "max_abs_error": 0.0,
                                                "max_error_relative": 0.0})
        summary["tensors"] += 1
        summary["max_abs_error"] = max(summary["max_abs_error"], error)
        summary["max_error_relative"] = max(summary["max_error_relative"],
                                            error / expected.abs().max().item())
    return errors


def gguf_tokenizer_matches(gguf_path: Path, tokenizer, lines) -> dict:
    import gguf
    from tokenizers.pre_tokenizers import Metaspace
    from transformers import AutoTokenizer

    fields = gguf.GGUFReader(gguf_path).fields
    keys = {key: bool(fields[f"tokenizer.ggml.{key}"].parts[-1][0])
            for key in ("add_space_prefix", "add_bos_token", "add_eos_token")}
    rebuilt = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ours = tokenizer(lines)["input_ids"]  # training's: the tokenizer's defaults
    report = {"keys": keys, "lines": len(lines)}
    for label, prefix in (("matching_lines", keys["add_space_prefix"]),
                          ("matching_lines_with_llama_cpp_default_prefix", True)):
        rebuilt.backend_tokenizer.pre_tokenizer = Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False)
        report[label] = sum(rebuilt(line)["input_ids"] == ids for line, ids in zip(lines, ours))
    return report


def llama_cpp_logits(gguf_path: Path, text: str, max_tokens: int):
    """(ids, logits [len(ids), vocab] as numpy) of the first `max_tokens` tokens of `text`, as
    llama.cpp itself tokenizes it (with the BOS/EOS its GGUF keys ask for) and runs it in one
    batch on the CPU, every position's logits kept. Through cyllama's bindings of llama.cpp (a
    prebuilt wheel on PyPI)."""
    import numpy as np
    from cyllama.llama import llama_cpp

    class Model(llama_cpp.LlamaModel):
        # cyllama 0.2.18's LlamaContext.get_logits* read `model.n_vocab`, which its LlamaModel
        # does not have (docs/dependencies.md).
        @property
        def n_vocab(self):
            return self.get_vocab().n_vocab

    llama_cpp.disable_logging()
    llama_cpp.ggml_backend_load_all()
    model_params = llama_cpp.LlamaModelParams()
    model_params.n_gpu_layers = 0
    model = Model(str(gguf_path), model_params)
    ids = model.get_vocab().tokenize(text, add_special=True, parse_special=False)[:max_tokens]
    context_params = llama_cpp.LlamaContextParams()
    context_params.n_ctx = context_params.n_batch = context_params.n_ubatch = len(ids)
    context_params.n_threads = context_params.n_threads_batch = 1
    context = llama_cpp.LlamaContext(model, context_params)
    batch = llama_cpp.LlamaBatch(n_tokens=len(ids), embd=0, n_seq_max=1)
    for position, token in enumerate(ids):
        batch.add(token, position, [0], True)
    context.decode(batch)
    logits = np.array([context.get_logits_ith(i) for i in range(len(ids))], dtype=np.float32)
    return list(ids), logits


def llama_cpp_against_hf(gguf_path: Path, hf, tokenizer, text: str, max_tokens: int) -> dict:
    """llama.cpp's per-position logits of `text` against the hf output's on the same ids, with
    llama.cpp's ids against the ones training gives the text (its tokenizer's defaults)."""
    import numpy as np

    ids, theirs = llama_cpp_logits(gguf_path, text, max_tokens)
    ours = tokenizer(text)["input_ids"][:max_tokens]
    with torch.no_grad():
        reference = hf(torch.tensor([ids])).logits[0].float().numpy()

    def perplexity(logits):
        logprobs = torch.from_numpy(logits[:-1]).log_softmax(-1)
        return torch.exp(-logprobs.gather(1, torch.tensor(ids[1:])[:, None]).mean()).item()

    return {"tokens": len(ids), "same_ids_as_training": ids == ours,
            "max_abs_logit_difference": float(np.abs(theirs - reference).max()),
            "max_abs_logit": float(np.abs(reference).max()),
            "same_argmax": float((theirs.argmax(1) == reference.argmax(1)).mean()),
            "perplexity": {"llama_cpp": perplexity(theirs), "hf": perplexity(reference)}}


def stored_dtypes(directory: Path) -> dict:
    from safetensors import safe_open

    with safe_open(directory / "model.safetensors", "pt") as f:
        stored = sorted({f.get_slice(name).get_dtype() for name in f.keys()})
    return {"config": json.loads((directory / "config.json").read_text()).get("dtype"),
            "tensors": stored}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a training --output_dir")
    p.add_argument("--out", default=None, help="where the conversions go (default: RUN-readers)")
    args = p.parse_args(argv)
    from transformers import AutoModelForCausalLM

    from tsld_ds.convert.cli import convert
    from tsld_ds.data import builtin_corpus_dir
    from tsld_ds.models import load_tokenizer

    run = Path(args.run)
    out = Path(args.out or f"{run}-readers")
    summaries = {fmt: convert(run, out / name, fmt, overwrite=True)
                 for fmt, name in (("hf", "hf"), ("packed", "packed"), ("gguf", "model.gguf"))}
    bits = summaries["packed"]["quantization"]["bits"]
    hf = AutoModelForCausalLM.from_pretrained(out / "hf").eval()
    tokenizer = load_tokenizer(str(out / "hf"))
    lines = [line for line in (builtin_corpus_dir() / "validation.txt").read_text().splitlines()
             if line.strip()][:200]

    ids = torch.tensor([tokenizer(" ".join(lines[:40]))["input_ids"]
                        [:hf.config.max_position_embeddings]])
    loaded = stock_logits(out / "packed", ids, out, dequantize=bits == 4)
    assert not loaded["tsld_ds_imported"]
    stock = loaded["logits"]
    with torch.no_grad():
        reference = hf(ids).logits
    report = {
        "run": str(run), "bits": bits,
        "gguf": {"bytes": summaries["gguf"]["bytes"],
                 "types": gguf_against_hf(out / "model.gguf", hf),
                 "tokenizer": gguf_tokenizer_matches(out / "model.gguf", tokenizer, lines),
                 "in_llama_cpp": llama_cpp_against_hf(out / "model.gguf", hf, tokenizer,
                                                      "\n".join(lines),
                                                      hf.config.max_position_embeddings)},
        "packed_in_stock_transformers": {
            "bytes": summaries["packed"]["bytes"], "tokens": ids.shape[1],
            "max_abs_logit_difference": (stock - reference).abs().max().item(),
            "max_abs_logit": reference.abs().max().item(),
            "same_argmax": (stock.argmax(-1) == reference.argmax(-1)).float().mean().item()},
        "dtypes": {fmt: stored_dtypes(out / fmt) for fmt in ("hf", "packed")},
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
