"""Fine-tuning a teacher for next-action anticipation, and batched prediction.

Loss: ``0.8 CE_action + 0.1 CE_verb + 0.1 CE_noun`` with ``multi_task``, else ``CE_action``.
With ``class_weighted = p > 0`` each CE weighs class c by ``(n / (C * count_c)) ** p``
(p = 1: balanced weights, p = 0.5: their square root), counted on the training labels;
a class absent from them gets weight 0 (it is never a target, so the weight only keeps
the vector finite).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from transformers import PreTrainedTokenizerFast

from kdstore.faults import crash_point

from .config import TeacherConfig
from .models import TeacherModel
from .optim import (load_checkpoint, lr_at, make_optimizer, pad_batch, save_checkpoint, seed_epoch, set_lr,
                    steps_per_epoch)
from .tokenizer import encode

LOSS_WEIGHTS = {"action": 0.8, "verb": 0.1, "noun": 0.1}


@dataclass
class Thinning:
    """History dropout: each epoch an example reads its history with every action dropped
    with a probability drawn uniformly from [0, ``rate``) for that example and epoch, so
    the teacher also sees histories as sparse as a gappy split's (one action in five)."""

    actions: np.ndarray  # [n, W] action ids before each example, oldest first, -1 padded
    lens: np.ndarray  # [n] history length (actions) of each example
    words: list[str]  # teacher text of each action id
    rate: float
    max_len: int
    recent_first: bool = False  # texts newest action first (TeacherConfig.recent_first)

    def draw(self, tok: PreTrainedTokenizerFast, seed: int, epoch: int) -> list[list[int]]:
        """Token ids of every example's thinned history for ``epoch`` (seeded)."""
        rng = np.random.default_rng([seed, epoch])
        drop = rng.uniform(0, self.rate, len(self.actions))[:, None]  # [n, 1]
        keep = (self.actions >= 0) & (rng.random(self.actions.shape) >= drop)  # [n, W]
        texts = []
        for row, k, L in zip(self.actions, keep, self.lens):
            acts = row[k][-L:] if k.any() else row[row >= 0][-L:]  # never empty
            texts.append(" <a> ".join(self.words[a] for a in (acts[::-1] if self.recent_first else acts)))
        return encode(tok, texts, self.max_len, self.recent_first)


@dataclass
class Examples:
    """Tokenized inputs with their action, verb and noun labels."""

    ids: list[list[int]]
    action: np.ndarray  # [n] int
    verb: np.ndarray  # [n] int
    noun: np.ndarray  # [n] int
    thinning: Thinning | None = None  # redraws ``ids`` each epoch when set

    def __len__(self) -> int:
        return len(self.ids)


def class_weights(labels: np.ndarray, num: int, power: float = 1.0) -> torch.Tensor:
    """[num] balanced weights ``(n / (num * count)) ** power``; 0 for classes absent from ``labels``."""
    counts = np.bincount(labels, minlength=num).astype(np.float64)
    w = np.where(counts > 0, (len(labels) / (num * np.maximum(counts, 1))) ** power, 0.0)
    return torch.tensor(w, dtype=torch.float32)


def finetune(
    model: TeacherModel,
    data: Examples,
    cfg: TeacherConfig,
    tok: PreTrainedTokenizerFast,
    seed: int,
    ckpt_dir: str | Path | None = None,
    on_step: Callable[[int, int], None] | None = None,
    on_epoch: Callable[[int, dict], None] | None = None,
) -> list[dict]:
    """Train ``model`` on ``data`` for ``cfg.epochs``; return the per-epoch log.

    With ``ckpt_dir`` a checkpoint is written after every epoch and an existing one is
    resumed from (model, AdamW state, step and log). ``on_step(done, total)`` reports
    progress; ``on_epoch(epoch, row)`` is called after each checkpoint.
    """
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    state = load_checkpoint(ckpt_dir, model, opt) if ckpt_dir else None
    start, log = (state["epoch"], state["log"]) if state else (0, [])
    heads = ("action", "verb", "noun") if cfg.multi_task else ("action",)
    labels = {h: torch.as_tensor(getattr(data, h), dtype=torch.long) for h in heads}
    weights = {h: class_weights(getattr(data, h), n, cfg.class_weighted) if cfg.class_weighted else None
               for h, n in zip(heads, model.num_classes)}
    n, bs = len(data), cfg.batch_size
    per_epoch = steps_per_epoch(n, bs)
    total, step = cfg.epochs * per_epoch, start * per_epoch
    for epoch in range(start, cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=seed_epoch(seed, epoch))
        ids = data.thinning.draw(tok, seed, epoch) if data.thinning else data.ids
        t0, sums = time.perf_counter(), dict.fromkeys(("loss", *heads), 0.0)
        for b in range(per_epoch):
            idx = perm[b * bs : (b + 1) * bs]  # [B]
            x, mask = pad_batch([ids[i] for i in idx], tok.pad_token_id)  # [B, T]
            out = model(x, mask)
            losses = {h: F.cross_entropy(out[h], labels[h][idx], weight=weights[h], label_smoothing=cfg.label_smoothing)
                      for h in heads}
            loss = sum(LOSS_WEIGHTS[h] * losses[h] for h in heads) if cfg.multi_task else losses["action"]
            set_lr(opt, lr_at(step, total, cfg.lr, cfg.warmup))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.grad_clip:
                torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
            step += 1
            sums["loss"] += loss.item()
            for h in heads:
                sums[h] += losses[h].item()
            if on_step:
                on_step(step, total)
        row = {"epoch": epoch + 1, **{("loss" if k == "loss" else f"loss_{k}"): v / per_epoch for k, v in sums.items()},
               "seconds": round(time.perf_counter() - t0, 2)}
        log.append(row)
        if ckpt_dir:
            save_checkpoint(ckpt_dir, model, opt, {"epoch": epoch + 1, "step": step, "log": log})
            crash_point("teacher.epoch")
        if on_epoch:
            on_epoch(epoch + 1, row)
    return log


@torch.no_grad()
def predict(model: TeacherModel, ids: list[list[int]], pad_id: int, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Logits of every head and the [CLS] features, float32 arrays with ``len(ids)`` rows."""
    model.eval()
    out: dict[str, np.ndarray] = {}
    order = np.argsort([len(s) for s in ids], kind="stable")  # similar lengths share a batch
    for lo in range(0, len(ids), batch_size):
        rows = order[lo : lo + batch_size]
        x, mask = pad_batch([ids[i] for i in rows], pad_id)  # [B, T]
        for k, v in model(x, mask).items():
            if k not in out:
                out[k] = np.empty((len(ids), v.shape[1]), np.float32)
            out[k][rows] = v.float().numpy()
    return out
