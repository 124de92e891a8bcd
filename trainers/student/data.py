"""Student samples: observed-frame windows and teacher targets, gathered from the store.

For each labelled segment the window is ``num_frames`` frames at ``fps`` ending ``tau_a``
seconds before the segment starts (AVT's "last clip"); a window that starts before the
video repeats the video's first frame. Frame indices of every window are computed once; a
batch is then one vectorised gather from the memory-mapped features plus array slices of
labels and teacher targets, with no per-sample Python.
"""

from __future__ import annotations

import queue
import threading
from typing import Iterator

import numpy as np
import torch

from kdstore.errors import ConfigError, MissingError
from kdstore.store import Store
from trainers.queues import put_until

from .batch import Batch
from .config import StudentConfig


class StudentData:
    """Windows and targets of one split, ready for batched reads by index."""

    def __init__(self, store: Store, features: str, split: str, cfg: StudentConfig, teacher: str | None = None):
        seg, classes = store.segments, store.classes
        self.rows = seg.rows_in(split)  # [N] segment rows
        if len(self.rows) == 0:
            raise MissingError(f"{store.path}: split {split!r} has no segments")
        self.features = store.video(features)
        vidx = self.features.video_index(seg.videos)[seg.video[self.rows]]  # [N]
        if (vidx < 0).any():
            r = self.rows[np.flatnonzero(vidx < 0)[0]]
            raise MissingError(
                f"video/{features}: UID {seg.uid[r]} is in video {seg.videos[seg.video[r]]!r}, which has no features"
            )
        end = seg.start_frame[self.rows] / seg.fps - cfg.tau_a  # [N] seconds
        offsets = (np.arange(cfg.num_frames) - (cfg.num_frames - 1)) / cfg.fps  # [T], last frame at `end`
        self.frame_idx = self.features.frames_at(vidx, end[:, None] + offsets[None, :])  # [N, T]
        self.uid = seg.uid[self.rows]
        self.action = seg.action[self.rows].astype(np.int64)
        self.verb = seg.verb[self.rows].astype(np.int64)
        self.noun = seg.noun[self.rows].astype(np.int64)
        self.num_actions, self.num_verbs, self.num_nouns = classes.num_actions, classes.num_verbs, classes.num_nouns
        self.mode = cfg.distill_mode if teacher else "none"
        self.temperature = cfg.temperature
        self.teacher = store.teacher(teacher) if teacher else None
        if self.teacher is not None:
            if self.teacher.attrs["num_classes"] != classes.num_actions:
                raise ConfigError(
                    f"teacher/{teacher}: {self.teacher.attrs['num_classes']} classes, store has {classes.num_actions}"
                )
            self.teacher_row = self.teacher.row_of_segment[self.rows]  # [N], -1 where absent
            if self.mode in ("topk", "topk_lse") and self.teacher.topk < cfg.topk:
                raise ConfigError(f"teacher/{teacher}: stores top-{self.teacher.topk}, config asks for top-{cfg.topk}")
            self.k = cfg.topk
            if self.mode == "topk_lse":
                self.lse_col = self.teacher.lse_column(cfg.temperature)
            # The memmaps, opened once (each Predictions property re-reads the metadata). An
            # empty group gets one zero row for the masked-out reads of absent rows.
            keys = {"full": ("logits",), "topk": ("topk_values", "topk_indices"),
                    "topk_lse": ("topk_values", "topk_indices", "lse")}.get(self.mode, ())
            self._teacher_arrays = {}
            for key in keys:
                a = getattr(self.teacher, key)
                self._teacher_arrays[key] = a if len(a) else np.zeros((1, *a.shape[1:]), a.dtype)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def dim(self) -> int:
        return self.features.dim

    def batch(self, ids: np.ndarray) -> Batch:
        """The batch of samples ``ids`` (positions in this split), as CPU tensors."""
        ids = np.asarray(ids)
        frames = self.features.gather(self.frame_idx[ids]).astype(np.float32, copy=False)  # [B, T, D]
        b = Batch(
            frames=torch.from_numpy(frames),
            action=torch.from_numpy(self.action[ids]),
            verb=torch.from_numpy(self.verb[ids]),
            noun=torch.from_numpy(self.noun[ids]),
            uids=torch.from_numpy(self.uid[ids]),
            teacher_mask=torch.zeros(len(ids), dtype=torch.bool),
        )
        if self.teacher is None or self.mode == "none":
            return b
        prow = self.teacher_row[ids]  # [B]
        present = prow >= 0
        take = np.where(present, prow, 0)  # absent rows read row 0 but are masked out
        b.teacher_mask = torch.from_numpy(present)
        t = self._teacher_arrays
        if self.mode == "full":
            b.teacher_logits = torch.from_numpy(np.asarray(t["logits"][take], dtype=np.float32))  # [B, A]
        else:
            b.teacher_topk = torch.from_numpy(np.asarray(t["topk_values"][take, : self.k]))  # [B, K]
            b.teacher_idx = torch.from_numpy(t["topk_indices"][take, : self.k].astype(np.int64))  # [B, K]
            if self.mode == "topk_lse":
                b.teacher_lse = torch.from_numpy(np.asarray(t["lse"][take, self.lse_col]))  # [B]
        return b


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The sample order of one epoch: a pure function of (seed, epoch), so resume is exact."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class BatchLoader:
    """Batches of one epoch, prepared by a background thread while the model trains.

    The gather releases the GIL inside numpy, so one thread keeps up with the model;
    ``pin`` puts batches in pinned memory for asynchronous host-to-GPU copies.
    """

    def __init__(self, data: StudentData, order: np.ndarray, batch_size: int, drop_last: bool = False,
                 pin: bool = False, prefetch: int = 4):
        self.data, self.batch_size, self.pin, self.prefetch = data, batch_size, pin, prefetch
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        self.chunks = [order[i : i + batch_size] for i in range(0, stop, batch_size)]

    def __len__(self) -> int:
        return len(self.chunks)

    def __iter__(self) -> Iterator[Batch]:
        q: queue.Queue = queue.Queue(maxsize=self.prefetch)
        done = object()
        cancel = threading.Event()

        def work() -> None:
            try:
                for ids in self.chunks:
                    b = self.data.batch(ids)
                    if self.pin:
                        b = b.pin_memory()
                    if not put_until(q, b, cancel):  # the consumer has gone
                        return
                put_until(q, done, cancel)
            except BaseException as e:  # surfaced in the consumer
                put_until(q, e, cancel)

        t = threading.Thread(target=work, daemon=True)
        t.start()
        try:
            while (item := q.get()) is not done:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancel.set()
            t.join()
