"""Action-sequence corpora: text files, JSONL recipes, and a store's training histories.

A corpus is a list of lines ``verb <v> noun <a> verb <v> noun``. Sources:

- a text file, one sequence a line (blank lines are skipped);
- JSONL, one recipe a line: a list of ``[verb, object]`` pairs or ``{"actions": [...]}``
  (the paper mined Recipe1M instructions); stop-verbs (be, have, do, get ...) are dropped;
- the per-video action sequences of one split of an annotation table (``history_corpus``).

A line without any action is an error that names the file and line.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from kdstore.histories import histories
from kdstore.rulstm import load_annotations
from kdstore.tables import ClassTable, SegmentTable
from kdstore.text import action_text, action_words
from kdstore.errors import DataError

STOP_VERBS = frozenset({"is", "are", "be", "have", "was", "were", "been", "do", "does", "get"})


def _words(text: str) -> str:
    return " ".join(str(text).lower().replace("_", " ").split())


def recipe_text(pairs: list) -> str:
    """A recipe's (verb, object) pairs as action text, stop-verbs and empty pairs dropped."""
    kept = []
    for pair in pairs:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"expected [verb, object] pairs, found {pair!r}")
        verb, obj = _words(pair[0]), _words(pair[1])
        if verb and obj and verb not in STOP_VERBS:
            kept.append(f"{verb} <v> {obj}")
    return " <a> ".join(kept)


def check_line(text: str) -> str:
    """The line normalised to ``a <v> b <a> c <v> d``; ValueError if an action is malformed."""
    actions = [a.strip() for a in text.split("<a>")]
    if not any(actions):
        raise ValueError("no actions (expected 'verb <v> noun <a> verb <v> noun')")
    out = []
    for i, act in enumerate(actions, start=1):
        parts = [p.strip() for p in act.split("<v>")]
        if len(parts) != 2 or not all(parts):
            raise ValueError(f"action {i} is {act!r}, expected 'verb <v> noun'")
        out.append(f"{_words(parts[0])} <v> {_words(parts[1])}")
    return " <a> ".join(out)


def read_corpus(path: str | Path) -> list[str]:
    """The lines of a text or JSONL corpus file, checked (DataError names a bad line)."""
    path = Path(path)
    try:
        raw = path.read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        raise DataError(f"{path}: corpus file not found") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text ({e.reason})") from None
    first = next((line.strip() for line in raw if line.strip()), "")
    jsonl = path.suffix.lower() == ".jsonl" or first.startswith(("[", "{"))
    lines = []
    for n, line in enumerate(raw, start=1):
        if not line.strip():
            continue
        try:
            if jsonl:
                rec = json.loads(line)
                pairs = rec.get("actions") if isinstance(rec, dict) else rec
                if not isinstance(pairs, list):
                    raise ValueError("expected a list of [verb, object] pairs or {\"actions\": [...]}")
                text = recipe_text(pairs)
                if not text:
                    raise ValueError("no actions (empty, or only stop-verbs)")
            else:
                text = check_line(line)
        except (ValueError, json.JSONDecodeError) as e:
            raise DataError(f"{path}, line {n}: {e}") from None
        lines.append(text)
    if not lines:
        raise DataError(f"{path}: corpus has no lines")
    return lines


def history_texts(
    classes: ClassTable, segments: SegmentTable, rows: np.ndarray, hist_len: int, mode: str = "gappy", colon: str = "keep",
    split: str | None = None, recent_first: bool = False,
) -> list[str]:
    """The history text of each segment row ("" for a segment with no earlier action),
    oldest action first (or newest, ``recent_first``); in gappy mode the history comes from ``split``."""
    hist = histories(segments, rows, hist_len, mode, split)  # [n, hist_len], -1 padded, oldest first
    return [action_text(classes, segments.action[h[h >= 0]][:: -1 if recent_first else 1], colon) for h in hist]


def history_corpus(
    classes: ClassTable, segments: SegmentTable, split: str, window: int = 16, colon: str = "keep"
) -> list[str]:
    """Pretraining lines from one split: each video's time-ordered actions of that split,
    cut into windows of ``window`` actions overlapping by half.

    Only the split's own labels are read, so pretraining on ``training1`` sees nothing
    of ``validation1``.
    """
    rows = segments.rows_in(split, labelled=True)
    if len(rows) == 0:
        raise DataError(f"split {split!r}: no labelled segments")
    order = rows[np.lexsort((segments.uid[rows], segments.start_frame[rows], segments.video[rows]))]
    lines = []
    step = max(1, window // 2)
    for v in np.unique(segments.video[order]):
        acts = segments.action[order[segments.video[order] == v]]
        for lo in range(0, max(1, len(acts) - window + step), step):
            lines.append(action_text(classes, acts[lo : lo + window], colon))
    return lines


def annotations_corpus(directory: str | Path, split: str, window: int = 16, colon: str = "keep") -> list[str]:
    """``history_corpus`` of one split CSV of a RULSTM-style annotation folder."""
    classes, segments = load_annotations(directory, [split], fps=1.0)  # the frame rate only orders segments
    return history_corpus(classes, segments, split, window, colon)


def corpus_sequences(classes: ClassTable, lines: list[str], colon: str = "keep") -> list[np.ndarray]:
    """The corpus lines (as ``read_corpus`` returns them) whose actions are all store classes,
    as action-id arrays; lines with any other action are left out."""
    index = {action_words(classes, a, colon): a for a in range(classes.num_actions)}
    out = []
    for line in lines:
        acts = [index.get(a.strip()) for a in line.split("<a>")]
        if all(a is not None for a in acts):
            out.append(np.asarray(acts, np.int64))
    return out
