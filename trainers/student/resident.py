"""A split's windows and teacher targets kept on the training device, gathered there.

When the frames that a split's windows reach (often a small part of a feature set) and the
teacher targets of its samples fit in device memory, the trainer copies them to the device
once and a batch is a few indexing kernels on device tensors: no loader thread competing for
the GIL, no host-to-device copy per step. The batches equal :meth:`StudentData.batch`'s bit
for bit (the frames keep their stored dtype on the device and become float32 in the gather,
as the memory-mapped path converts them). Everything is checked for NaN/inf once, when it is
loaded, so the training step needs no check (and no host sync) of its own.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from kdstore.errors import ConfigError, DataError

from .batch import TEACHER_FIELDS, Batch
from .data import StudentData

# Share of the device's free memory that resident data may take under data_on_device="auto":
# the rest is for the model, its optimiser state and the activations of a step.
AUTO_SHARE = 0.5
CHUNK_ROWS = 65_536  # rows copied to the device at a time: bounds the host memory of the load


def resident_bytes(data: StudentData) -> int:
    """Device bytes that :class:`ResidentData` of ``data`` takes."""
    n_frames = len(np.unique(data.frame_idx))
    per_sample = data.frame_idx.shape[1] * 8 + 4 * 8 + 1  # window indices, labels and uid, mask
    if data.past_action is not None:
        per_sample += data.past_action.shape[1] * 8
    if data.targets is not None:
        widths = {f: data.targets.width(f) or 1 for f in data.targets.fields}
        per_sample += sum((8 if f == "topk_indices" else 4) * w for f, w in widths.items())
    return n_frames * data.dim * data.features.features.dtype.itemsize + len(data) * per_sample


def resident_on(data: StudentData, device: str, policy: str) -> bool:
    """Whether ``data`` is kept on ``device`` under ``policy`` (StudentConfig.data_on_device).

    ``auto``: on a CUDA device when it takes at most AUTO_SHARE of the free memory; ``always``
    on any device (the CPU stands in for a GPU in tests), refused with ConfigError on a CUDA
    device whose free memory it exceeds; ``never``: the host path.
    """
    if policy == "never" or (policy == "auto" and not device.startswith("cuda")):
        return False
    if not device.startswith("cuda"):
        return True
    need = resident_bytes(data)
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    if policy == "auto":
        return need <= AUTO_SHARE * free
    if need > free:
        raise ConfigError(f"data_on_device='always': the split needs {need / 2**30:.2f} GiB on {device}, "
                          f"which has {free / 2**30:.2f} GiB free; use 'auto' or 'never'")
    return True


class ResidentData:
    """The samples of ``data`` on ``device``: the frames their windows reach ([U, D] in the
    stored dtype), each window's rows in them ([N, T]), labels (past labels [N, T]) and teacher
    targets ([N, ...]).

    Raises DataError naming the first UID whose window frames, or whose teacher targets,
    hold NaN/inf (indices excepted).
    """

    def __init__(self, data: StudentData, device: str | torch.device):
        self.data, self.device = data, torch.device(device)
        frames, window = np.unique(data.frame_idx, return_inverse=True)  # [U], [N * T]
        self.window = torch.from_numpy(window.reshape(data.frame_idx.shape).astype(np.int64)).to(device)  # [N, T]
        self.frames = torch.empty((len(frames), data.dim), device=device,
                                  dtype=torch.from_numpy(np.empty(0, data.features.features.dtype)).dtype)  # [U, D]
        bad = torch.zeros(len(frames), dtype=torch.bool, device=device)  # [U]
        for lo in range(0, len(frames), CHUNK_ROWS):
            chunk = torch.from_numpy(data.features.gather(frames[lo: lo + CHUNK_ROWS])).to(device)  # [n, D]
            self.frames[lo: lo + len(chunk)] = chunk
            bad[lo: lo + len(chunk)] = ~chunk.isfinite().all(1)
        self._raise_first(bad[self.window].any(1), "frames")
        put = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        self.action, self.verb, self.noun, self.uids = (put(a) for a in (data.action, data.verb, data.noun, data.uid))
        self.past_action = None if data.past_action is None else put(data.past_action)  # [N, T]
        self.teacher_mask = torch.zeros(len(data), dtype=torch.bool, device=device)  # [N]
        self.teacher: dict[str, torch.Tensor] = {}  # Batch field -> [N, ...]
        if data.targets is not None:
            self._load_targets(data)

    def _load_targets(self, data: StudentData) -> None:
        for lo in range(0, len(data), CHUNK_ROWS):
            g = data.targets.gather(data.rows[lo: lo + CHUNK_ROWS])  # one gather per field
            present = torch.from_numpy(g.pop("present"))
            self.teacher_mask[lo: lo + len(present)] = present.to(self.device)
            for field, x in g.items():
                name = TEACHER_FIELDS[field]
                t = torch.from_numpy(x.astype(np.int64) if field == "topk_indices" else x)  # [n, ...]
                if name not in self.teacher:
                    self.teacher[name] = torch.empty((len(data), *t.shape[1:]), dtype=t.dtype, device=self.device)
                self.teacher[name][lo: lo + len(t)] = t.to(self.device)
        for name, t in self.teacher.items():
            if name != "teacher_idx":
                self._raise_first(self.teacher_mask & ~t.reshape(len(t), -1).isfinite().all(1), name)

    def _raise_first(self, bad: torch.Tensor, name: str) -> None:
        """DataError naming the first sample flagged in ``bad`` [N] (one host sync, at load)."""
        if bool(bad.any()):
            uid = self.data.uid[int(bad.nonzero()[0, 0])]
            raise DataError(f"UID {uid}: {name} contain NaN/inf")

    def __len__(self) -> int:
        return len(self.window)

    def batch(self, ids: torch.Tensor) -> Batch:
        """The batch of positions ``ids`` ([B] long on the device): gathers on the device only."""
        return Batch(
            frames=self.frames[self.window[ids]].float(),  # [B, T, D]
            action=self.action[ids], verb=self.verb[ids], noun=self.noun[ids], uids=self.uids[ids],
            teacher_mask=self.teacher_mask[ids],
            past_action=None if self.past_action is None else self.past_action[ids],
            **{name: t[ids] for name, t in self.teacher.items()},
        )

    def batches(self, order: np.ndarray, batch_size: int, drop_last: bool = False) -> Iterator[Batch]:
        """The batches of ``order`` (positions, host array), ``batch_size`` at a time: the order
        goes to the device once, each batch is a slice of it."""
        order = torch.from_numpy(np.asarray(order, dtype=np.int64)).to(self.device)  # [n]
        stop = len(order) - (len(order) % batch_size if drop_last else 0)
        for lo in range(0, stop, batch_size):
            yield self.batch(order[lo: lo + batch_size])
