"""End-to-end QAT runs of launch/train.py with 2 real ranks (DeepSpeed launcher, gloo, ZeRO-3)."""
import json
import math

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from conftest import read_metrics, run_train, step_losses, write_ds_config


def common_args(model_dir, corpus_dir, output_dir, ds_config, **extra):
    args = {"--model": model_dir, "--dataset": corpus_dir, "--ds_config": ds_config,
            "--output_dir": output_dir, "--block_size": 32, "--lr": 3e-3, "--log_every": 1,
            "--eval_every": 0, "--eval_max_blocks": 16, "--seed": 7}
    args.update(extra)
    flat = []
    for key, value in args.items():
        flat += [key] if value is True else [key, value]
    return flat


@pytest.mark.parametrize("kd", ["gt", "logit", "logit_gt", "l2l", "tsld"])
def test_each_objective_trains_on_two_ranks(kd, tiny_teacher_dir, small_corpus_dir, tmp_path):
    out = tmp_path / "run"
    ds = write_ds_config(tmp_path / "ds.json")
    run_train(common_args(tiny_teacher_dir, small_corpus_dir, out, ds, **{"--kd": kd,
                                                                       "--max_steps": 20}))
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 21))
    assert all(math.isfinite(v) for v in losses.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    # Learning is judged on the fixed validation blocks: each step's loss is on a different
    # 2x32-token batch, whose spread (+-0.4 nats) hides 20 steps of progress.
    assert summary["student_ppl_after"] < 0.97 * summary["student_ppl_before"], summary
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000020"
    if kd != "gt":
        # ZeRO-3 partitioned the teacher: each rank holds about half of it.
        assert summary["teacher_numel_this_rank"] <= summary["teacher_numel"] // 2 + 64
    terms = {k for r in read_metrics(out) for k in r}
    expected = {"gt": {"gt"}, "logit": {"logit"}, "logit_gt": {"logit", "gt"},
                "l2l": {"logit", "l2l"}, "tsld": {"gt", "tsld"}}[kd]
    assert expected <= terms and {"lr", "grad_norm", "tokens_per_s"} <= terms


def test_resume_reproduces_uninterrupted_losses(tiny_teacher_dir, small_corpus_dir, tmp_path):
    ds = write_ds_config(tmp_path / "ds.json")
    full = tmp_path / "full"
    run_train(common_args(tiny_teacher_dir, small_corpus_dir, full, ds, **{"--max_steps": 8,
                                                                         "--save_every": 4}))
    resumed = tmp_path / "resumed"
    run_train(common_args(tiny_teacher_dir, small_corpus_dir, resumed, ds, **{
        "--max_steps": 8, "--resume": full / "checkpoints" / "step_0000004"}))
    expected, got = step_losses(full), step_losses(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    for step in got:
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6), step


def test_fused_and_naive_loss_give_the_same_training(tiny_teacher_dir, small_corpus_dir, tmp_path):
    ds = write_ds_config(tmp_path / "ds.json")
    runs = {}
    # The fused loss in one vocabulary sweep, in blocks of 100 entries (online log-sum-exp), and
    # the naive reference.
    for name, options in (("fused", {}), ("fused_vocab_blocks", {"--loss_vocab_chunk_size": 100}),
                          ("naive", {"--loss_impl": "naive"})):
        out = tmp_path / name
        run_train(common_args(tiny_teacher_dir, small_corpus_dir, out, ds, **{
            "--max_steps": 3, "--kd": "tsld", "--no_export": True, **options}))
        runs[name] = (step_losses(out),
                      get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints")))
    naive_losses, naive_weights = runs.pop("naive")
    for name, (losses, weights) in runs.items():
        for step in (1, 2, 3):
            assert losses[step] == pytest.approx(naive_losses[step], rel=1e-5), (name, step)
        for key, tensor in weights.items():
            torch.testing.assert_close(tensor, naive_weights[key], rtol=1e-4, atol=1e-6,
                                       msg=f"{name}: {key}")


def test_exported_student_is_ternary_and_loads_with_stock_transformers(tiny_teacher_dir,
                                                                       small_corpus_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run_train(common_args(tiny_teacher_dir, small_corpus_dir, out,
                          write_ds_config(tmp_path / "ds.json"), **{"--max_steps": 2}))
    model = AutoModelForCausalLM.from_pretrained(out / "hf")
    quantized = [name for name, _ in model.named_parameters()
                 if ".layers." in name and name.endswith("proj.weight")]
    assert len(quantized) == 2 * 7
    for name, weight in model.named_parameters():
        distinct = max(len(torch.unique(row)) for row in weight.detach())
        if name in quantized:
            assert distinct <= 3, name
        elif weight.dim() == 2:
            assert distinct > 3, name  # embeddings and lm_head stay full precision
