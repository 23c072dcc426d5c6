"""Fused chunked lm_head losses against autograd through the naive formula (reference losses)."""
import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tsld_ds.losses import (
    KD_CHOICES,
    default_chunk_size,
    distillation_loss,
    fused_linear_cross_entropy,
    fused_linear_kd_loss,
    fused_linear_tsld_loss,
    gt_loss,
    logit_kd_loss,
    tsld_loss,
)

IGNORE = -100

# (batch, length, vocab, hidden, chunk): V and N not divisible by the chunk, chunk > V and > N,
# one-token chunks.
CASES = [(3, 7, 37, 11, 8), (2, 5, 13, 6, 64), (1, 6, 17, 3, 1)]
# name -> (how to call the fused loss, how to compute the naive one)
OBJECTIVES = ["gt", "logit", "logit_gt", "tsld", "tsld_mean", "tsld_term", "tsld_term_mean"]


def make_inputs(batch, length, vocab, hidden, *, dtype, bias, teacher_form, scale=1.0, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * std).to(dtype)

    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[0, 1:3] = IGNORE
    if batch > 1:
        labels[-1] = IGNORE  # a sequence with nothing to score
    inputs = dict(
        student_hidden=randn(batch, length, hidden, std=scale).requires_grad_(),
        lm_head_weight=randn(vocab, hidden).requires_grad_(),
        lm_head_bias=randn(vocab).requires_grad_() if bias else None,
        labels=labels,
    )
    teacher_hidden, teacher_weight = randn(batch, length, hidden + 2, std=scale), randn(vocab, hidden + 2)
    teacher_bias = randn(vocab) if bias else None
    if teacher_form == "logits":
        inputs["teacher_logits"] = F.linear(teacher_hidden, teacher_weight, teacher_bias)
    else:
        inputs.update(teacher_hidden=teacher_hidden, teacher_weight=teacher_weight, teacher_bias=teacher_bias)
    return inputs


def teacher_logits_of(inputs):
    if "teacher_logits" in inputs:
        return inputs["teacher_logits"]
    return F.linear(inputs["teacher_hidden"], inputs["teacher_weight"], inputs["teacher_bias"])


def fused_objective(name, inputs, chunk):
    teacher = {k: v for k, v in inputs.items() if k.startswith("teacher_")}
    student = (inputs["student_hidden"], inputs["lm_head_weight"], inputs["labels"])
    if name == "gt" and not teacher:
        return fused_linear_cross_entropy(*student, lm_head_bias=inputs["lm_head_bias"], chunk_size=chunk)
    if name.startswith("tsld_term"):
        reduction = "mean" if name.endswith("mean") else "sum"
        return fused_linear_tsld_loss(
            *student, lm_head_bias=inputs["lm_head_bias"], reduction=reduction, chunk_size=chunk, **teacher
        )
    kd, reduction = ("tsld", "mean") if name == "tsld_mean" else (name, "sum")
    return fused_linear_kd_loss(
        *student, kd=kd, lm_head_bias=inputs["lm_head_bias"], reduction=reduction, chunk_size=chunk, **teacher
    )["loss"]


def naive_objective(name, inputs):
    """Autograd through the reference formula in float64 on the same (rounded) inputs."""
    h, w, b = (None if t is None else t.double() for t in
               (inputs["student_hidden"], inputs["lm_head_weight"], inputs["lm_head_bias"]))
    logits = F.linear(h, w, b)
    teacher = teacher_logits_of(inputs).double()
    labels = inputs["labels"]
    gt = gt_loss(logits, labels)
    logit = logit_kd_loss(logits, teacher, labels)
    tsld = tsld_loss(logits, teacher, labels, reduction="mean" if name.endswith("mean") else "sum")
    return {"gt": gt, "logit": logit, "logit_gt": logit + gt, "tsld": gt + tsld, "tsld_mean": gt + tsld,
            "tsld_term": tsld, "tsld_term_mean": tsld}[name]


def value_and_grads(loss, inputs):
    params = [inputs[k] for k in ("student_hidden", "lm_head_weight", "lm_head_bias") if inputs[k] is not None]
    return loss.detach(), torch.autograd.grad(loss, params)


def assert_matches_naive(name, inputs, chunk, rtol, atol):
    fused_value, fused_grads = value_and_grads(fused_objective(name, inputs, chunk), inputs)
    naive_value, naive_grads = value_and_grads(naive_objective(name, inputs), inputs)
    torch.testing.assert_close(fused_value.double(), naive_value, rtol=rtol, atol=atol)
    for fused_grad, naive_grad in zip(fused_grads, naive_grads):
        torch.testing.assert_close(fused_grad.double(), naive_grad.double(), rtol=rtol, atol=atol)


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "B{}L{}V{}H{}c{}".format(*c))
@pytest.mark.parametrize("dtype,rtol,atol", [(torch.float64, 1e-6, 1e-12), (torch.float32, 1e-4, 1e-6)],
                         ids=["fp64", "fp32"])
def test_fused_matches_naive(dtype, rtol, atol, case, bias, teacher_form, objective):
    batch, length, vocab, hidden, chunk = case
    inputs = make_inputs(batch, length, vocab, hidden, dtype=dtype, bias=bias, teacher_form=teacher_form)
    assert_matches_naive(objective, inputs, chunk, rtol, atol)


@pytest.mark.parametrize("objective", ["logit_gt", "tsld", "tsld_term_mean"])
def test_bf16_inputs_match_float64_reference(objective):
    # Logits come out of bf16 matmuls (relative rounding 2^-9), the rest is float32.
    inputs = make_inputs(4, 16, 300, 32, dtype=torch.bfloat16, bias=True, teacher_form="logits", scale=0.3)
    fused_value, fused_grads = value_and_grads(fused_objective(objective, inputs, 24), inputs)
    naive_value, naive_grads = value_and_grads(naive_objective(objective, inputs), inputs)
    assert fused_value.dtype == torch.float32
    assert [g.dtype for g in fused_grads] == [torch.bfloat16] * 3
    torch.testing.assert_close(fused_value.double(), naive_value, rtol=1e-3, atol=0)
    for fused_grad, naive_grad in zip(fused_grads, naive_grads):
        torch.testing.assert_close(fused_grad.double(), naive_grad.double(), rtol=2e-2, atol=2e-2 * naive_grad.abs().max().item())


@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_large_logits_stay_finite_and_exact(teacher_form):
    # |z| ~ 1e4: any exp without max-shifting or any -inf masking would overflow or give NaN.
    inputs = make_inputs(2, 9, 50, 8, dtype=torch.float32, bias=False, teacher_form=teacher_form, scale=3e3)
    assert teacher_logits_of(inputs).abs().max() > 1e4
    fused_value, fused_grads = value_and_grads(fused_objective("tsld", inputs, 4), inputs)
    naive_value, naive_grads = value_and_grads(naive_objective("tsld", inputs), inputs)
    assert torch.isfinite(fused_value) and all(torch.isfinite(g).all() for g in fused_grads)
    torch.testing.assert_close(fused_value.double(), naive_value, rtol=1e-5, atol=0)
    for fused_grad, naive_grad in zip(fused_grads, naive_grads):
        torch.testing.assert_close(fused_grad.double(), naive_grad.double(), rtol=1e-5, atol=1e-5 * naive_grad.abs().max().item())


@pytest.mark.parametrize("objective", ["tsld", "logit_gt"])
def test_backward_scales_by_grad_output(objective):
    inputs = make_inputs(3, 7, 37, 11, dtype=torch.float64, bias=True, teacher_form="hidden")
    _, grads = value_and_grads(fused_objective(objective, inputs, 8), inputs)
    for factor in (3.0, -0.5):
        _, scaled = value_and_grads(factor * fused_objective(objective, inputs, 8), inputs)
        for g, s in zip(grads, scaled):
            torch.testing.assert_close(s, factor * g, rtol=1e-12, atol=0)


def test_gradients_match_finite_differences():
    inputs = make_inputs(2, 6, 19, 5, dtype=torch.float64, bias=True, teacher_form="logits")
    names = ("student_hidden", "lm_head_weight", "lm_head_bias")
    _, grads = value_and_grads(fused_objective("tsld", inputs, 4), inputs)
    gen = torch.Generator().manual_seed(3)
    directions = [torch.randn(inputs[n].shape, generator=gen, dtype=torch.float64) for n in names]
    eps = 1e-6

    def at(sign):
        moved = dict(inputs, **{n: (inputs[n] + sign * eps * d).detach() for n, d in zip(names, directions)})
        with torch.no_grad():
            return fused_objective("tsld", moved, 4).item()

    numerical = (at(1) - at(-1)) / (2 * eps)
    analytical = sum((g * d).sum().item() for g, d in zip(grads, directions))
    assert analytical == pytest.approx(numerical, rel=1e-7)


def test_backward_runs_once():
    inputs = make_inputs(2, 5, 13, 6, dtype=torch.float64, bias=False, teacher_form="logits")
    loss = fused_objective("tsld", inputs, 4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_no_grad_gives_the_same_value():
    inputs = make_inputs(3, 7, 37, 11, dtype=torch.float64, bias=True, teacher_form="hidden")
    with_grad = fused_objective("tsld", inputs, 8)
    with torch.no_grad():
        without = fused_objective("tsld", inputs, 8)
    assert without.requires_grad is False
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-14, atol=0)


def test_non_contiguous_hidden_and_all_ignored():
    inputs = make_inputs(3, 7, 37, 11, dtype=torch.float64, bias=False, teacher_form="logits")
    base = inputs["student_hidden"].detach().transpose(0, 1).contiguous().requires_grad_()
    inputs["student_hidden"] = base.transpose(0, 1)  # a non-contiguous view
    fused_value, fused_grads = value_and_grads(fused_objective("tsld", inputs, 8), inputs)
    naive_value, naive_grads = value_and_grads(naive_objective("tsld", inputs), inputs)
    torch.testing.assert_close(fused_value, naive_value, rtol=1e-12, atol=0)
    torch.testing.assert_close(fused_grads[0], naive_grads[0], rtol=1e-10, atol=1e-14)

    inputs["labels"] = torch.full_like(inputs["labels"], IGNORE)
    value, grads = value_and_grads(fused_objective("tsld", inputs, 8), inputs)
    assert value.item() == 0 and all(torch.all(g == 0) for g in grads)


def test_teacher_must_be_given_once_with_matching_vocab():
    inputs = make_inputs(2, 5, 13, 6, dtype=torch.float32, bias=False, teacher_form="hidden")
    student = (inputs["student_hidden"], inputs["lm_head_weight"], inputs["labels"])
    with pytest.raises(ValueError, match="teacher"):
        fused_linear_tsld_loss(*student)
    with pytest.raises(ValueError, match="teacher"):
        fused_linear_tsld_loss(*student, teacher_logits=teacher_logits_of(inputs), teacher_hidden=inputs["teacher_hidden"])
    with pytest.raises(ValueError, match="vocabulary"):
        fused_linear_tsld_loss(*student, teacher_logits=teacher_logits_of(inputs)[..., :-1])


def test_default_chunk_size():
    assert default_chunk_size(128256, 512) == 256
    assert default_chunk_size(32000, 4096) == 2048
    assert default_chunk_size(128256, 4096) == 1040  # capped by the 512 MiB buffer
    assert default_chunk_size(50257, 16) == 16


class LargestAllocation(TorchDispatchMode):
    """Records the largest new tensor storage (in elements) any op creates, in forward and
    backward alike; views and in-place results share an input's storage and do not count."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = torch.utils._pytree.tree_leaves((args, kwargs))
        existing = {t.untyped_storage().data_ptr() for t in inputs if isinstance(t, torch.Tensor)}
        for t in torch.utils._pytree.tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in existing:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_fused_never_allocates_token_by_vocab_tensors(teacher_form):
    batch, length, vocab, hidden, chunk = 4, 64, 1000, 24, 16
    tokens = batch * length
    inputs = make_inputs(batch, length, vocab, hidden, dtype=torch.float32, bias=True, teacher_form=teacher_form)

    def largest_allocated_and_saved(impl):
        saved = [0]
        with LargestAllocation() as mode, torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t
        ):
            out = distillation_loss("tsld", impl=impl, chunk_size=chunk, **inputs)
            out["loss"].backward()
        return mode.largest, max(saved)

    allocated, saved = largest_allocated_and_saved("fused")
    assert allocated <= max(chunk * vocab, vocab * hidden) < tokens * vocab  # a block, or grad_W
    assert saved <= tokens * hidden
    # The detectors do see the naive path's [N, V] logits.
    assert min(largest_allocated_and_saved("naive")) >= tokens * vocab


@pytest.mark.parametrize("kd", KD_CHOICES)
def test_distillation_loss_fused_equals_naive(kd):
    inputs = make_inputs(3, 7, 37, 11, dtype=torch.float64, bias=True, teacher_form="hidden")
    teacher_layers = [torch.randn(3, 7, 11, generator=torch.Generator().manual_seed(5), dtype=torch.float64)] * 2
    results = {}
    for impl in ("fused", "naive"):
        if kd == "l2l":
            inputs.update(student_hidden_states=[inputs["student_hidden"] * 0.5, inputs["student_hidden"]],
                          teacher_hidden_states=teacher_layers)
        out = distillation_loss(kd, impl=impl, chunk_size=8, **inputs)
        results[impl] = (out, torch.autograd.grad(out["loss"], (inputs["student_hidden"], inputs["lm_head_weight"])))
    fused, naive = results["fused"], results["naive"]
    expected_terms = {"gt": {"gt"}, "logit": {"logit"}, "logit_gt": {"logit", "gt"}, "l2l": {"logit", "l2l"},
                      "tsld": {"gt", "tsld"}}[kd]
    assert set(fused[0]) == set(naive[0]) == expected_terms | {"loss"}
    for name in fused[0]:
        torch.testing.assert_close(fused[0][name], naive[0][name], rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(fused[0]["loss"], sum(fused[0][t] for t in expected_terms).detach())
    assert all(not fused[0][t].requires_grad for t in expected_terms)
    for f, n in zip(fused[1], naive[1]):
        torch.testing.assert_close(f, n, rtol=1e-10, atol=1e-14)
