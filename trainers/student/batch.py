"""The batch the student trainer consumes: frame features, labels and teacher targets."""

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor


# The Batch field holding each prediction-group field (kdstore.predictions.FIELDS).
TEACHER_FIELDS = {"logits": "teacher_logits", "topk_values": "teacher_topk", "topk_indices": "teacher_idx",
                  "lse": "teacher_lse", "features": "teacher_features"}


@dataclass
class Batch:
    """One collated batch; the teacher fields present depend on the distillation mode.

    Rows with `teacher_mask` False have no teacher prediction: whatever their teacher fields
    hold is never read as a target.
    """

    frames: Tensor  # [B, T, D] float
    action: Tensor  # [B] long
    verb: Tensor  # [B] long
    noun: Tensor  # [B] long
    uids: Tensor  # [B] long
    teacher_mask: Tensor  # [B] bool
    past_action: Tensor | None = None  # [B, T] long, the action under each window frame (-1: none)
    teacher_topk: Tensor | None = None  # [B, K] float32, the teacher's top-K logits
    teacher_idx: Tensor | None = None  # [B, K] long, their class indices
    teacher_lse: Tensor | None = None  # [B] float32, logsumexp(teacher_logits / T)
    teacher_logits: Tensor | None = None  # [B, A], the teacher's full logits
    teacher_features: Tensor | None = None  # [B, H] float32, the teacher's [CLS] features

    def to(self, device: torch.device | str, non_blocking: bool = True) -> "Batch":
        """A copy with every tensor on `device`."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """A copy in pinned memory; DataLoader(pin_memory=True) calls this."""
        return self._map(Tensor.pin_memory)

    def _map(self, fn: Callable[[Tensor], Tensor]) -> "Batch":
        return dataclasses.replace(self, **{
            f.name: fn(v) for f in dataclasses.fields(self)
            if (v := getattr(self, f.name)) is not None
        })
