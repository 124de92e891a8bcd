"""RULSTM/AVT annotation files: class lists, segment tables, histories and action text.

Formats (see ``../shared/data/README.md``):

- segment CSVs, no header: ``uid, video_id, start_frame, end_frame, verb, noun, action``
  (EK55 zero-pads the numbers and puts spaces after commas);
- EGTEA ``actions.csv``, no header: ``id, verb_noun, Verb_noun`` (``3, 3_3, Cut_tomato``);
- EK55 ``actions.csv`` with header ``id,action,verb,noun``;
- EK55 ``EPIC_many_shot_verbs.csv`` / ``EPIC_many_shot_nouns.csv`` (``verb_class,verb``).
"""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import AnnotationError, ConfigError, MissingError

#: Native annotation frame rate per dataset (frames of ``start_frame``/``end_frame``).
DATASET_FPS = {"egtea": 24.0, "ek55": 60.0}


@dataclass(frozen=True)
class ClassTable:
    """Action, verb and noun names with the action -> (verb, noun) map."""

    action_names: list[str]
    verb_names: list[str]
    noun_names: list[str]
    action_verb: np.ndarray  # [A] int32
    action_noun: np.ndarray  # [A] int32
    many_shot_verbs: np.ndarray | None = None  # [V] bool
    many_shot_nouns: np.ndarray | None = None  # [N] bool

    @property
    def num_actions(self) -> int:
        return len(self.action_names)

    @property
    def num_verbs(self) -> int:
        return len(self.verb_names)

    @property
    def num_nouns(self) -> int:
        return len(self.noun_names)

    @property
    def many_shot_actions(self) -> np.ndarray | None:
        """[A] bool: actions whose verb and noun are both many-shot (EK55 convention)."""
        if self.many_shot_verbs is None or self.many_shot_nouns is None:
            return None
        return self.many_shot_verbs[self.action_verb] & self.many_shot_nouns[self.action_noun]


@dataclass
class SegmentTable:
    """The annotation table, one row per labelled segment, column arrays."""

    uid: np.ndarray  # [N] int64
    video: np.ndarray  # [N] int32, index into ``videos``
    start_frame: np.ndarray  # [N] int64
    end_frame: np.ndarray  # [N] int64
    verb: np.ndarray  # [N] int32
    noun: np.ndarray  # [N] int32
    action: np.ndarray  # [N] int32
    split: np.ndarray  # [N] int8, index into ``splits``
    videos: list[str]
    splits: list[str]
    fps: float
    _index: dict[int, int] = field(default_factory=dict, repr=False, compare=False)

    COLUMNS = ("uid", "video", "start_frame", "end_frame", "verb", "noun", "action", "split")

    def __post_init__(self) -> None:
        if not self._index:
            self._index.update((int(u), i) for i, u in enumerate(self.uid))

    def __len__(self) -> int:
        return len(self.uid)

    def row_of(self, uids: Iterable[int]) -> np.ndarray:
        """Row indices of ``uids``; raises MissingError naming the first unknown UID."""
        rows = []
        for u in uids:
            try:
                rows.append(self._index[int(u)])
            except (KeyError, ValueError):
                raise MissingError(f"UID {u}: not in the segment table ({len(self)} segments)") from None
        return np.asarray(rows, dtype=np.int64)

    def rows_in(self, split: str) -> np.ndarray:
        """Row indices of one split, in table order."""
        if split not in self.splits:
            raise MissingError(f"split {split!r}: not in the store (splits: {', '.join(self.splits)})")
        return np.flatnonzero(self.split == self.splits.index(split))

    def start_seconds(self) -> np.ndarray:
        """[N] float64 start time of each segment in seconds."""
        return self.start_frame / self.fps


def _open_rows(path: Path) -> list[list[str]]:
    try:
        with open(path, newline="") as f:
            return [[c.strip() for c in row] for row in csv.reader(f) if row and any(c.strip() for c in row)]
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise AnnotationError(f"{path}: not a readable CSV ({e})") from None


def _int(path: Path, lineno: int, name: str, text: str, bits: int = 64) -> int:
    try:
        value = int(text)
    except ValueError:
        raise AnnotationError(f"{path}, row {lineno}: {name} must be an integer, found {text!r}") from None
    if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):  # stored as int64 (ids: int32)
        raise AnnotationError(f"{path}, row {lineno}: {name} {text.strip()} is beyond the int{bits} range it is stored in")
    return value


def read_classes(
    actions_csv: str | Path,
    many_shot_verbs: str | Path | None = None,
    many_shot_nouns: str | Path | None = None,
) -> ClassTable:
    """Read an EGTEA- or EK55-style ``actions.csv`` (format detected from the first row)."""
    path = Path(actions_csv)
    rows = _open_rows(path)
    if not rows:
        raise AnnotationError(f"{path}: empty class list")
    entries: list[tuple[int, str, int, int, str, str]] = []  # id, action name, verb, noun, verb name, noun name
    if [c.lower() for c in rows[0][:4]] == ["id", "action", "verb", "noun"]:
        # EK55: id,action,verb,noun with action = "verb_noun" names and verb/noun = class ids
        for n, row in enumerate(rows[1:], start=2):
            if len(row) < 4:
                raise AnnotationError(f"{path}, row {n}: expected 4 columns id,action,verb,noun, found {len(row)}")
            aid, name = _int(path, n, "id", row[0]), row[1]
            vid, nid = _int(path, n, "verb", row[2]), _int(path, n, "noun", row[3])
            vname, _, nname = name.partition("_")
            entries.append((aid, name, vid, nid, vname, nname or name))
    else:
        for n, row in enumerate(rows, start=1):
            if len(row) < 3:
                raise AnnotationError(f"{path}, row {n}: expected 3 columns id, verb_noun, Verb_noun, found {len(row)}")
            aid = _int(path, n, "id", row[0])
            ids = row[1].split("_")
            if len(ids) != 2:
                raise AnnotationError(f"{path}, row {n}: verb_noun must look like '3_7', found {row[1]!r}")
            vid, nid = _int(path, n, "verb id", ids[0]), _int(path, n, "noun id", ids[1])
            vname, sep, nname = row[2].partition("_")
            if not sep:
                raise AnnotationError(f"{path}, row {n}: Verb_noun must look like 'Cut_tomato', found {row[2]!r}")
            entries.append((aid, row[2], vid, nid, vname, nname))
    if not entries:
        raise AnnotationError(f"{path}: empty class list (a header and no classes)")
    ids = [e[0] for e in entries]
    if sorted(ids) != list(range(len(ids))):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        what = f"duplicate ids {dup[:5]}" if dup else f"ids are not 0..{len(ids) - 1}"
        raise AnnotationError(f"{path}: action {what}")
    entries.sort()
    verb_names = _names(path, "verb", [(e[2], e[4]) for e in entries])
    noun_names = _names(path, "noun", [(e[3], e[5]) for e in entries])
    classes = ClassTable(
        action_names=[e[1] for e in entries],
        verb_names=verb_names,
        noun_names=noun_names,
        action_verb=np.array([e[2] for e in entries], dtype=np.int32),
        action_noun=np.array([e[3] for e in entries], dtype=np.int32),
    )
    if many_shot_verbs is not None or many_shot_nouns is not None:
        if many_shot_verbs is None or many_shot_nouns is None:
            raise AnnotationError("many-shot lists: give both the verb and the noun list")
        classes = ClassTable(
            **{k: getattr(classes, k) for k in ("action_names", "verb_names", "noun_names", "action_verb", "action_noun")},
            many_shot_verbs=_many_shot(Path(many_shot_verbs), len(verb_names)),
            many_shot_nouns=_many_shot(Path(many_shot_nouns), len(noun_names)),
        )
    return classes


def _names(path: Path, kind: str, pairs: list[tuple[int, str]]) -> list[str]:
    """Names for ids 0..max from (id, name) pairs; ids never seen get ``<kind>_<id>``."""
    n = max(i for i, _ in pairs) + 1
    names = [f"{kind}_{i}" for i in range(n)]
    seen: dict[int, str] = {}
    for i, name in pairs:
        if i < 0:
            raise AnnotationError(f"{path}: negative {kind} id {i}")
        if seen.setdefault(i, name).lower() != name.lower():
            raise AnnotationError(f"{path}: {kind} id {i} has two names, {seen[i]!r} and {name!r}")
        names[i] = seen[i]
    return names


def _many_shot(path: Path, n: int) -> np.ndarray:
    rows = _open_rows(path)
    mask = np.zeros(n, dtype=bool)
    for lineno, row in enumerate(rows, start=1):
        if lineno == 1 and not row[0].lstrip("-").isdigit():
            continue  # header
        i = _int(path, lineno, "class id", row[0])
        if not 0 <= i < n:
            raise AnnotationError(f"{path}, row {lineno}: class id {i} outside 0..{n - 1}")
        mask[i] = True
    return mask


@dataclass(frozen=True)
class RawSegments:
    """Rows of one segment CSV before they are merged into a SegmentTable."""

    path: Path
    uid: list[int]
    video: list[str]
    start: list[int]
    end: list[int]
    verb: list[int]
    noun: list[int]
    action: list[int]


def read_segments_csv(path: str | Path, classes: ClassTable | None = None) -> RawSegments:
    """Read one RULSTM/AVT segment CSV and check every row (and its labels against ``classes``)."""
    path = Path(path)
    cols: tuple[list, ...] = ([], [], [], [], [], [], [])
    for n, row in enumerate(_open_rows(path), start=1):
        if len(row) != 7:
            raise AnnotationError(
                f"{path}, row {n}: expected 7 columns uid,video,start,end,verb,noun,action, found {len(row)}"
            )
        uid = _int(path, n, "uid", row[0])
        start, end = _int(path, n, "start_frame", row[2]), _int(path, n, "end_frame", row[3])
        verb, noun, action = (_int(path, n, k, v, bits=32) for k, v in zip(("verb", "noun", "action"), row[4:]))
        if end < start:
            raise AnnotationError(f"{path}, row {n}: UID {uid} ends at frame {end} before it starts at {start}")
        if start < 0:
            raise AnnotationError(f"{path}, row {n}: UID {uid} starts at negative frame {start}")
        if classes is not None:
            if not 0 <= action < classes.num_actions:
                raise AnnotationError(
                    f"{path}, row {n}: UID {uid} has unknown action id {action} (classes: 0..{classes.num_actions - 1})"
                )
            if (classes.action_verb[action], classes.action_noun[action]) != (verb, noun):
                raise AnnotationError(
                    f"{path}, row {n}: UID {uid} action {action} is verb {classes.action_verb[action]}"
                    f" noun {classes.action_noun[action]}, found verb {verb} noun {noun}"
                )
        for col, value in zip(cols, (uid, row[1], start, end, verb, noun, action)):
            col.append(value)
    if not cols[0]:
        raise AnnotationError(f"{path}: no segments")
    return RawSegments(path, *cols)


def build_segment_table(splits: dict[str, RawSegments], fps: float) -> SegmentTable:
    """Merge the CSVs of several splits into one table; a UID may appear only once."""
    videos = sorted({v for raw in splits.values() for v in raw.video})
    vindex = {v: i for i, v in enumerate(videos)}
    seen: dict[int, Path] = {}
    parts = []
    for s, (name, raw) in enumerate(splits.items()):
        for n, u in enumerate(raw.uid, start=1):
            if u in seen:
                raise AnnotationError(f"{raw.path}, row {n}: duplicate UID {u} (already in {seen[u]})")
            seen[u] = raw.path
        parts.append(
            (
                np.asarray(raw.uid, np.int64),
                np.asarray([vindex[v] for v in raw.video], np.int32),
                np.asarray(raw.start, np.int64),
                np.asarray(raw.end, np.int64),
                np.asarray(raw.verb, np.int32),
                np.asarray(raw.noun, np.int32),
                np.asarray(raw.action, np.int32),
                np.full(len(raw.uid), s, np.int8),
            )
        )
    if not (fps > 0 and np.isfinite(fps)):
        raise AnnotationError(f"frame rate must be positive, found {fps}")
    arrays = [np.concatenate(col) for col in zip(*parts)]
    return SegmentTable(*arrays, videos=videos, splits=list(splits), fps=float(fps))


def load_annotations(
    directory: str | Path,
    splits: Sequence[str] | None = None,
    fps: float | None = None,
    dataset: str | None = None,
) -> tuple[ClassTable, SegmentTable]:
    """Read a RULSTM-style folder: ``actions.csv``, split CSVs, optional EK55 many-shot lists.

    ``splits`` names CSV stems (``training1``, ``validation1``); by default every CSV other
    than the class files. ``fps`` defaults to the dataset's native rate (``dataset`` or a
    guess from the class count: 106 -> EGTEA 24 fps, 2513 -> EK55 60 fps).
    """
    directory = Path(directory)
    if not directory.is_dir():
        raise AnnotationError(f"{directory}: annotation folder not found")
    ms_v, ms_n = directory / "EPIC_many_shot_verbs.csv", directory / "EPIC_many_shot_nouns.csv"
    classes = read_classes(
        directory / "actions.csv",
        ms_v if ms_v.exists() else None,
        ms_n if ms_n.exists() else None,
    )
    if splits is None:
        special = {"actions", "EPIC_many_shot_verbs", "EPIC_many_shot_nouns", "verbs", "nouns"}
        splits = sorted(p.stem for p in directory.glob("*.csv") if p.stem not in special)
    if not splits:
        raise AnnotationError(f"{directory}: no split CSVs found")
    raw = {s: read_segments_csv(directory / f"{s}.csv", classes) for s in splits}
    if fps is None:
        dataset = dataset or guess_dataset(classes)
        if dataset not in DATASET_FPS:
            raise AnnotationError(f"{directory}: unknown dataset {dataset!r}; pass the frame rate (--fps)")
        fps = DATASET_FPS[dataset]
    return classes, build_segment_table(raw, fps)


def guess_dataset(classes: ClassTable) -> str | None:
    """Name of the known dataset with this class count, if any."""
    return {106: "egtea", 2513: "ek55"}.get(classes.num_actions)


# ---------------------------------------------------------------------------------------
# Histories and action text


def histories(segments: SegmentTable, rows: np.ndarray, hist_len: int, mode: str = "gappy") -> np.ndarray:
    """[len(rows), hist_len] segment rows of the actions before each segment, oldest first.

    A segment's history holds the segments of the same video that start strictly earlier,
    time-sorted, the last ``hist_len`` of them, left-padded with -1. ``gappy`` draws them
    only from the segment's own split (what a model trained on that split sees);
    ``complete`` from every segment in the table.
    """
    if mode not in ("gappy", "complete"):
        raise ConfigError(f"history mode must be 'gappy' or 'complete', found {mode!r}")
    if hist_len < 1:
        raise ConfigError(f"hist_len must be >= 1, found {hist_len}")
    rows = np.asarray(rows, dtype=np.int64)
    # Sort all segments by (video, start, uid) once; a history is then a slice ending just
    # before the segment's own position among its video's earlier-starting segments.
    order = np.lexsort((segments.uid, segments.start_frame, segments.video))
    out = np.full((len(rows), hist_len), -1, dtype=np.int64)
    groups = [order] if mode == "complete" else [order[segments.split[order] == s] for s in range(len(segments.splits))]
    for pool in groups:
        key_v, key_s = segments.video[pool].astype(np.int64), segments.start_frame[pool]
        for which in np.flatnonzero(np.isin(rows, pool) if mode == "gappy" else np.ones(len(rows), bool)):
            r = rows[which]
            v, s = np.int64(segments.video[r]), segments.start_frame[r]
            lo = np.searchsorted(key_v, v, side="left")
            hi = lo + np.searchsorted(key_s[lo : np.searchsorted(key_v, v, side="right")], s, side="left")
            hist = pool[max(lo, hi - hist_len) : hi]
            if len(hist):
                out[which, hist_len - len(hist) :] = hist
    return out


_WORD_SEP = re.compile(r"[_/]+")


def class_words(name: str, colon: str = "keep") -> str:
    """A class name as plain lowercase words: ``Inspect/Read`` -> ``inspect read``.

    ``_`` and ``/`` separate words. ``:`` joins a compound: EGTEA writes it in reading
    order (``eating:utensil`` -> ``eating utensil``, ``colon="keep"``), EK55 writes the
    head noun first (``pan:dust`` -> ``dust pan``, ``colon="reverse"``).
    """
    parts = [p for p in name.strip().lower().split(":") if p]
    if colon == "reverse":
        parts = parts[::-1]
    return " ".join(w for p in parts for w in _WORD_SEP.split(p) if w)


def pair_words(verb: str, noun: str, colon: str = "keep") -> str:
    """A (verb, noun) pair of class names as teacher text: ``verb <v> noun``."""
    return f"{class_words(verb, colon)} <v> {class_words(noun, colon)}"


def action_words(classes: ClassTable, action: int, colon: str = "keep") -> str:
    """One action as teacher text: ``verb <v> noun``."""
    v, n = classes.action_verb[action], classes.action_noun[action]
    return pair_words(classes.verb_names[v], classes.noun_names[n], colon)


def action_text(classes: ClassTable, actions: Iterable[int], colon: str = "keep") -> str:
    """A sequence of action ids as teacher text: ``verb <v> noun <a> verb <v> noun``."""
    return " <a> ".join(action_words(classes, int(a), colon) for a in actions)
