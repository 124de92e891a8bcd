"""Which frames the student's windows read: the store's lookup against an exact float search.

``FeatureSet.frames_at`` finds "the last frame at or before each time" in integer
microseconds (``kdstore.windows``). The student's window times (``start_frame / fps - tau_a
+ offsets``) land on the frame grid only up to float rounding, often a few ulps below the
frame they mean, where a search on the float times reads the frame before.

This counts, for the student presets' windows over every segment, the window frames where
the store's rule and an exact per-video search on the float timestamps
(``per_video_frames``) pick different frames, and among those the ones whose time lies a
microsecond or more from the store's frame (``frames_differ_over_1us``: 0 means every
difference is float rounding). Data: the demo's synthetic data (2 fps frames, 24 fps
annotations) and the real annotations of ``../shared/data/{egtea,ek55,ek100}`` with
RULSTM's full 30 fps frames (frame ``n`` at ``n / 30`` s, from 1). Rows go to
``bench/results/window_lookup.csv``.

    python bench/window_lookup.py            # the demo and every real dataset found
    python bench/window_lookup.py --tiny     # a 6-video synthetic dataset: seconds
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import argparse  # noqa: E402
import tempfile  # noqa: E402

import numpy as np  # noqa: E402

from bench.common import append_row  # noqa: E402

BENCH = "window_lookup"
DATA = ROOT.parent / "shared" / "data"


def store_frames(ts: np.ndarray, offsets: np.ndarray, video_idx: np.ndarray, times: np.ndarray) -> np.ndarray:
    """[B, T] global frame indices by the store's rule (``FeatureSet.frames_at``)."""
    from kdstore.windows import FrameIndex

    return FrameIndex(offsets, ts).frames_at(video_idx, times)


def per_video_frames(ts: np.ndarray, offsets: np.ndarray, video_idx: np.ndarray, times: np.ndarray) -> np.ndarray:
    """[B, T] global frame indices: the last frame at or before each time, searched among
    the video's own timestamps (its first frame for times before it)."""
    times = np.asarray(times, np.float64)
    out = np.empty(times.shape, np.int64)
    for v in np.unique(video_idx):
        rows = video_idx == v
        lo, hi = offsets[v], offsets[v + 1]
        i = np.searchsorted(ts[lo:hi], times[rows], side="right") - 1  # [b, T]
        out[rows] = np.clip(i, 0, hi - lo - 1) + lo
    return out


def compare(ts: np.ndarray, offsets: np.ndarray, video_idx: np.ndarray, times: np.ndarray) -> dict:
    """How many window frames (and windows) the two rules pick differently, and how many of
    those lie a microsecond or more from the store's frame."""
    ours = store_frames(ts, offsets, video_idx, times)
    differ = ours != per_video_frames(ts, offsets, video_idx, times)  # [B, T]
    far = np.abs(np.asarray(times, np.float64) - ts[ours]) >= 1e-6
    return {"windows": int(len(times)), "frames": int(differ.size), "frames_differ": int(differ.sum()),
            "windows_differ": int(differ.any(axis=1).sum()), "frames_differ_over_1us": int((differ & far).sum())}


def student_times(seg, num_frames: int, fps: float, tau_a: float) -> tuple[np.ndarray, np.ndarray]:
    """(video index [N], window times [N, T]) of every segment, as ``StudentData`` computes them."""
    from kdstore.selection import window_offsets

    end = seg.start_frame / seg.fps - tau_a  # [N] seconds
    return seg.video.astype(np.int64), end[:, None] + window_offsets(num_frames, fps)[None, :]


def _frames(per_video: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    counts = np.array([len(t) for t in per_video], np.int64)
    return np.concatenate(per_video), np.concatenate([[0], np.cumsum(counts)])


def datasets(tiny: bool, tmp: Path):
    """(name, segments, timestamps [F], offsets [V+1]) of each dataset measured."""
    from kdstore.rulstm import load_annotations
    from kdstore.synthetic import SyntheticConfig, generate_annotations, synthetic_features
    from trainers.demo import DemoConfig

    demo = DemoConfig()
    syn = SyntheticConfig(n_videos=6) if tiny else demo.synthetic
    classes, seg = load_annotations(generate_annotations(tmp / "demo", syn), fps=24.0)
    feats = synthetic_features(classes, seg, dim=1, rate=demo.feature_rate)
    yield "tiny" if tiny else "demo", seg, *_frames([feats[v][1] for v in seg.videos])
    for name in () if tiny else ("egtea", "ek55", "ek100"):
        if not (DATA / name / "actions.csv").is_file():
            continue
        classes, seg = load_annotations(DATA / name)
        last = np.zeros(len(seg.videos), np.int64)
        np.maximum.at(last, seg.video, seg.end_frame)
        yield name, seg, *_frames([np.arange(1, n + 30) / seg.fps for n in last])  # every frame, a second past the last segment


def run(tiny: bool = False, out_dir: str | Path | None = None) -> list[dict]:
    from trainers.student.config import PRESETS

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name, seg, ts, offsets in datasets(tiny, Path(tmp)):
            for preset in sorted(PRESETS):
                p = PRESETS[preset]
                video_idx, times = student_times(seg, p["num_frames"], p["fps"], p["tau_a"])
                config = {"data": name, "preset": preset, "num_frames": p["num_frames"], "fps": p["fps"],
                          "tau_a": p["tau_a"], "tiny": tiny}
                rows.append(append_row(BENCH, config, compare(ts, offsets, video_idx, times), out_dir))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tiny", action="store_true", help="a 6-video synthetic dataset only")
    args = ap.parse_args(argv)
    import json

    for r in run(tiny=args.tiny):
        c = json.loads(r["config"])
        print(f"{c['data']:6s} {c['preset']:6s} windows {r['windows']:6d}: {r['frames_differ']:6d} of {r['frames']:7d}"
              f" window frames differ, in {r['windows_differ']} windows; {r['frames_differ_over_1us']} a microsecond or more from its frame")


if __name__ == "__main__":
    main()
