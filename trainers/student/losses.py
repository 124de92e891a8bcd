"""Student objective: AVT's losses plus KL distillation toward the text teacher."""

import torch
from torch import Tensor
from torch.nn import functional as F

from kdstore.errors import ConfigError, DataError
from trainers.student.batch import Batch
from trainers.student.config import StudentConfig

# The teacher fields each distillation mode reads.
_TEACHER_FIELDS = {
    "full": ("teacher_logits",),
    "topk": ("teacher_topk", "teacher_idx"),
    "topk_lse": ("teacher_topk", "teacher_idx", "teacher_lse"),
    "none": (),
}


def student_losses(out: dict[str, Tensor], batch: Batch, cfg: StudentConfig) -> dict[str, Tensor]:
    """The student's losses for one batch, from `AVTHead` outputs `out`.

    Keys: `ce` (action CE of the future prediction), `verb`/`noun` (with verb_noun_heads),
    `past_cls` (with past_cls > 0), `feat` (MSE of each position's prediction against the next
    frame), `distill` (with distill_mode != "none"; already scaled by cfg.distill * T^2), and
    `total` = ce + verb_noun_weight * (verb + noun) + past_cls * past_cls + feat * feat + distill.

    past_cls follows AVT's classifier on past predictions, with one simplification: AVT labels
    each past position with the action under that frame, which the store does not carry, so
    every past position 0..T-2 is labelled with the batch's action.

    Raises DataError naming the UID when a row's frames or teacher targets hold NaN/inf, and
    ConfigError when the batch lacks a teacher field that distill_mode reads.
    """
    if batch.frames.shape[1] < 2:
        raise DataError(f"frames: the feat and past_cls losses need >= 2 frames per row, "
                        f"got {batch.frames.shape[1]}")
    _check_finite(batch.frames, "frames", batch)
    for name in _TEACHER_FIELDS[cfg.distill_mode]:
        if getattr(batch, name) is None:
            raise ConfigError(f"distill_mode={cfg.distill_mode!r} needs batch.{name}, which is None")
        if name != "teacher_idx":
            _check_finite(getattr(batch, name), name, batch, rows=batch.teacher_mask)

    ls = cfg.label_smoothing
    losses = {"ce": F.cross_entropy(out["logits"], batch.action, label_smoothing=ls)}
    total = losses["ce"]
    if cfg.verb_noun_heads:
        losses["verb"] = F.cross_entropy(out["verb_logits"], batch.verb, label_smoothing=ls)
        losses["noun"] = F.cross_entropy(out["noun_logits"], batch.noun, label_smoothing=ls)
        total = total + cfg.verb_noun_weight * (losses["verb"] + losses["noun"])
    if cfg.past_cls > 0:
        past = out["past_logits"][:, :-1]  # [B, T-1, A]; the last position is the future
        target = batch.action[:, None].expand(past.shape[:2])  # [B, T-1]
        losses["past_cls"] = F.cross_entropy(past.flatten(0, 1), target.flatten(), label_smoothing=ls)
        total = total + cfg.past_cls * losses["past_cls"]
    losses["feat"] = F.mse_loss(out["pred_feats"][:, :-1], batch.frames[:, 1:])
    total = total + cfg.feat * losses["feat"]
    if cfg.distill_mode != "none":
        T = cfg.temperature
        losses["distill"] = cfg.distill * T * T * _distill_kl(out["logits"], batch, cfg)
        total = total + losses["distill"]
    losses["total"] = total
    return losses


def _distill_kl(logits: Tensor, batch: Batch, cfg: StudentConfig) -> Tensor:
    """Mean over the rows that have a teacher of KL(p_teacher,T || p_student,T); 0 if none has."""
    mask = batch.teacher_mask  # [B]
    if cfg.distill_mode == "full":
        if batch.teacher_logits.shape != logits.shape:
            raise DataError(f"teacher_logits: expected shape {list(logits.shape)} like the "
                            f"student's logits, got {list(batch.teacher_logits.shape)}")
        # Rows without a teacher get a finite stand-in (so no NaN reaches the graph) and are
        # then dropped by the where: their loss and gradient are exactly 0.
        teacher = torch.where(mask[:, None], batch.teacher_logits.float(), 0.0)  # [B, A]
        log_p = F.log_softmax(teacher / cfg.temperature, dim=-1)  # [B, A]
        log_q = F.log_softmax(logits.float() / cfg.temperature, dim=-1)  # [B, A]
        per_row = F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1)  # [B]
        per_row = torch.where(mask, per_row, 0.0)
    else:
        # Imported on use: importing it JIT-decorates Triton kernels (slow, and the decoration
        # reads TRITON_INTERPRET), which full/none runs and CPU-only imports needn't pay.
        from trainers.kernels.topk_kl import topk_kl

        lse = batch.teacher_lse if cfg.distill_mode == "topk_lse" else None
        per_row = topk_kl(logits, batch.teacher_topk, batch.teacher_idx, cfg.temperature,
                          mode=cfg.distill_mode, teacher_lse=lse, mask=mask)  # [B], 0 where ~mask
    # Masking instead of selecting rows keeps shapes static (no host sync); the sum stays
    # attached to the graph when no row has a teacher, so DDP sees every parameter used.
    return per_row.sum() / mask.sum().clamp(min=1)


def _check_finite(x: Tensor, name: str, batch: Batch, rows: Tensor | None = None) -> None:
    """Raise DataError naming the first UID whose row of x holds NaN/inf (among `rows`)."""
    if bool(x.isfinite().all()):  # the common case costs one reduction and one sync
        return
    bad = ~x.reshape(len(x), -1).isfinite().all(dim=1)  # [B]
    if rows is not None:
        bad &= rows
    if bool(bad.any()):
        uid = int(batch.uids[bad][0])
        raise DataError(f"UID {uid}: {name} contain NaN/inf")
