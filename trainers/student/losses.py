"""Student objective: AVT's losses plus the distillation terms toward the text teacher."""

from torch import Tensor
from torch.nn import functional as F

from kdstore.errors import ConfigError, DataError
from trainers.student.batch import TEACHER_FIELDS, Batch
from trainers.student.config import StudentConfig
from trainers.student.distill import active_terms


def student_losses(out: dict[str, Tensor], batch: Batch, cfg: StudentConfig, check: bool = True) -> dict[str, Tensor]:
    """The student's losses for one batch, from `AVTHead` outputs `out`.

    Keys: `ce` (action CE of the future prediction), `verb`/`noun` (with verb_noun_heads),
    `past_cls` (with past_cls > 0), `feat` (MSE of each position's prediction against the next
    frame), one key per active distillation term (`distill` for the KD mode, `distill_feat`,
    `distill_feat_mse`; trainers.student.distill), each already multiplied by its weight, and
    `total` = ce + verb_noun_weight * (verb + noun) + past_cls * past_cls + feat * feat + the terms.

    past_cls is AVT's loss on its past classifier: cross-entropy of each past position against
    the action under that frame (``batch.past_action``, with past_frame_labels; -1 where no
    segment covers the frame), summed over the labelled positions and divided by all B x T
    positions, as AVT's ``MultiDimCrossEntropy(ignore_index=-1, reduction='none')`` followed by
    ``torch.mean``. Without past_frame_labels every position is labelled with the batch's action.

    With ``check`` it first runs :func:`check_batch`; ``check=False`` is for a caller that has
    checked the batch already (the trainer's data paths): no host sync, so the step compiles
    into one graph.
    """
    if check:
        check_batch(batch, cfg)
    terms = active_terms(cfg)
    ls = cfg.label_smoothing
    losses = {"ce": F.cross_entropy(out["logits"], batch.action, label_smoothing=ls)}
    total = losses["ce"]
    if cfg.verb_noun_heads:
        losses["verb"] = F.cross_entropy(out["verb_logits"], batch.verb, label_smoothing=ls)
        losses["noun"] = F.cross_entropy(out["noun_logits"], batch.noun, label_smoothing=ls)
        total = total + cfg.verb_noun_weight * (losses["verb"] + losses["noun"])
    if cfg.past_cls > 0:
        losses["past_cls"] = past_cls_loss(out["past_logits"], batch, cfg)
        total = total + cfg.past_cls * losses["past_cls"]
    losses["feat"] = F.mse_loss(out["pred_feats"][:, :-1], batch.frames[:, 1:])
    total = total + cfg.feat * losses["feat"]
    # Rows without a teacher are masked, not dropped: static shapes (no host sync), and a term
    # stays attached to the graph when no row has a teacher, so DDP sees every parameter used.
    for name, term in terms.items():
        losses[name] = getattr(cfg, term.weight) * term.loss(out, batch, cfg)
        total = total + losses[name]
    losses["total"] = total
    return losses


def past_cls_loss(past_logits: Tensor, batch: Batch, cfg: StudentConfig) -> Tensor:
    """AVT's past-classifier loss; past_logits [B, P, A] score the last P window frames."""
    P = past_logits.shape[1]
    if cfg.past_frame_labels:
        target = batch.past_action[:, -P:]  # [B, P]
    else:
        target = batch.action[:, None].expand(past_logits.shape[:2])  # [B, P]
    ce = F.cross_entropy(past_logits.flatten(0, 1), target.flatten(), ignore_index=-1, reduction="none",
                         label_smoothing=cfg.label_smoothing)  # [B * P], 0 where ignored
    return ce.mean()


def check_batch(batch: Batch, cfg: StudentConfig) -> None:
    """Raise DataError naming the UID when a row's frames or teacher targets hold NaN/inf, and
    ConfigError when the batch lacks a teacher field that an active term of ``cfg`` reads."""
    if batch.frames.shape[1] < 2:
        raise DataError(f"frames: the feat and past_cls losses need >= 2 frames per row, "
                        f"got {batch.frames.shape[1]}")
    _check_finite(batch.frames, "frames", batch)
    if cfg.past_cls > 0 and cfg.past_frame_labels and batch.past_action is None:
        raise ConfigError("past_cls with past_frame_labels needs batch.past_action (the action under each window "
                          "frame), which is None; build the data with this config")
    for term_name, term in active_terms(cfg).items():
        for field in term.reads:
            name = TEACHER_FIELDS[field]
            if getattr(batch, name) is None:
                raise ConfigError(f"{term_name} (distill_mode={cfg.distill_mode!r}) needs batch.{name}, which is None")
            if field != "topk_indices":
                _check_finite(getattr(batch, name), name, batch, rows=batch.teacher_mask)


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
