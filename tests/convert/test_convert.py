"""launch/convert.py on real 2-rank ZeRO-3 runs: hf (perplexity equal to training's, loads with
stock transformers), packed (same logits, size), gguf (TQ2_0 round trip; run by llama.cpp
itself); every tokenizer written tokenizes as training did in stock readers; and a conversion
never harms the run it reads nor an output it replaces."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import REPO, tree_digest
from safetensors import safe_open

from benchmarks.real_readers import (
    dequantized_gguf,
    gguf_tokenizer_matches,
    llama_cpp_against_hf,
    llama_cpp_logits,
    stock_logits,
)
from tsld_ds.convert.cli import convert
from tsld_ds.convert.cli import main as convert_main
from tsld_ds.evaluation.cli import main as eval_main

# Run in a fresh interpreter: stock transformers only, tsld_ds never imported.
LOAD_WITH_STOCK_TRANSFORMERS = """
import json, sys
import torch
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D
model = AutoModelForCausalLM.from_pretrained(sys.argv[1])
distinct = {}
for name, module in model.named_modules():
    if isinstance(module, (torch.nn.Linear, Conv1D)):
        rows = module.weight.detach().t() if isinstance(module, Conv1D) else module.weight.detach()
        distinct[name] = max(len(torch.unique(row)) for row in rows)  # per output channel
tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
print(json.dumps({"tsld_ds_imported": "tsld_ds" in sys.modules, "distinct": distinct,
                  "tied": tied}))
"""

@pytest.mark.parametrize("run_name,quantized_linears", [("llama256", 14), ("gpt2", 8)])
def test_hf_perplexity_equals_training_eval(run_name, quantized_linears, shared_runs,
                                            small_corpus_dir, tmp_path):
    run = shared_runs[run_name].path
    out = tmp_path / "hf"
    summary = convert(run, out)
    assert summary["format"] == "hf" and summary["quantized_linears"] == quantized_linears
    assert summary["distinct_values"] == {"per": "row", "max": 3, "limit": 3, "check": "pass",
                                          "failing": []}

    assert eval_main(["--model", str(out), "--dataset", str(small_corpus_dir), "--block_size",
                      "32", "--max_blocks", "8", "--batch_size", "2", "--output",
                      str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    trained = json.loads((run / "summary.json").read_text())["student_ppl_after"]
    assert report["kind"] == "hf"
    assert report["perplexity"]["value"] == pytest.approx(trained, rel=1e-4)

    loaded = json.loads(subprocess.run(
        [sys.executable, "-c", LOAD_WITH_STOCK_TRANSFORMERS, str(out)], capture_output=True,
        text=True, check=True).stdout)
    assert not loaded["tsld_ds_imported"]
    quantized = [d for n, d in loaded["distinct"].items() if ".h." in n or ".layers." in n]
    assert len(quantized) == quantized_linears and max(quantized) <= 3
    assert loaded["distinct"]["lm_head"] > 3  # full precision stays full precision
    assert loaded["tied"] == (run_name == "gpt2")  # GPT-2 ties its embeddings
    with safe_open(out / "model.safetensors", "pt") as stored:  # and a tied weight is stored once
        assert ("lm_head.weight" in stored.keys()) == (not loaded["tied"])


@pytest.mark.parametrize("run_name", ["llama256", "gpt2"])  # untied; tied
def test_hf_conversion_equals_the_live_export(run_name, shared_runs, tmp_path):
    from safetensors.torch import load_file

    run = shared_runs[run_name].path
    out = tmp_path / "hf"
    convert(run, out)
    ours = load_file(out / "model.safetensors")
    live = load_file(run / "hf" / "model.safetensors")
    assert ours.keys() == live.keys()
    for name in ours:
        assert torch.equal(ours[name], live[name]), name


def test_zero2_checkpoint_converts_like_the_live_export(sweep_runs, tmp_path):
    """sweep_runs' `recipe/zero2`: 3 steps with ds_configs/zero2.json (parameters whole on each
    rank)."""
    from safetensors.torch import load_file

    run = sweep_runs["recipe/zero2"].path
    summary = convert(run, tmp_path / "hf")
    assert summary["distinct_values"]["check"] == "pass" and summary["quantized_linears"] == 14
    ours = load_file(tmp_path / "hf" / "model.safetensors")
    live = load_file(run / "hf" / "model.safetensors")
    assert ours.keys() == live.keys()
    for name in ours:
        assert torch.equal(ours[name], live[name]), name


def test_packed_gives_hf_logits_in_fewer_bytes(llama256_run, tmp_path):
    from transformers import AutoModelForCausalLM

    from tsld_ds import load_packed
    from tsld_ds.packed.linear import PackedTernaryLinear

    summary = convert(llama256_run, tmp_path / "packed", "packed")
    convert(llama256_run, tmp_path / "hf", "hf")
    assert summary["quantized_weight_size_vs_bf16"] <= 1 / 7
    assert summary["distinct_values"]["check"] == "pass"
    packed = load_packed(tmp_path / "packed")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert isinstance(packed.model.layers[0].mlp.down_proj, PackedTernaryLinear)
    ids = torch.randint(0, hf.config.vocab_size, (2, 24),
                        generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(packed(ids).logits, hf(ids).logits, rtol=1e-5, atol=1e-5)

    config = json.loads((tmp_path / "packed" / "config.json").read_text())["quantization_config"]
    assert config["ignore"] == ["lm_head"]
    assert config["config_groups"]["group_0"]["weights"]["num_bits"] == 2
    ct = pytest.importorskip("compressed_tensors.quantization")
    ct.QuantizationConfig.model_validate(config)  # a valid compressed-tensors config


@pytest.mark.parametrize("run_name,bits", [("llama256", 2), ("llama256_w4", 4)])
def test_packed_loads_in_stock_transformers_with_the_hf_logits(run_name, bits, shared_runs,
                                                               tmp_path):
    from transformers import AutoModelForCausalLM

    run = shared_runs[run_name].path
    convert(run, tmp_path / "packed", "packed")
    convert(run, tmp_path / "hf", "hf")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    ids = torch.randint(0, hf.config.vocab_size, (2, 24),
                        generator=torch.Generator().manual_seed(0))
    stock = stock_logits(tmp_path / "packed", ids, tmp_path, dequantize=bits == 4)
    assert not stock["tsld_ds_imported"]
    with torch.no_grad():
        torch.testing.assert_close(stock["logits"], hf(ids).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fmt", ["hf", "packed"])
def test_config_names_the_stored_dtype(fmt, llama256_run, tmp_path):
    # llama256's own config says bfloat16 (it is stored so); the run trained in fp32.
    for dtype, stored in ((None, "F32"), ("bf16", "BF16")):
        out = tmp_path / f"{fmt}-{dtype}"
        summary = convert(llama256_run, out, fmt, dtype)
        if fmt == "hf":  # dequantized weights: twice bf16's bytes in fp32, as many in bf16
            assert summary["quantized_weight_size_vs_bf16"] == {"F32": 2.0, "BF16": 1.0}[stored]
        config = json.loads((out / "config.json").read_text())
        with safe_open(out / "model.safetensors", "pt") as f:
            dtypes = {f.get_slice(name).get_dtype() for name in f.keys()} - {"I32", "I64"}
        assert dtypes == {stored}
        assert config["dtype"] == {"F32": "float32", "BF16": "bfloat16"}[stored]


def test_a_bf16_run_converts_in_bf16_and_what_its_grid_cannot_hold_is_refused(
        one_rank_runs, tmp_path, capsys):
    """A 4-bit min-max run trained in bf16 (one_rank_runs' `bf16`): its default conversion is bf16
    (the training dtype) and says so in config.json; Q4_1 is refused before a weight is read
    (bf16 rounds the values off the grid), and packed, which finds that out while writing, ends
    in one line, writing nothing."""
    out = one_rank_runs["bf16"].path
    convert(out, tmp_path / "hf")
    assert json.loads((tmp_path / "hf" / "config.json").read_text())["dtype"] == "bfloat16"
    with safe_open(tmp_path / "hf" / "model.safetensors", "pt") as f:
        assert {f.get_slice(name).get_dtype() for name in f.keys()} == {"BF16"}
    for fmt, output, message in (("gguf", "model.gguf", "Q4_1 holds min-max weights on an exact "
                                  "grid; this run computed them in bfloat16"),
                                 ("packed", "packed", "not on a 4-bit grid")):
        assert convert_main(["--checkpoint", str(out), "--output", str(tmp_path / output),
                             "--format", fmt]) == 2
        err = capsys.readouterr().err.strip().splitlines()[-1]  # after the loading bars
        assert err.startswith("error: ") and message in err, err
        assert not (tmp_path / output).exists()
        assert not list(tmp_path.glob(f".{output}.*"))


def gguf_tensors_against_hf(gguf_path, hf_dir) -> dict:
    """{llama.cpp type name: number of tensors} of a GGUF read with llama.cpp's `gguf` package,
    after checking that each tensor, dequantized by `gguf.quants`, is the hf output's weight (q/k
    rows in GGML's rotary order, as llama.cpp's converter permutes them) to the rounding of its
    fp16 constants."""
    import gguf
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(hf_dir)
    types = {}
    for name, kind, values, expected in dequantized_gguf(gguf_path, hf):
        types[kind.name] = types.get(kind.name, 0) + 1
        if kind == gguf.GGMLQuantizationType.TQ2_0:
            # Exact codes; alpha rounded to fp16 (relative error <= 2^-11).
            torch.testing.assert_close(values, expected, rtol=2**-11, atol=0)
        elif kind == gguf.GGMLQuantizationType.Q4_1:
            # x = d * c + m with exact codes c in [0, 15]; d and m rounded to fp16 (2^-11 each).
            blocks = expected.reshape(-1, 32)
            low, high = blocks.amin(1, keepdim=True), blocks.amax(1, keepdim=True)
            bound = (low.abs() + high - low) * 2**-11 * 1.01
            assert ((values.reshape(-1, 32) - blocks).abs() <= bound).all(), name
        else:
            torch.testing.assert_close(values, expected, rtol=1e-3, atol=1e-4)
    return types


@pytest.mark.parametrize("run_name,quant_type", [("llama256", "TQ2_0"), ("llama256_w4", "Q4_1")])
def test_gguf_tensors_give_back_the_hf_weights(run_name, quant_type, shared_runs, tmp_path):
    run = shared_runs[run_name].path
    summary = convert(run, tmp_path / "model.gguf", "gguf")
    convert(run, tmp_path / "hf", "hf")
    assert summary["distinct_values"]["check"] == "pass"
    assert summary["quantized_weight_size_vs_bf16"] < (1 / 7 if quant_type == "TQ2_0" else 1 / 3)
    types = gguf_tensors_against_hf(tmp_path / "model.gguf", tmp_path / "hf")
    assert types[quant_type] == 14


def test_gguf_tokenizer_tokenizes_as_training_did(llama256_run, builtin_tokenizer, tmp_path):
    """transformers rebuilds a tokenizer from the GGUF's own vocabulary keys (tokens, scores,
    types; add_bos/eos_token). It ignores `add_space_prefix` (its SentencePiece builder always
    prepends), so the reader applies that key as llama.cpp does. On real lines of the corpus the
    result must give the ids training gave them (`tokenize_and_pack`: no special tokens); with the
    space prefix llama.cpp defaults to, no line would. llama.cpp itself gives them too."""
    from tsld_ds.data import builtin_corpus_dir

    convert(llama256_run, tmp_path / "model.gguf", "gguf")
    lines = (builtin_corpus_dir() / "validation.txt").read_text().splitlines()
    lines = [line for line in lines if line.strip()][:200]
    report = gguf_tokenizer_matches(tmp_path / "model.gguf", builtin_tokenizer, lines)
    assert report["keys"] == {"add_space_prefix": False, "add_bos_token": False,
                              "add_eos_token": False}
    assert (report["matching_lines"], report["matching_lines_with_llama_cpp_default_prefix"]) \
        == (200, 0)
    pytest.importorskip("cyllama", reason="cyllama (llama.cpp, in the test extra) is missing")
    assert all(llama_cpp_logits(tmp_path / "model.gguf", line, 1000)[0] == ids
               for line, ids in zip(lines[:20], builtin_tokenizer(lines[:20])["input_ids"]))


# Run in a fresh interpreter: stock transformers' AutoTokenizer, tsld_ds never imported.
STOCK_TOKENIZER = """
import json, sys
from transformers import AutoTokenizer
ids = AutoTokenizer.from_pretrained(sys.argv[1])(json.loads(sys.argv[2]))["input_ids"]
print(json.dumps({"ids": ids, "tsld_ds_imported": "tsld_ds" in sys.modules}))
"""


def test_converted_tokenizers_tokenize_as_training_did_in_stock_readers(llama256_run,
                                                                        small_corpus_dir,
                                                                        tmp_path):
    """The hf and packed outputs' tokenizers, read by stock transformers in a fresh interpreter
    and by llama.cpp's converter (gguf-py's SpecialVocab), give the ids of training's validation
    rows (the run's tokenizer's defaults; EOS between documents)."""
    import gguf

    from tsld_ds.data import dataset_rows, load_text_splits
    from tsld_ds.models import load_tokenizer

    _, validation = load_text_splits(str(small_corpus_dir))
    documents = list(validation["text"])
    trained = load_tokenizer(str(llama256_run / "hf"))  # the run's own export
    rows = dataset_rows(str(small_corpus_dir), trained, 32)[1]["input_ids"]
    stream = [t for row in rows for t in row]
    for fmt in ("hf", "packed"):
        convert(llama256_run, tmp_path / fmt, fmt)
        stock = json.loads(subprocess.run(
            [sys.executable, "-c", STOCK_TOKENIZER, str(tmp_path / fmt), json.dumps(documents)],
            capture_output=True, text=True, check=True).stdout)
        assert not stock["tsld_ds_imported"]
        read = [t for ids in stock["ids"] for t in ids + [trained.eos_token_id]]
        assert read[:len(stream)] == stream
        special = gguf.SpecialVocab(tmp_path / fmt, load_merges=False).add_special_token
        assert (special["bos"], special["eos"]) == (False, False)


def ternary_builtin_model(tmp_path, tokenizer):
    """The default run's student before QAT (the built-in model, ternarized TWN per channel),
    written by the converter's writers as `model.gguf` and `hf/` under `tmp_path`, with
    `tokenizer`'s vocabulary keys: the default run's outputs, without a training launch."""
    from transformers import AutoModelForCausalLM

    from tsld_ds.convert.gguf_file import write_gguf
    from tsld_ds.convert.report import Report
    from tsld_ds.convert.writers import write_hf
    from tsld_ds.models import BUILTIN_MODEL
    from tsld_ds.quant import QuantConfig, quantize_model
    from tsld_ds.quant.fake_quant import fake_quant_tensors

    model = AutoModelForCausalLM.from_pretrained(BUILTIN_MODEL, dtype=torch.float32)
    cfg = QuantConfig(bits=2)
    quantize_model(model, cfg)
    tensors = list(fake_quant_tensors(model, model.state_dict()))
    report = Report(format="gguf", output=tmp_path, checkpoint=Path(BUILTIN_MODEL), step=0,
                    quantization=cfg.to_dict())
    write_gguf(model, iter(tensors), tokenizer, cfg, tmp_path / "model.gguf", report)
    write_hf(model, iter(tensors), tokenizer, tmp_path / "hf", torch.float32, report)
    return tmp_path / "model.gguf", AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()


def test_llama_cpp_runs_the_gguf_as_the_hf_output_does(builtin_tokenizer, tmp_path):
    """The default run's ternary model as llama.cpp itself (cyllama's prebuilt bindings) runs it:
    on 512 tokens of validation text, llama.cpp's own tokenization is training's, and its logits
    at every position are the hf output's up to TQ2_0's kernel (it rounds activations to 8 bits:
    about 1 % of the largest logit), with the same argmax nearly everywhere and the same
    perplexity to 1 %."""
    pytest.importorskip("cyllama", reason="cyllama (llama.cpp, in the test extra) is missing")
    from tsld_ds.data import builtin_corpus_dir

    gguf_path, hf = ternary_builtin_model(tmp_path, builtin_tokenizer)
    text = (builtin_corpus_dir() / "validation.txt").read_text()[:8000]
    report = llama_cpp_against_hf(gguf_path, hf, builtin_tokenizer, text, 512)
    assert report["tokens"] == 512 and report["same_ids_as_training"]
    assert report["max_abs_logit_difference"] < 0.03 * report["max_abs_logit"]
    assert report["same_argmax"] >= 0.97
    assert report["perplexity"]["llama_cpp"] == pytest.approx(report["perplexity"]["hf"],
                                                              rel=0.01)


def test_gguf_keys_add_what_the_tokenizer_adds(llama_style_tokenizer, tmp_path):
    """A LLaMA-style tokenizer (a BOS before every text) gives a GGUF whose keys make llama.cpp
    put the BOS before a text as training put it before each document; a tokenizer that adds
    anything else by default is refused."""
    import gguf
    from tokenizers import processors

    from tsld_ds.convert.gguf_file import added_bos_eos
    from tsld_ds.errors import UsageError

    gguf_path, _ = ternary_builtin_model(tmp_path, llama_style_tokenizer)
    fields = gguf.GGUFReader(gguf_path).fields
    assert bool(fields["tokenizer.ggml.add_bos_token"].parts[-1][0])
    assert not bool(fields["tokenizer.ggml.add_eos_token"].parts[-1][0])
    pytest.importorskip("cyllama", reason="cyllama (llama.cpp, in the test extra) is missing")
    text = "In the beginning God created the heaven and the earth."
    assert llama_cpp_logits(gguf_path, text, 100)[0] == llama_style_tokenizer(text)["input_ids"]

    padded = llama_style_tokenizer.__class__.from_pretrained(llama_style_tokenizer.name_or_path)
    padded.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<pad> $A", special_tokens=[("<pad>", padded.pad_token_id)])
    with pytest.raises(UsageError, match=r"llama.cpp adds at most a BOS before a text and an EOS "
                       r"after it; this tokenizer adds \[3\] before and \[\] after"):
        added_bos_eos(padded)


def test_gguf_refuses_what_its_types_cannot_hold(builtin_tokenizer):
    from helpers import tiny_llama_config
    from transformers import AutoModelForCausalLM

    from tsld_ds.convert.gguf_file import check_supported
    from tsld_ds.errors import UsageError
    from tsld_ds.quant import QuantConfig, quantize_model

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(tiny_llama_config(len(builtin_tokenizer)))
    cfg = QuantConfig(bits=2)
    quantize_model(model, cfg)
    with pytest.raises(UsageError, match="blocks of 256 weights"):
        check_supported(model, cfg, builtin_tokenizer)
    with pytest.raises(UsageError, match="Q4_1 has one step and one minimum per 32 weights of a "
                       "row: .* this run has --quant_method minmax --granularity channel"):
        check_supported(model, QuantConfig(bits=4, method="minmax"), builtin_tokenizer)
    with pytest.raises(UsageError, match="--group_size 64"):
        check_supported(model, QuantConfig(bits=4, method="minmax", granularity="group",
                                           group_size=64), builtin_tokenizer)
    with pytest.raises(UsageError, match="this run has 8-bit weights"):
        check_supported(model, QuantConfig(bits=8, method="minmax"), builtin_tokenizer)
    # rows of 32 and 64 weights: whole Q4_1 blocks
    check_supported(model, QuantConfig(bits=4, method="minmax", granularity="group",
                                       group_size=32), builtin_tokenizer)


def test_refusals_are_one_clear_line(tmp_path, capsys, gpt2_run, llama256_dir):
    cases = [
        (["--checkpoint", tmp_path / "nowhere"], "does not exist"),
        (["--checkpoint", llama256_dir], "not a tsld-ds run directory nor a DeepSpeed checkpoint"),
        (["--checkpoint", gpt2_run, "--format", "gguf"], "supports LLaMA-architecture models"),
    ]
    for argv, message in cases:
        assert convert_main([*map(str, argv), "--output", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("error: ") and message in err and "\n" not in err, err
    Path(tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "file").write_text("x")
    assert convert_main(["--checkpoint", str(gpt2_run), "--output", str(tmp_path / "taken")]) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert convert_main(["--checkpoint", str(gpt2_run), "--output", str(tmp_path / "taken"),
                         "--overwrite"]) == 2  # not an earlier output: never replaced
    assert "was not written by convert" in capsys.readouterr().err
    assert (tmp_path / "taken" / "file").read_text() == "x"


def test_a_refusal_as_a_user_sees_it(tmp_path):
    """launch/convert.py in its own process: exit 2 and one line, nothing written."""
    proc = subprocess.run([sys.executable, str(REPO / "launch" / "convert.py"), "--checkpoint",
                           str(tmp_path / "nowhere"), "--output", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "does not exist" in proc.stderr and not (tmp_path / "out").exists()


def test_output_in_or_around_the_run_is_refused_and_the_run_kept(gpt2_run, capsys):
    before = tree_digest(gpt2_run)
    for output in (gpt2_run, gpt2_run / "hf", gpt2_run / "checkpoints" / "out", gpt2_run.parent):
        assert convert_main(["--checkpoint", str(gpt2_run), "--output", str(output),
                             "--overwrite"]) == 2
        err = capsys.readouterr().err
        assert "is, holds or lies inside the run being converted" in err, err
    assert tree_digest(gpt2_run) == before


def test_overwrite_replaces_the_output_only_once_the_new_one_is_complete(gpt2_run, tmp_path,
                                                                         monkeypatch):
    import tsld_ds.convert.writers as writers

    out = tmp_path / "hf"
    convert(gpt2_run, out)
    before = tree_digest(out)
    real_write_hf = writers.write_hf

    def write_then_fail(model, tensors, tokenizer, out_dir, *rest):
        real_write_hf(model, tensors, tokenizer, out_dir, *rest)  # a complete directory...
        raise OSError("disk full")  # ...then the conversion fails

    monkeypatch.setattr(writers, "write_hf", write_then_fail)
    with pytest.raises(OSError, match="disk full"):
        convert(gpt2_run, out, overwrite=True)
    assert tree_digest(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]  # no temporary siblings left
    monkeypatch.setattr(writers, "write_hf", real_write_hf)
    convert(gpt2_run, out, dtype="bf16", overwrite=True)
    assert tree_digest(out) != before and sorted(p.name for p in tmp_path.iterdir()) == ["hf"]


def test_conversion_uses_the_checkpoints_own_options(gpt2_run, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(gpt2_run, run)
    args = json.loads((run / "args.json").read_text())
    args.update(bits=4, quant_method="minmax")  # a later run's args.json, say
    (run / "args.json").write_text(json.dumps(args))
    summary = convert(run, tmp_path / "hf")
    assert summary["quantization"]["bits"] == 2 and summary["quantization"]["method"] == "twn"
    assert summary["distinct_values"]["check"] == "pass"
