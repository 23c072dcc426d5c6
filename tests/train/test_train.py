"""End-to-end QAT runs of launch/train.py with 2 real ranks (DeepSpeed launcher, gloo, ZeRO-3):
each objective learns, the fused loss trains as the naive one does, the export is ternary, a
resume is exact. The runs are conftest.py's."""
import json
import math

import pytest
import torch
from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
from helpers import GRADIENT_CASES, INSTRUCTIONS, LOSS_IMPLS, read_metrics, step_losses

OBJECTIVE_TERMS = {"gt": {"gt"}, "logit": {"logit"}, "logit_gt": {"logit", "gt"},
                   "l2l": {"logit", "l2l"}, "tsld": {"gt", "tsld"}}


@pytest.fixture(params=list(OBJECTIVE_TERMS))
def objective_run(request, shared_runs, sweep_runs):
    """The run of each --kd on 2 ranks: tsld is shared_runs' (20 steps), the others sweep_runs'
    (gt 60 steps, the rest 20; logit's teacher ZeRO-3-partitioned)."""
    runs = shared_runs if request.param == "tsld" else sweep_runs
    return request.param, runs[request.param]


def test_each_objective_trains_on_two_ranks(objective_run):
    kd, run = objective_run
    out, steps = run.path, int(run.argv[run.argv.index("--max_steps") + 1])
    losses = step_losses(out)
    assert sorted(losses) == list(range(1, steps + 1))
    assert all(math.isfinite(v) for v in losses.values())
    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2
    # Learning is judged on the fixed validation blocks: each step's loss is on a different
    # 2x32-token batch, whose spread (+-0.4 nats) hides 20 steps of progress.
    assert summary["student_ppl_after"] < 0.97 * summary["student_ppl_before"], summary
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step_{steps:07d}"
    if "--teacher_ds_config" in run.argv:
        # ZeRO-3 partitioned the teacher: each rank holds about half of it.
        assert summary["teacher_numel_this_rank"] <= summary["teacher_numel"] // 2 + 64
        assert "teacher weights: as --teacher_ds_config" in run.finished.stdout
    elif kd != "gt":
        assert summary["teacher_numel_this_rank"] == summary["teacher_numel"]
        assert "teacher weights: replicated, ZeRO stage 0 (tsld-estimate: " in \
            run.finished.stdout
    terms = {k for r in read_metrics(out) for k in r}
    assert OBJECTIVE_TERMS[kd] <= terms and {"lr", "grad_norm", "tokens_per_s"} <= terms


def test_resume_reproduces_uninterrupted_losses(tsld_run, continued_runs):
    """`tsld` resumed from its step 12 (in another directory, the model staged elsewhere): steps
    13 to 20 give the uninterrupted run's losses bit for bit (an exact-resume config)."""
    expected, got = step_losses(tsld_run), step_losses(continued_runs["elsewhere"].path)
    assert sorted(got) == list(range(13, 21))
    assert got == {step: expected[step] for step in got}


def impl_results(run) -> dict:
    return {"weights": get_fp32_state_dict_from_zero_checkpoint(str(run.path / "checkpoints")),
            "losses": step_losses(run.path),
            "lrs": {r["step"]: r["lr"] for r in read_metrics(run.path) if "lr" in r}}


def adam_update_bound(betas, step: int) -> float:
    """The largest |m_hat / sqrt(v_hat)| Adam can reach at `step` (from 1), whatever the gradients
    were: by Cauchy-Schwarz, sqrt(sum_i a_i^2 / b_i) over the bias-corrected EMA weights a (first
    moment) and b (second). About 1 for the first steps: a round-off difference in a gradient
    near 0 can become a whole learning rate of difference in the update."""
    b1, b2 = betas
    a = [(1 - b1) * b1 ** (step - i) / (1 - b1 ** step) for i in range(1, step + 1)]
    b = [(1 - b2) * b2 ** (step - i) / (1 - b2 ** step) for i in range(1, step + 1)]
    return math.sqrt(sum(x * x / y for x, y in zip(a, b)))


@pytest.mark.parametrize("case", GRADIENT_CASES)
def test_fused_and_naive_loss_give_the_same_gradients(case, sweep_runs, tiny_teacher_dir):
    """One step of plain SGD at lr 1 without clipping: the weights move by exactly minus the
    gradient, so the fused paths' first-step gradients, and those with every student block
    recomputed in backward (--gradient_checkpointing), are compared with the naive one's
    element by element."""
    from safetensors.torch import load_file

    impls = GRADIENT_CASES[case][1]
    runs = {impl: impl_results(sweep_runs[f"sgd/{case}/{impl}"]) for impl in impls}
    start = {f"model.{k}": v for k, v in load_file(tiny_teacher_dir / "model.safetensors").items()}
    assert set(runs["naive"]["weights"]) == set(start)
    grads = {impl: {k: start[k] - w for k, w in run["weights"].items()}
             for impl, run in runs.items()}
    naive = grads.pop("naive")
    assert all(g.abs().max() > 0 for g in naive.values())  # every tensor was trained
    for impl, grad in grads.items():
        assert runs[impl]["losses"][1] == pytest.approx(runs["naive"]["losses"][1], rel=1e-6), \
            impl
        for key, g in grad.items():
            scale = naive[key].abs().max().item()
            torch.testing.assert_close(g, naive[key], rtol=1e-4, atol=1e-5 * scale,
                                       msg=f"{impl}: gradient of {key}")


def test_fused_and_naive_loss_give_the_same_training(sweep_runs, ds_config):
    """3 steps of the real optimizer (AdamW, clipping): the losses agree to float round-off at
    every step. The weights can differ by more where Adam's m/sqrt(v) turns a round-off
    difference in a near-zero gradient into an update of up to the learning rate: every element
    must stay within twice the largest update Adam could have made, and all but a handful must
    agree to round-off."""
    betas = json.loads(ds_config.read_text())["optimizer"]["params"]["betas"]
    runs = {impl: impl_results(sweep_runs[f"adamw/{impl}"]) for impl in LOSS_IMPLS}
    naive = runs.pop("naive")
    assert naive["lrs"][1] > 0
    reach = 2 * sum(lr * adam_update_bound(betas, step) for step, lr in naive["lrs"].items())
    for impl, run in runs.items():
        for step in (1, 2, 3):
            assert run["losses"][step] == pytest.approx(naive["losses"][step], rel=1e-5), \
                (impl, step)
        differing, total = 0, 0
        for key, tensor in run["weights"].items():
            difference = (tensor - naive["weights"][key]).abs()
            assert difference.max() <= reach, (impl, key, difference.max().item(), reach)
            tight = 1e-6 + 1e-4 * naive["weights"][key].abs()
            differing += int((difference > tight).sum())
            total += tensor.numel()
        assert differing <= total * 1e-3, (impl, differing, total)


def test_exported_student_is_ternary_and_loads_with_stock_transformers(tsld_run):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tsld_run / "hf")
    quantized = [name for name, _ in model.named_parameters()
                 if ".layers." in name and name.endswith("proj.weight")]
    assert len(quantized) == 2 * 7
    for name, weight in model.named_parameters():
        distinct = max(len(torch.unique(row)) for row in weight.detach())
        if name in quantized:
            assert distinct <= 3, name
        elif weight.dim() == 2:
            assert distinct > 3, name  # embeddings and lm_head stay full precision


def test_instruction_data_trains_and_evaluates_on_responses(sweep_runs, tmp_path):
    """The shipped prompt/response examples (one per row, response-only labels) on 2 ranks with
    TSLD: the log counts the cut examples, and launch/eval.py scores the same response tokens."""
    from tsld_ds.evaluation.cli import main as eval_main

    run = sweep_runs["instruction"]
    assert (f"{INSTRUCTIONS} train: 4000 prompt/response examples, one per row of 40 tokens; "
            in run.finished.stdout)
    assert "truncated to --block_size" in run.finished.stdout
    summary = json.loads((run.path / "summary.json").read_text())
    assert math.isfinite(summary["student_ppl_after"])
    assert eval_main(["--model", str(run.path), "--output", str(tmp_path / "eval.json")]) == 0
    report = json.loads((tmp_path / "eval.json").read_text())
    assert report["perplexity"]["value"] == pytest.approx(summary["student_ppl_after"], rel=1e-4)
