"""The training objective: every --kd gives its terms, fused and naive alike (values and
gradients, float64), with the layer term and the token-scale ablations; bad combinations are
refused when the objective is built."""
import pytest
import torch
from helpers import make_loss_inputs, student_inputs, teacher_of

from tsld_ds.losses import KD_CHOICES, TOKEN_SCALES, Objective, TeacherOutput

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("kd", KD_CHOICES)
def test_each_kd_gives_its_terms_fused_as_naive(kd, device):
    inputs = make_loss_inputs(3, 7, 37, 11, device=device, dtype=torch.float64, bias=True,
                              teacher_form="hidden")
    gen = torch.Generator().manual_seed(5)
    teacher_layers = [torch.randn(3, 7, 11, generator=gen, dtype=torch.float64,
                                  device="cpu").to(device) for _ in range(2)]
    hidden = inputs["student_hidden"]
    teacher = TeacherOutput(hidden=inputs["teacher_hidden"], weight=inputs["teacher_weight"],
                            bias=inputs["teacher_bias"], hidden_states=teacher_layers)
    results = {}
    for impl in ("fused", "naive"):
        objective = Objective.from_kd(kd, impl=impl, chunk_size=8)
        out = objective(*student_inputs(inputs), teacher, lm_head_bias=inputs["lm_head_bias"],
                        student_hidden_states=[hidden * 0.5, hidden])
        results[impl] = out, torch.autograd.grad(out["loss"], hidden)
    (fused, fused_grad), (naive, naive_grad) = results["fused"], results["naive"]
    terms = {"gt": {"gt"}, "logit": {"logit"}, "logit_gt": {"logit", "gt"},
             "l2l": {"logit", "l2l"}, "tsld": {"gt", "tsld"}, "tsld_nogt": {"tsld"}}[kd]
    assert set(fused) == set(naive) == terms | {"loss"}
    for name in fused:
        torch.testing.assert_close(fused[name], naive[name], rtol=1e-10, atol=1e-14)
    assert all(not fused[t].requires_grad for t in terms)  # terms are for logging
    torch.testing.assert_close(fused["loss"].detach(), sum(fused[t] for t in terms))
    torch.testing.assert_close(fused_grad, naive_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("token_scale", TOKEN_SCALES)
def test_token_scale_fused_as_naive(token_scale, device):
    inputs = make_loss_inputs(3, 7, 37, 11, device=device, dtype=torch.float64, bias=True,
                              teacher_form="logits")
    results = {}
    for impl in ("fused", "naive"):
        objective = Objective.from_kd("tsld", impl=impl, chunk_size=8, token_scale=token_scale)
        out = objective(*student_inputs(inputs), teacher_of(inputs),
                        lm_head_bias=inputs["lm_head_bias"])
        results[impl] = out["tsld"], torch.autograd.grad(out["loss"], inputs["student_hidden"])
    (fused, fused_grad), (naive, naive_grad) = results["fused"], results["naive"]
    torch.testing.assert_close(fused, naive, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(fused_grad, naive_grad, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("impl", ["fused", "naive"])
def test_instruction_rows_scale_tokens_over_each_response_alone(impl, device):
    """An instruction row (prompt and padding labelled -100) gives each term exactly what its
    response alone gives: TSLD's softmax over positions sees only the response's tokens."""
    inputs = make_loss_inputs(2, 12, 37, 11, device=device, dtype=torch.float64, bias=False,
                              teacher_form="logits")
    labels = inputs["labels"].clone()
    starts, ends = [3, 5], [9, 12]  # response labels at [start, end); the rest prompt or pad
    objective = Objective.from_kd("tsld", impl=impl, chunk_size=5)
    whole, alone = [], []
    for b, (start, end) in enumerate(zip(starts, ends)):
        row = torch.full_like(labels[b], -100)
        row[start:end] = labels[b, start:end]
        sliced = slice(start - 1, end)  # position n predicts label n + 1
        hidden = inputs["student_hidden"][b:b + 1]
        teacher = TeacherOutput(logits=inputs["teacher_logits"][b:b + 1])
        whole.append(objective(hidden, inputs["lm_head_weight"], row[None], teacher))
        alone.append(objective(hidden[:, sliced], inputs["lm_head_weight"], row[None, sliced],
                               TeacherOutput(logits=teacher.logits[:, sliced])))
    for name in ("gt", "tsld"):
        for w, a in zip(whole, alone):
            torch.testing.assert_close(w[name], a[name], rtol=1e-12, atol=1e-14)


def test_what_the_teacher_hands_over_follows_the_objective():
    assert not Objective.from_kd("gt").needs_teacher
    fused, naive = Objective.from_kd("tsld"), Objective.from_kd("tsld", impl="naive")
    assert fused.needs_teacher and not fused.wants_teacher_logits and naive.wants_teacher_logits
    assert Objective.from_kd("l2l").wants_teacher_logits and Objective.from_kd("l2l").layers


@pytest.mark.parametrize("kd,options,message", [
    ("logit", {"token_scale": "uniform"}, "weighs the TSLD term"),
    ("tsld", {"token_scale": "flat"}, "token scale"),
    ("tsld", {"reduction": "max"}, "reduction"),
    ("tsld", {"impl": "fast"}, "impl"),
    ("tsld", {"chunk_size": 0}, "chunk_size"),
    ("ce", {}, "kd must be one of"),
])
def test_bad_objectives_are_refused_when_built(kd, options, message):
    with pytest.raises(ValueError, match=message):
        Objective.from_kd(kd, **options)


def test_a_soft_term_without_the_teacher_is_refused(device):
    inputs = make_loss_inputs(2, 5, 13, 6, device=device, dtype=torch.float64, bias=False,
                              teacher_form="logits")
    with pytest.raises(ValueError, match="needs the teacher"):
        Objective.from_kd("tsld")(*student_inputs(inputs))
