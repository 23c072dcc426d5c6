"""The fused chunked lm_head loss against autograd through the reference losses (float64), for
every objective, teacher form, odd sizes and vocabulary blocks; its memory bounds."""
import pytest
import torch
import torch.nn.functional as F
from helpers import make_loss_inputs, student_inputs, teacher_logits_of, teacher_of
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from tsld_ds.losses import (
    Objective,
    default_chunk_size,
    fused_linear_loss,
    fused_linear_tsld_loss,
    gt_loss,
    logit_kd_loss,
    tsld_loss,
)

IGNORE = -100
PARAMS = ("student_hidden", "lm_head_weight", "lm_head_bias")

# (batch, length, vocab, hidden, chunk, vocab_chunk): V and N not divisible by the chunks, chunks
# larger than V and N, one-token and one-entry blocks; None is the whole vocabulary (one sweep).
CASES = [(3, 7, 37, 11, 8, None), (3, 7, 37, 11, 8, 10), (2, 5, 13, 6, 64, None),
         (2, 5, 13, 6, 64, 64), (1, 6, 17, 3, 1, 1)]
# tsld* names: "_term" the TSLD term alone (else gt + TSLD), "_mean" its mean reduction (else sum),
# "_uniform"/"_inverse" its token scale (else confidence).
OBJECTIVES = ["gt", "logit", "logit_gt", "tsld", "tsld_mean", "tsld_term", "tsld_term_mean",
              "tsld_uniform", "tsld_inverse", "tsld_term_inverse_mean"]


# Tiny tensors: thread-pool hand-offs would dominate, badly so on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def tsld_options(name):
    """reduction and token_scale of a tsld* objective name."""
    token_scale = next((s for s in ("uniform", "inverse") if s in name), "confidence")
    return dict(reduction="mean" if name.endswith("mean") else "sum", token_scale=token_scale)


def fused_objective(name, inputs, chunk, vocab_chunk=None):
    """The loss of objective `name` (OBJECTIVES) by the fused path: the TSLD term alone through
    its functional contract `fused_linear_tsld_loss`, the others through `fused_linear_loss`."""
    teacher = {k: v for k, v in inputs.items() if k.startswith("teacher_")}
    student = student_inputs(inputs)
    blocks = dict(chunk_size=chunk, vocab_chunk_size=vocab_chunk)
    if name.startswith("tsld_term"):
        return fused_linear_tsld_loss(*student, lm_head_bias=inputs["lm_head_bias"],
                                      **tsld_options(name), **blocks, **teacher)
    options = tsld_options(name) if name.startswith("tsld") else {}
    objective = Objective.from_kd(name.partition("_")[0] if name.startswith("tsld") else name,
                                  **options, **blocks)
    teacher = teacher_of(inputs) if objective.needs_teacher else None
    return fused_linear_loss(*student, objective, teacher,
                             lm_head_bias=inputs["lm_head_bias"])["loss"]


def naive_objective(name, inputs):
    """Autograd through the reference formula in float64 on the same (rounded) inputs."""
    h, w, b = (None if inputs[k] is None else inputs[k].double() for k in PARAMS)
    logits = F.linear(h, w, b)
    teacher, labels = teacher_logits_of(inputs).double(), inputs["labels"]
    gt = gt_loss(logits, labels)
    logit = logit_kd_loss(logits, teacher, labels)
    if name.startswith("tsld"):
        tsld = tsld_loss(logits, teacher, labels, **tsld_options(name))
        return tsld if name.startswith("tsld_term") else gt + tsld
    return {"gt": gt, "logit": logit, "logit_gt": logit + gt}[name]


def value_and_grads(loss, inputs):
    params = [inputs[k] for k in PARAMS if inputs[k] is not None]
    return loss.detach(), torch.autograd.grad(loss, params)


def assert_matches_naive(name, inputs, chunk, rtol, atol, grad_atol_fraction=None,
                         vocab_chunk=None):
    """Values and grads of the fused objective equal the naive float64 ones. With
    grad_atol_fraction, each grad's atol is that fraction of its largest entry."""
    fused_value, fused_grads = value_and_grads(
        fused_objective(name, inputs, chunk, vocab_chunk), inputs)
    naive_value, naive_grads = value_and_grads(naive_objective(name, inputs), inputs)
    torch.testing.assert_close(fused_value.double(), naive_value, rtol=rtol, atol=atol)
    for fused_grad, naive_grad in zip(fused_grads, naive_grads):
        assert fused_grad.dtype == naive_grad.dtype  # gradients come back in the input dtype
        if grad_atol_fraction is not None:
            atol = grad_atol_fraction * naive_grad.abs().max().item()
        torch.testing.assert_close(fused_grad.double(), naive_grad.double(), rtol=rtol, atol=atol)
    return fused_value, fused_grads


# Every shape in float64 (exactness), one sweep and two in float32 (accumulation precision).
PRECISIONS = [(torch.float64, 1e-6, 1e-12, case) for case in CASES]
PRECISIONS += [(torch.float32, 1e-4, 1e-6, case) for case in CASES[:2]]
PRECISION_IDS = ["{}-B{}L{}V{}H{}c{}v{}".format(str(p[0])[6:], *p[3]) for p in PRECISIONS]


@pytest.mark.parametrize("objective", OBJECTIVES)
@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("dtype,rtol,atol,case", PRECISIONS, ids=PRECISION_IDS)
def test_fused_matches_naive(dtype, rtol, atol, case, bias, teacher_form, objective, device):
    batch, length, vocab, hidden, chunk, vocab_chunk = case
    inputs = make_loss_inputs(batch, length, vocab, hidden, device=device, dtype=dtype, bias=bias,
                              teacher_form=teacher_form)
    assert_matches_naive(objective, inputs, chunk, rtol, atol, vocab_chunk=vocab_chunk)


@pytest.mark.parametrize("vocab_chunk", [None, 64])
@pytest.mark.parametrize("objective", ["logit_gt", "tsld", "tsld_term_mean"])
def test_bf16_inputs_match_float64_reference(objective, vocab_chunk, device):
    # The logits come out of bf16 matmuls (relative rounding 2^-9) and the grads are returned in
    # bf16; everything in between is float32.
    inputs = make_loss_inputs(4, 16, 300, 32, device=device,
                              dtype=torch.bfloat16, bias=True, teacher_form="logits",
                              scale=0.3)
    value, _ = assert_matches_naive(objective, inputs, 24, rtol=1e-3, atol=0,
                                    grad_atol_fraction=2e-2, vocab_chunk=vocab_chunk)
    assert value.dtype == torch.float32


@pytest.mark.parametrize("vocab_chunk", [None, 7])
@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_large_logits_stay_finite_and_exact(teacher_form, vocab_chunk, device):
    # |z| ~ 1e4: an exp without max-shifting or any -inf masking would overflow or give NaN.
    inputs = make_loss_inputs(2, 9, 50, 8, device=device,
                              dtype=torch.float32, bias=False, teacher_form=teacher_form,
                              scale=3e3)
    assert teacher_logits_of(inputs).abs().max() > 1e4
    value, grads = assert_matches_naive("tsld", inputs, 4, rtol=1e-5, atol=0,
                                        grad_atol_fraction=1e-5, vocab_chunk=vocab_chunk)
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("objective", ["tsld", "logit_gt"])
def test_backward_scales_by_grad_output(objective, device):
    inputs = make_loss_inputs(3, 7, 37, 11, device=device,
                              dtype=torch.float64, bias=True, teacher_form="hidden")
    _, grads = value_and_grads(fused_objective(objective, inputs, 8), inputs)
    for factor in (3.0, -0.5):
        _, scaled = value_and_grads(factor * fused_objective(objective, inputs, 8), inputs)
        for g, s in zip(grads, scaled):
            torch.testing.assert_close(s, factor * g, rtol=1e-12, atol=0)


def test_gradients_match_finite_differences(device):
    inputs = make_loss_inputs(2, 6, 19, 5, device=device,
                              dtype=torch.float64, bias=True, teacher_form="logits")
    _, grads = value_and_grads(fused_objective("tsld", inputs, 4), inputs)
    gen = torch.Generator().manual_seed(3)
    directions = {k: torch.randn(inputs[k].shape, generator=gen, dtype=torch.float64,
                                 device="cpu").to(device) for k in PARAMS}
    eps = 1e-6

    def moved(sign):
        shifted = {k: (inputs[k] + sign * eps * d).detach() for k, d in directions.items()}
        with torch.no_grad():
            return fused_objective("tsld", {**inputs, **shifted}, 4).item()

    numerical = (moved(1) - moved(-1)) / (2 * eps)
    analytical = sum((g * directions[k]).sum().item() for k, g in zip(PARAMS, grads))
    assert analytical == pytest.approx(numerical, rel=1e-7)


def test_backward_runs_once(device):
    inputs = make_loss_inputs(2, 5, 13, 6, device=device,
                              dtype=torch.float64, bias=False, teacher_form="logits")
    loss = fused_objective("tsld", inputs, 4)
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="once"):
        loss.backward()


def test_no_grad_gives_the_same_value(device):
    inputs = make_loss_inputs(3, 7, 37, 11, device=device,
                              dtype=torch.float64, bias=True, teacher_form="hidden")
    with_grad = fused_objective("tsld", inputs, 8)
    with torch.no_grad():
        without = fused_objective("tsld", inputs, 8)
    assert not without.requires_grad
    torch.testing.assert_close(without, with_grad.detach(), rtol=1e-14, atol=0)


def test_non_contiguous_hidden_and_all_ignored(device):
    inputs = make_loss_inputs(3, 7, 37, 11, device=device,
                              dtype=torch.float64, bias=False, teacher_form="logits")
    base = inputs["student_hidden"].detach().transpose(0, 1).contiguous().requires_grad_()
    inputs["student_hidden"] = base.transpose(0, 1)  # a non-contiguous view
    assert_matches_naive("tsld", inputs, 8, rtol=1e-10, atol=1e-14)

    inputs["labels"] = torch.full_like(inputs["labels"], IGNORE)
    value, grads = value_and_grads(fused_objective("tsld", inputs, 8), inputs)
    assert value.item() == 0 and all(torch.all(g == 0) for g in grads)


def test_teacher_must_be_given_once_with_matching_vocab(device):
    inputs = make_loss_inputs(2, 5, 13, 6, device=device,
                              dtype=torch.float32, bias=False, teacher_form="hidden")
    student = (inputs["student_hidden"], inputs["lm_head_weight"], inputs["labels"])
    logits = teacher_logits_of(inputs)
    with pytest.raises(ValueError, match="teacher"):
        fused_linear_tsld_loss(*student)
    with pytest.raises(ValueError, match="teacher"):
        fused_linear_tsld_loss(*student, teacher_logits=logits,
                               teacher_hidden=inputs["teacher_hidden"])
    with pytest.raises(ValueError, match="vocabulary"):
        fused_linear_tsld_loss(*student, teacher_logits=logits[..., :-1])


@pytest.mark.parametrize("vocab", [13, 4096, 32000, 50257, 128256, 1 << 22])
@pytest.mark.parametrize("hidden", [16, 100, 512, 4096, 8192])
def test_default_chunk_size_is_the_largest_that_keeps_the_buffers_bounded(vocab, hidden):
    """A multiple of 16, at least 16; above that, its two float32 [chunk, V] buffers stay within
    half the [V, H] weight-gradient accumulator (chunk <= H/4) or one is at most 16 MiB, and one
    buffer within 512 MiB; and 16 more tokens would break one of those bounds."""
    chunk = default_chunk_size(vocab, hidden)

    def bounded(c):
        return (2 * c * vocab <= vocab * hidden // 2 or 4 * c * vocab <= 16 << 20) \
            and 4 * c * vocab <= 512 << 20

    assert chunk % 16 == 0 and chunk >= 16
    assert chunk == 16 or bounded(chunk)
    assert not bounded(chunk + 16)


class LargestAllocation(TorchDispatchMode):
    """Records the largest new tensor storage (in elements) any op creates, in forward and
    backward alike; views and in-place results share an input's storage and do not count."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        existing = {t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs))
                    if isinstance(t, torch.Tensor)}
        for t in tree_leaves(out):
            if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in existing:
                self.largest = max(self.largest, t.untyped_storage().nbytes() // t.element_size())
        return out


@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_fused_never_allocates_token_by_vocab_tensors(teacher_form, device):
    batch, length, vocab, hidden, chunk = 4, 64, 1000, 24, 16
    tokens = batch * length
    inputs = make_loss_inputs(batch, length, vocab, hidden, device=device,
                              dtype=torch.float32, bias=True,
                              teacher_form=teacher_form)

    def largest_allocated_and_saved(impl):
        saved = [0]
        with LargestAllocation() as mode, torch.autograd.graph.saved_tensors_hooks(
            lambda t: saved.append(t.numel()) or t, lambda t: t
        ):
            objective = Objective.from_kd("tsld", impl=impl, chunk_size=chunk)
            objective(*student_inputs(inputs), teacher_of(inputs),
                      lm_head_bias=inputs["lm_head_bias"])["loss"].backward()
        return mode.largest, max(saved)

    allocated, saved = largest_allocated_and_saved("fused")
    # A [chunk, V] buffer or the [V, H] weight gradient, never [N, V]; nothing big saved.
    assert allocated <= max(chunk * vocab, vocab * hidden) < tokens * vocab
    assert saved <= tokens * hidden
    # The detectors do see the naive path's [N, V] logits.
    assert min(largest_allocated_and_saved("naive")) >= tokens * vocab


@pytest.mark.parametrize("teacher_form", ["logits", "hidden"])
def test_vocab_blocks_bound_the_buffers(teacher_form, device):
    # Token chunks so long that [chunk, V] outgrows the [V, H] weight gradient: vocabulary blocks
    # bring the buffers down to [chunk, vocab_chunk].
    batch, length, vocab, hidden, chunk, vocab_chunk = 2, 64, 1000, 24, 48, 100
    inputs = make_loss_inputs(batch, length, vocab, hidden, device=device,
                              dtype=torch.float32, bias=True,
                              teacher_form=teacher_form)

    def largest_allocated(vocab_chunk_size):
        with LargestAllocation() as mode:
            objective = Objective.from_kd("tsld", chunk_size=chunk,
                                          vocab_chunk_size=vocab_chunk_size)
            objective(*student_inputs(inputs), teacher_of(inputs),
                      lm_head_bias=inputs["lm_head_bias"])["loss"].backward()
        return mode.largest

    assert largest_allocated(vocab_chunk) <= vocab * hidden < chunk * vocab
    assert largest_allocated(None) >= chunk * vocab


# --- a teacher from a top-k cache (TopKTeacher) ----------------------------------------------

def topk_teacher_of(inputs, k):
    """The TopKTeacher a cache would store for the inputs' teacher (its rounded logits)."""
    from tsld_ds.losses import TopKTeacher, next_token_targets

    logp = torch.log_softmax(teacher_logits_of(inputs).double(), dim=-1)
    values, ids = logp.topk(k, dim=-1)
    targets = next_token_targets(inputs["labels"]).clamp_min(0)
    target = logp.gather(-1, targets[..., None]).squeeze(-1)
    return TopKTeacher(values.float(), ids.int(), target.float())


def topk_losses(name, inputs, teacher, chunk, vocab_chunk, impl):
    """The objective `name` with a top-k teacher through `Objective` (fused or naive), inputs
    cast to float64 for the naive reference."""
    kd = name.partition("_")[0] if name.startswith("tsld") else name
    options = tsld_options(name) if name.startswith("tsld") else {}
    objective = Objective.from_kd(kd, impl=impl, chunk_size=chunk, vocab_chunk_size=vocab_chunk,
                                  **options)
    h, w, b = (None if inputs[k] is None else inputs[k] for k in PARAMS)
    if impl == "naive":
        h, w, b = (None if t is None else t.double() for t in (h, w, b))
    from tsld_ds.losses import TeacherOutput

    return objective(h, w, inputs["labels"], TeacherOutput(topk=teacher), lm_head_bias=b)["loss"]


def assert_topk_fused_matches_reference(objective, inputs, teacher, chunk, vocab_chunk):
    """Fused against autograd through the float64 reference: values and gradients."""
    fused_value, fused_grads = value_and_grads(
        topk_losses(objective, inputs, teacher, chunk, vocab_chunk, "fused"), inputs)
    naive_value, naive_grads = value_and_grads(
        topk_losses(objective, inputs, teacher, chunk, vocab_chunk, "naive"), inputs)
    torch.testing.assert_close(fused_value, naive_value, rtol=1e-10, atol=1e-12)
    for fused_grad, naive_grad in zip(fused_grads, naive_grads):
        torch.testing.assert_close(fused_grad, naive_grad, rtol=1e-9, atol=1e-12)


TOPK_CASES = [(3, 7, 37, 11, 8, None), (3, 7, 37, 11, 8, 10), (1, 6, 17, 3, 1, 1)]


@pytest.mark.parametrize("k", [1, 5, 16])
@pytest.mark.parametrize("objective", ["logit", "logit_gt", "tsld", "tsld_mean", "tsld_inverse"])
@pytest.mark.parametrize("case", TOPK_CASES, ids=["B{}L{}V{}H{}c{}v{}".format(*c)
                                                  for c in TOPK_CASES])
def test_topk_teacher_matches_reference(case, objective, k, device):
    """The K + 1 bucket soft CE, fused (one sweep and vocabulary blocks), against autograd
    through the reference in float64, values and gradients."""
    batch, length, vocab, hidden, chunk, vocab_chunk = case
    inputs = make_loss_inputs(batch, length, vocab, hidden, device=device, dtype=torch.float64,
                              bias=True, teacher_form="hidden")
    teacher = topk_teacher_of(inputs, min(k, vocab))
    assert_topk_fused_matches_reference(objective, inputs, teacher, chunk, vocab_chunk)


@pytest.mark.parametrize("objective", ["logit", "logit_gt", "tsld", "tsld_inverse"])
@pytest.mark.parametrize("case", TOPK_CASES[:2], ids=["B{}L{}V{}H{}c{}v{}".format(*c)
                                                      for c in TOPK_CASES[:2]])
def test_topk_teacher_with_a_sampled_tail_matches_reference(case, objective, device):
    """Top 5 and 16 draws from the tail (tsld-cache --tail_samples): no tail bucket, repeated
    draws leaving -inf entries; fused against the float64 reference, values and gradients."""
    from tsld_ds.losses import topk_with_sampled_tail

    batch, length, vocab, hidden, chunk, vocab_chunk = case
    inputs = make_loss_inputs(batch, length, vocab, hidden, device=device, dtype=torch.float64,
                              bias=True, teacher_form="hidden")
    exact = topk_teacher_of(inputs, vocab)
    logp = torch.log_softmax(teacher_logits_of(inputs).double(), dim=-1).flatten(0, 1)
    values, ids = topk_with_sampled_tail(logp, 5, 16, torch.Generator(device).manual_seed(0))
    assert values.isinf().any()  # some draws repeat
    teacher = exact._replace(logprobs=values.float().view(batch, length, -1),
                             ids=ids.int().view(batch, length, -1), has_tail=False)
    assert_topk_fused_matches_reference(objective, inputs, teacher, chunk, vocab_chunk)


def test_a_sampled_tail_is_an_unbiased_target(device):
    """The sparse target of top k plus tail draws sums to 1, keeps the top k exact, names each
    token once, and averages to the full distribution (so the soft term's value and gradient,
    linear in it, do too)."""
    from tsld_ds.losses import topk_with_sampled_tail

    logp = torch.log_softmax(2 * torch.randn(6, 41, dtype=torch.float64, device=device), dim=-1)
    draws, samples = 4000, 8
    generator = torch.Generator(device).manual_seed(1)
    mean = torch.zeros_like(logp)
    for _ in range(draws):
        values, ids = topk_with_sampled_tail(logp, 4, samples, generator)
        assert all(len(set(row.tolist())) == 4 + samples for row in ids)
        target = torch.zeros_like(logp).scatter_(1, ids, values.exp())
        mean += target / draws
    torch.testing.assert_close(target.sum(dim=1), torch.ones(6, dtype=target.dtype,
                                                              device=device))
    top_values, top_ids = logp.topk(4, dim=-1)
    torch.testing.assert_close(values[:, :4], top_values)
    assert torch.equal(ids[:, :4], top_ids)
    # each entry's mean has a standard deviation of at most sqrt(P_tail p_i / (samples draws))
    std = (logp.exp() / (samples * draws)).sqrt()
    assert ((mean - logp.exp()).abs() <= 5 * std + 1e-12).all()


@pytest.mark.parametrize("vocab_chunk", [None, 10])
@pytest.mark.parametrize("objective", ["logit_gt", "tsld"])
def test_topk_teacher_with_every_token_is_the_exact_loss(objective, vocab_chunk, device):
    """K = V leaves no tail: the cached rows give the full-distribution loss and its gradients."""
    inputs = make_loss_inputs(3, 7, 37, 11, device=device, dtype=torch.float64, bias=True,
                              teacher_form="logits")
    teacher = topk_teacher_of(inputs, 37)
    value, grads = value_and_grads(
        topk_losses(objective, inputs, teacher, 8, vocab_chunk, "fused"), inputs)
    exact_value, exact_grads = value_and_grads(naive_objective(objective, inputs), inputs)
    torch.testing.assert_close(value, exact_value, rtol=1e-6, atol=0)  # float32 log-probs
    for g, exact in zip(grads, exact_grads):
        torch.testing.assert_close(g, exact, rtol=1e-5, atol=1e-6 * exact.abs().max().item())


@pytest.mark.parametrize("dtype,lift", [(torch.float64, 60.0), (torch.float32, 95.0)])
@pytest.mark.parametrize("vocab_chunk", [None, 7])
def test_topk_teacher_with_a_confident_student_stays_finite(vocab_chunk, dtype, lift, device):
    """A student whose K tokens hold all but ~e^-lift of its mass: 1 - Σ p^S is 0, and in
    float32 e^-95 relative to the max underflows. The tail has its own log-sum-exp, so value
    and gradients stay finite and match the float64 reference."""
    inputs = make_loss_inputs(2, 9, 50, 50, device=device, dtype=dtype, bias=False,
                              teacher_form="logits")
    teacher = topk_teacher_of(inputs, 4)
    boost = torch.zeros(2, 9, 50, dtype=dtype, device=device)
    boost.scatter_(-1, teacher.ids.long(), lift)
    # lm_head = identity: the student's logits are its hidden states, the teacher's lifted ones.
    inputs["lm_head_weight"] = torch.eye(50, dtype=dtype, device=device).requires_grad_()
    inputs["student_hidden"] = (inputs["teacher_logits"] + boost).requires_grad_()
    student_p = torch.softmax(inputs["student_hidden"].detach().double(), dim=-1)
    assert (1 - student_p.gather(-1, teacher.ids.long()).sum(-1)).abs().max() < 1e-15
    value, grads = value_and_grads(
        topk_losses("tsld", inputs, teacher, 4, vocab_chunk, "fused"), inputs)
    ref_value, ref_grads = value_and_grads(
        topk_losses("tsld", inputs, teacher, 4, vocab_chunk, "naive"), inputs)
    assert torch.isfinite(value) and all(torch.isfinite(g).all() for g in grads)
    rtol = 1e-10 if dtype == torch.float64 else 1e-5
    torch.testing.assert_close(value.double(), ref_value, rtol=rtol, atol=0)
    for g, ref in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), ref.double(), rtol=rtol * 100,
                                   atol=rtol * ref.abs().max().item())
