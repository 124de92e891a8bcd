"""kdstore/windows.py: the frame at or before each window time, per video, in integer microseconds."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kdstore.errors import DataError
from kdstore.windows import FrameIndex, window_offsets


def reference(per_video: list[np.ndarray], video_idx: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Per video and per time, by definition: the last frame whose time rounded to whole
    microseconds is at or before the time so rounded, else the video's first frame."""
    first = np.concatenate([[0], np.cumsum([len(t) for t in per_video])])
    out = np.empty(times.shape, np.int64)
    for b, v in enumerate(video_idx):
        us = [round(float(x) * 1e6) for x in per_video[v]]
        for j, t in enumerate(times[b]):
            at_or_before = [i for i, u in enumerate(us) if u <= round(float(t) * 1e6)]
            out[b, j] = first[v] + (at_or_before[-1] if at_or_before else 0)
    return out


videos = st.lists(st.lists(st.integers(-3_000, 3_000), min_size=1, max_size=12, unique=True), min_size=1, max_size=5)


@settings(max_examples=150, deadline=None)
@given(videos, st.lists(st.tuples(st.integers(0, 4), st.lists(st.integers(-4_000, 4_000), min_size=3, max_size=3)),
                        min_size=1, max_size=8), st.sampled_from([1 / 30, 0.5, 1e-3, 7.0]))
def test_frames_at_is_the_last_frame_at_or_before_in_its_own_video(frames, queries, unit):
    per_video = [np.sort(np.asarray(f)) * unit for f in frames]  # [n_v] seconds, some negative
    video_idx = np.array([v % len(per_video) for v, _ in queries])  # [B]
    times = np.array([q for _, q in queries], np.float64) * unit  # [B, 3]
    times[:, 1] = np.nextafter(times[:, 1], -np.inf)  # a few ulps below a frame's time still reads it
    offsets = np.concatenate([[0], np.cumsum([len(t) for t in per_video])])
    index = FrameIndex(offsets, np.concatenate(per_video))
    np.testing.assert_array_equal(index.frames_at(video_idx, times), reference(per_video, video_idx, times))


def test_times_outside_a_video_stay_in_it():
    index = FrameIndex(np.array([0, 3, 5]), np.array([1.0, 2.0, 3.0, 0.5, 9.0]))
    # before the first frame, 1e-12 s below a frame (its frame), 2 us below one (the frame before), after the last
    got = index.frames_at(np.array([0, 1]), np.array([[-5.0, 2.0 - 1e-12, 50.0], [0.0, 8.999_998, 1e6]]))
    np.testing.assert_array_equal(got, [[0, 1, 2], [3, 3, 4]])


def test_window_offsets_end_at_zero():
    np.testing.assert_allclose(window_offsets(4, 2.0), [-1.5, -1.0, -0.5, 0.0])


def test_a_set_too_long_for_one_key_is_refused():
    with pytest.raises(DataError, match="do not fit one int64 frame key"):
        FrameIndex(np.array([0, 1, 2, 3]), np.array([0.0, 4e12, 0.0]))
