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
