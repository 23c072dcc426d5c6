"""launch/eval.py: a run directory scored on its own validation data by training's method, the
single-process perplexity, and clear errors."""
import importlib.util
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import tiny_llama_config, tree_digest

from tsld_ds.evaluation.cli import main as eval_main
from tsld_ds.evaluation.perplexity import perplexity

TASK_DIR = Path(__file__).parent / "lm_eval_task"


def test_run_directory_uses_the_runs_data_and_reproduces_its_perplexity(llama256_run, tmp_path,
                                                                         capsys):
    report_file = tmp_path / "report.json"
    assert eval_main(["--model", str(llama256_run), "--batch_size", "4",
                      "--output", str(report_file)]) == 0
    report = json.loads(report_file.read_text())
    assert json.loads(capsys.readouterr().out) == report
    assert report["kind"] == "run" and report["loaded_from"].endswith("hf")
    assert report["perplexity"]["block_size"] == 32 and report["perplexity"]["blocks"] == 8
    assert report["perplexity"]["value"] == pytest.approx(report["training_ppl_after"], rel=1e-4)


def test_perplexity_runs_without_a_process_group():
    blocks = {"input_ids": [[1, 2, 3]] * 5}

    class Blocks:  # datasets-style row selection
        def __len__(self):
            return 5

        def __getitem__(self, rows):
            return {"input_ids": [blocks["input_ids"][i] for i in rows]}

    def nll(input_ids, labels):
        valid = (labels[:, 1:] != -100).sum()
        return torch.log(torch.tensor(4.0)) * valid, valid  # every token: p = 1/4

    assert perplexity(nll, Blocks(), 2, device="cpu") == pytest.approx(4.0)
    assert perplexity(nll, Blocks(), 2, device="cpu", max_blocks=3) == pytest.approx(4.0)

    def diverged(input_ids, labels):  # a model whose loss overflowed exp(): 1000 nats a token
        valid = (labels[:, 1:] != -100).sum()
        return torch.tensor(1000.0) * valid, valid

    assert perplexity(diverged, Blocks(), 2, device="cpu") == math.inf


def test_tasks_without_lm_eval_name_the_package_before_the_model_loads(tiny_llama_dir, capsys,
                                                                      monkeypatch):
    import tsld_ds.evaluation.models

    find_spec = importlib.util.find_spec  # lm-eval is in the test extra: hide it
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *args, **kwargs: None if name == "lm_eval"
                        else find_spec(name, *args, **kwargs))

    def load_eval_model(*args, **kwargs):
        raise AssertionError("the model was loaded before lm-eval was looked for")

    monkeypatch.setattr(tsld_ds.evaluation.models, "load_eval_model", load_eval_model)
    assert eval_main(["--model", str(tiny_llama_dir), "--tasks", "piqa"]) == 2
    assert capsys.readouterr().err.strip() == ("error: --tasks needs lm-evaluation-harness: pip "
                                               "install lm-eval")


class CountingTokenizer:
    """A tokenizer that records every text it is asked to tokenize."""

    def __init__(self, tokenizer):
        self.tokenizer, self.texts = tokenizer, []

    def __call__(self, text, **options):
        self.texts += [text] if isinstance(text, str) else list(text)
        return self.tokenizer(text, **options)

    def __getattr__(self, name):
        return getattr(self.tokenizer, name)


@pytest.mark.parametrize("carved", [False, True])
def test_evaluation_tokenizes_the_validation_split_only(carved, llama_style_tokenizer,
                                                       small_corpus_dir, tmp_path):
    """eval.py's rows are training's validation rows (here with a LLaMA-style tokenizer: a BOS
    before each document, as training packs them), and the training split is never tokenized,
    also when the validation split is carved out of it."""
    from tsld_ds.data import dataset_rows, load_text_splits
    from tsld_ds.evaluation.perplexity import validation_blocks

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    if carved:  # one file: the validation split is carved out of the training documents
        (corpus / "all.txt").write_text((small_corpus_dir / "train.txt").read_text())
    else:
        for name in ("train.txt", "validation.txt"):
            (corpus / name).write_text((small_corpus_dir / name).read_text())
    counting = CountingTokenizer(llama_style_tokenizer)
    blocks = validation_blocks(counting, str(corpus), seed=3, block_size=32)
    train, validation = load_text_splits(str(corpus), seed=3)
    assert set(validation["text"]) <= set(counting.texts)
    assert not set(counting.texts) & set(train["text"])
    assert blocks["input_ids"] == dataset_rows(str(corpus), llama_style_tokenizer, 32,
                                               seed=3)[1]["input_ids"]
    stream = [t for row in blocks["input_ids"] for t in row]
    assert stream[0] == llama_style_tokenizer.bos_token_id
    assert llama_style_tokenizer.eos_token_id not in stream


def test_lm_eval_scores_a_local_task_offline(llama256_run, tmp_path):
    """`--tasks` through lm-eval itself, offline, on a task shipped in tests/ (four endings of a
    verse); its accuracy is the one found by scoring each ending as lm-eval defines it (summed
    log-probability of " " + ending after the context, both encoded without special tokens)."""
    pytest.importorskip("lm_eval")
    from helpers import REPO
    from transformers import AutoModelForCausalLM, AutoTokenizer

    report_file = tmp_path / "report.json"
    proc = subprocess.run(
        [sys.executable, str(REPO / "launch" / "eval.py"), "--model", str(llama256_run),
         "--no_perplexity", "--tasks", "kjv_continuation", "--include_path", str(TASK_DIR),
         "--output", str(report_file)],
        cwd=REPO, capture_output=True, text=True, timeout=600,
        env={**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
             "TOKENIZERS_PARALLELISM": "false"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    accuracy = json.loads(report_file.read_text())["tasks"]["kjv_continuation"]["acc,none"]

    model = AutoModelForCausalLM.from_pretrained(llama256_run / "hf").eval()
    tokenizer = AutoTokenizer.from_pretrained(llama256_run / "hf")
    window = model.config.max_position_embeddings + 1
    questions = [json.loads(line) for line in
                 (TASK_DIR / "kjv_continuation.jsonl").read_text().splitlines()]
    correct = 0
    for question in questions:
        context = tokenizer(question["context"], add_special_tokens=False)["input_ids"]
        scores = []
        for choice in question["choices"]:
            whole = tokenizer(question["context"] + " " + choice,
                              add_special_tokens=False)["input_ids"]
            ending = whole[len(context):]
            ids = torch.tensor([whole[-window:][:-1]])
            with torch.no_grad():
                logprobs = model(ids).logits[0, -len(ending):].log_softmax(-1)
            scores.append(logprobs.gather(1, torch.tensor(ending)[:, None]).sum().item())
        correct += max(range(4), key=scores.__getitem__) == question["label"]
    assert len(questions) == 100
    assert accuracy == pytest.approx(correct / len(questions))


def test_missing_model_is_one_clear_line(tmp_path, capsys):
    assert eval_main(["--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err


def refused_before_loading(monkeypatch):
    """Loading any model fails the test: a refusal must come first."""
    import tsld_ds.evaluation.models

    def load(*args, **kwargs):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr(tsld_ds.evaluation.models.AutoModelForCausalLM, "from_pretrained", load)


def one_error_line(capsys) -> str:
    out, err = capsys.readouterr()
    assert out == "" and err.startswith("error: ") and err.count("\n") == 1
    return err.removeprefix("error: ").rstrip("\n")


@pytest.mark.parametrize("device, accelerator, message", [
    ("cuda", None, "--device cuda: this machine has no cuda device (torch sees no accelerator); "
                   "use --device cpu"),
    ("mps", "cuda", "--device mps: this machine has no mps device (torch sees cuda); use "
                    "--device cuda"),
    ("cuda:3", "cuda", "--device cuda:3: this machine has 1 cuda device(s)"),
    ("gpu", None, "--device gpu: Expected one of cpu, cuda"),
], ids=["no gpu", "another accelerator", "no such index", "not a device"])
def test_an_absent_device_is_refused_before_the_model_loads(tiny_llama_dir, tmp_path, capsys,
                                                            monkeypatch, device, accelerator,
                                                            message):
    """As on a machine without a GPU (or with one other accelerator): torch's view is faked."""
    monkeypatch.setattr(torch.accelerator, "is_available", lambda: accelerator is not None)
    monkeypatch.setattr(torch.accelerator, "current_accelerator",
                        lambda *args, **kwargs: accelerator and torch.device(accelerator))
    monkeypatch.setattr(torch.accelerator, "device_count", lambda: int(accelerator is not None))
    refused_before_loading(monkeypatch)
    output = tmp_path / "report.json"
    assert eval_main(["--model", str(tiny_llama_dir), "--device", device,
                      "--output", str(output)]) == 2
    assert one_error_line(capsys).startswith(message)
    assert not output.exists()


@pytest.fixture
def model_without_tokenizer(tiny_llama_dir, tmp_path):
    """tiny_llama_dir's config and weights alone."""
    model = tmp_path / "model"
    model.mkdir()
    for file in tiny_llama_dir.iterdir():
        if file.name == "config.json" or file.suffix == ".safetensors":
            shutil.copy(file, model / file.name)
    return model


@pytest.mark.parametrize("tokenizer, message", [
    (None, "model '{model}' has no tokenizer (no tokenizer_config.json or tokenizer.json): pass "
           "--tokenizer, the tokenizer it was trained with"),
    ("{tmp}/nowhere", "--tokenizer path '{tmp}/nowhere' does not exist"),
    ("{model}", "--tokenizer directory '{model}' has no tokenizer_config.json: it is not a "
                "Hugging Face directory of that kind"),
], ids=["model without one", "missing path", "no tokenizer there"])
def test_a_missing_tokenizer_is_refused_before_the_model_loads(model_without_tokenizer, tmp_path,
                                                              capsys, monkeypatch, tokenizer,
                                                              message):
    refused_before_loading(monkeypatch)
    names = {"tmp": tmp_path, "model": model_without_tokenizer}
    output = tmp_path / "report.json"
    before = tree_digest(tmp_path)
    tokenizer_option = [] if tokenizer is None else ["--tokenizer", tokenizer.format(**names)]
    assert eval_main(["--model", str(model_without_tokenizer), *tokenizer_option,
                      "--device", "cpu", "--output", str(output)]) == 2
    assert one_error_line(capsys) == message.format(**names)
    assert tree_digest(tmp_path) == before


def test_tokenizer_option_tokenizes_the_data(model_without_tokenizer, tiny_llama_dir, capsys):
    """--tokenizer scores a model saved without one as its own tokenizer would."""
    from tsld_ds.data import builtin_tokenizer_path

    def report(*argv):
        assert eval_main([*argv, "--block_size", "32", "--max_blocks", "2",
                          "--device", "cpu"]) == 0
        return json.loads(capsys.readouterr().out)

    given = report("--model", str(model_without_tokenizer),
                   "--tokenizer", str(builtin_tokenizer_path()))
    own = report("--model", str(tiny_llama_dir))
    assert given["tokenizer"] == str(builtin_tokenizer_path()) and own["tokenizer"] is None
    assert given["perplexity"] == own["perplexity"]


def test_a_tokenizer_beyond_the_models_vocabulary_is_refused(tmp_path, capsys):
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as transformers_logging

    from tsld_ds.data import builtin_tokenizer_path

    model = tmp_path / "model"
    AutoModelForCausalLM.from_config(tiny_llama_config(97)).save_pretrained(model)
    capsys.readouterr()
    transformers_logging.disable_progress_bar()  # stderr: the refusal alone
    try:
        assert eval_main(["--model", str(model), "--tokenizer", str(builtin_tokenizer_path()),
                          "--device", "cpu"]) == 2
    finally:
        transformers_logging.enable_progress_bar()
    assert one_error_line(capsys) == (f"--tokenizer has 4096 tokens, more than the 97 that "
                                      f"model '{model}' predicts")
