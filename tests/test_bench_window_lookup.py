"""bench/window_lookup.py: its transcription of the store's frame lookup is the store's, the
exact per-video search is "the last frame at or before", and where they part on awkward times."""

from __future__ import annotations

import json

import numpy as np

from bench import window_lookup as wl
from conftest import build_store


def _awkward(ts: np.ndarray) -> np.ndarray:
    """Times on each frame's timestamp, one ulp below and above it, before the first frame
    and after the last."""
    return np.concatenate([ts, np.nextafter(ts, -np.inf), np.nextafter(ts, np.inf), [ts[0] - 1.0, ts[-1] + 1.0]])


def test_the_rules_on_awkward_times(tmp_path, synthetic_tables):
    s = build_store(tmp_path / "s.zarr", *synthetic_tables, teachers=())
    fs = s.video("feat")
    ts, offsets = fs.timestamps, fs.offsets
    parted = []  # per video: whether the rules pick different frames anywhere
    for v in range(len(fs.videos)):
        times = _awkward(ts[offsets[v] : offsets[v + 1]])[None, :]  # [1, T]
        vidx = np.array([v])
        old, new = wl.float_key_frames(ts, offsets, vidx, times), wl.per_video_frames(ts, offsets, vidx, times)
        np.testing.assert_array_equal(old, fs.frames_at(vidx, times))  # the transcription is the store's rule
        own = ts[offsets[v] : offsets[v + 1]]
        want = offsets[v] + np.maximum(np.array([np.sum(own <= t) for t in times[0]]) - 1, 0)  # by definition
        np.testing.assert_array_equal(new[0], want)
        # they part only one ulp below a frame, where the store's key rounds onto that frame (not in video 0)
        n = len(own)
        below = np.zeros(times.shape[1], bool)
        below[n : 2 * n] = True
        assert not (old != new)[0, ~below].any()
        parted.append(bool((old != new).any()))
    # video 0's keys are its times, unrounded; later videos' keys round a time one ulp below a frame onto it
    assert not parted[0] and any(parted[1:])


def test_tiny_run(tmp_path):
    rows = wl.run(tiny=True, out_dir=tmp_path)
    assert [json.loads(r["config"])["data"] for r in rows] == ["tiny"] * len(rows) and rows
    assert all(r["frames"] == r["windows"] * json.loads(r["config"])["num_frames"] for r in rows)
    assert all(0 <= r["frames_differ"] <= r["frames"] for r in rows)
    assert (tmp_path / "window_lookup.csv").is_file()
