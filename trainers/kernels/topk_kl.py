"""Fused top-K knowledge-distillation KL: loss and student-logit gradient in one kernel.

The teacher is stored as its top-K logits per sample (plus, for ``topk_lse``, the log-sum-exp of
its full logits), so distillation compares the student with a K-class (or K+1-bucket) teacher:

* ``"topk"``: both distributions renormalised over the teacher's K classes,
  ``p = softmax(t / T)``, ``q = softmax(z[idx])`` with ``z = s / T``, loss ``KL(p || q)``.
* ``"topk_lse"``: the teacher keeps its full normaliser, ``p_k = exp(t_k / T - lse_t)``, and all
  other classes form one tail bucket ``p_tail = max(1 - sum p, 0)``; the student's tail is
  ``q_tail = exp(LSE(z over non-top-K) - LSE(z))``, computed in log space so that it stays exact
  when the student puts almost all its mass on the K classes.

Two Triton kernels, each program handling ``ROWS`` rows as [ROWS, BLOCK] tiles: one row while B
leaves too few programs to fill the device (the student's batch sizes), more at large B, so
that each program keeps more loads in flight (``rows_per_program``). The forward reads each
row of logits once and keeps only the loss, the gradient on the K classes and four numbers per
row (the tail gradient is a closed form of them); the backward reads the row again and writes
the whole gradient, already
scaled by ``grad_output``. So nothing of size [B, C] lives between forward and backward, and
``topk`` mode never reads the C - K other logits at all. ``T**2`` is left to the caller.

The loss is per row, or reduced over the rows that have a teacher: ``"rows"`` takes their mean,
``"elements"`` their mean over rows x columns, as ``torch.mean`` of ``KLDivLoss(reduction='none')``
over a [B, K] (``topk``) or [B, C] (``topk_lse``, which stands in for the full KL) tensor does.
A reduction is a scale of the per-row losses, so the backward kernel serves it through its
(expanded scalar) ``grad_output``.
"""

from __future__ import annotations

import math

import torch

from kdstore.errors import DependencyError

try:
    import triton
    import triton.language as tl
except ImportError:  # the CPU install has no Triton; topk_kl then uses the reference
    triton = None
# The kernel needs tl.histogram(..., mask=), added in Triton 3.4.
_HAS_TRITON = triton is not None and tuple(int(v) for v in triton.__version__.split(".")[:2]) >= (3, 4)

MODES = ("topk", "topk_lse")
REDUCTIONS = ("none", "rows", "elements")
# Largest blocks one program holds in registers; bigger K or C loop over blocks: an EK55 row
# (C = 2513) fits one block. TILE caps the [BLOCK_X, BLOCK_K] membership tile of the (rare)
# exact tail pass: its registers limit the occupancy of every row. Values from
# `python bench/topk_kl.py --sweep` on an H200 (TILE 8192 -> 2048 took fp32 topk_lse
# forward + backward from 114 to 66 us; docs/results.md).
MAX_BLOCK_K = 1024
MAX_BLOCK_C = 4096
TILE = 2048
MAX_WARPS = 8
ELEMS_PER_WARP = 256  # of a [ROWS, BLOCK_C] block
# Rows a program handles (rows_per_program): one until B leaves at least MIN_PROGRAMS programs
# (four per SM of an H100/H200) with two, then doubling up to MAX_ROWS. None: that rule;
# a power of two: that many (the benchmark's sweep and the tests set it).
MIN_PROGRAMS = 528
MAX_ROWS = 8
ROWS_PER_PROGRAM: int | None = None
# The student's tail mass q_tail = 1 - q_top is taken from its top-K mass when it is at least
# this (fp32 error ~1e-7 / q_tail); below, the kernel sums the tail itself in a second pass.
TAIL_FAST_MIN = 0.25
# p_tail = 0 (a teacher whose top-K hold all its mass) needs 0 * log(0) = 0: clamp inside the log.
_TINY = torch.finfo(torch.float32).tiny


def _check_inputs(student_logits, teacher_topk, topk_idx, temperature, mode, teacher_lse, mask, reduction):
    """Validate shapes and options; return the keep mask [B] bool."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, found {mode!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, found {reduction!r}")
    if student_logits.dim() != 2 or not student_logits.is_floating_point():
        raise ValueError(f"student_logits must be a float [B, C] tensor, found {student_logits.dtype} "
                         f"{tuple(student_logits.shape)}")
    B, C = student_logits.shape
    if teacher_topk.dim() != 2 or teacher_topk.shape[0] != B or not 1 <= teacher_topk.shape[1] <= C:
        raise ValueError(f"teacher_topk must be [B={B}, K] with 1 <= K <= C={C}, found {tuple(teacher_topk.shape)}")
    if topk_idx.shape != teacher_topk.shape or topk_idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"topk_idx must be int32/int64 of shape {tuple(teacher_topk.shape)}, found "
                         f"{topk_idx.dtype} {tuple(topk_idx.shape)}")
    if not temperature > 0:
        raise ValueError(f"temperature must be positive, found {temperature}")
    if mode == "topk_lse" and (teacher_lse is None or teacher_lse.shape != (B,)):
        found = None if teacher_lse is None else tuple(teacher_lse.shape)
        raise ValueError(f"mode 'topk_lse' needs teacher_lse of shape ({B},), found {found}")
    if mask is None:
        return torch.ones(B, dtype=torch.bool, device=student_logits.device)
    if mask.shape != (B,):
        raise ValueError(f"mask must have shape ({B},), found {tuple(mask.shape)}")
    return mask.to(torch.bool)


def _reduce(loss, keep, mode, C, K, reduction):
    """Per-row losses [B] -> the requested reduction over the kept rows (0 when none is kept)."""
    if reduction == "none":
        return loss
    # dividing by a count tensor keeps it on the device (no host sync) and the sum in the graph
    n = keep.sum().clamp(min=1)  # []
    if reduction == "elements":
        n = n * (K if mode == "topk" else C)
    return loss.sum() / n


def topk_kl_reference(student_logits, teacher_topk, topk_idx, temperature, mode="topk", teacher_lse=None,
                      mask=None, reduction="none") -> torch.Tensor:
    """Per-row top-K distillation KL in plain torch ops (autograd-capable).

    Args:
        student_logits: [B, C] float (fp32, bf16, fp16 or fp64).
        teacher_topk: [B, K] teacher logits of its top-K classes.
        topk_idx: [B, K] int32/int64 class indices of ``teacher_topk``, distinct within a row.
        temperature: softmax temperature T of both models.
        mode: ``"topk"`` (both renormalised over the K classes) or ``"topk_lse"`` (teacher keeps
            its full normaliser, other classes form one tail bucket).
        teacher_lse: [B] ``logsumexp(teacher_full_logits / T)``; required for ``"topk_lse"``.
        mask: [B] bool, False for rows without a teacher; their loss and gradient are 0 and their
            teacher inputs may hold anything (padding indices, NaN).
        reduction: ``"none"`` (per row), ``"rows"`` (mean over the kept rows) or ``"elements"``
            (mean over kept rows x K in ``topk`` mode, x C in ``topk_lse`` mode).

    Student logits are assumed finite. With K == C the tail is empty and has no bucket, and
    ``topk`` mode is the full KL.

    Returns:
        [B] loss per row, or a scalar when reduced; fp32 (fp64 for fp64 logits), without the
        ``T**2`` factor.
    """
    keep = _check_inputs(student_logits, teacher_topk, topk_idx, temperature, mode, teacher_lse, mask, reduction)
    B, C = student_logits.shape
    K = teacher_topk.shape[1]
    dtype = torch.float64 if student_logits.dtype == torch.float64 else torch.float32
    # Replace masked rows' teacher by finite stand-ins so the discarded branch has no NaN gradient.
    idx = torch.where(keep[:, None], topk_idx.long(), torch.arange(K, device=keep.device))  # [B, K]
    a = torch.where(keep[:, None], teacher_topk.to(dtype), 0.0) / temperature  # [B, K]
    z = student_logits.to(dtype) / temperature  # [B, C]
    z_k = z.gather(1, idx)  # [B, K]
    if mode == "topk":
        log_p = a.log_softmax(-1)  # [B, K]
        loss = (log_p.exp() * (log_p - z_k.log_softmax(-1))).sum(-1)  # [B]
    else:
        log_p = a - torch.where(keep, teacher_lse.to(dtype), 0.0)[:, None]  # [B, K]
        p = log_p.exp()  # [B, K]
        lse_s = z.logsumexp(-1)  # [B]
        loss = (p * (log_p - (z_k - lse_s[:, None]))).sum(-1)  # [B]
        if K < C:  # the other C - K classes form the tail bucket
            in_k = torch.zeros(B, C, dtype=torch.bool, device=z.device).scatter_(1, idx, True)  # [B, C]
            log_q_tail = z.masked_fill(in_k, -math.inf).logsumexp(-1) - lse_s  # [B]
            p_tail = (1 - p.sum(-1)).clamp(min=0)  # [B]
            loss = loss + torch.xlogy(p_tail, p_tail) - p_tail * log_q_tail
    return _reduce(torch.where(keep, loss, 0.0), keep, mode, C, K, reduction)


if triton is not None:
    _TL_TINY = tl.constexpr(_TINY)  # jit code reads globals only as constexpr

    @triton.jit
    def _lse_update(m, d, x):
        """Fold block ``x`` [ROWS, BLOCK] into running log-sum-exps ``m + log(d)`` [ROWS]; an
        all -inf row of the block leaves its row as it was."""
        m_new = tl.maximum(m, tl.max(x, axis=1))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoid -inf - -inf
        return m_new, d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref[:, None]), axis=1)

    @triton.jit
    def _in_topk(idx_rows, K, offs_c, row_mask, ROWS: tl.constexpr, BLOCK_X: tl.constexpr, BLOCK_K: tl.constexpr):
        """[ROWS, BLOCK_X] bool: is class ``offs_c[j]`` one of row i's K indices. A
        [ROWS, BLOCK_X, BLOCK_K] comparison: the indices are distinct, so each class matches at most once."""
        hits = tl.zeros([ROWS, BLOCK_X], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            km = (offs_k[None, :] < K) & row_mask[:, None]
            cls = tl.load(idx_rows + offs_k[None, :], mask=km, other=-1).to(tl.int32)  # [ROWS, BLOCK_K]
            hits += tl.sum((offs_c[None, :, None] == cls[:, None, :]).to(tl.int32), axis=2)
        return hits > 0

    @triton.jit
    def _topk_kl_fwd_kernel(
        s_ptr, s_stride,  # [B, C] student logits, any float dtype
        t_ptr, t_stride,  # [B, K] teacher top-K logits, fp32
        idx_ptr, idx_stride,  # [B, K] int32/int64 class indices
        lse_ptr,  # [B] fp32 teacher log-sum-exp at temperature T (LSE_MODE only)
        keep_ptr,  # [B] uint8, 0 for rows without a teacher
        loss_ptr,  # [B] fp32 out
        gk_ptr,  # [B, K] fp32 out: d loss / d s on the K classes
        stats_ptr,  # [B, 4] fp32 out: lse_s, lse_tail, mass, p_tail (the tail gradient's terms)
        inv_t, B, C, K,
        tail_fast_min,  # q_tail at or above which 1 - q_top is exact enough (see TAIL_FAST_MIN)
        LSE_MODE: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
        BLOCK_X: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
        in_b = rows < B
        # Masked rows (and rows past B) load nothing and end with zero loss, K-gradient and tail
        # terms (their indices may be padding); whatever their lanes compute is discarded.
        keep = in_b & (tl.load(keep_ptr + rows, mask=in_b, other=0) != 0)  # [ROWS]
        s_rows = s_ptr + rows[:, None] * s_stride  # [ROWS, 1]
        t_rows = t_ptr + rows[:, None] * t_stride
        idx_rows = idx_ptr + rows[:, None] * idx_stride
        zero = tl.zeros([ROWS], dtype=tl.float32)
        lse_tail, p_tail, loss = zero, zero, zero

        if LSE_MODE:
            lse_t = tl.load(lse_ptr + rows, mask=keep, other=0.0)  # [ROWS]
            # Teacher mass on its K classes; the remainder is the tail bucket.
            sum_p = zero
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                km = (offs_k[None, :] < K) & keep[:, None]  # [ROWS, BLOCK_K]
                a = tl.load(t_rows + offs_k[None, :], mask=km, other=float("-inf")) * inv_t  # [ROWS, BLOCK_K]
                sum_p += tl.sum(tl.exp(a - lse_t[:, None]), axis=1)
            # K == C leaves no tail: no bucket (p_tail = 0) and a finite dummy lse_tail.
            has_tail = K < C
            if has_tail:
                p_tail = tl.maximum(1.0 - sum_p, 0.0)
            # One pass over the rows for the student's LSE, then its LSE over the K classes.
            m_s, d_s = zero + float("-inf"), zero
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                cm = (offs_c[None, :] < C) & keep[:, None]  # [ROWS, BLOCK_C]
                z = tl.load(s_rows + offs_c[None, :], mask=cm, other=float("-inf")).to(tl.float32) * inv_t
                m_s, d_s = _lse_update(m_s, d_s, z)
            lse_s = m_s + tl.log(d_s)
            m_k, d_k = zero + float("-inf"), zero
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                km = (offs_k[None, :] < K) & keep[:, None]
                cls = tl.load(idx_rows + offs_k[None, :], mask=km, other=0)  # [ROWS, BLOCK_K]
                z = tl.load(s_rows + cls, mask=km, other=float("-inf")).to(tl.float32) * inv_t  # [ROWS, BLOCK_K]
                m_k, d_k = _lse_update(m_k, d_k, z)
            if has_tail:
                q_tail = 1.0 - tl.exp(m_k + tl.log(d_k) - lse_s)  # [ROWS]
                # no cancellation in 1 - q_top: take the tail from it
                fast = q_tail >= tail_fast_min
                lse_tail = lse_s + tl.log(tl.maximum(q_tail, _TL_TINY))
                if tl.max((keep & ~fast).to(tl.int32), axis=0) > 0:
                    # A confident student: sum the tail itself (a second pass over the rows) so
                    # q_tail stays exact even when 1 - q_top underflows.
                    m_tl, d_tl = zero + float("-inf"), zero
                    for c0 in range(0, C, BLOCK_X):
                        offs_c = c0 + tl.arange(0, BLOCK_X)
                        cm = (offs_c[None, :] < C) & keep[:, None]  # [ROWS, BLOCK_X]
                        z = tl.load(s_rows + offs_c[None, :], mask=cm, other=float("-inf")).to(tl.float32) * inv_t
                        in_k = _in_topk(idx_rows, K, offs_c, keep, ROWS, BLOCK_X, BLOCK_K)  # [ROWS, BLOCK_X]
                        m_tl, d_tl = _lse_update(m_tl, d_tl, tl.where(in_k, float("-inf"), z))
                    lse_tail = tl.where(fast, lse_tail, m_tl + tl.log(tl.maximum(d_tl, _TL_TINY)))
            loss = p_tail * (tl.log(tl.maximum(p_tail, _TL_TINY)) - (lse_tail - lse_s))
            # d loss / d z_j = mass * q_j - p_j on the K classes and mass * q_j - p_tail * q_j / q_tail
            # on the tail, with mass = sum p + p_tail (1 unless the teacher's top-K exceed 1).
            mass = sum_p + p_tail
            lse_p = lse_t
        else:
            # Both distributions live on the K classes: two online LSEs over K.
            m_a, d_a, m_z, d_z = zero + float("-inf"), zero, zero + float("-inf"), zero
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                km = (offs_k[None, :] < K) & keep[:, None]
                a = tl.load(t_rows + offs_k[None, :], mask=km, other=float("-inf")) * inv_t  # [ROWS, BLOCK_K]
                cls = tl.load(idx_rows + offs_k[None, :], mask=km, other=0)  # [ROWS, BLOCK_K]
                z = tl.load(s_rows + cls, mask=km, other=float("-inf")).to(tl.float32) * inv_t  # [ROWS, BLOCK_K]
                m_a, d_a = _lse_update(m_a, d_a, a)
                m_z, d_z = _lse_update(m_z, d_z, z)
            lse_p = m_a + tl.log(d_a)
            lse_s = m_z + tl.log(d_z)
            mass = zero + 1.0
        # The K classes' KL terms and gradients (a second read of K values, cache-resident).
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            km = (offs_k[None, :] < K) & keep[:, None]
            a = tl.load(t_rows + offs_k[None, :], mask=km, other=0.0) * inv_t  # [ROWS, BLOCK_K]
            cls = tl.load(idx_rows + offs_k[None, :], mask=km, other=0)  # [ROWS, BLOCK_K]
            z = tl.load(s_rows + cls, mask=km, other=0.0).to(tl.float32) * inv_t  # [ROWS, BLOCK_K]
            log_p = a - lse_p[:, None]
            log_q = z - lse_s[:, None]
            p = tl.exp(log_p)
            loss += tl.sum(tl.where(km, p * (log_p - log_q), 0.0), axis=1)
            gk = tl.where(km, (mass[:, None] * tl.exp(log_q) - p) * inv_t, 0.0)  # [ROWS, BLOCK_K]
            tl.store(gk_ptr + rows[:, None] * K + offs_k[None, :], gk, mask=(offs_k[None, :] < K) & in_b[:, None])
        if not LSE_MODE:
            mass = zero  # topk mode has no gradient outside the K classes
        st = stats_ptr + rows * 4
        tl.store(loss_ptr + rows, tl.where(keep, loss, 0.0), mask=in_b)
        tl.store(st + 0, tl.where(keep, lse_s, 0.0), mask=in_b)
        tl.store(st + 1, tl.where(keep, lse_tail, 0.0), mask=in_b)
        tl.store(st + 2, tl.where(keep, mass, 0.0), mask=in_b)
        tl.store(st + 3, tl.where(keep, p_tail, 0.0), mask=in_b)

    @triton.jit
    def _topk_kl_bwd_kernel(
        s_ptr, s_stride,  # [B, C] student logits (read only when DENSE)
        idx_ptr, idx_stride,  # [B, K] class indices
        keep_ptr,  # [B] uint8
        gk_ptr,  # [B, K] fp32 gradient on the K classes, from the forward
        stats_ptr,  # [B, 4] fp32 lse_s, lse_tail, mass, p_tail, from the forward
        go_ptr, go_stride,  # [B] fp32 grad_output (stride 0 when it is an expanded scalar)
        grad_ptr, grad_stride,  # [B, C] out, in the student dtype
        inv_t, B, C, K,
        DENSE: tl.constexpr, ROWS: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)  # [ROWS]
        in_b = rows < B
        keep = in_b & (tl.load(keep_ptr + rows, mask=in_b, other=0) != 0)  # [ROWS]
        s_rows = s_ptr + rows[:, None] * s_stride  # [ROWS, 1]
        g_rows = grad_ptr + rows[:, None] * grad_stride
        idx_rows = idx_ptr + rows[:, None] * idx_stride
        g_dtype = grad_ptr.dtype.element_ty
        go = tl.load(go_ptr + rows * go_stride, mask=in_b, other=0.0)  # [ROWS]
        st = stats_ptr + rows * 4
        lse_s = tl.load(st + 0, mask=in_b, other=0.0)
        lse_tail = tl.load(st + 1, mask=in_b, other=0.0)
        scale = tl.load(st + 2, mask=in_b, other=0.0) * inv_t * go
        tail_scale = tl.load(st + 3, mask=in_b, other=0.0) * inv_t * go
        # Every class: the tail gradient (zero in topk mode and on masked rows) ...
        for c0 in range(0, C, BLOCK_C):
            offs_c = c0 + tl.arange(0, BLOCK_C)
            cm = (offs_c[None, :] < C) & in_b[:, None]  # [ROWS, BLOCK_C]
            if DENSE:
                z = tl.load(s_rows + offs_c[None, :], mask=cm & keep[:, None], other=0.0).to(tl.float32) * inv_t
                # q_j / q_tail = exp(z_j - lse_tail) <= 1 on the tail: no overflow.
                g = scale[:, None] * tl.exp(z - lse_s[:, None]) - tail_scale[:, None] * tl.exp(z - lse_tail[:, None])
                g = tl.where(keep[:, None], g, 0.0)  # [ROWS, BLOCK_C]
            else:
                g = tl.zeros([ROWS, BLOCK_C], dtype=tl.float32)
            tl.store(g_rows + offs_c[None, :], g.to(g_dtype), mask=cm)
        # ... then the K classes overwrite theirs. The barrier orders the two stores to an address
        # made by different threads of the program.
        tl.debug_barrier()
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            km = (offs_k[None, :] < K) & keep[:, None]  # [ROWS, BLOCK_K]
            cls = tl.load(idx_rows + offs_k[None, :], mask=km, other=0)  # [ROWS, BLOCK_K]
            gk = tl.load(gk_ptr + rows[:, None] * K + offs_k[None, :], mask=km, other=0.0)  # [ROWS, BLOCK_K]
            tl.store(g_rows + cls, (gk * go[:, None]).to(g_dtype), mask=km)


def rows_per_program(B: int) -> int:
    """Rows each program of the kernels handles: one while B rows leave programs too few to
    fill the device (every B up to the student's batch sizes), more (up to MAX_ROWS) beyond,
    so that each program keeps more loads in flight. ROWS_PER_PROGRAM overrides it."""
    if ROWS_PER_PROGRAM is not None:
        return ROWS_PER_PROGRAM
    rows = 1
    while rows < MAX_ROWS and B // (2 * rows) >= MIN_PROGRAMS:
        rows *= 2
    return rows


def _blocks(C: int, K: int, rows: int = 1) -> dict:
    """Block sizes and warps for ``rows`` rows a program: a [rows, BLOCK_C] tile stays within
    MAX_BLOCK_C elements. BLOCK_X: the exact tail pass holds a [rows, BLOCK_X, BLOCK_K] membership tile."""
    block_k = min(triton.next_power_of_2(K), MAX_BLOCK_K)
    block_c = max(1, min(triton.next_power_of_2(C), MAX_BLOCK_C // rows))
    block_x = max(1, min(triton.next_power_of_2(C), MAX_BLOCK_C, TILE // (block_k * rows)))
    warps = max(1, min(MAX_WARPS, rows * block_c // ELEMS_PER_WARP))
    return {"ROWS": rows, "BLOCK_K": block_k, "BLOCK_C": block_c, "BLOCK_X": block_x, "num_warps": warps}


class TopKKLFunction(torch.autograd.Function):
    """Forward: one pass over the logits for the loss, the K-class gradient and four per-row
    numbers. Backward: one pass that writes the full gradient, already scaled by grad_output;
    nothing of size [B, C] is kept between the two."""

    @staticmethod
    def forward(ctx, student_logits, teacher_topk, topk_idx, teacher_lse, keep, temperature, lse_mode):
        s = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()  # [B, C]
        t = teacher_topk.to(torch.float32).contiguous()  # [B, K]
        idx = topk_idx.contiguous()  # [B, K]
        keep = keep.contiguous().view(torch.uint8)  # [B], a bool tensor's bytes
        B, C = s.shape
        K = t.shape[1]
        loss = torch.empty(B, dtype=torch.float32, device=s.device)  # [B]
        gk = torch.empty(B, K, dtype=torch.float32, device=s.device)  # [B, K]
        stats = torch.empty(B, 4, dtype=torch.float32, device=s.device)  # [B, 4]
        if B:
            lse = teacher_lse.to(torch.float32).contiguous() if lse_mode else loss  # [B]; unused in topk mode
            blocks = _blocks(C, K, rows_per_program(B))
            _topk_kl_fwd_kernel[(triton.cdiv(B, blocks["ROWS"]),)](
                s, s.stride(0), t, t.stride(0), idx, idx.stride(0), lse, keep, loss, gk, stats, 1.0 / temperature,
                B, C, K, TAIL_FAST_MIN, LSE_MODE=lse_mode, **blocks,
            )
        ctx.save_for_backward(s, idx, keep, gk, stats)
        ctx.inv_t, ctx.lse_mode = 1.0 / temperature, lse_mode
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        s, idx, keep, gk, stats = ctx.saved_tensors
        B, C = s.shape
        K = idx.shape[1]
        grad = torch.empty_like(s)  # [B, C]
        if B:
            go = grad_loss.to(torch.float32)  # [B]; may be an expanded scalar (stride 0)
            blocks = _blocks(C, K, rows_per_program(B))
            del blocks["BLOCK_X"]
            _topk_kl_bwd_kernel[(triton.cdiv(B, blocks["ROWS"]),)](
                s, s.stride(0), idx, idx.stride(0), keep, gk, stats, go, go.stride(0), grad, grad.stride(0),
                ctx.inv_t, B, C, K, DENSE=ctx.lse_mode, **blocks,
            )
        return grad, None, None, None, None, None, None


def topk_kl(student_logits, teacher_topk, topk_idx, temperature, mode="topk", teacher_lse=None, mask=None,
            reduction="none", use_kernel=None) -> torch.Tensor:
    """Top-K distillation KL, fused in Triton where available.

    Same arguments and result as :func:`topk_kl_reference` (loss [B] fp32 or its reduction, no
    ``T**2`` factor, 0 for masked rows); gradients flow to ``student_logits`` only.

    Args:
        use_kernel: True forces the Triton kernel (CUDA tensors, or CPU tensors under
            ``TRITON_INTERPRET=1``); None uses it for CUDA tensors when Triton is installed;
            False always uses the torch reference.

    Raises:
        DependencyError: ``use_kernel=True`` without Triton >= 3.4 installed.
    """
    if use_kernel is None:
        use_kernel = _HAS_TRITON and student_logits.is_cuda
    if not use_kernel:
        return topk_kl_reference(student_logits, teacher_topk, topk_idx, temperature, mode, teacher_lse, mask,
                                 reduction)
    if not _HAS_TRITON:
        found = "not installed" if triton is None else f"found {triton.__version__}"
        raise DependencyError(f"topk_kl(use_kernel=True) needs Triton >= 3.4 ({found}): pip install 'kdstore[gpu]'")
    keep = _check_inputs(student_logits, teacher_topk, topk_idx, temperature, mode, teacher_lse, mask, reduction)
    loss = TopKKLFunction.apply(student_logits, teacher_topk, topk_idx, teacher_lse, keep, float(temperature),
                                mode == "topk_lse")  # [B]
    return _reduce(loss, keep, mode, student_logits.shape[1], teacher_topk.shape[1], reduction)
