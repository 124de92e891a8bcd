"""RULSTM/AVT annotation folders read into a ClassTable and a SegmentTable (kdstore/tables.py).

Formats (see ``../shared/data/README.md`` and docs/format.md):

- segment CSVs, no header: ``key, video_id, start_frame, end_frame, verb, noun, action``
  (EK55 zero-pads the numbers and puts a space after each comma); unlabelled test files
  (EK55 ``test_seen``/``test_unseen``, EK100 ``test_timestamps``) have the first four
  columns only. The key is an integer uid (EGTEA, EK55) or a string narration id (EK100
  ``P01_11_0``). Frames count at 30 fps in every RULSTM CSV.
- ``actions.csv``: EGTEA ``id, verb_noun, Verb_noun`` without header (``3, 3_3, Cut_tomato``);
  EK55 header ``id,action,verb,noun`` with ``action`` = ``verb_noun`` surface words
  (``2, get_fish,0,100``); EK100 header ``id,verb,noun,action`` with ``action`` =
  ``verb noun`` (``0,0,0,take tap``).
- EK55 ``EPIC_many_shot_verbs.csv`` / ``EPIC_many_shot_nouns.csv`` (``verb_class,verb``);
  optional ``EPIC_verb_classes.csv`` / ``EPIC_noun_classes.csv`` (``verb_id,class_key,verbs``)
  or EK100's ``EPIC_100_verb_classes.csv`` (``id,key,...``): canonical class names.
- ``<split>_<name>_ids.csv``: one segment key a line, an evaluation subset of ``<split>``
  (EK100 ``validation_unseen_participants_ids.csv``, ``validation_tail_actions_ids.csv``).
- ``<split>_videos.csv``: video lists (not read).
"""

from __future__ import annotations

import csv
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from .errors import AnnotationError
from .tables import ClassTable, SegmentTable

#: Frame rate of ``start_frame``/``end_frame`` in each known dataset's RULSTM CSVs: RULSTM
#: converted every video to 30 fps before numbering frames (EPIC's 59.94 fps numbers halved).
DATASET_FPS = {"egtea": 30.0, "ek55": 30.0, "ek100": 30.0}
#: Known datasets by action count.
DATASET_ACTIONS = {106: "egtea", 2513: "ek55", 3806: "ek100"}
#: Class-name files beside ``actions.csv``: (verb file, noun file) in order of preference.
CLASS_KEY_FILES = (("EPIC_verb_classes.csv", "EPIC_noun_classes.csv"), ("EPIC_100_verb_classes.csv", "EPIC_100_noun_classes.csv"))
MANY_SHOT_FILES = ("EPIC_many_shot_verbs.csv", "EPIC_many_shot_nouns.csv")
_NOT_SEGMENTS = {"actions", "verbs", "nouns", *(Path(f).stem for pair in (*CLASS_KEY_FILES, MANY_SHOT_FILES) for f in pair)}


def _open_rows(path: Path) -> list[tuple[int, list[str]]]:
    """(line number, stripped cells) of the non-blank rows; a UTF-8 BOM is skipped."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            out = []
            for row in reader:
                cells = [c.strip() for c in row]
                if any(cells):
                    out.append((reader.line_num, cells))
            return out
    except FileNotFoundError:
        raise AnnotationError(f"{path}: file not found") from None
    except (UnicodeDecodeError, csv.Error) as e:
        raise AnnotationError(f"{path}: not a readable CSV ({e})") from None


_INT64 = (-(2**63), 2**63 - 1)


def _int(path: Path, lineno: int, name: str, text: str, bits: int = 64) -> int:
    try:
        value = int(text)
    except ValueError:
        raise AnnotationError(f"{path}, row {lineno}: {name} must be an integer, found {text!r}") from None
    if not -(2 ** (bits - 1)) <= value < 2 ** (bits - 1):  # stored as int64 (ids: int32)
        raise AnnotationError(f"{path}, row {lineno}: {name} {text.strip()} is beyond the int{bits} range it is stored in")
    return value


def _split_name(path: Path, n: int, aid: int, name: str, sep: str, example: str) -> tuple[str, str]:
    """(verb word, noun word) of an action name; a missing part is a class without a name."""
    if not name:
        raise AnnotationError(f"{path}, row {n}: action {aid} has no name")
    verb, found, noun = name.partition(sep)
    if not found or not verb.strip() or not noun.strip():
        raise AnnotationError(f"{path}, row {n}: action {aid} name {name!r} lacks a verb or a noun word (like {example!r})")
    return verb.strip(), noun.strip()


def read_classes(
    actions_csv: str | Path,
    many_shot_verbs: str | Path | None = None,
    many_shot_nouns: str | Path | None = None,
    verb_classes: str | Path | None = None,
    noun_classes: str | Path | None = None,
) -> ClassTable:
    """Read an EGTEA, EK55 or EK100 ``actions.csv`` (format told by its first row).

    A verb or noun class may appear under several surface words. Its display name is the
    ``class_key`` of ``verb_classes``/``noun_classes`` when given, else its most frequent
    surface word (ties: the word of the lowest action id).
    """
    path = Path(actions_csv)
    entries = _action_entries(path)
    _check_entries(path, entries)
    verb_keys = _class_keys(Path(verb_classes), "verb") if verb_classes else None
    noun_keys = _class_keys(Path(noun_classes), "noun") if noun_classes else None
    verb_names = _display_names(path, "verb", [(e[2], e[4]) for e in entries], verb_keys, verb_classes)
    noun_names = _display_names(path, "noun", [(e[3], e[5]) for e in entries], noun_keys, noun_classes)
    many_v = many_n = None
    if many_shot_verbs is not None or many_shot_nouns is not None:
        if many_shot_verbs is None or many_shot_nouns is None:
            raise AnnotationError("many-shot lists: give both the verb and the noun list")
        many_v = _many_shot(Path(many_shot_verbs), len(verb_names))
        many_n = _many_shot(Path(many_shot_nouns), len(noun_names))
    return ClassTable(
        action_names=[e[1] for e in entries],
        verb_names=verb_names,
        noun_names=noun_names,
        action_verb=np.array([e[2] for e in entries], dtype=np.int32),
        action_noun=np.array([e[3] for e in entries], dtype=np.int32),
        many_shot_verbs=many_v,
        many_shot_nouns=many_n,
        surface_verbs=[e[4] for e in entries],
        surface_nouns=[e[5] for e in entries],
    )


_Entry = tuple[int, str, int, int, str, str]  # id, action name, verb, noun, verb word, noun word


def _action_entries(path: Path) -> list[_Entry]:
    """The rows of an ``actions.csv`` in any of the three formats, in file order."""
    rows = _open_rows(path)
    if not rows:
        raise AnnotationError(f"{path}: empty class list")
    entries: list[_Entry] = []
    header = [c.lower() for c in rows[0][1][:4]]
    if header in (["id", "action", "verb", "noun"], ["id", "verb", "noun", "action"]):
        ek55 = header[1] == "action"
        for n, row in rows[1:]:
            if len(row) < 4:
                raise AnnotationError(f"{path}, row {n}: expected 4 columns {','.join(header)}, found {len(row)}")
            aid = _int(path, n, "id", row[0])
            name, vtext, ntext = (row[1], row[2], row[3]) if ek55 else (row[3], row[1], row[2])
            vid, nid = _int(path, n, "verb", vtext), _int(path, n, "noun", ntext)
            words = _split_name(path, n, aid, name, "_" if ek55 else " ", "take_pan" if ek55 else "take pan")
            entries.append((aid, name, vid, nid, *words))
    else:
        for n, row in rows:
            if len(row) < 3:
                raise AnnotationError(f"{path}, row {n}: expected 3 columns id, verb_noun, Verb_noun, found {len(row)}")
            aid = _int(path, n, "id", row[0])
            ids = row[1].split("_")
            if len(ids) != 2:
                raise AnnotationError(f"{path}, row {n}: verb_noun must look like '3_7', found {row[1]!r}")
            vid, nid = _int(path, n, "verb id", ids[0]), _int(path, n, "noun id", ids[1])
            entries.append((aid, row[2], vid, nid, *_split_name(path, n, aid, row[2], "_", "Cut_tomato")))
    if not entries:
        raise AnnotationError(f"{path}: empty class list (a header and no classes)")
    return entries


def _check_entries(path: Path, entries: list[_Entry]) -> None:
    """Ids 0..A-1 each once, no negative class id, one action per (verb, noun); sorts ``entries`` by id."""
    ids = [e[0] for e in entries]
    if sorted(ids) != list(range(len(ids))):
        dup = sorted({i for i, c in Counter(ids).items() if c > 1})
        what = f"duplicate ids {dup[:5]}" if dup else f"ids are not 0..{len(ids) - 1}"
        raise AnnotationError(f"{path}: action {what}")
    entries.sort()
    for kind, col in (("verb", 2), ("noun", 3)):
        neg = next((e for e in entries if e[col] < 0), None)
        if neg is not None:
            raise AnnotationError(f"{path}: action {neg[0]} has negative {kind} id {neg[col]}")
    pairs = Counter((e[2], e[3]) for e in entries)
    dup = next((p for p, c in pairs.items() if c > 1), None)
    if dup is not None:
        twice = [e[0] for e in entries if (e[2], e[3]) == dup]
        raise AnnotationError(f"{path}: actions {twice[0]} and {twice[1]} are both verb {dup[0]} noun {dup[1]}")


def _class_keys(path: Path, kind: str) -> dict[int, str]:
    """Class id -> canonical name from ``EPIC_<kind>_classes.csv`` (``<kind>_id,class_key,...``)
    or ``EPIC_100_<kind>_classes.csv`` (``id,key,...``)."""
    rows = _open_rows(path)
    if not rows:
        raise AnnotationError(f"{path}: empty class-name list")
    header = [c.lower() for c in rows[0][1]]
    col = next((header.index(k) for k in ("class_key", "key") if k in header), None)
    if col is None or col == 0:
        raise AnnotationError(f"{path}, row {rows[0][0]}: expected a header '{kind}_id,class_key,...' or 'id,key,...', found {rows[0][1]}")
    keys: dict[int, str] = {}
    for n, row in rows[1:]:
        i = _int(path, n, f"{kind} id", row[0])
        if len(row) <= col or not row[col]:
            raise AnnotationError(f"{path}, row {n}: {kind} class {i} has no name")
        if i in keys:
            raise AnnotationError(f"{path}, row {n}: {kind} class {i} named twice")
        keys[i] = row[col]
    return keys


def _display_names(path: Path, kind: str, pairs: list[tuple[int, str]], keys: dict[int, str] | None, keys_path) -> list[str]:
    """One name per class id 0..max: its class key, else its most frequent surface word;
    ids no action uses and no key names get ``<kind>_<id>``."""
    words: dict[int, Counter] = {}
    for i, w in pairs:  # Counter keeps first-insertion order, so most_common breaks ties by action id
        words.setdefault(i, Counter())[w] += 1
    n = max([i for i, _ in pairs] + list(keys or [])) + 1
    names = [f"{kind}_{i}" for i in range(n)]
    for i, c in words.items():
        names[i] = c.most_common(1)[0][0]
    if keys is not None:
        missing = sorted(set(words) - set(keys))
        if missing:
            raise AnnotationError(f"{keys_path}: {kind} class {missing[0]} (used by {path.name}) has no name")
        for i, key in keys.items():
            names[i] = key
    return names


def _many_shot(path: Path, n: int) -> np.ndarray:
    rows = _open_rows(path)
    mask = np.zeros(n, dtype=bool)
    for k, (lineno, row) in enumerate(rows):
        if k == 0 and not row[0].lstrip("-").isdigit():
            continue  # header
        i = _int(path, lineno, "class id", row[0])
        if not 0 <= i < n:
            raise AnnotationError(f"{path}, row {lineno}: class id {i} outside 0..{n - 1}")
        mask[i] = True
    return mask


@dataclass(frozen=True)
class RawSegments:
    """Rows of one segment CSV before they are merged into a SegmentTable.

    ``keys`` are ints (integer uids) or strings (narration ids); labels are -1 in an
    unlabelled (4-column) file.
    """

    path: Path
    lines: list[int]
    keys: list
    video: list[str]
    start: list[int]
    end: list[int]
    verb: list[int]
    noun: list[int]
    action: list[int]
    labelled: bool


def _key(text: str) -> int | str:
    """An integer uid if ``text`` is one that fits in 64 bits, else the string id."""
    try:
        value = int(text)
    except ValueError:
        return text
    return value if _INT64[0] <= value <= _INT64[1] else text


def read_segments_csv(path: str | Path, classes: ClassTable | None = None) -> RawSegments:
    """Read one RULSTM/AVT segment CSV (7 labelled or 4 unlabelled columns) and check
    every row, and its labels against ``classes``.

    A file named ``test*`` must be unlabelled; a key may appear once.
    """
    path = Path(path)
    rows = _open_rows(path)
    if not rows:
        raise AnnotationError(f"{path}: no segments")
    width = len(rows[0][1])
    if width not in (4, 7):
        raise AnnotationError(
            f"{path}, row {rows[0][0]}: expected 7 columns uid,video,start,end,verb,noun,action"
            f" (4 in an unlabelled test file), found {width}"
        )
    if width == 7 and path.stem.lower().startswith("test"):
        raise AnnotationError(
            f"{path}, row {rows[0][0]}: a test file holds unlabelled segments (uid, video, start, end), found a labelled row of 7 columns"
        )
    cols: tuple[list, ...] = ([], [], [], [], [], [], [], [])
    seen: dict = {}
    for n, row in rows:
        if len(row) != width:
            raise AnnotationError(f"{path}, row {n}: {len(row)} columns, the file's first row has {width}")
        key = _key(row[0])
        if key == "":
            raise AnnotationError(f"{path}, row {n}: empty segment key")
        if cols[1] and type(key) is not type(cols[1][0]):
            kind = "an integer uid" if isinstance(cols[1][0], int) else "a string id"
            raise AnnotationError(f"{path}, row {n}: segment key {row[0]!r} is not {kind} like row {cols[0][0]}'s")
        if key in seen:
            raise AnnotationError(f"{path}, row {n}: {_what(key)} appears twice (rows {seen[key]} and {n})")
        seen[key] = n
        start, end = _int(path, n, "start_frame", row[2]), _int(path, n, "end_frame", row[3])
        labels = zip(("verb", "noun", "action"), row[4:])
        verb, noun, action = (_int(path, n, k, v, bits=32) for k, v in labels) if width == 7 else (-1, -1, -1)
        if end < start:
            raise AnnotationError(f"{path}, row {n}: {_what(key)} ends at frame {end} before it starts at {start}")
        if start < 0:
            raise AnnotationError(f"{path}, row {n}: {_what(key)} starts at negative frame {start}")
        if classes is not None and width == 7:
            if not 0 <= action < classes.num_actions:
                raise AnnotationError(
                    f"{path}, row {n}: {_what(key)} has action id {action}, not in actions.csv (0..{classes.num_actions - 1})"
                )
            if (classes.action_verb[action], classes.action_noun[action]) != (verb, noun):
                raise AnnotationError(
                    f"{path}, row {n}: {_what(key)} action {action} is verb {classes.action_verb[action]}"
                    f" noun {classes.action_noun[action]} in actions.csv, found verb {verb} noun {noun}"
                )
        for col, value in zip(cols, (n, key, row[1], start, end, verb, noun, action)):
            col.append(value)
    return RawSegments(path, *cols, labelled=width == 7)


def _what(key) -> str:
    return f"UID {key}" if isinstance(key, int) else f"segment {key}"


def natural_key(text: str) -> tuple:
    """Sort key comparing digit runs as numbers: ``P01_11_9`` < ``P01_11_10``."""
    parts = re.split(r"(\d+)", text)
    return tuple(int(p) if i % 2 else p for i, p in enumerate(parts)), text


def read_id_list(path: Path) -> list[tuple[int, str]]:
    """(line, key) of a one-key-a-line id list (RULSTM's ``validation_*_ids.csv``)."""
    rows = _open_rows(path)
    seen: dict[str, int] = {}
    for n, row in rows:
        if row[0] in seen:
            raise AnnotationError(f"{path}, row {n}: {row[0]} listed twice (rows {seen[row[0]]} and {n})")
        seen[row[0]] = n
    return [(n, row[0]) for n, row in rows]


_FIELDS = ("video", "start", "end", "verb", "noun", "action")


def build_segment_table(
    splits: dict[str, RawSegments], fps: float, subsets: dict[str, tuple[str, Path]] | None = None
) -> SegmentTable:
    """Merge the CSVs of several splits into one table.

    A key in several files is one segment when its rows agree (EGTEA's split schemes
    share segments); rows that disagree are an error naming both files and rows. Integer
    keys are the uids; string keys get uids 0..S-1 in natural order of the keys
    (``P01_11_9`` before ``P01_11_10``). Rows are in uid order. ``subsets`` maps a subset
    name to (its split, its id list file).
    """
    if not (fps > 0 and np.isfinite(fps)):
        raise AnnotationError(f"frame rate must be positive, found {fps}")
    kinds = {name: {type(k) for k in raw.keys} for name, raw in splits.items()}
    strings = any(str in k for k in kinds.values())
    if strings and any(int in k for k in kinds.values()):
        ints = next(raw for name, raw in splits.items() if int in kinds[name])
        strs = next(raw for name, raw in splits.items() if str in kinds[name])
        raise AnnotationError(f"{ints.path} has integer segment keys, {strs.path} string ones (narration ids): one dataset has one kind")
    first = _first_rows(splits)  # key -> (raw, index in raw)
    keys = sorted(first, key=natural_key) if strings else sorted(first)
    videos = sorted({raw.video[j] for raw, j in first.values()})
    vindex = {v: i for i, v in enumerate(videos)}
    cols = {f: np.array([getattr(first[k][0], f)[first[k][1]] for k in keys]) for f in _FIELDS}
    row = {k: i for i, k in enumerate(keys)}
    split_mask = np.zeros((len(keys), len(splits)), bool)
    for p, raw in enumerate(splits.values()):
        split_mask[[row[k] for k in raw.keys], p] = True
    names = list(subsets or {})
    subset_mask = _subset_mask(subsets or {}, list(splits), split_mask, row, strings)
    n = len(keys)
    return SegmentTable(
        uid=np.arange(n, dtype=np.int64) if strings else np.asarray(keys, np.int64).reshape(n),
        video=np.array([vindex[v] for v in cols["video"]], np.int32).reshape(n),
        start_frame=cols["start"].astype(np.int64).reshape(n),
        end_frame=cols["end"].astype(np.int64).reshape(n),
        verb=cols["verb"].astype(np.int32).reshape(n),
        noun=cols["noun"].astype(np.int32).reshape(n),
        action=cols["action"].astype(np.int32).reshape(n),
        split_mask=split_mask,
        videos=videos,
        splits=list(splits),
        fps=float(fps),
        ids=np.array(keys, dtype=object) if strings else None,
        subset_mask=subset_mask,
        subsets=names,
        subset_splits=[subsets[s][0] for s in names],
    )


def _first_rows(splits: dict[str, RawSegments]) -> dict:
    """Key -> (raw file, index in it) of each key's first row; AnnotationError names both rows
    of a key whose rows disagree."""
    first: dict = {}
    for raw in splits.values():
        for j, k in enumerate(raw.keys):
            if k not in first:
                first[k] = (raw, j)
                continue
            old, i = first[k]
            a = [getattr(old, f)[i] for f in _FIELDS]
            b = [getattr(raw, f)[j] for f in _FIELDS]
            if a != b:
                f = next(f for f, x, y in zip(_FIELDS, a, b) if x != y)
                x, y = a[_FIELDS.index(f)], b[_FIELDS.index(f)]
                if f in ("verb", "noun", "action") and -1 in (x, y):
                    x, y = ("unlabelled" if v == -1 else f"{f} {v}" for v in (x, y))
                else:
                    x, y = f"{f} {x}", f"{f} {y}"
                raise AnnotationError(
                    f"{old.path}, row {old.lines[i]} and {raw.path}, row {raw.lines[j]}: {_what(k)} differs ({x} vs {y})"
                )
    return first


def _subset_mask(subsets: dict[str, tuple[str, Path]], splits: list[str], split_mask: np.ndarray, row: dict,
                 strings: bool) -> np.ndarray:
    """[S, Q] bool membership of each evaluation subset, read from its id list; every id must
    be a segment of the subset's split."""
    subset_mask = np.zeros((len(split_mask), len(subsets)), bool)
    for q, (split, path) in enumerate(subsets.values()):
        members = split_mask[:, splits.index(split)]
        for n, k in read_id_list(path):
            r = row.get(k if strings else _key(k))
            if r is None or not members[r]:
                raise AnnotationError(f"{path}, row {n}: {k} is not a segment of split {split!r}")
            subset_mask[r, q] = True
    return subset_mask


@dataclass(frozen=True)
class AnnotationFolder:
    """The files of a RULSTM-style annotation folder, by role."""

    directory: Path
    splits: list[str]  # segment CSV stems
    id_lists: dict[str, tuple[str, Path]]  # subset name -> (split, file)
    many_shot: tuple[Path, Path] | None
    class_keys: tuple[Path | None, Path | None]

    @classmethod
    def scan(cls, directory: str | Path) -> "AnnotationFolder":
        d = Path(directory)
        if d.exists() and not d.is_dir():
            raise AnnotationError(f"{d}: a file, expected an annotation folder (actions.csv and split CSVs)")
        if not d.is_dir():
            raise AnnotationError(f"{d}: annotation folder not found")
        stems = sorted(p.stem for p in d.glob("*.csv"))
        splits = [s for s in stems if s not in _NOT_SEGMENTS and not s.endswith(("_ids", "_videos"))]
        id_lists = {}
        for s in stems:
            if s.endswith("_ids"):
                parent = max((p for p in splits if s.startswith(p + "_")), key=len, default=None)
                if parent is None:
                    raise AnnotationError(f"{d / (s + '.csv')}: an id list is named <split>_<subset>_ids.csv; no split CSV matches")
                id_lists[s[: -len("_ids")]] = (parent, d / f"{s}.csv")
        ms = tuple(d / f for f in MANY_SHOT_FILES)
        keys = next((tuple(d / f for f in pair) for pair in CLASS_KEY_FILES if any((d / f).exists() for f in pair)), (None, None))
        return cls(d, splits, id_lists, ms if any(p.exists() for p in ms) else None,
                   tuple(p if p is not None and p.exists() else None for p in keys))

    def inputs(self, splits: Sequence[str]) -> list[Path]:
        """The files an ingest of ``splits`` reads (for provenance)."""
        out = [self.directory / "actions.csv", *(self.directory / f"{s}.csv" for s in splits)]
        out += [p for s, p in self.id_lists.values() if s in splits]
        out += [p for p in (*(self.many_shot or ()), *self.class_keys) if p is not None]
        return out


def load_annotations(
    directory: str | Path,
    splits: Sequence[str] | None = None,
    fps: float | None = None,
    dataset: str | None = None,
) -> tuple[ClassTable, SegmentTable]:
    """Read a RULSTM-style folder: ``actions.csv``, split CSVs, id lists, class-name and
    many-shot lists.

    ``splits`` names CSV stems (``training1``, ``test_timestamps``); by default every
    segment CSV of the folder. The id lists of the ingested splits become evaluation
    subsets. ``fps`` defaults to the dataset's rate (``dataset``, or guessed from the
    class count: EGTEA, EK55 and EK100 all 30 fps).
    """
    folder = AnnotationFolder.scan(directory)
    ms, (vk, nk) = folder.many_shot, folder.class_keys
    classes = read_classes(folder.directory / "actions.csv", *(ms or (None, None)), vk, nk)
    splits = list(dict.fromkeys(splits if splits is not None else folder.splits))
    if not splits:
        raise AnnotationError(f"{folder.directory}: no split CSVs found")
    raw = {s: read_segments_csv(folder.directory / f"{s}.csv", classes) for s in splits}
    if fps is None:
        dataset = dataset or guess_dataset(classes)
        if dataset not in DATASET_FPS:
            raise AnnotationError(f"{folder.directory}: unknown dataset {dataset!r}; pass the frame rate (--fps)")
        fps = DATASET_FPS[dataset]
    subsets = {name: sp for name, sp in folder.id_lists.items() if sp[0] in raw}
    return classes, build_segment_table(raw, fps, subsets)


def guess_dataset(classes: ClassTable) -> str | None:
    """Name of the known dataset with this action count, if any."""
    return DATASET_ACTIONS.get(classes.num_actions)
