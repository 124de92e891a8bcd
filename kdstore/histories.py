"""Action histories: the labelled segments of a video before each segment, as the teacher reads them."""

from __future__ import annotations

import numpy as np

from .errors import ConfigError
from .tables import SegmentTable


def histories(
    segments: SegmentTable, rows: np.ndarray, hist_len: int, mode: str = "gappy", split: str | None = None
) -> np.ndarray:
    """[len(rows), hist_len] segment rows of the actions before each segment, oldest first.

    A segment's history holds the labelled segments of the same video that start strictly
    earlier, sorted by (start, uid), the last ``hist_len`` of them, left-padded with -1.
    ``gappy`` draws them only from the segments of ``split`` (what a model trained on
    that split sees; a segment may be in several splits, so the split must be named);
    ``complete`` from every labelled segment of the table. Unlabelled segments are never
    in a history.
    """
    if mode not in ("gappy", "complete"):
        raise ConfigError(f"history mode must be 'gappy' or 'complete', found {mode!r}")
    if hist_len < 1:
        raise ConfigError(f"hist_len must be >= 1, found {hist_len}")
    if mode == "gappy" and split is None:
        raise ConfigError("gappy histories need the split whose segments form them (split=...)")
    rows = np.asarray(rows, dtype=np.int64)
    keep = segments.labelled & (segments.in_split(split) if mode == "gappy" else True)
    # Sort the pool by (video, start, uid) once; a history is then a slice ending just
    # before the segment's own position among its video's earlier-starting segments.
    order = np.lexsort((segments.uid, segments.start_frame, segments.video))
    pool = order[keep[order]]
    out = np.full((len(rows), hist_len), -1, dtype=np.int64)
    key_v, key_s = segments.video[pool].astype(np.int64), segments.start_frame[pool]
    for which, r in enumerate(rows):
        v, s = np.int64(segments.video[r]), segments.start_frame[r]
        lo, hi_v = np.searchsorted(key_v, v, side="left"), np.searchsorted(key_v, v, side="right")
        hi = lo + np.searchsorted(key_s[lo:hi_v], s, side="left")
        hist = pool[max(lo, hi - hist_len) : hi]
        if len(hist):
            out[which, hist_len - len(hist) :] = hist
    return out
