"""Student windows over stored frames: window offsets and the frame lookup in integer time.

A student's window is ``num_frames`` times at ``fps`` ending ``tau_a`` before a segment's
start; each time reads "the last frame of its video at or before it" (the video's first
frame for times before it, as AVT pads a window that starts before the video).

Times are compared as integer microseconds (:func:`ticks`), never as floats: window times
come from float arithmetic (``start_frame / fps - tau_a + offset``) and often land a few
ulps below the frame timestamp they mean, which a float comparison would read as the frame
before. Frames of real video lie milliseconds apart, so a microsecond names one frame.
"""

from __future__ import annotations

import numpy as np

from .errors import DataError

TICKS_PER_S = 1_000_000


def ticks(seconds) -> np.ndarray:
    """int64 microseconds nearest to ``seconds`` (any shape)."""
    return np.rint(np.asarray(seconds, np.float64) * TICKS_PER_S).astype(np.int64)


def window_offsets(num_frames: int, fps: float) -> np.ndarray:
    """[T] seconds of a window's frames relative to its last one (AVT: ``num_frames`` at
    ``fps``). The student's windows and an import's selection both use this arithmetic, so
    their times agree to the bit."""
    return (np.arange(num_frames) - (num_frames - 1)) / fps


def last_at_or_before(frame_ticks: np.ndarray, time_ticks: np.ndarray) -> np.ndarray:
    """Index of the last of one video's sorted ``frame_ticks`` [n] at or before each of
    ``time_ticks`` (any shape); 0 for times before the first frame."""
    return np.maximum(np.searchsorted(frame_ticks, time_ticks, side="right") - 1, 0)


class FrameIndex:
    """The lookup of window times in a set of videos stored back to back.

    Frames are keyed by (video, tick) packed into one sorted int64, so a whole batch of
    windows is one binary search, and a time only ever finds a frame of its own video.
    """

    def __init__(self, offsets: np.ndarray, timestamps: np.ndarray):
        self.offsets = np.asarray(offsets, np.int64)  # [V+1] first frame of each video
        t = ticks(timestamps)  # [F]
        self._lo = int(t.min(initial=0))
        self._span = int(t.max(initial=0)) - self._lo + 1  # ticks per video band
        videos = len(self.offsets) - 1
        if videos and self._span > np.iinfo(np.int64).max // (videos + 1):
            raise DataError(f"{videos} videos spanning {self._span / TICKS_PER_S:g} s do not fit one int64 frame key")
        self._key = np.repeat(np.arange(videos, dtype=np.int64), np.diff(self.offsets)) * self._span + (t - self._lo)

    def frames_at(self, video_idx: np.ndarray, times: np.ndarray) -> np.ndarray:
        """[B, T] global frame indices of ``times`` [B, T] seconds in videos ``video_idx`` [B]."""
        video_idx = np.asarray(video_idx, np.int64)  # [B]
        within = np.clip(ticks(times) - self._lo, 0, self._span - 1)  # [B, T] kept inside the video's band
        idx = np.searchsorted(self._key, video_idx[:, None] * self._span + within, side="right") - 1  # [B, T]
        return np.maximum(idx, self.offsets[video_idx][:, None])  # times before a video's first frame
