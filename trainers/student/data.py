"""Student samples: observed-frame windows and teacher targets, gathered from the store.

For each labelled segment the window is ``num_frames`` frames at ``fps`` ending ``tau_a``
seconds before the segment starts (AVT's "last clip"); a window that starts before the
video repeats the video's first frame. A feature set imported with ``--fps``/``--windows``
holds only some frames; one whose recorded selection cannot give these windows is refused
(ConfigError) rather than read at other frames. Frame indices of every window are computed once; a
batch is then one vectorised gather from the memory-mapped features plus one gather of the
teacher targets (kdstore.predictions), with no per-sample Python.

:class:`StudentData` is a ``torch.utils.data.Dataset`` indexed by arrays of positions and
:class:`WindowBatchSampler` yields those arrays, so ``DataLoader(data, sampler=..., batch_size=None)``
feeds any training loop one gathered :class:`Batch` at a time.
"""

from __future__ import annotations

import queue
import threading
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from kdstore.errors import ConfigError, MissingError
from kdstore.features import FeatureSet
from kdstore.predictions import TeacherTargets
from kdstore.store import Store
from trainers.queues import put_until
from kdstore.selection import Selection
from kdstore.windows import window_offsets

from .batch import TEACHER_FIELDS, Batch
from .config import StudentConfig
from .distill import reads


# preread="auto" reads the feature file first when the training windows reach at least this
# share of its frames (below it, a sequential read of the whole file costs more than the random
# reads it saves) and the file takes at most this share of the memory the OS reports available.
PREREAD_REACH = 0.25
PREREAD_MEMORY = 0.5
# AVT keeps a segment when its observed window ends at or after the first frame of a RULSTM
# 30 fps feature stream (datasets/base_video_dataset.py convert_to_anticipation,
# drop_style="correct"); only those segments label past frames.
AVT_FIRST_FRAME_S = 1 / 30


def available_memory() -> int | None:
    """Bytes the kernel reports available (``MemAvailable``: free plus reclaimable cache), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def preread_on(data: StudentData, policy: str) -> bool:
    """Whether to read ``data``'s feature file into the page cache before training
    (StudentConfig.preread: always, never, or auto as described at PREREAD_REACH)."""
    if policy != "auto":
        return policy == "always"
    reach = len(np.unique(data.frame_idx)) / max(len(data.features), 1)
    avail = available_memory()
    return reach >= PREREAD_REACH and avail is not None and data.features.features.nbytes <= PREREAD_MEMORY * avail


class StudentData(torch.utils.data.Dataset):
    """Windows and targets of one split, ready for batched reads by index.

    Args:
        store: an open store.
        features: the ``video/<name>`` feature set.
        split: the split whose segments are the samples.
        cfg: the window (num_frames, fps, tau_a) and, with a teacher, the distillation terms
            whose fields each batch carries.
        teacher: a prediction group to read targets from (None: no teacher fields).
        fields: prediction-group fields to read instead of the config's (kdstore.predictions.FIELDS),
            e.g. ``("logits", "features")``.
        videos: keep only the split's segments in these videos (None: all), e.g. a hold-out.
    """

    def __init__(self, store: Store, features: str, split: str, cfg: StudentConfig, teacher: str | None = None,
                 fields: Iterable[str] | None = None, videos: Iterable[str] | None = None):
        seg, classes = store.segments, store.classes
        self.rows = seg.rows_in(split)  # [N] segment rows
        if videos is not None:
            wanted = set(videos)
            self.rows = self.rows[np.isin(seg.video[self.rows], [i for i, v in enumerate(seg.videos) if v in wanted])]
        if len(self.rows) == 0:
            raise MissingError(f"{store.path}: split {split!r} has no segments" + (" in the given videos" if videos is not None else ""))
        self.features = store.video(features)
        check_selection(self.features, cfg)
        vidx = self.features.video_index(seg.videos)[seg.video[self.rows]]  # [N]
        if (vidx < 0).any():
            r = self.rows[np.flatnonzero(vidx < 0)[0]]
            raise MissingError(
                f"video/{features}: UID {seg.uid[r]} is in video {seg.videos[seg.video[r]]!r}, which has no features"
            )
        end = seg.start_frame[self.rows] / seg.fps - cfg.tau_a  # [N] seconds
        offsets = window_offsets(cfg.num_frames, cfg.fps)  # [T], last frame at `end`
        self.frame_idx = self.features.frames_at(vidx, end[:, None] + offsets[None, :])  # [N, T]
        self.uid = seg.uid[self.rows]
        self.action = seg.action[self.rows].astype(np.int64)
        self.verb = seg.verb[self.rows].astype(np.int64)
        self.noun = seg.noun[self.rows].astype(np.int64)
        self.num_actions, self.num_verbs, self.num_nouns = classes.num_actions, classes.num_verbs, classes.num_nouns
        # the action under each window frame, for AVT's past classifier
        self.past_action = None  # [N, T] int64, -1 where no segment covers the frame
        if cfg.past_cls > 0 and cfg.past_frame_labels:
            avt_kept = self.rows[seg.start_frame[self.rows] / seg.fps - cfg.tau_a >= AVT_FIRST_FRAME_S]
            self.past_action = frame_actions(seg, avt_kept, seg.video[self.rows],
                                             self.features.timestamps[self.frame_idx])
        self.targets: TeacherTargets | None = None
        wanted = tuple(fields) if fields is not None else reads(cfg)
        if teacher is not None and wanted:
            self.targets = TeacherTargets(store.group(teacher), wanted, temperature=cfg.temperature, k=cfg.topk,
                                          calibrated=cfg.teacher_calibration)

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, ids) -> Batch:
        """The batch of positions ``ids`` (an int gives a batch of one)."""
        return self.batch(np.atleast_1d(np.asarray(ids)))

    @property
    def dim(self) -> int:
        return self.features.dim

    @property
    def teacher_dim(self) -> int | None:
        """Width of the teacher's features when the batches carry them, else None."""
        return self.targets.width("features") if self.targets and "features" in self.targets.fields else None

    def batch(self, ids: np.ndarray) -> Batch:
        """The batch of samples ``ids`` (positions in this split), as CPU tensors."""
        ids = np.asarray(ids)
        if ids.size and not ((ids >= -len(self)) & (ids < len(self))).all():
            bad = ids[(ids < -len(self)) | (ids >= len(self))].flat[0]
            raise MissingError(f"sample {bad}: out of range for this split's {len(self)} samples")
        # torch casts float16 to float32 several times faster than numpy (a no-op on float32)
        frames = torch.from_numpy(self.features.gather(self.frame_idx[ids])).float()  # [B, T, D]
        b = Batch(
            frames=frames,
            action=torch.from_numpy(self.action[ids]),
            verb=torch.from_numpy(self.verb[ids]),
            noun=torch.from_numpy(self.noun[ids]),
            uids=torch.from_numpy(self.uid[ids]),
            teacher_mask=torch.zeros(len(ids), dtype=torch.bool),
            past_action=None if self.past_action is None else torch.from_numpy(self.past_action[ids]),
        )
        if self.targets is None:
            return b
        g = self.targets.gather(self.rows[ids])  # one gather per field; zeros where absent
        b.teacher_mask = torch.from_numpy(g.pop("present"))
        if "topk_indices" in g:
            g["topk_indices"] = g["topk_indices"].astype(np.int64)
        for field, x in g.items():
            setattr(b, TEACHER_FIELDS[field], torch.from_numpy(x))
        return b


def frame_actions(seg, pool: np.ndarray, video: np.ndarray, times: np.ndarray) -> np.ndarray:
    """[N, T] the action of the segment (among rows ``pool`` of the segment table ``seg``) that
    covers each time: same video (``video`` [N], the table's video index), start <= t <= end in
    seconds (``times`` [N, T]); -1 where none does. Where several do, AVT's choice
    (datasets/base_video_dataset.py ``_get_vidseg_labels``): the smallest |t - (end - start) / 2|,
    the first row on ties. Vectorised: one sort, then one pass per overlap depth."""
    pool = np.sort(np.asarray(pool))
    vid, start = seg.video[pool].astype(np.int64), seg.start_frame[pool] / seg.fps  # [S], [S]
    order = np.lexsort((start, vid))  # by video, then start; stable, so by row on ties
    vid, start, end = vid[order], start[order], (seg.end_frame[pool] / seg.fps)[order]  # [S] each
    action, row = seg.action[pool][order].astype(np.int64), pool[order]  # [S], [S]
    qv = np.broadcast_to(np.asarray(video, dtype=np.int64)[:, None], times.shape).ravel()  # [Q]
    qt = np.asarray(times, dtype=np.float64).ravel()  # [Q]
    after = _count_le(vid, start, qv, qt)  # [Q] segments starting at or before each query
    depth = int((_count_le(vid, start, vid, end) - np.arange(len(vid))).max(initial=0))  # most a cover lies back
    best = np.full(len(qt), -1, dtype=np.int64)  # [Q]
    best_score, best_row = np.full(len(qt), np.inf), np.full(len(qt), np.iinfo(np.int64).max)  # [Q], [Q]
    for k in range(1, depth + 1):
        j = np.maximum(after - k, 0)  # [Q]
        covers = (after - k >= 0) & (vid[j] == qv) & (end[j] >= qt)  # start <= t holds for every j < after
        score = np.abs(qt - (end[j] - start[j]) / 2)  # [Q]
        better = covers & ((score < best_score) | ((score == best_score) & (row[j] < best_row)))
        best, best_score, best_row = (np.where(better, x, y) for x, y in
                                      ((action[j], best), (score, best_score), (row[j], best_row)))
    return best.reshape(times.shape)


def _count_le(vid: np.ndarray, start: np.ndarray, qv: np.ndarray, qt: np.ndarray) -> np.ndarray:
    """For each query (qv, qt): how many of the (vid, start) pairs, sorted by video then start,
    are <= it (same video and start <= qt, or an earlier video)."""
    n = len(vid)
    is_query = np.r_[np.zeros(n, dtype=bool), np.ones(len(qv), dtype=bool)]
    order = np.lexsort((is_query, np.r_[start, qt], np.r_[vid, qv]))  # a pair before an equal query
    counts = np.cumsum(~is_query[order])  # pairs at or before each position
    out = np.empty(len(qv), dtype=np.int64)
    out[order[is_query[order]] - n] = counts[is_query[order]]
    return out


def check_selection(fs: FeatureSet, cfg: StudentConfig) -> None:
    """Raise ConfigError when ``fs`` keeps only frames (``--fps``/``--windows`` import) that
    cannot give ``cfg``'s windows, naming the set, its store, the windows asked for and those it covers."""
    selection = Selection.from_json(fs.attrs.get("selection"))
    why = selection.refusal(cfg.tau_a, cfg.num_frames, cfg.fps)
    if why is not None:
        raise ConfigError(
            f"video/{fs.name} in {fs.store.path}: the student asks for windows of {cfg.num_frames} frames at {cfg.fps:g} fps"
            f" ending tau_a {cfg.tau_a:g} s before each segment, but the set holds {selection.describe()}: {why};"
            " import the features again with a selection that covers these windows"
            " (import-features --fps/--windows --tau-a/--num-frames/--window-fps), or use a full set"
        )


def epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> np.ndarray:
    """The sample order of one epoch: a pure function of (seed, epoch), so resume is exact."""
    if not shuffle:
        return np.arange(n)
    return np.random.default_rng([seed, epoch]).permutation(n)


class WindowBatchSampler(torch.utils.data.Sampler):
    """Arrays of positions, one per batch, for ``DataLoader(data, sampler=this, batch_size=None)``.

    The order of an epoch is :func:`epoch_order` (call ``set_epoch`` before each epoch), and
    with ``world`` > 1 each ``rank`` takes its slice of every global batch of
    ``world * batch_size`` samples (the last, partial global batch is dropped), as the trainer does.
    """

    def __init__(self, n: int, batch_size: int, shuffle: bool = True, seed: int = 0, drop_last: bool = False,
                 rank: int = 0, world: int = 1):
        if batch_size < 1:
            raise ConfigError(f"WindowBatchSampler: batch_size must be >= 1, found {batch_size}")
        if not 0 <= rank < world:
            raise ConfigError(f"WindowBatchSampler: rank {rank} is not one of the {world} ranks (0..{world - 1})")
        self.n, self.batch_size, self.shuffle, self.seed = n, batch_size, shuffle, seed
        self.drop_last, self.rank, self.world, self.epoch = drop_last or world > 1, rank, world, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        per_step = self.batch_size * self.world
        return self.n // per_step if self.drop_last else -(-self.n // per_step)

    def __iter__(self) -> Iterator[np.ndarray]:
        order = epoch_order(self.n, self.seed, self.epoch, self.shuffle)
        if self.drop_last:
            steps = len(self)
            order = order[: steps * self.batch_size * self.world].reshape(steps, self.world, self.batch_size)
            yield from order[:, self.rank]
            return
        for i in range(0, self.n, self.batch_size):
            yield order[i : i + self.batch_size]


class BatchLoader:
    """Batches of one epoch, prepared by a background thread while the model trains.

    The gather releases the GIL inside numpy, so one thread keeps up with the model;
    ``pin`` puts batches in pinned memory for asynchronous host-to-GPU copies. ``check``
    (e.g. trainers.student.losses.check_batch) runs on each batch in that thread; what it
    raises reaches the consumer at that batch.
    """

    def __init__(self, data: StudentData, order: np.ndarray, batch_size: int, drop_last: bool = False,
                 pin: bool = False, prefetch: int = 4, check: Callable[[Batch], None] | None = None):
        self.data, self.batch_size, self.pin, self.prefetch, self.check = data, batch_size, pin, prefetch, check
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
                    if self.check is not None:
                        self.check(b)
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
