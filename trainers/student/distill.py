"""The distillation terms: what each reads from the teacher's prediction group, and its loss.

One registry, so that a new mode is one entry here: the data reads what the active terms
declare (``reads``), the losses add up the active terms, and the trainer distils when any
term is active. Two kinds of term:

* **KD modes** (``distill_mode``; weight ``distill``), a KL divergence between the teacher's
  and the student's action distributions at temperature T, scaled by T^2 (Hinton et al.):
  ``full`` (all classes), ``topk`` (both distributions renormalised over the teacher's top-K:
  the variant of the paper's EK55 runs) and ``topk_lse`` (the teacher's full normaliser, its
  other classes one tail bucket). ``distill_reduction`` picks the mean the paper's code takes,
  ``torch.mean`` over all B x C (``topk``: B x K) elements of ``KLDivLoss(reduction='none')``
  (``elements``), or the mean over rows (``rows``, C or K times stronger at the same weight).
* **KD modes beyond the paper's** (weight ``distill``, temperature T, times T^2):
  ``std`` and ``std_topk``, the KL of z-scored logits (Sun et al., "Logit Standardization in
  Knowledge Distillation", CVPR 2024), through the fused kernel; ``dkd``, decoupled KD (Zhao
  et al., CVPR 2022): ``dkd_alpha`` x the binary target / non-target KL (TCKD) + ``dkd_beta`` x
  the KL among the non-target classes (NCKD, the fused kernel's KL over those C - 1); ``dist``, DIST (Huang et al., NeurIPS 2022):
  ``dist_beta`` x (1 - Pearson correlation of each row's probabilities) + ``dist_gamma`` x
  (1 - Pearson correlation of each class's probabilities across the batch's rows). ``std``,
  ``dkd`` and ``dist`` read the teacher's full logits; ``std_topk`` only its stored top-K, and
  standardises both models over those K classes (docs/distillation.md). ``dkd`` takes
  ``distill_reduction`` like the KL modes (its ``rows`` is the authors' sum over classes, mean
  over rows); ``dist`` is a mean of correlations already and ignores it.
* **Feature terms** (weights ``distill_feat``, ``distill_feat_mse``), on the student's future
  aggregate (projected to the teacher's width when the two differ) and the teacher's [CLS]
  feature: 1 - cosine similarity, mean over rows, and the MSE of the L2-normalised features,
  mean over rows x H, as the paper's ``CosineSim`` and ``NormedMSE``.

Every term averages over the rows that have a teacher; rows without one contribute nothing
(the paper's code gives them a constant -1 target, a uniform distribution, instead; see
docs/distillation.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor
from torch.nn import functional as F

from kdstore.errors import ConfigError, DataError

from .batch import Batch

# ``cfg`` is a StudentConfig, named but not imported: trainers/student/config.py looks this
# registry up to check distill_mode, and the two modules must not import each other.
Loss = Callable[[dict[str, Tensor], Batch, "StudentConfig"], Tensor]


@dataclass(frozen=True)
class Term:
    """One distillation term: its weight's config field, the store fields it reads, its loss.

    ``loss(out, batch, cfg)`` is the unweighted scalar from the model outputs ``out`` and the
    batch; 0 (still attached to the graph) when no row has a teacher.
    """

    weight: str
    reads: tuple[str, ...]
    loss: Loss


def _topk_kl(logits: Tensor, teacher: Tensor, idx: Tensor, mode: str, lse: Tensor | None, batch: Batch,
             cfg: StudentConfig) -> Tensor:
    """T^2 x the KL of trainers.kernels.topk_kl, reduced by cfg.distill_reduction; 0 when no row has a teacher."""
    # Imported on use: importing it JIT-decorates Triton kernels (the decoration reads
    # TRITON_INTERPRET), which runs without distillation and CPU-only imports needn't pay.
    from trainers.kernels.topk_kl import topk_kl

    T = cfg.temperature
    return T * T * topk_kl(logits, teacher, idx, T, mode=mode, teacher_lse=lse, mask=batch.teacher_mask,
                           reduction=cfg.distill_reduction)


def _kl_full(out: dict[str, Tensor], batch: Batch, cfg: StudentConfig) -> Tensor:
    logits = out["logits"]  # [B, A]
    if batch.teacher_logits.shape != logits.shape:
        raise DataError(f"teacher_logits: expected shape {list(logits.shape)} like the student's "
                        f"logits, got {list(batch.teacher_logits.shape)}")
    # the full KL is the top-K KL with K = every class, in order
    idx = torch.arange(logits.shape[1], device=logits.device).expand(logits.shape)  # [B, A]
    return _topk_kl(logits, batch.teacher_logits, idx, "topk", None, batch, cfg)


def _kl_topk(mode: str) -> Loss:
    return lambda out, batch, cfg: _topk_kl(out["logits"], batch.teacher_topk, batch.teacher_idx, mode,
                                            batch.teacher_lse, batch, cfg)


def standardise(x: Tensor) -> Tensor:
    """Z-score of each row, as the official code of Sun et al. computes it (unbiased std, + 1e-7)."""
    x = x.float()  # [B, C]
    return (x - x.mean(-1, keepdim=True)) / (1e-7 + x.std(-1, keepdim=True))


def _teacher_rows(teacher: Tensor, batch: Batch) -> Tensor:
    """The teacher's logits as float32, 0 on rows without a teacher (whatever they held)."""
    return torch.where(batch.teacher_mask[:, None], teacher.float(), 0.0)  # [B, C]


def _full_pair(out: dict[str, Tensor], batch: Batch) -> tuple[Tensor, Tensor]:
    logits = out["logits"]  # [B, A]
    if batch.teacher_logits.shape != logits.shape:
        raise DataError(f"teacher_logits: expected shape {list(logits.shape)} like the student's "
                        f"logits, got {list(batch.teacher_logits.shape)}")
    return logits, _teacher_rows(batch.teacher_logits, batch)


def _kl_std(out: dict[str, Tensor], batch: Batch, cfg: StudentConfig) -> Tensor:
    """KL at T of the z-scored logits over all classes: the fused kernel on standardised inputs."""
    s, t = _full_pair(out, batch)
    idx = torch.arange(s.shape[1], device=s.device).expand(s.shape)  # [B, A]
    return _topk_kl(standardise(s), standardise(t), idx, "topk", None, batch, cfg)


def _kl_std_topk(out: dict[str, Tensor], batch: Batch, cfg: StudentConfig) -> Tensor:
    """``std`` on the teacher's stored top-K: both models z-scored over those K classes."""
    t = _teacher_rows(batch.teacher_topk, batch)  # [B, K]
    idx = torch.where(batch.teacher_mask[:, None], batch.teacher_idx, 0)  # [B, K]; padding rows read class 0
    s = out["logits"].gather(1, idx)  # [B, K]
    local = torch.arange(t.shape[1], device=t.device).expand(t.shape)  # [B, K]
    return _topk_kl(standardise(s), standardise(t), local, "topk", None, batch, cfg)


def _reduce_rows(per_row: Tensor, batch: Batch, cfg: StudentConfig, width: int) -> Tensor:
    """``distill_reduction`` of per-row losses over the rows with a teacher (elements: x ``width``)."""
    return _masked_mean_rows(per_row, batch.teacher_mask, width if cfg.distill_reduction == "elements" else 1)


def _dkd(out: dict[str, Tensor], batch: Batch, cfg: StudentConfig) -> Tensor:
    """T^2 (alpha TCKD + beta NCKD). TCKD in log space; NCKD, the KL of the two distributions
    renormalised over the non-target classes, is the fused kernel's top-K KL over those C - 1."""
    from trainers.kernels.topk_kl import topk_kl

    s, t = _full_pair(out, batch)
    T, (B, C) = cfg.temperature, s.shape
    zs, zt = s.float() / T, t / T  # [B, A]
    gt = F.one_hot(batch.action.clamp(min=0), C).bool()  # [B, A]
    lse_s, lse_t = zs.logsumexp(-1), zt.logsumexp(-1)  # [B]
    nt_s = zs.masked_fill(gt, float("-inf")).logsumexp(-1)  # [B] over the non-target classes
    nt_t = zt.masked_fill(gt, float("-inf")).logsumexp(-1)
    # binary (target, non-target) log-probabilities [B, 2]
    bs = torch.stack([(zs * gt).sum(-1) - lse_s, nt_s - lse_s], -1)
    bt = torch.stack([(zt * gt).sum(-1) - lse_t, nt_t - lse_t], -1)
    tckd = (bt.exp() * (bt - bs)).sum(-1)  # [B]
    j = torch.arange(C - 1, device=s.device).expand(B, C - 1)  # [B, C-1]
    idx = torch.where(j < batch.action.clamp(min=0)[:, None], j, j + 1)  # every class but the target
    nckd = topk_kl(s, t.gather(1, idx), idx, T, mode="topk", mask=batch.teacher_mask) if C > 1 else tckd * 0  # [B]
    per_row = T * T * (cfg.dkd_alpha * tckd + cfg.dkd_beta * nckd)
    return _reduce_rows(per_row, batch, cfg, C)


def _pearson_loss(a: Tensor, b: Tensor, dim: int, keep: Tensor) -> Tensor:
    """Mean over the other axis of 1 - Pearson correlation of ``a`` and ``b`` along ``dim``
    (cosine of the centred vectors, + 1e-8 in the denominator as DIST's code), on ``keep``'s entries."""
    n = keep.sum(dim, keepdim=True).clamp(min=1)
    a = torch.where(keep, a - (a * keep).sum(dim, keepdim=True) / n, 0.0)
    b = torch.where(keep, b - (b * keep).sum(dim, keepdim=True) / n, 0.0)
    rho = (a * b).sum(dim) / (a.norm(dim=dim) * b.norm(dim=dim) + 1e-8)
    return 1 - rho


def _dist(out: dict[str, Tensor], batch: Batch, cfg: StudentConfig) -> Tensor:
    """T^2 (beta inter-class + gamma intra-class relation loss) over the rows with a teacher."""
    s, t = _full_pair(out, batch)
    T, mask = cfg.temperature, batch.teacher_mask
    ys, yt = torch.softmax(s.float() / T, -1), torch.softmax(t / T, -1)  # [B, A]
    keep = mask[:, None].expand(ys.shape)  # [B, A]
    inter = _masked_mean_rows(_pearson_loss(ys, yt, 1, keep), mask)  # rows: correlation across classes
    intra = _pearson_loss(ys, yt, 0, keep).mean() * mask.any()  # classes: across the rows with a teacher
    return T * T * (cfg.dist_beta * inter + cfg.dist_gamma * intra)


def _masked_mean_rows(per_row: Tensor, mask: Tensor, width: int = 1) -> Tensor:
    """Mean over the rows with a teacher (x ``width`` columns); the graph stays attached at 0 rows."""
    return torch.where(mask, per_row, 0.0).sum() / (mask.sum().clamp(min=1) * width)


def _normalised_pair(out: dict[str, Tensor], batch: Batch) -> tuple[Tensor, Tensor]:
    """(student, teacher) features [B, H], L2-normalised; rows without a teacher get a finite stand-in."""
    if "future_agg" not in out:
        raise ConfigError("feature distillation needs the model's future_agg output: build AVTHead with teacher_dim")
    s = out["future_agg"].float()  # [B, H]
    if batch.teacher_features.shape != s.shape:
        raise DataError(f"teacher_features: expected shape {list(s.shape)} like the student's projected "
                         f"future feature, got {list(batch.teacher_features.shape)}")
    t = torch.where(batch.teacher_mask[:, None], batch.teacher_features.float(), 1.0)  # [B, H]
    return F.normalize(s, dim=-1), F.normalize(t, dim=-1)


def _feat_cosine(out: dict[str, Tensor], batch: Batch, cfg: StudentConfig) -> Tensor:
    s, t = _normalised_pair(out, batch)
    return _masked_mean_rows(1 - (s * t).sum(-1), batch.teacher_mask)


def _feat_mse(out: dict[str, Tensor], batch: Batch, cfg: StudentConfig) -> Tensor:
    s, t = _normalised_pair(out, batch)
    return _masked_mean_rows((s - t).square().sum(-1), batch.teacher_mask, width=s.shape[1])


NONE = "none"  # distill_mode of a run without a KD term
KD_MODES: dict[str, Term] = {
    "full": Term("distill", ("logits",), _kl_full),
    "topk": Term("distill", ("topk_values", "topk_indices"), _kl_topk("topk")),
    "topk_lse": Term("distill", ("topk_values", "topk_indices", "lse"), _kl_topk("topk_lse")),
    "std": Term("distill", ("logits",), _kl_std),
    "std_topk": Term("distill", ("topk_values", "topk_indices"), _kl_std_topk),
    "dkd": Term("distill", ("logits",), _dkd),
    "dist": Term("distill", ("logits",), _dist),
}
FEATURE_TERMS: dict[str, Term] = {
    "distill_feat": Term("distill_feat", ("features",), _feat_cosine),
    "distill_feat_mse": Term("distill_feat_mse", ("features",), _feat_mse),
}
REDUCTIONS = ("elements", "rows")


def active_terms(cfg: StudentConfig) -> dict[str, Term]:
    """The terms a config trains with, by loss name (``distill`` for the KD mode): weight > 0."""
    terms = {}
    if cfg.distill_mode != NONE and cfg.distill > 0:
        terms["distill"] = KD_MODES[cfg.distill_mode]
    terms |= {name: t for name, t in FEATURE_TERMS.items() if getattr(cfg, t.weight) > 0}
    return terms


def reads(cfg: StudentConfig) -> tuple[str, ...]:
    """The prediction-group fields the active terms read, each once."""
    return tuple(dict.fromkeys(f for t in active_terms(cfg).values() for f in t.reads))


def distills(cfg: StudentConfig) -> bool:
    """Whether the config has any active distillation term (and so needs a teacher)."""
    return bool(active_terms(cfg))


def without_distillation(cfg: StudentConfig) -> StudentConfig:
    """The same config with every distillation term off: the baseline's."""
    return dataclasses.replace(cfg, distill_mode=NONE, **{t.weight: 0.0 for t in FEATURE_TERMS.values()})
