"""Fused lm_head + next-token losses (CE, logit KD, TSLD) that never build the full logits.

The student's logits z = h @ W.T (+ b) exist only one token chunk at a time, in a reused float32
[chunk, V] buffer. For each chunk the loss value *and* its gradient are computed in forward:
for a per-token loss a_n·softCE_n + b_n·CE_n the gradient w.r.t. the logits is
a_n·(p^S - p^T) + b_n·(p^S - onehot(y_n)), which is pushed straight through the lm_head into
grad_hidden [N, H] and the float32 accumulators grad_W [V, H], grad_b [V]. Backward only scales
them by grad_output. Peak extra memory is two [chunk, V] buffers (student, teacher) plus those
gradients, instead of several [N, V] tensors.

By default a chunk's block covers the whole vocabulary, so one sweep gives both the exact
normalizer and the gradient: 3 matmuls per chunk (logits, grad_hidden, grad_W), the same as
autograd through the naive loss. With ``vocab_chunk_size`` < V the block is also cut along the
vocabulary ([chunk, vocab_chunk] buffers, for vocabularies too large for even a small token
chunk): a first sweep keeps a running max and a rescaled running sum per row (online
log-sum-exp) for student and teacher, a second sweep recomputes each block's logits and pushes
its gradient: 4 matmuls instead of 3. The TSLD token scale needs every position's teacher CE
before any weighted term, so TSLD runs a teacher-only pass first.

The teacher is a fixed target (no gradient), given as logits [B, L, V] or as its final hidden
states and lm_head, in which case its logits are also built one chunk at a time.
"""
from typing import Dict, NamedTuple, Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import positions
from .positions import next_token_targets

# kd name -> (soft term, with gt CE). "tsld" is gt + TSLD, as the training option means it.
KD_TERMS = {
    "gt": (None, True),
    "logit": ("logit", False),
    "logit_gt": ("logit", True),
    "tsld": ("tsld", True),
}


def default_chunk_size(vocab_size: int, hidden_size: int) -> int:
    """Tokens per chunk when none is given: min(H // 2, 2^27 // V), floored to a multiple of 16
    and at least 16.

    A chunk works in two float32 [chunk, V] buffers, so chunk <= H/2 keeps them within the size
    of the float32 [V, H] weight-gradient accumulator that the loss holds anyway (chunking never
    dominates the footprint), and 2^27 // V caps one buffer at 512 MiB. Larger chunks make
    larger, more efficient matmuls. H = 512 gives 256 tokens; H = 4096 gives 2048 (V = 32000)
    or 1040 (V = 128256).
    """
    chunk = min(hidden_size // 2, (1 << 27) // vocab_size)
    return max(16, chunk // 16 * 16)


def _linear_into(out: Tensor, x: Tensor, weight: Tensor, bias: Optional[Tensor]) -> Tensor:
    """out = x @ weight.T (+ bias): the matmul runs in x's dtype, the result lands in out's dtype.

    Writing into a reused buffer matters on CPU, where a fresh [chunk, V] allocation costs more
    (page faults) than the matmul's own output writes.
    """
    if x.dtype != out.dtype:
        return out.copy_(F.linear(x, weight, bias))
    if bias is None:
        return torch.mm(x, weight.t(), out=out)
    return torch.addmm(bias, x, weight.t(), out=out)


class _Teacher(NamedTuple):
    """Teacher logits for selected token rows, from full logits or from hidden states + lm_head."""

    logits: Optional[Tensor]  # [N, V]
    hidden: Optional[Tensor]  # [N, H_teacher]
    weight: Optional[Tensor]  # [V, H_teacher]
    bias: Optional[Tensor]  # [V]

    @property
    def vocab_size(self) -> int:
        return self.logits.shape[1] if self.logits is not None else self.weight.shape[0]

    def logits_into(self, out: Tensor, rows: Tensor, cols: slice) -> Tensor:
        """out = the teacher's logits of token rows `rows`, vocabulary entries `cols`."""
        if self.logits is None:
            return _linear_into(out, self.hidden.index_select(0, rows), self.weight[cols],
                                None if self.bias is None else self.bias[cols])
        return _copy_rows_into(out, self.logits[:, cols], rows)


def _copy_rows_into(out: Tensor, source: Tensor, rows: Tensor) -> Tensor:
    """out[i] = source[rows[i]], cast to out's dtype.

    The rows come in runs of consecutive positions (a sequence's valid ones). On the CPU a slice
    copy per run is about 3x faster than index_select, which matters for [chunk, V] teacher
    logits; on a GPU index_select is as fast and avoids reading the rows back to the host.
    """
    if source.device.type != "cpu":
        if source.dtype == out.dtype:
            return torch.index_select(source, 0, rows, out=out)
        return out.copy_(source.index_select(0, rows))
    positions = rows.tolist()
    run_start = 0
    for i in range(1, len(positions) + 1):
        if i == len(positions) or positions[i] != positions[i - 1] + 1:
            first = positions[run_start]
            out[run_start:i].copy_(source[first:first + i - run_start])
            run_start = i
    return out


class _RunningLogSumExp:
    """Per-row log Σ exp over vocabulary blocks seen one at a time: a running max and the sum of
    exp(z - running max), rescaled whenever the max grows."""

    def __init__(self, rows: int, dtype, device):
        self.max = torch.full((rows,), float("-inf"), dtype=dtype, device=device)
        self.sum = torch.zeros(rows, dtype=dtype, device=device)

    def add_exp_(self, block: Tensor) -> Tensor:
        """Folds in a [rows, width] block, which it overwrites with exp(block - new max).
        Returns the factor exp(old max - new max) by which sums over earlier blocks shrink."""
        new_max = torch.maximum(self.max, block.amax(dim=1))
        rescale = (self.max - new_max).exp()
        block.sub_(new_max[:, None]).exp_()
        self.sum = self.sum * rescale + block.sum(dim=1)
        self.max = new_max
        return rescale

    def start_shifted_(self, block: Tensor) -> None:
        """Starts from a first block already shifted to row max 0, overwritten with its exp
        (saves add_exp_'s max and subtraction passes)."""
        self.max = torch.zeros_like(self.max)
        self.sum = block.exp_().sum(dim=1)

    def log_sum_exp(self) -> Tensor:
        return self.max + self.sum.log()


def _chunks(length: int, chunk_size: int):
    """Slices of [0, length) of chunk_size entries (the last one shorter): token rows or
    vocabulary entries."""
    return (slice(start, min(start + chunk_size, length))
            for start in range(0, length, chunk_size))


def _block(buffer: Tensor, rows: int, cols: slice) -> Tensor:
    """A contiguous [rows, block width] view at the start of a flat reused buffer."""
    width = cols.stop - cols.start
    return buffer[: rows * width].view(rows, width)


def _targets_in(cols: slice, targets: Tensor) -> Tuple[Tensor, Tensor]:
    """(whether each row's target lies in the vocabulary block, its column in the block or 0)."""
    inside = (targets >= cols.start) & (targets < cols.stop)
    return inside, torch.where(inside, targets - cols.start, 0)


@torch.no_grad()
def _teacher_target_ce(teacher: _Teacher, rows: Tensor, targets: Tensor, chunk_size: int,
                       vocab_chunk_size: int, dtype):
    """CE^T = logsumexp(z^T) - z^T[y] for each selected row, chunk by chunk."""
    ce = torch.empty(rows.numel(), dtype=dtype, device=rows.device)
    block = min(chunk_size, rows.numel()) * min(vocab_chunk_size, teacher.vocab_size)
    buffer = torch.empty(block, dtype=dtype, device=rows.device)
    for chunk in _chunks(rows.numel(), chunk_size):
        idx, y = rows[chunk], targets[chunk]
        target_logit = torch.zeros(len(idx), dtype=dtype, device=rows.device)
        lse = _RunningLogSumExp(len(idx), dtype, rows.device)
        for cols in _chunks(teacher.vocab_size, vocab_chunk_size):
            logits = teacher.logits_into(_block(buffer, len(idx), cols), idx, cols)
            inside, col = _targets_in(cols, y)
            target_logit = torch.where(inside, logits.gather(1, col[:, None]).squeeze(1),
                                       target_logit)
            lse.add_exp_(logits)
        ce[chunk] = lse.log_sum_exp() - target_logit
    return ce


def _loss_and_grads(
    hidden: Tensor,
    weight: Tensor,
    bias: Optional[Tensor],
    rows: Tensor,
    targets: Tensor,
    soft_coef: Optional[Tensor],
    hard_coef: Optional[Tensor],
    teacher: Optional[_Teacher],
    chunk_size: int,
    vocab_chunk_size: int,
    needs_grad: Tuple[bool, bool, bool],
):
    """The chunk engine: Σ_n soft_coef_n·softCE_n + hard_coef_n·CE_n over the selected rows.

    hidden [N, H]; rows [n] indexes the positions that count, targets/soft_coef/hard_coef [n] go
    with them (a missing coefficient drops that term). Blocks are [chunk_size tokens,
    vocab_chunk_size vocabulary entries]. Returns (soft total, hard total, grads) with grads =
    (grad_hidden, grad_weight, grad_bias) in the inputs' dtypes, None where ``needs_grad`` is
    False. Statistics and accumulators are float32 (float64 for float64 inputs); matmuls run in
    the input dtype.
    """
    acc_dtype = torch.promote_types(hidden.dtype, torch.float32)
    device = hidden.device
    need_hidden, need_weight, need_bias = needs_grad
    grad_hidden = torch.zeros_like(hidden) if need_hidden else None
    grad_weight = weight.new_zeros(weight.shape, dtype=acc_dtype) if need_weight else None
    grad_bias = bias.new_zeros(bias.shape, dtype=acc_dtype) if need_bias else None
    soft_total = hidden.new_zeros((), dtype=acc_dtype)
    hard_total = hidden.new_zeros((), dtype=acc_dtype)
    vocab_blocks = list(_chunks(weight.shape[0], vocab_chunk_size))
    one_block = len(vocab_blocks) == 1  # then the second sweep reuses the first one's blocks
    # Two reused blocks: the student's logits, then exp(z - max) and the logits' gradient; the
    # teacher's logits, then exp(z^T - max).
    block = min(chunk_size, rows.numel()) * min(vocab_chunk_size, weight.shape[0])
    student_buffer = hidden.new_empty(block, dtype=acc_dtype)
    teacher_buffer = hidden.new_empty(block, dtype=acc_dtype) if soft_coef is not None else None

    def student_logits(h, n, cols):
        return _linear_into(_block(student_buffer, n, cols), h, weight[cols],
                            None if bias is None else bias[cols])

    for chunk in _chunks(rows.numel(), chunk_size):
        idx, y = rows[chunk], targets[chunk]
        n = len(idx)
        h = hidden.index_select(0, idx)
        # First sweep: per-row statistics. Student logits are shifted by their first block's row
        # max, so that Σ p^T z and z[y] are taken on moderate numbers: log p^S = z' - lse(z').
        student = _RunningLogSumExp(n, acc_dtype, device)
        if soft_coef is not None:
            teacher_stats = _RunningLogSumExp(n, acc_dtype, device)
            teacher_dot = torch.zeros(n, dtype=acc_dtype, device=device)  # Σ exp(z^T - max) z'
        target_logit = torch.zeros(n, dtype=acc_dtype, device=device)
        for cols in vocab_blocks:
            logits = student_logits(h, n, cols)
            if cols.start == 0:
                shift = logits.amax(dim=1)
            logits -= shift[:, None]
            if hard_coef is not None:
                inside, col = _targets_in(cols, y)
                target_logit = torch.where(inside, logits.gather(1, col[:, None]).squeeze(1),
                                           target_logit)
            if soft_coef is not None:
                teacher_exp = teacher.logits_into(_block(teacher_buffer, n, cols), idx, cols)
                rescale = teacher_stats.add_exp_(teacher_exp)
                teacher_dot = teacher_dot * rescale + torch.einsum("nv,nv->n", teacher_exp, logits)
            if cols.start == 0:
                student.start_shifted_(logits)
            else:
                student.add_exp_(logits)
        log_sum = student.log_sum_exp()
        if soft_coef is not None:  # -Σ p^T log p^S = lse(z') - Σ p^T z'
            soft_total += soft_coef[chunk] @ (log_sum - teacher_dot / teacher_stats.sum)
        if hard_coef is not None:
            hard_total += hard_coef[chunk] @ (log_sum - target_logit)
        if not any(needs_grad):
            continue

        # Second sweep. d/dz [a·softCE + b·CE] = (a + b)·p^S - a·p^T - b·onehot(y), in place.
        soft_c = soft_coef[chunk] if soft_coef is not None else 0
        hard_c = hard_coef[chunk] if hard_coef is not None else 0
        student_factor = ((soft_c + hard_c) / student.sum)[:, None]
        if soft_coef is not None:
            teacher_factor = (soft_c / teacher_stats.sum)[:, None]
        # One block's grad_hidden goes straight in; several add up in float32.
        grad_h = None if one_block else hidden.new_zeros((n, hidden.shape[1]), dtype=acc_dtype)
        for cols in vocab_blocks:
            if one_block:  # the buffers hold exp(z' - max) and exp(z^T - max) already
                student_exp = logits
            else:
                student_exp = student_logits(h, n, cols)
                student_exp.sub_((shift + student.max)[:, None]).exp_()
                if soft_coef is not None:
                    teacher_exp = teacher.logits_into(_block(teacher_buffer, n, cols), idx, cols)
                    teacher_exp.sub_(teacher_stats.max[:, None]).exp_()
            grad_logits = student_exp.mul_(student_factor)
            if soft_coef is not None:
                grad_logits.addcmul_(teacher_exp, teacher_factor, value=-1)
            if hard_coef is not None:
                inside, col = _targets_in(cols, y)
                grad_logits.scatter_add_(1, col[:, None], (-hard_c * inside)[:, None])
            if need_hidden:
                block_grad_h = grad_logits.to(weight.dtype) @ weight[cols]
                grad_h = block_grad_h if one_block else grad_h.add_(block_grad_h)
            if need_weight:  # float32 GEMM straight into the accumulator: exact for bf16 too
                grad_weight[cols].addmm_(grad_logits.t(), h.to(acc_dtype))
            if need_bias:
                grad_bias[cols] += grad_logits.sum(dim=0)
        if need_hidden:
            grad_hidden.index_copy_(0, idx, grad_h.to(grad_hidden.dtype))

    grads = (
        grad_hidden,
        None if grad_weight is None else grad_weight.to(weight.dtype),
        None if grad_bias is None else grad_bias.to(bias.dtype),
    )
    return soft_total, hard_total, grads


class _FusedLinearLoss(torch.autograd.Function):
    """Runs the chunk engine in forward and keeps its gradients; backward scales them."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, *engine_args):
        soft_total, hard_total, ctx.grads = _loss_and_grads(
            hidden, weight, bias, *engine_args, needs_grad=tuple(ctx.needs_input_grad[:3])
        )
        ctx.mark_non_differentiable(soft_total, hard_total)
        return soft_total + hard_total, soft_total, hard_total

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_loss, _grad_soft, _grad_hard):
        if ctx.grads is None:
            raise RuntimeError(
                "the fused loss can be backpropagated once: it hands over its gradients"
            )
        grads, ctx.grads = ctx.grads, None
        # In place: the gradients are ours and backward runs once.
        scaled = tuple(None if g is None else g.mul_(grad_loss) for g in grads)
        return scaled + (None,) * (len(ctx.needs_input_grad) - 3)


def _fused_linear_loss(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    soft: Optional[str],
    with_gt: bool,
    lm_head_bias: Optional[Tensor],
    teacher_logits: Optional[Tensor],
    teacher_hidden: Optional[Tensor],
    teacher_weight: Optional[Tensor],
    teacher_bias: Optional[Tensor],
    temperature: float,
    token_scale: str,
    ignore_index: int,
    reduction: str,
    chunk_size: Optional[int],
    vocab_chunk_size: Optional[int],
) -> Tuple[Tensor, Dict[str, Tensor]]:
    """Differentiable total of the chosen terms, and each term (detached) by name."""
    if reduction not in ("sum", "mean"):
        raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")
    batch, length, hidden_size = student_hidden.shape
    vocab_size = lm_head_weight.shape[0]
    acc_dtype = torch.promote_types(student_hidden.dtype, torch.float32)
    targets = next_token_targets(labels, ignore_index)
    valid = targets != ignore_index
    rows = valid.flatten().nonzero().squeeze(1)
    row_targets = targets.flatten()[rows]
    chunk_size = chunk_size or default_chunk_size(vocab_size, hidden_size)
    vocab_chunk_size = vocab_chunk_size or vocab_size
    if chunk_size < 1 or vocab_chunk_size < 1:
        raise ValueError(f"chunk sizes must be positive, got chunk_size={chunk_size}, "
                         f"vocab_chunk_size={vocab_chunk_size}")
    teacher = None
    if soft:
        teacher = _teacher(teacher_logits, teacher_hidden, teacher_weight, teacher_bias, vocab_size)

    per_token_mean = torch.full_like(row_targets, 1, dtype=acc_dtype) / max(rows.numel(), 1)
    soft_coef = per_token_mean if soft == "logit" else None
    if soft == "tsld":
        teacher_ce = torch.zeros(batch * length, dtype=acc_dtype, device=rows.device)
        teacher_ce[rows] = _teacher_target_ce(teacher, rows, row_targets, chunk_size,
                                                vocab_chunk_size, acc_dtype)
        weights = positions.token_scale(teacher_ce.view(batch, length), valid, temperature,
                                        token_scale)
        if reduction == "mean":
            weights = weights / valid.any(dim=-1).sum().clamp_min(1)
        soft_coef = weights.flatten()[rows]
    hard_coef = per_token_mean if with_gt else None

    args = (
        student_hidden.reshape(batch * length, hidden_size), lm_head_weight, lm_head_bias,
        rows, row_targets, soft_coef, hard_coef, teacher, chunk_size, vocab_chunk_size,
    )
    trainable = [t for t in (student_hidden, lm_head_weight, lm_head_bias) if t is not None]
    if torch.is_grad_enabled() and any(t.requires_grad for t in trainable):
        loss, soft_total, hard_total = _FusedLinearLoss.apply(*args)
    else:  # evaluation: value only, one matmul per chunk
        soft_total, hard_total, _ = _loss_and_grads(*args, needs_grad=(False, False, False))
        loss = soft_total + hard_total
    terms = {}
    if with_gt:
        terms["gt"] = hard_total.detach()
    if soft:
        terms[soft] = soft_total.detach()
    return loss, terms


def _teacher(logits, hidden, weight, bias, vocab_size) -> _Teacher:
    if (logits is None) == (hidden is None):
        raise ValueError("give the teacher as teacher_logits or as teacher_hidden + teacher_weight")
    if logits is not None:
        flat = logits.detach().reshape(-1, logits.shape[-1])
        teacher = _Teacher(flat, None, None, None)
    else:
        if weight is None:
            raise ValueError("teacher_hidden needs teacher_weight (the teacher's lm_head)")
        flat = hidden.detach().reshape(-1, hidden.shape[-1])
        teacher = _Teacher(None, flat, weight.detach(), None if bias is None else bias.detach())
    if teacher.vocab_size != vocab_size:
        raise ValueError(
            f"teacher vocabulary {teacher.vocab_size} != student vocabulary {vocab_size}"
        )
    return teacher


def fused_linear_kd_loss(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    kd: str = "tsld",
    teacher_logits: Optional[Tensor] = None,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    lm_head_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    temperature: float = 10.0,
    token_scale: str = "confidence",
    ignore_index: int = -100,
    reduction: str = "sum",
    chunk_size: Optional[int] = None,
    vocab_chunk_size: Optional[int] = None,
) -> Dict[str, Tensor]:
    """A logit-level training objective from one fused pass: {"loss": total, term: value, ...}.

    kd: "gt" (CE with labels), "logit" (soft CE), "logit_gt" (soft CE + CE) or "tsld" (CE + TSLD).
    "gt" and "logit" are means over valid positions; ``reduction`` and ``token_scale`` (its
    weights, see :func:`~tsld_ds.losses.positions.token_scale`) apply to the TSLD term.
    Only "loss" carries gradients; the terms are detached, for logging. The teacher is not needed
    for "gt". See :func:`fused_linear_tsld_loss` for the arguments.
    """
    if kd not in KD_TERMS:
        raise ValueError(f"kd must be one of {sorted(KD_TERMS)}, got {kd!r}")
    soft, with_gt = KD_TERMS[kd]
    loss, terms = _fused_linear_loss(
        student_hidden, lm_head_weight, labels, soft=soft, with_gt=with_gt,
        lm_head_bias=lm_head_bias, teacher_logits=teacher_logits, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, teacher_bias=teacher_bias, temperature=temperature,
        token_scale=token_scale, ignore_index=ignore_index, reduction=reduction,
        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
    )
    return {"loss": loss, **terms}


def fused_linear_tsld_loss(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    teacher_logits: Optional[Tensor] = None,
    teacher_hidden: Optional[Tensor] = None,
    teacher_weight: Optional[Tensor] = None,
    lm_head_bias: Optional[Tensor] = None,
    teacher_bias: Optional[Tensor] = None,
    temperature: float = 10.0,
    token_scale: str = "confidence",
    ignore_index: int = -100,
    reduction: str = "sum",
    chunk_size: Optional[int] = None,
    vocab_chunk_size: Optional[int] = None,
) -> Tensor:
    """The TSLD term of ``tsld_loss(student_hidden @ lm_head_weight.T (+ lm_head_bias),
    teacher_logits, labels)`` without building the student's (or teacher's) logits.

    student_hidden [B, L, H] are the student's final hidden states (unshifted), labels [B, L].
    The teacher comes as ``teacher_logits`` [B, L, V] or as ``teacher_hidden`` [B, L, H_t] with
    its lm_head ``teacher_weight`` [V, H_t] (and ``teacher_bias``). Gradients reach
    student_hidden, lm_head_weight and lm_head_bias. ``chunk_size``: tokens per chunk (default
    :func:`default_chunk_size`); ``vocab_chunk_size``: vocabulary entries per block (default: the
    whole vocabulary, one sweep; smaller blocks cost a second sweep, see the module docstring). ``token_scale``: as in :func:`~tsld_ds.losses.tsld_loss`.
    """
    loss, _ = _fused_linear_loss(
        student_hidden, lm_head_weight, labels, soft="tsld", with_gt=False,
        lm_head_bias=lm_head_bias, teacher_logits=teacher_logits, teacher_hidden=teacher_hidden,
        teacher_weight=teacher_weight, teacher_bias=teacher_bias, temperature=temperature,
        token_scale=token_scale, ignore_index=ignore_index, reduction=reduction,
        chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
    )
    return loss


def fused_linear_cross_entropy(
    student_hidden: Tensor,
    lm_head_weight: Tensor,
    labels: Tensor,
    *,
    lm_head_bias: Optional[Tensor] = None,
    ignore_index: int = -100,
    chunk_size: Optional[int] = None,
    vocab_chunk_size: Optional[int] = None,
) -> Tensor:
    """``gt_loss(student_hidden @ lm_head_weight.T (+ lm_head_bias), labels)`` without building
    the logits."""
    return fused_linear_kd_loss(
        student_hidden, lm_head_weight, labels, kd="gt", lm_head_bias=lm_head_bias,
        ignore_index=ignore_index, chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
    )["loss"]
