"""End-to-end QAT runs of launch/train.py with 2 real ranks (DeepSpeed launcher, gloo, ZeRO-3)."""
import json
import math

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

from helpers import REPO, read_metrics, run_train, step_losses, train_args, write_ds_config


# --kd logit runs its teacher under ZeRO-3 (the given config); the others let the run choose,
# and the tiny teacher fits replicated.
SHARDED_TEACHER = {"logit": str(REPO / "ds_configs" / "teacher_zero3.json")}


@pytest.mark.parametrize("kd", ["gt", "logit", "logit_gt", "l2l", "tsld"])
def test_each_objective_trains_on_two_ranks(kd, tiny_teacher_dir, small_corpus_dir, tmp_path):
    out = tmp_path / "run"
    ds = write_ds_config(tmp_path / "ds.json")
    teacher = {"teacher_ds_config": SHARDED_TEACHER[kd]} if kd in SHARDED_TEACHER else {}
    proc = run_train(train_args(tiny_teacher_dir, small_corpus_dir, out, ds,
                                **{"kd": kd, "max_steps": 20, **teacher}))
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, 21))
    assert all(math.isfinite(v) for v in losses.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    # Learning is judged on the fixed validation blocks: each step's loss is on a different
    # 2x32-token batch, whose spread (+-0.4 nats) hides 20 steps of progress.
    assert summary["student_ppl_after"] < 0.97 * summary["student_ppl_before"], summary
    assert (out / "checkpoints" / "latest").read_text().strip() == "step_0000020"
    if kd in SHARDED_TEACHER:
        # ZeRO-3 partitioned the teacher: each rank holds about half of it.
        assert summary["teacher_numel_this_rank"] <= summary["teacher_numel"] // 2 + 64
        assert "teacher weights: as --teacher_ds_config" in proc.stdout
    elif kd != "gt":
        assert summary["teacher_numel_this_rank"] == summary["teacher_numel"]
        assert "teacher weights: replicated, ZeRO stage 0 (tsld-estimate: " in proc.stdout
    terms = {k for r in read_metrics(out) for k in r}
    expected = {"gt": {"gt"}, "logit": {"logit"}, "logit_gt": {"logit", "gt"},
                "l2l": {"logit", "l2l"}, "tsld": {"gt", "tsld"}}[kd]
    assert expected <= terms and {"lr", "grad_norm", "tokens_per_s"} <= terms


def test_resume_reproduces_uninterrupted_losses(tiny_teacher_dir, small_corpus_dir, tmp_path):
    ds = write_ds_config(tmp_path / "ds.json", exact_resume=True)
    full = tmp_path / "full"
    run_train(train_args(tiny_teacher_dir, small_corpus_dir, full, ds, **{"max_steps": 8,
                                                                         "save_every": 4}))
    resumed = tmp_path / "resumed"
    run_train(train_args(tiny_teacher_dir, small_corpus_dir, resumed, ds, **{
        "max_steps": 8, "resume": full / "checkpoints" / "step_0000004"}))
    expected, got = step_losses(full), step_losses(resumed)
    assert sorted(got) == [5, 6, 7, 8]
    assert got == {step: expected[step] for step in got}  # bit for bit


# The fused loss in one vocabulary sweep, in blocks of 100 entries (online log-sum-exp), and the
# naive reference.
LOSS_IMPLS = {"fused": {}, "fused_vocab_blocks": {"loss_vocab_chunk_size": 100},
              "naive": {"loss_impl": "naive"}}


def adam_update_bound(betas, step: int) -> float:
    """The largest |m_hat / sqrt(v_hat)| Adam can reach at `step` (from 1), whatever the gradients
    were: by Cauchy-Schwarz, sqrt(sum_i a_i^2 / b_i) over the bias-corrected EMA weights a (first
    moment) and b (second). About 1 for the first steps: a round-off difference in a gradient
    near 0 can become a whole learning rate of difference in the update."""
    b1, b2 = betas
    a = [(1 - b1) * b1 ** (step - i) / (1 - b1 ** step) for i in range(1, step + 1)]
    b = [(1 - b2) * b2 ** (step - i) / (1 - b2 ** step) for i in range(1, step + 1)]
    return math.sqrt(sum(x * x / y for x, y in zip(a, b)))


def _train_with_each_impl(tmp_path, name, model_dir, corpus_dir, ds, impls=LOSS_IMPLS,
                          **options):
    weights, losses, lrs = {}, {}, {}
    for impl, impl_options in impls.items():
        out = tmp_path / f"{name}-{impl}"
        run_train(train_args(model_dir, corpus_dir, out, ds, **{
            "kd": "tsld", "no_export": True, **options, **impl_options}))
        weights[impl] = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoints"))
        losses[impl] = step_losses(out)
        lrs[impl] = {r["step"]: r["lr"] for r in read_metrics(out) if "lr" in r}
    return weights, losses, lrs


CHECKPOINTED = {"fused_checkpointed": {"gradient_checkpointing": True}}


@pytest.mark.parametrize("kd,impls", [
    ("tsld", {**LOSS_IMPLS, **CHECKPOINTED}),
    ("l2l", {"naive": LOSS_IMPLS["naive"], **CHECKPOINTED}),
], ids=["tsld", "l2l-checkpointed"])
def test_fused_and_naive_loss_give_the_same_gradients(kd, impls, tiny_teacher_dir,
                                                      small_corpus_dir, tmp_path):
    """One step of plain SGD at lr 1 without clipping: the weights move by exactly minus the
    gradient, so the fused paths' first-step gradients, and those with every student block
    recomputed in backward (--gradient_checkpointing), are compared with the naive one's
    element by element."""
    from safetensors.torch import load_file

    ds = write_ds_config(tmp_path / "ds.json", gradient_clipping=0.0,
                         zero_allow_untested_optimizer=True,
                         optimizer={"type": "SGD", "params": {"lr": 1.0}})
    weights, losses, _ = _train_with_each_impl(
        tmp_path, "sgd", tiny_teacher_dir, small_corpus_dir, ds, impls,
        **{"kd": kd, "max_steps": 1, "lr": 1.0, "lr_schedule": "constant"})
    start = {f"model.{k}": v for k, v in load_file(tiny_teacher_dir / "model.safetensors").items()}
    assert set(weights["naive"]) == set(start)
    grads = {impl: {k: start[k] - w for k, w in state.items()}
             for impl, state in weights.items()}
    naive = grads.pop("naive")
    assert all(g.abs().max() > 0 for g in naive.values())  # every tensor was trained
    for impl, grad in grads.items():
        assert losses[impl][1] == pytest.approx(losses["naive"][1], rel=1e-6), impl
        for key, g in grad.items():
            scale = naive[key].abs().max().item()
            torch.testing.assert_close(g, naive[key], rtol=1e-4, atol=1e-5 * scale,
                                       msg=f"{impl}: gradient of {key}")


def test_fused_and_naive_loss_give_the_same_training(tiny_teacher_dir, small_corpus_dir, tmp_path):
    """3 steps of the real optimizer (AdamW, clipping): the losses agree to float round-off at
    every step. The weights can differ by more where Adam's m/sqrt(v) turns a round-off
    difference in a near-zero gradient into an update of up to the learning rate: every element
    must stay within twice the largest update Adam could have made, and all but a handful must
    agree to round-off."""
    ds = write_ds_config(tmp_path / "ds.json")
    betas = json.loads(ds.read_text())["optimizer"]["params"]["betas"]
    weights, losses, lrs = _train_with_each_impl(tmp_path, "adamw", tiny_teacher_dir,
                                                 small_corpus_dir, ds, **{"max_steps": 3})
    assert lrs["naive"][1] > 0
    reach = 2 * sum(lr * adam_update_bound(betas, step) for step, lr in lrs["naive"].items())
    naive_weights = weights.pop("naive")
    for impl, state in weights.items():
        for step in (1, 2, 3):
            assert losses[impl][step] == pytest.approx(losses["naive"][step], rel=1e-5), \
                (impl, step)
        differing, total = 0, 0
        for key, tensor in state.items():
            difference = (tensor - naive_weights[key]).abs()
            assert difference.max() <= reach, (impl, key, difference.max().item(), reach)
            tight = 1e-6 + 1e-4 * naive_weights[key].abs()
            differing += int((difference > tight).sum())
            total += tensor.numel()
        assert differing <= total * 1e-3, (impl, differing, total)


def test_exported_student_is_ternary_and_loads_with_stock_transformers(tiny_teacher_dir,
                                                                       small_corpus_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    run_train(train_args(tiny_teacher_dir, small_corpus_dir, out,
                          write_ds_config(tmp_path / "ds.json"), **{"max_steps": 2}))
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


def test_instruction_data_trains_and_evaluates_on_responses(tiny_teacher_dir, tmp_path):
    """The shipped prompt/response examples (one per row, response-only labels) on 2 ranks with
    TSLD: the log counts the cut examples, and launch/eval.py scores the same response tokens."""
    from helpers import REPO
    from tsld_ds.evaluation.cli import main as eval_main

    shipped = REPO / "tsld_ds" / "assets" / "kjv-instructions"
    out = tmp_path / "run"
    proc = run_train(train_args(tiny_teacher_dir, shipped, out, write_ds_config(tmp_path / "ds.json"),
                                kd="tsld", max_length=40, max_steps=3, eval_max_blocks=8))
    assert (f"{shipped} train: 4000 prompt/response examples, one per row of 40 tokens; "
            in proc.stdout)
    assert "truncated to --block_size" in proc.stdout
    summary = json.loads((out / "summary.json").read_text())
    assert math.isfinite(summary["student_ppl_after"])
    assert eval_main(["--model", str(out), "--output", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["perplexity"]["value"] == pytest.approx(summary["student_ppl_after"], rel=1e-4)
