"""launch/eval.py: a run directory scored on its own validation data by training's method, the
single-process perplexity, and clear errors."""
import importlib.util
import json
import math

import pytest
import torch

from tsld_ds.evaluation.cli import main as eval_main
from tsld_ds.evaluation.perplexity import perplexity


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


@pytest.mark.skipif(importlib.util.find_spec("lm_eval") is not None, reason="lm-eval installed")
def test_tasks_without_lm_eval_name_the_package(llama256_run, capsys):
    assert eval_main(["--model", str(llama256_run), "--no_perplexity", "--tasks", "piqa"]) == 2
    assert "pip install lm-eval" in capsys.readouterr().err


def test_missing_model_is_one_clear_line(tmp_path, capsys):
    assert eval_main(["--model", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err
