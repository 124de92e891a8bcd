"""Fused top-K knowledge-distillation KL: loss and student-logit gradient in one kernel.

The teacher is stored as its top-K logits per sample (plus, for ``topk_lse``, the log-sum-exp of
its full logits), so distillation compares the student with a K-class (or K+1-bucket) teacher:

* ``"topk"``: both distributions renormalised over the teacher's K classes,
  ``p = softmax(t / T)``, ``q = softmax(z[idx])`` with ``z = s / T``, loss ``KL(p || q)``.
* ``"topk_lse"``: the teacher keeps its full normaliser, ``p_k = exp(t_k / T - lse_t)``, and all
  other classes form one tail bucket ``p_tail = max(1 - sum p, 0)``; the student's tail is
  ``q_tail = exp(LSE(z over non-top-K) - LSE(z))``, computed in log space so that it stays exact
  when the student puts almost all its mass on the K classes.

Like Liger-Kernel's cross entropy, the Triton kernel computes the per-row loss and writes the
gradient w.r.t. the student logits during the forward pass (one program per row); backward only
scales the saved gradient by ``grad_output``. ``T**2`` and the reduction over rows are left to
the caller.
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
# Largest blocks one program holds in registers; bigger K or C loop over blocks. Rows are short
# (C = 2513 on EK55) and many, so small programs suffice, and tl.histogram's cost grows with
# warps x bins.
MAX_BLOCK_K = 1024
MAX_BLOCK_C = 1024
# p_tail = 0 (a teacher whose top-K hold all its mass) needs 0 * log(0) = 0: clamp inside the log.
_TINY = torch.finfo(torch.float32).tiny


def _check_inputs(student_logits, teacher_topk, topk_idx, temperature, mode, teacher_lse, mask):
    """Validate shapes and options; return the keep mask [B] bool."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, found {mode!r}")
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


def topk_kl_reference(student_logits, teacher_topk, topk_idx, temperature, mode="topk", teacher_lse=None,
                      mask=None) -> torch.Tensor:
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

    Student logits are assumed finite. With K == C the tail is empty and has no bucket.

    Returns:
        [B] loss per row, fp32 (fp64 for fp64 logits), without the ``T**2`` factor.
    """
    keep = _check_inputs(student_logits, teacher_topk, topk_idx, temperature, mode, teacher_lse, mask)
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
    return torch.where(keep, loss, 0.0)


if triton is not None:
    _TL_TINY = tl.constexpr(_TINY)  # jit code reads globals only as constexpr

    @triton.jit
    def _lse_update(m, d, x):
        """Fold block ``x`` into a running log-sum-exp ``m + log(d)``; an all -inf block is a no-op."""
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)  # avoid -inf - -inf
        return m_new, d * tl.exp(m - m_ref) + tl.sum(tl.exp(x - m_ref), axis=0)

    @triton.jit
    def _in_topk(idx_row, K, c0, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
        """[BLOCK_C] bool: is class ``c0 + i`` one of the row's K indices (a histogram is a scatter)."""
        hits = tl.zeros([BLOCK_C], dtype=tl.int32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            local = tl.load(idx_row + offs_k, mask=offs_k < K, other=-1).to(tl.int32) - c0  # [BLOCK_K]
            hits += tl.histogram(local, BLOCK_C, mask=(local >= 0) & (local < BLOCK_C))
        return hits > 0

    @triton.jit
    def _topk_kl_kernel(
        s_ptr, s_stride,  # [B, C] student logits, any float dtype
        t_ptr, t_stride,  # [B, K] teacher top-K logits, fp32
        idx_ptr, idx_stride,  # [B, K] int32/int64 class indices
        lse_ptr,  # [B] fp32 teacher log-sum-exp at temperature T (LSE_MODE only)
        keep_ptr,  # [B] uint8, 0 for rows without a teacher
        loss_ptr,  # [B] fp32 out
        grad_ptr, grad_stride,  # [B, C] out: d loss_b / d s_b in the student dtype (WRITE_GRAD only)
        inv_t, C, K,
        LSE_MODE: tl.constexpr, WRITE_GRAD: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_C: tl.constexpr,
    ):
        row = tl.program_id(0).to(tl.int64)
        s_row = s_ptr + row * s_stride
        t_row = t_ptr + row * t_stride
        idx_row = idx_ptr + row * idx_stride
        g_row = grad_ptr + row * grad_stride
        g_dtype = grad_ptr.dtype.element_ty

        if tl.load(keep_ptr + row) == 0:
            tl.store(loss_ptr + row, 0.0)
            if LSE_MODE and WRITE_GRAD:  # topk mode's gradient buffer is pre-zeroed
                for c0 in range(0, C, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    tl.store(g_row + offs_c, tl.zeros([BLOCK_C], dtype=g_dtype), mask=offs_c < C)
            return

        if LSE_MODE:
            lse_t = tl.load(lse_ptr + row)
            # Teacher mass on its K classes; the remainder is the tail bucket.
            sum_p = 0.0
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(t_row + offs_k, mask=offs_k < K, other=float("-inf")) * inv_t  # [BLOCK_K]
                sum_p += tl.sum(tl.exp(a - lse_t), axis=0)
            # K == C leaves no tail: no bucket (p_tail = 0) and a finite dummy lse_tail.
            has_tail = K < C
            p_tail = tl.where(has_tail, tl.maximum(1.0 - sum_p, 0.0), 0.0)

            # Online LSE over the whole row and, separately, over the tail (so q_tail is exact).
            m_s, d_s, m_tl, d_tl = float("-inf"), 0.0, float("-inf"), 0.0
            for c0 in range(0, C, BLOCK_C):
                offs_c = c0 + tl.arange(0, BLOCK_C)
                z = tl.load(s_row + offs_c, mask=offs_c < C, other=float("-inf")).to(tl.float32) * inv_t  # [BLOCK_C]
                m_s, d_s = _lse_update(m_s, d_s, z)
                in_k = _in_topk(idx_row, K, c0, BLOCK_C, BLOCK_K)  # [BLOCK_C]
                m_tl, d_tl = _lse_update(m_tl, d_tl, tl.where(in_k, float("-inf"), z))
            lse_s = m_s + tl.log(d_s)
            lse_tail = tl.where(has_tail, m_tl + tl.log(tl.maximum(d_tl, _TL_TINY)), 0.0)
            loss = p_tail * (tl.log(tl.maximum(p_tail, _TL_TINY)) - (lse_tail - lse_s))
            # d loss / d z_j = mass * q_j - p_j on the K classes and mass * q_j - p_tail * q_j / q_tail
            # on the tail, with mass = sum p + p_tail (1 unless the teacher's top-K exceed 1).
            mass = sum_p + p_tail

            if WRITE_GRAD:
                for c0 in range(0, C, BLOCK_C):
                    offs_c = c0 + tl.arange(0, BLOCK_C)
                    z = tl.load(s_row + offs_c, mask=offs_c < C, other=0.0).to(tl.float32) * inv_t  # [BLOCK_C]
                    in_k = _in_topk(idx_row, K, c0, BLOCK_C, BLOCK_K)  # [BLOCK_C]
                    # q_j / q_tail = exp(z_j - lse_tail) <= 1 on the tail: no overflow.
                    g = mass * tl.exp(z - lse_s) - p_tail * tl.exp(z - lse_tail)  # [BLOCK_C]
                    tl.store(g_row + offs_c, (g * inv_t).to(g_dtype), mask=(offs_c < C) & ~in_k)
            # The K classes: their KL terms, and their gradient (disjoint from the tail stores above).
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                a = tl.load(t_row + offs_k, mask=k_mask, other=0.0) * inv_t  # [BLOCK_K]
                cls = tl.load(idx_row + offs_k, mask=k_mask, other=0)  # [BLOCK_K]
                z = tl.load(s_row + cls, mask=k_mask, other=0.0).to(tl.float32) * inv_t  # [BLOCK_K]
                log_p = a - lse_t
                log_q = z - lse_s
                p = tl.exp(log_p)
                loss += tl.sum(tl.where(k_mask, p * (log_p - log_q), 0.0), axis=0)
                if WRITE_GRAD:
                    tl.store(g_row + cls, ((mass * tl.exp(log_q) - p) * inv_t).to(g_dtype), mask=k_mask)
        else:
            # Both distributions live on the K classes: two online LSEs over K, then the KL.
            m_a, d_a, m_z, d_z = float("-inf"), 0.0, float("-inf"), 0.0
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                a = tl.load(t_row + offs_k, mask=k_mask, other=float("-inf")) * inv_t  # [BLOCK_K]
                cls = tl.load(idx_row + offs_k, mask=k_mask, other=0)  # [BLOCK_K]
                z = tl.load(s_row + cls, mask=k_mask, other=float("-inf")).to(tl.float32) * inv_t  # [BLOCK_K]
                m_a, d_a = _lse_update(m_a, d_a, a)
                m_z, d_z = _lse_update(m_z, d_z, z)
            lse_a = m_a + tl.log(d_a)
            lse_z = m_z + tl.log(d_z)
            # Second pass re-reads K values per row (cache-resident) to form p, q and the gradient.
            loss = 0.0
            for k0 in range(0, K, BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                k_mask = offs_k < K
                a = tl.load(t_row + offs_k, mask=k_mask, other=0.0) * inv_t  # [BLOCK_K]
                cls = tl.load(idx_row + offs_k, mask=k_mask, other=0)  # [BLOCK_K]
                z = tl.load(s_row + cls, mask=k_mask, other=0.0).to(tl.float32) * inv_t  # [BLOCK_K]
                log_p = a - lse_a
                log_q = z - lse_z
                p = tl.exp(log_p)
                loss += tl.sum(tl.where(k_mask, p * (log_p - log_q), 0.0), axis=0)
                if WRITE_GRAD:
                    tl.store(g_row + cls, ((tl.exp(log_q) - p) * inv_t).to(g_dtype), mask=k_mask)
        tl.store(loss_ptr + row, loss)


def _launch(student_logits, teacher_topk, topk_idx, teacher_lse, keep, temperature, lse_mode, write_grad):
    """Run the fused kernel; return (loss [B] fp32, grad [B, C] in the student dtype or None)."""
    s = student_logits if student_logits.stride(-1) == 1 else student_logits.contiguous()  # [B, C]
    t = teacher_topk.to(torch.float32).contiguous()  # [B, K]
    idx = topk_idx.contiguous()  # [B, K]
    B, C = s.shape
    K = t.shape[1]
    loss = torch.empty(B, dtype=torch.float32, device=s.device)  # [B]
    grad = None
    if write_grad:
        # topk writes only the K positions of each row; topk_lse writes every position.
        alloc = torch.empty if lse_mode else torch.zeros
        grad = alloc((B, C), dtype=s.dtype, device=s.device)  # [B, C]
    if B == 0:
        return loss, grad
    lse = teacher_lse.to(torch.float32).contiguous() if lse_mode else loss  # [B]; unused in topk mode
    g = s if grad is None else grad  # unused when not write_grad
    block_k = min(triton.next_power_of_2(K), MAX_BLOCK_K)
    block_c = min(triton.next_power_of_2(C), MAX_BLOCK_C)
    widest = block_c if lse_mode else block_k
    _topk_kl_kernel[(B,)](
        s, s.stride(0), t, t.stride(0), idx, idx.stride(0), lse, keep.to(torch.uint8), loss, g, g.stride(0),
        1.0 / temperature, C, K,
        LSE_MODE=lse_mode, WRITE_GRAD=write_grad, BLOCK_K=block_k, BLOCK_C=block_c,
        num_warps=max(1, widest // 256),  # one warp per 256 lanes, 4 at the caps
    )
    return loss, grad


class TopKKLFunction(torch.autograd.Function):
    """Fused loss; forward also computes d loss / d logits, backward scales it by grad_output."""

    @staticmethod
    def forward(ctx, student_logits, teacher_topk, topk_idx, teacher_lse, keep, temperature, lse_mode):
        loss, grad = _launch(student_logits, teacher_topk, topk_idx, teacher_lse, keep, temperature, lse_mode,
                             write_grad=ctx.needs_input_grad[0])
        ctx.save_for_backward(grad)
        return loss

    @staticmethod
    def backward(ctx, grad_loss):
        (grad,) = ctx.saved_tensors  # [B, C]
        # Not in place: the saved gradient must survive a second backward (retain_graph).
        return grad * grad_loss[:, None].to(grad.dtype), None, None, None, None, None, None


def topk_kl(student_logits, teacher_topk, topk_idx, temperature, mode="topk", teacher_lse=None, mask=None,
            use_kernel=None) -> torch.Tensor:
    """Per-row top-K distillation KL, fused in Triton where available.

    Same arguments and result as :func:`topk_kl_reference` (loss [B] fp32, no ``T**2`` factor,
    0 for masked rows); gradients flow to ``student_logits`` only.

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
        return topk_kl_reference(student_logits, teacher_topk, topk_idx, temperature, mode, teacher_lse, mask)
    if not _HAS_TRITON:
        found = "not installed" if triton is None else f"found {triton.__version__}"
        raise DependencyError(f"topk_kl(use_kernel=True) needs Triton >= 3.4 ({found}): pip install 'kdstore[gpu]'")
    keep = _check_inputs(student_logits, teacher_topk, topk_idx, temperature, mode, teacher_lse, mask)
    return TopKKLFunction.apply(student_logits, teacher_topk, topk_idx, teacher_lse, keep, float(temperature),
                                mode == "topk_lse")
