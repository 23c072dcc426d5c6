"""Reference losses against an independent float64 restatement of docs/method.md §2, written with
loops."""
import functools
import math

import pytest
import torch

from tsld_ds.losses import (
    TOKEN_SCALES,
    gt_loss,
    l2l_loss,
    logit_kd_loss,
    token_scale,
    tsld_loss,
)

IGNORE = -100


# Tiny tensors: thread-pool hand-offs would dominate, badly so on a busy machine.
pytestmark = pytest.mark.usefixtures("one_thread")


def random_batch(batch=3, length=9, vocab=23, scale=3.0, seed=0):
    """Logits and labels with an ignored run and one fully ignored sequence."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64) * scale
    teacher = torch.randn(batch, length, vocab, generator=gen, dtype=torch.float64) * scale
    labels = torch.randint(0, vocab, (batch, length), generator=gen)
    labels[0, 2:5] = IGNORE
    labels[-1] = IGNORE
    return student, teacher, labels


def log_softmax_1d(z):
    z = z.tolist()
    m = max(z)
    log_normalizer = m + math.log(sum(math.exp(v - m) for v in z))
    return [v - log_normalizer for v in z]


def restated(student, teacher, labels, temperature=10.0):
    """Per sequence: (soft CE, teacher CE, student CE) for each position n with a label at n+1."""
    sequences = []
    for b in range(labels.shape[0]):
        rows = []
        for n in range(labels.shape[1] - 1):
            y = int(labels[b, n + 1])
            if y == IGNORE:
                continue
            log_ps = log_softmax_1d(student[b, n])
            log_pt = log_softmax_1d(teacher[b, n])
            soft = -sum(math.exp(log_pt[i]) * log_ps[i] for i in range(len(log_ps)))
            rows.append((soft, -log_pt[y], -log_ps[y]))
        sequences.append(rows)
    return sequences


SCALE_SIGNS = {"confidence": 1.0, "uniform": 0.0, "inverse": -1.0}  # exponent's sign on CE^T / τ


def restated_tsld(sequences, temperature, reduction, token_scale="confidence"):
    sign = SCALE_SIGNS[token_scale]
    total, counted = 0.0, 0
    for rows in sequences:
        if not rows:
            continue
        top = max(sign * ce_t / temperature for _, ce_t, _ in rows)
        exps = [math.exp(sign * ce_t / temperature - top) for _, ce_t, _ in rows]
        total += sum(e / sum(exps) * soft for e, (soft, _, _) in zip(exps, rows))
        counted += 1
    return total / counted if reduction == "mean" else total


def test_gt_loss_matches_restatement():
    student, _, labels = random_batch()
    rows = [r for seq in restated(student, student, labels) for r in seq]
    expected = sum(ce_s for _, _, ce_s in rows) / len(rows)
    assert gt_loss(student, labels).item() == pytest.approx(expected, rel=1e-12)


def test_logit_kd_loss_matches_restatement():
    student, teacher, labels = random_batch()
    rows = [r for seq in restated(student, teacher, labels) for r in seq]
    expected = sum(soft for soft, _, _ in rows) / len(rows)
    assert logit_kd_loss(student, teacher, labels).item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("token_scale", TOKEN_SCALES)
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("temperature", [10.0, 0.5])
def test_tsld_loss_matches_restatement(reduction, temperature, token_scale):
    student, teacher, labels = random_batch()
    expected = restated_tsld(restated(student, teacher, labels), temperature, reduction,
                             token_scale)
    got = tsld_loss(student, teacher, labels, temperature=temperature, reduction=reduction,
                    token_scale=token_scale)
    assert got.item() == pytest.approx(expected, rel=1e-12)


@pytest.mark.parametrize("vocab_chunk", [1, 5, 23, 100])
def test_tsld_vocab_chunks_give_same_value_and_grads(vocab_chunk):
    student, teacher, labels = random_batch()
    student.requires_grad_(True)
    direct = tsld_loss(student, teacher, labels)
    (grad_direct,) = torch.autograd.grad(direct, student)
    chunked = tsld_loss(student, teacher, labels, vocab_chunk=vocab_chunk)
    (grad_chunked,) = torch.autograd.grad(chunked, student)
    torch.testing.assert_close(chunked, direct, rtol=1e-12, atol=0)
    torch.testing.assert_close(grad_chunked, grad_direct, rtol=1e-10, atol=1e-14)


def test_token_scale_is_a_masked_softmax_per_sequence():
    teacher_ce = torch.tensor([[0.1, 5.0, 2.0, 9.0], [1.0, 1.0, 1.0, 1.0], [3.0, 4.0, 5.0, 6.0]])
    valid = torch.tensor([[True, True, True, False], [True, True, True, True], [False] * 4])
    w = token_scale(teacher_ce, valid, temperature=1.0)
    torch.testing.assert_close(w[0, :3], torch.softmax(teacher_ce[0, :3], dim=0))
    assert w[0, 3] == 0 and torch.all(w[2] == 0)
    torch.testing.assert_close(w[1], torch.full((4,), 0.25))
    # Confident teacher tokens (low CE) get the least weight.
    assert w[0, 0] < w[0, 2] < w[0, 1]
    assert torch.equal(w, token_scale(teacher_ce, valid, 1.0, "confidence"))


def test_token_scale_ablations():
    teacher_ce = torch.tensor([[0.1, 5.0, 2.0, 9.0], [3.0, 4.0, 5.0, 6.0]])
    valid = torch.tensor([[True, True, True, False], [False] * 4])
    uniform = token_scale(teacher_ce, valid, 2.0, "uniform")
    torch.testing.assert_close(uniform, torch.tensor([[1 / 3] * 3 + [0.0], [0.0] * 4]))
    inverse = token_scale(teacher_ce, valid, 2.0, "inverse")
    torch.testing.assert_close(inverse[0, :3], torch.softmax(-teacher_ce[0, :3] / 2.0, dim=0))
    assert inverse[0, 3] == 0 and torch.all(inverse[1] == 0)
    # Confident teacher tokens (low CE) get the most weight.
    assert inverse[0, 0] > inverse[0, 2] > inverse[0, 1]
    with pytest.raises(ValueError, match="token scale"):
        token_scale(teacher_ce, valid, 2.0, "flat")


def test_ignored_positions_do_not_matter_and_empty_sequences_give_zero():
    student, teacher, labels = random_batch()
    garbage_student, garbage_teacher = student.clone(), teacher.clone()
    # Positions whose next label is ignored, the last positions, and the ignored sequence.
    for t in (garbage_student, garbage_teacher):
        t[0, 1:4] = 1e30
        t[:, -1] = -1e30
        t[-1] = 7e29
    tsld_scales = [functools.partial(tsld_loss, token_scale=scale) for scale in TOKEN_SCALES]
    for loss in (*tsld_scales, logit_kd_loss):
        expected = loss(student, teacher, labels)
        torch.testing.assert_close(loss(garbage_student, garbage_teacher, labels), expected,
                                   rtol=1e-12, atol=0)
    all_ignored = torch.full_like(labels, IGNORE)
    student.requires_grad_(True)
    for loss in (tsld_loss(student, teacher, all_ignored),
                 logit_kd_loss(student, teacher, all_ignored), gt_loss(student, all_ignored)):
        (grad,) = torch.autograd.grad(loss, student)
        assert loss.item() == 0 and torch.all(grad == 0)


def test_large_logits_are_stable():
    student, teacher, labels = random_batch(scale=1e4)
    expected = restated_tsld(restated(student, teacher, labels), 10.0, "sum")
    student32, teacher32 = student.float(), teacher.float()
    for got in (tsld_loss(student, teacher, labels), tsld_loss(student32, teacher32, labels),
                tsld_loss(student32, teacher32, labels, vocab_chunk=4)):
        assert torch.isfinite(got)
        assert got.item() == pytest.approx(expected, rel=1e-5)


def test_teacher_gets_no_gradient():
    student, teacher, labels = random_batch()
    student.requires_grad_(True)
    teacher.requires_grad_(True)
    (tsld_loss(student, teacher, labels) + logit_kd_loss(student, teacher, labels)).backward()
    assert teacher.grad is None and student.grad is not None


def test_bf16_logits_are_upcast():
    student, teacher, labels = random_batch()
    student, teacher = student.bfloat16(), teacher.bfloat16()
    got = tsld_loss(student, teacher, labels)
    assert got.dtype == torch.float32
    expected = tsld_loss(student.double(), teacher.double(), labels)
    assert got.item() == pytest.approx(expected.item(), rel=1e-5)


def test_l2l_loss_matches_restatement():
    gen = torch.Generator().manual_seed(1)
    batch, length, hidden, heads, layers = 2, 5, 4, 3, 3

    def randoms(make, shape, count):
        return [make(*shape, generator=gen, dtype=torch.float64) for _ in range(count)]

    student_h = randoms(torch.randn, (batch, length, hidden), layers + 1)
    teacher_h = randoms(torch.randn, (batch, length, hidden), layers + 1)
    student_a = randoms(torch.rand, (batch, heads, length, length), layers)
    teacher_a = randoms(torch.rand, (batch, heads, length, length), layers)
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, 3:] = 0

    def mse(s, t, keep):
        diffs = [(s[idx] - t[idx]).item() ** 2 for idx in keep]
        return sum(diffs) / len(diffs)

    hidden_keep = [(b, n, k) for b in range(batch) for n in range(length) for k in range(hidden)
                   if mask[b, n]]
    attention_keep = [(b, h, q, k) for b in range(batch) for h in range(heads)
                      for q in range(length) for k in range(length) if mask[b, q] and mask[b, k]]

    expected = sum(mse(s, t, hidden_keep) for s, t in zip(student_h, teacher_h))
    expected += sum(mse(s, t, attention_keep) for s, t in zip(student_a, teacher_a))
    got = l2l_loss(student_h, teacher_h, student_a, teacher_a, attention_mask=mask)
    assert got.item() == pytest.approx(expected, rel=1e-12)

    unmasked = sum(((s - t) ** 2).mean().item() for s, t in zip(student_h, teacher_h))
    assert l2l_loss(student_h, teacher_h).item() == pytest.approx(unmasked, rel=1e-12)
    with pytest.raises(ValueError):
        l2l_loss(student_h, teacher_h[:-1])
