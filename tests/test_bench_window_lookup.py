"""bench/window_lookup.py and the store's frame lookup on awkward times: a time within a
microsecond of a frame's timestamp reads that frame, in every video, as a float search does
everywhere else."""

from __future__ import annotations

import json

import numpy as np

from bench import window_lookup as wl
from conftest import build_store


def _awkward(ts: np.ndarray) -> np.ndarray:
    """Times on each frame's timestamp, one ulp below and above it, 2 us below it, before the
    first frame and after the last."""
    return np.concatenate([ts, np.nextafter(ts, -np.inf), np.nextafter(ts, np.inf), ts - 2e-6,
                           [ts[0] - 1.0, ts[-1] + 1.0]])


def test_the_rules_on_awkward_times(tmp_path, synthetic_tables):
    s = build_store(tmp_path / "s.zarr", *synthetic_tables, teachers=())
    fs = s.video("feat")
    ts, offsets = fs.timestamps, fs.offsets
    for v in range(len(fs.videos)):
        own = ts[offsets[v] : offsets[v + 1]]
        n = len(own)
        times = _awkward(own)[None, :]  # [1, T]
        vidx = np.array([v])
        ours, exact = fs.frames_at(vidx, times), wl.per_video_frames(ts, offsets, vidx, times)
        np.testing.assert_array_equal(ours, wl.store_frames(ts, offsets, vidx, times))  # the bench's is the store's
        # by definition, in microseconds: the last frame whose rounded time is at or before the rounded time
        tick = lambda x: np.rint(np.asarray(x) * 1e6).astype(np.int64)  # noqa: E731
        want = offsets[v] + np.maximum(np.array([np.sum(tick(own) <= tick(t)) for t in times[0]]) - 1, 0)
        np.testing.assert_array_equal(ours[0], want)
        # one ulp below a frame reads that frame (the float search: the one before); elsewhere they agree
        below = np.zeros(times.shape[1], bool)
        below[n : 2 * n] = True
        np.testing.assert_array_equal(ours[0, below], offsets[v] + np.arange(n))
        assert not (ours != exact)[0, ~below].any()
        assert (ours != exact)[0, below][1:].all()  # the first frame has none before it


def test_tiny_run(tmp_path):
    rows = wl.run(tiny=True, out_dir=tmp_path)
    assert [json.loads(r["config"])["data"] for r in rows] == ["tiny"] * len(rows) and rows
    assert all(r["frames"] == r["windows"] * json.loads(r["config"])["num_frames"] for r in rows)
    assert all(0 <= r["frames_differ_over_1us"] <= r["frames_differ"] <= r["frames"] for r in rows)
    assert all(r["frames_differ_over_1us"] == 0 for r in rows)
    assert (tmp_path / "window_lookup.csv").is_file()
