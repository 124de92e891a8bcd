"""Which frames of a video an import keeps: a regular grid (``--fps``) and student windows (``--windows``).

Both work on one video's exact, increasing timestamps and return a boolean mask over its
frames, so an import decides per video, before reading the features, which values to read.

- ``grid_mask``: for every point ``k / fps`` of a regular grid over the video, the frame
  nearest to it (ties go to the earlier frame, so no frame comes from after its grid point).
  Timestamps are kept exact, not rounded to the grid.
- ``window_mask``: the frames that the student's window lookup (``FeatureSet.frames_at``:
  the last frame at or before each time) can return for some segment of the video, for
  every ``tau_a`` in ``[tau_min, tau_max]`` and windows of up to ``num_frames`` frames at
  ``fps`` (AVT: ``num_frames`` at the student's fps, the last one ``tau_a`` before the
  segment start). A student whose window falls in that range reads the same frames from the
  selected set as from the full one; each segment's reachable frames form one run of rows
  (for ``tau_max - tau_min >= 1 / fps``, one interval of time).

A feature set records its selection (``attrs["selection"]``, :meth:`Selection.to_json`);
:meth:`Selection.refusal` says when it cannot serve a student's windows, so a student
refuses such a set instead of reading other frames than the full set would give.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from kdstore.errors import ConfigError
from kdstore.windows import last_at_or_before, ticks, window_offsets

# Tolerance of the coverage check on tau_a (seconds) and on rate ratios: config values
# that equal the import's up to float noise are the same window.
COVER_TOL = 1e-9


@dataclass(frozen=True)
class WindowSpec:
    """Student windows an import must serve: ``num_frames`` at ``fps``, ending ``tau_a`` in
    ``[tau_min, tau_max]`` seconds before each segment start."""

    tau_min: float
    tau_max: float
    num_frames: int
    fps: float

    def __post_init__(self):
        if not (np.isfinite(self.tau_min) and np.isfinite(self.tau_max)) or self.tau_min > self.tau_max:
            raise ConfigError(f"--tau-a: expected A or A:B with A <= B, found {self.tau_min}:{self.tau_max}")
        if self.num_frames < 1:
            raise ConfigError(f"--num-frames must be >= 1, found {self.num_frames}")
        if not self.fps > 0:
            raise ConfigError(f"--window-fps must be positive, found {self.fps}")

    @classmethod
    def parse(cls, tau_a: str, num_frames: int, fps: float) -> "WindowSpec":
        """From the CLI: ``tau_a`` is ``A`` or ``A:B`` seconds."""
        parts = str(tau_a).split(":")
        try:
            lo, hi = (float(parts[0]), float(parts[-1])) if len(parts) <= 2 else (None, None)
        except ValueError:
            lo = hi = None
        if lo is None:
            raise ConfigError(f"--tau-a: expected A or A:B in seconds (e.g. 1 or 0.5:2), found {tau_a!r}")
        if not lo > 0:  # as the student's tau_a: a window ends before its segment
            raise ConfigError(f"--tau-a must be positive (seconds before each segment), found {tau_a}")
        return cls(lo, hi, int(num_frames), float(fps))

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """The windows in words, e.g. ``windows of up to 10 frames at 1 fps ending tau_a 0.5-2 s before each segment``."""
        tau = f"{self.tau_min:g}" if self.tau_min == self.tau_max else f"{self.tau_min:g}-{self.tau_max:g}"
        return f"windows of up to {self.num_frames} frames at {self.fps:g} fps ending tau_a {tau} s before each segment"

    def refusal(self, tau_a: float, num_frames: int, fps: float) -> str | None:
        """Why these windows cannot serve ``num_frames`` at ``fps`` ending ``tau_a`` before
        each segment, or None when they do: ``tau_a`` in range, and every offset ``j / fps``
        (j < num_frames) one of the spec's ``i / self.fps`` (i < self.num_frames)."""
        # exact at tau_max and at the offsets: window_mask keeps no frame before the import's
        # earliest window times, so a student's time may not lie below them
        if not self.tau_min - COVER_TOL <= tau_a <= self.tau_max:
            return f"tau_a {tau_a:.17g} s is outside the imported range"
        if num_frames > 1:
            step = self.fps / fps  # spec frames per student frame: a whole number for shared offsets
            if abs(step - round(step)) > COVER_TOL * max(step, 1.0) or round(step) < 1:
                return f"its {fps:g} fps frames are not on the imported {self.fps:g} fps window offsets"
            if (num_frames - 1) * round(step) > self.num_frames - 1:
                return f"{num_frames} frames at {fps:g} fps reach further back than the imported windows"
            s = round(step)
            theirs = window_offsets(self.num_frames, self.fps)[self.num_frames - 1 - s * (num_frames - 1) :: s]  # [T]
            if (window_offsets(num_frames, fps) < theirs).any():
                return (f"its {fps:g} fps frame offsets round below the imported {self.fps:g} fps ones;"
                        f" import with --window-fps {fps:g}")
        return None


@dataclass(frozen=True)
class Selection:
    """What an import keeps: every frame (both None), a grid, windows, or windows on a grid."""

    fps: float | None = None
    windows: WindowSpec | None = None

    def __post_init__(self):
        if self.fps is not None and not self.fps > 0:
            raise ConfigError(f"--fps must be positive, found {self.fps}")

    def mask(self, ts: np.ndarray, starts: np.ndarray) -> np.ndarray:
        """[n] bool: the frames to keep of one video with timestamps ``ts`` [n] (seconds,
        increasing) and segments starting at ``starts`` [m] seconds."""
        keep = np.ones(len(ts), bool) if self.fps is None else grid_mask(ts, self.fps)
        if self.windows is not None:
            rows = np.flatnonzero(keep)
            keep = np.zeros(len(ts), bool)
            keep[rows[window_mask(ts[rows], starts, self.windows)]] = True
        return keep

    def to_json(self) -> dict:
        return {"fps": self.fps, "windows": self.windows.to_json() if self.windows else None}

    @classmethod
    def from_json(cls, d: dict | None) -> "Selection":
        """The selection a feature set records (None or absent: every frame)."""
        d = d or {}
        return cls(d.get("fps"), WindowSpec(**d["windows"]) if d.get("windows") else None)

    def describe(self) -> str:
        """What the kept frames cover, in words."""
        grid = f"the frames nearest a {self.fps:g} fps grid" if self.fps is not None else None
        if self.windows is None:
            return grid or "every source frame"
        return f"{grid}, only those of {self.windows.describe()}" if grid else f"only the frames of {self.windows.describe()}"

    def refusal(self, tau_a: float, num_frames: int, fps: float) -> str | None:
        """Why the kept frames cannot give a student's windows (``num_frames`` at ``fps``,
        ending ``tau_a`` s before each segment start) as the full set would, or None.

        A grid serves windows at its rate or below (each window frame its own grid frame) and
        windows of one frame; windows serve the tau_a range, lengths and rates of
        :meth:`WindowSpec.refusal`.
        """
        if self.fps is not None and num_frames > 1 and fps > self.fps * (1 + COVER_TOL):
            return f"its {fps:g} fps windows are denser than the {self.fps:g} fps grid"
        return self.windows.refusal(tau_a, num_frames, fps) if self.windows is not None else None


def grid_mask(ts: np.ndarray, fps: float) -> np.ndarray:
    """[n] bool: the frames nearest to the points ``k / fps`` of a grid spanning ``ts``."""
    ts = np.asarray(ts, np.float64)
    keep = np.zeros(len(ts), bool)
    if not len(ts):
        return keep
    k = np.arange(np.ceil(ts[0] * fps - 0.5), np.floor(ts[-1] * fps + 0.5) + 1)  # grid points within half a step
    g = k / fps  # [G] seconds
    i = np.searchsorted(ts, g, side="left")  # [G] first frame at or after each point
    prev, nxt = np.clip(i - 1, 0, len(ts) - 1), np.clip(i, 0, len(ts) - 1)
    # the later frame only when it is strictly nearer (by more than float noise)
    take_next = (i == 0) | ((i < len(ts)) & (ts[nxt] - g < g - ts[prev] - 1e-9))
    keep[np.where(take_next, nxt, prev)] = True
    return keep


def window_mask(ts: np.ndarray, starts: np.ndarray, spec: WindowSpec) -> np.ndarray:
    """[n] bool: the frames some window of ``spec`` before one of ``starts`` can return.

    The video's first and last frames are always kept, so every video stays in the set.
    Frames are found as the student finds them (:mod:`kdstore.windows`): the last at or
    before each time, in integer microseconds. The latest times are those of the smallest
    ``tau_a`` that :meth:`WindowSpec.refusal` accepts, so every accepted window is covered.
    """
    ts = ticks(ts)  # [n]
    n = len(ts)
    keep = np.zeros(n, bool)
    if not n:
        return keep
    starts = np.asarray(starts, np.float64)
    if len(starts):
        # the same arithmetic as the student's windows: end = start - tau_a, then end + offsets
        offsets = window_offsets(spec.num_frames, spec.fps)  # [T]
        lo = (starts - spec.tau_max)[:, None] + offsets[None, :]  # [m, T]
        hi = (starts - (spec.tau_min - COVER_TOL))[:, None] + offsets[None, :]
        a = last_at_or_before(ts, ticks(lo).ravel())
        b = last_at_or_before(ts, ticks(hi).ravel())
        runs = np.zeros(n + 1, np.int64)  # +1 at each run's first frame, -1 after its last
        np.add.at(runs, a, 1)
        np.add.at(runs, b + 1, -1)
        keep = np.cumsum(runs[:n]) > 0
    keep[0] = keep[-1] = True
    return keep
