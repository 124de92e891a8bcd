"""Fine-tuning a teacher for next-action anticipation, and batched prediction.

Loss: ``0.8 CE_action + 0.1 CE_verb + 0.1 CE_noun`` with ``multi_task``, else ``CE_action``.
With ``class_weighted = p > 0`` each CE weighs class c by ``(n / (C * count_c)) ** p``
(p = 1: balanced weights, p = 0.5: their square root), counted on the training labels;
a class absent from them gets weight 0 (it is never a target, so the weight only keeps
the vector finite).

Both run on the model's device (bf16 autocast on CUDA, see ``device``); the per-step
losses are summed on that device and read once an epoch.
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

from ..device import autocast, training_dtype
from .config import TeacherConfig
from .models import TeacherModel
from .optim import load_checkpoint, lr_at, make_optimizer, save_checkpoint, seed_epoch, set_lr, steps_per_epoch
from .tokenizer import Tokens, encode

LOSS_WEIGHTS = {"action": 0.8, "verb": 0.1, "noun": 0.1}


@dataclass
class Thinning:
    """History dropout: each epoch an example reads its history with every action dropped
    with a probability drawn uniformly from [0, ``rate``) for that example and epoch, so
    the teacher also sees histories as sparse as a gappy split's (one action in five).

    With a tokenizer whose ids of a joined text are the joined ids of its actions
    (WordPiece: checked on the full histories by ``prepare``), an epoch's inputs are put
    together from each action's token ids in numpy; otherwise they are tokenized again."""

    actions: np.ndarray  # [n, W] action ids before each example, oldest first, -1 padded
    lens: np.ndarray  # [n] history length (actions) of each example
    words: list[str]  # teacher text of each action id
    rate: float
    max_len: int
    recent_first: bool = False  # texts newest action first (TeacherConfig.recent_first)
    table: Tokens | None = None  # token ids of each action's words, set by ``prepare`` when joining is exact

    def prepare(self, tok: PreTrainedTokenizerFast, full: Tokens) -> "Thinning":
        """Use joined action ids if they reproduce ``full``, the tokenizer's ids of the unthinned histories."""
        table = Tokens.from_lists(tok(self.words, add_special_tokens=False)["input_ids"], tok.pad_token_id)
        ids = _tokens_ids(tok)
        dense = _join_actions(_last(self.actions, self.actions >= 0, self.lens), table, ids, self.max_len, self.recent_first)
        self.table = table if _same(dense, full) else None
        return self

    def draw(self, tok: PreTrainedTokenizerFast, seed: int, epoch: int, chunk: int = 8192) -> Tokens:
        """Token ids of every example's thinned history for ``epoch`` (seeded)."""
        rng = np.random.default_rng([seed, epoch])
        drop = rng.uniform(0, self.rate, len(self.actions))[:, None]  # [n, 1]
        valid = self.actions >= 0  # [n, W]
        keep = valid & (rng.random(self.actions.shape) >= drop)  # [n, W]
        empty = ~keep.any(axis=1)
        keep[empty] = valid[empty]  # never empty
        acts = _last(self.actions, keep, self.lens)  # [n, W]
        if self.table is None:
            order = slice(None, None, -1 if self.recent_first else 1)
            texts = [" <a> ".join(self.words[a] for a in row[row >= 0][order]) for row in acts]
            return encode(tok, texts, self.max_len, self.recent_first)
        ids = _tokens_ids(tok)
        return Tokens.concat([_join_actions(acts[lo : lo + chunk], self.table, ids, self.max_len, self.recent_first)
                              for lo in range(0, len(acts), chunk)])


def _tokens_ids(tok: PreTrainedTokenizerFast) -> tuple[int, int, int]:
    """(start, end, action separator) token ids."""
    ids = tok("", add_special_tokens=True)["input_ids"]
    return ids[0], ids[-1], tok.convert_tokens_to_ids("<a>")


def _last(actions: np.ndarray, keep: np.ndarray, lens: np.ndarray) -> np.ndarray:
    """[n, W] ``actions`` where ``keep`` and among the row's last ``lens`` kept ones, else -1."""
    after = np.cumsum(keep[:, ::-1], axis=1)[:, ::-1]  # [n, W] kept actions at or after each slot
    return np.where(keep & (after <= lens[:, None]), actions, -1)


def _join_actions(
    acts: np.ndarray, table: Tokens, special: tuple[int, int, int], max_len: int, recent_first: bool = False
) -> Tokens:
    """``start w(a1) <a> w(a2) ... end`` of each row's actions (-1: none; newest first if
    ``recent_first``), the oldest tokens cut to fit ``max_len`` (what the tokenizer does with
    ``truncation_side`` "left", or "right" for newest-first texts)."""
    start, end, sep = special
    if recent_first:
        acts = acts[:, ::-1]
    n, W = acts.shape
    A = table.ids.shape[1] + 1  # an action's tokens and its separator
    a = np.maximum(acts, 0)
    grid = np.concatenate([table.ids[a], np.zeros((n, W, 1), np.int32)], axis=2)  # [n, W, A]
    np.put_along_axis(grid, table.lens[a][:, :, None].astype(np.int64), sep, axis=2)  # the separator after the words
    width = np.where(acts >= 0, table.lens[a] + 1, 0)  # [n, W] tokens of each slot
    real = acts >= 0
    last = W - 1 - np.argmax(real[:, ::-1], axis=1)  # [n] slot of the newest action
    width[np.arange(n), last] -= real[np.arange(n), last]  # no separator after it
    grid, valid = grid.reshape(n, -1), (np.arange(A)[None, None, :] < width[:, :, None]).reshape(n, -1)  # [n, W*A]
    body = max_len - 2
    kept = np.cumsum(valid, axis=1) if recent_first else np.cumsum(valid[:, ::-1], axis=1)[:, ::-1]
    valid &= kept <= body  # the newest ``body`` tokens
    k = valid.sum(axis=1)  # [n]
    packed = np.take_along_axis(grid, np.argsort(~valid, axis=1, kind="stable"), axis=1)[:, :body]  # [n, <= body]
    out = np.full((n, max_len), table.pad_id, np.int32)
    out[:, 0] = start
    cols = np.arange(packed.shape[1])[None, :] < k[:, None]
    out[:, 1 : 1 + packed.shape[1]] = np.where(cols, packed, table.pad_id)
    out[np.arange(n), k + 1] = end
    return Tokens(out, (k + 2).astype(np.int32), table.pad_id)


def _same(a: Tokens, b: Tokens) -> bool:
    """Whether ``a`` and ``b`` hold the same token ids (padding aside)."""
    if not np.array_equal(a.lens, b.lens):
        return False
    T = int(a.lens.max(initial=0))
    real = np.arange(T)[None, :] < a.lens[:, None]  # [n, T]
    return bool(np.array_equal(np.where(real, a.ids[:, :T], -1), np.where(real, b.ids[:, :T], -1)))


@dataclass
class Examples:
    """Tokenized inputs with their action, verb and noun labels."""

    ids: Tokens
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
    """Train ``model`` (on its device) on ``data`` for ``cfg.epochs``; return the per-epoch log.

    With ``ckpt_dir`` a checkpoint is written after every epoch and an existing one is
    resumed from (model, AdamW state, step and log). ``on_step(done, total)`` reports
    progress; ``on_epoch(epoch, row)`` is called after each checkpoint.
    """
    device = next(model.parameters()).device
    opt = make_optimizer(model, cfg.lr, cfg.weight_decay)
    state = load_checkpoint(ckpt_dir, model, opt) if ckpt_dir else None
    start, log = (state["epoch"], state["log"]) if state else (0, [])
    heads = ("action", "verb", "noun") if cfg.multi_task else ("action",)
    labels = {h: torch.as_tensor(getattr(data, h), dtype=torch.long, device=device) for h in heads}
    weights = {h: class_weights(getattr(data, h), n, cfg.class_weighted).to(device) if cfg.class_weighted else None
               for h, n in zip(heads, model.num_classes)}
    n, bs = len(data), cfg.batch_size
    per_epoch = steps_per_epoch(n, bs)
    total, step = cfg.epochs * per_epoch, start * per_epoch
    for epoch in range(start, cfg.epochs):
        model.train()
        perm = torch.randperm(n, generator=seed_epoch(seed, epoch)).numpy()
        ids = data.thinning.draw(tok, seed, epoch) if data.thinning else data.ids
        t0, sums = time.perf_counter(), torch.zeros(1 + len(heads), device=device)  # loss, then each head's
        for b in range(per_epoch):
            idx = perm[b * bs : (b + 1) * bs]  # [B]
            set_lr(opt, lr_at(step, total, cfg.lr, cfg.warmup))
            sums += _step(model, opt, cfg, ids.batch(idx, device), torch.from_numpy(idx).to(device, non_blocking=True),
                          labels, weights)
            step += 1
            if on_step:
                on_step(step, total)
        means = (sums / per_epoch).tolist()
        row = {"epoch": epoch + 1, "loss": means[0], **{f"loss_{h}": m for h, m in zip(heads, means[1:])},
               "seconds": round(time.perf_counter() - t0, 2), "device": str(device)}
        log.append(row)
        if ckpt_dir:
            save_checkpoint(ckpt_dir, model, opt, {"epoch": epoch + 1, "step": step, "log": log})
            crash_point("teacher.epoch")
        if on_epoch:
            on_epoch(epoch + 1, row)
    return log


def _step(model: TeacherModel, opt: torch.optim.Optimizer, cfg: TeacherConfig, batch: tuple[torch.Tensor, torch.Tensor],
          at: torch.Tensor, labels: dict[str, torch.Tensor], weights: dict[str, torch.Tensor | None]) -> torch.Tensor:
    """One optimizer step on the examples ``at`` [B] whose inputs are ``batch`` (ids, mask [B, T]);
    returns the detached [1 + heads] losses (the weighted sum, then each head's)."""
    x, mask = batch
    with autocast(x.device, training_dtype(x.device)):
        out = model(x, mask)
    losses = {h: F.cross_entropy(out[h].float(), labels[h][at], weight=weights[h], label_smoothing=cfg.label_smoothing)
              for h in labels}
    loss = sum(LOSS_WEIGHTS[h] * losses[h] for h in labels) if cfg.multi_task else losses["action"]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if cfg.grad_clip:
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    opt.step()
    return torch.stack([loss, *losses.values()]).detach()


@torch.no_grad()
def predict(model: TeacherModel, ids: Tokens, batch_size: int = 256) -> dict[str, np.ndarray]:
    """Logits of every head and the pooled features, float32 arrays with ``len(ids)`` rows,
    computed on the model's device."""
    model.eval()
    device = next(model.parameters()).device
    out: dict[str, np.ndarray] = {}
    order = np.argsort(ids.lens, kind="stable")  # similar lengths share a batch
    for lo in range(0, len(ids), batch_size):
        rows = order[lo : lo + batch_size]
        x, mask = ids.batch(rows, device)  # [B, T]
        with autocast(device, training_dtype(device)):
            for k, v in model(x, mask).items():
                if k not in out:
                    out[k] = np.empty((len(ids), v.shape[1]), np.float32)
                out[k][rows] = v.float().cpu().numpy()
    return out
