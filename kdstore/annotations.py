"""RULSTM/AVT annotation folders: class lists, segment tables, histories and action text.

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
from dataclasses import InitVar, dataclass, field
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .errors import AnnotationError, ConfigError, MissingError

#: Frame rate of ``start_frame``/``end_frame`` in each known dataset's RULSTM CSVs: RULSTM
#: converted every video to 30 fps before numbering frames (EPIC's 59.94 fps numbers halved).
DATASET_FPS = {"egtea": 30.0, "ek55": 30.0, "ek100": 30.0}
#: Known datasets by action count.
DATASET_ACTIONS = {106: "egtea", 2513: "ek55", 3806: "ek100"}
#: Class-name files beside ``actions.csv``: (verb file, noun file) in order of preference.
CLASS_KEY_FILES = (("EPIC_verb_classes.csv", "EPIC_noun_classes.csv"), ("EPIC_100_verb_classes.csv", "EPIC_100_noun_classes.csv"))
MANY_SHOT_FILES = ("EPIC_many_shot_verbs.csv", "EPIC_many_shot_nouns.csv")
_NOT_SEGMENTS = {"actions", "verbs", "nouns", *(Path(f).stem for pair in (*CLASS_KEY_FILES, MANY_SHOT_FILES) for f in pair)}


@dataclass(frozen=True)
class ClassTable:
    """Action, verb and noun names with the action -> (verb, noun) map.

    ``verb_names``/``noun_names`` hold one display name per class; ``surface_verbs`` and
    ``surface_nouns`` the verb and noun words of each action's own name (EK55 names one
    verb class ``take``, ``get``, ``pick-up``...), which make the action's teacher text.
    They default to the display names of the action's classes.
    """

    action_names: list[str]
    verb_names: list[str]
    noun_names: list[str]
    action_verb: np.ndarray  # [A] int32
    action_noun: np.ndarray  # [A] int32
    many_shot_verbs: np.ndarray | None = None  # [V] bool
    many_shot_nouns: np.ndarray | None = None  # [N] bool
    surface_verbs: list[str] | None = None  # [A]
    surface_nouns: list[str] | None = None  # [A]

    def __post_init__(self) -> None:
        if self.surface_verbs is None:
            object.__setattr__(self, "surface_verbs", [self.verb_names[v] for v in self.action_verb])
        if self.surface_nouns is None:
            object.__setattr__(self, "surface_nouns", [self.noun_names[n] for n in self.action_noun])

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
        """[A] bool: actions whose verb or noun is many-shot (RULSTM's ``get_many_shot``).

        The epic-kitchens library's own list asks for both (and a training occurrence);
        RULSTM, whose EK55 figures papers compare with, takes either.
        """
        if self.many_shot_verbs is None or self.many_shot_nouns is None:
            return None
        return self.many_shot_verbs[self.action_verb] | self.many_shot_nouns[self.action_noun]

    def surface_names(self, kind: str) -> dict[int, list[str]]:
        """Class id -> its distinct surface words in action-id order (``kind``: verb or noun)."""
        ids, words = (self.action_verb, self.surface_verbs) if kind == "verb" else (self.action_noun, self.surface_nouns)
        out: dict[int, list[str]] = {}
        for i, w in zip(ids.tolist(), words):
            if w not in out.setdefault(i, []):
                out[i].append(w)
        return out


@dataclass
class SegmentTable:
    """The segments of a dataset, one row each, column arrays.

    ``uid`` is the integer key every prediction group refers to; ``ids`` the dataset's own
    string keys (EK100 narration ids) or None where the dataset's keys are the integers
    themselves (EGTEA, EK55). Unlabelled segments hold -1 in ``verb``/``noun``/``action``.
    ``split_mask[s, p]`` says whether segment ``s`` is in split ``splits[p]`` (a segment can
    be in several: EGTEA's three split schemes); ``subset_mask[s, q]`` whether it is in
    the evaluation subset ``subsets[q]`` (of split ``subset_splits[q]``). ``split``, an
    [S] index into ``splits``, builds ``split_mask`` for tables with one split per segment.
    """

    uid: np.ndarray  # [S] int64
    video: np.ndarray  # [S] int32, index into ``videos``
    start_frame: np.ndarray  # [S] int64
    end_frame: np.ndarray  # [S] int64
    verb: np.ndarray  # [S] int32, -1: unlabelled
    noun: np.ndarray  # [S] int32
    action: np.ndarray  # [S] int32
    split_mask: np.ndarray | None = None  # [S, P] bool
    videos: list[str] = field(default_factory=list)
    splits: list[str] = field(default_factory=list)
    fps: float = 30.0
    ids: np.ndarray | None = None  # [S] str (object), the dataset's own keys
    subset_mask: np.ndarray | None = None  # [S, Q] bool
    subsets: list[str] = field(default_factory=list)
    subset_splits: list[str] = field(default_factory=list)
    split: InitVar[np.ndarray | None] = None
    _index: dict = field(default_factory=dict, repr=False, compare=False)

    COLUMNS = ("uid", "video", "start_frame", "end_frame", "verb", "noun", "action", "split_mask")

    def __post_init__(self, split: np.ndarray | None) -> None:
        if self.split_mask is None:
            if split is None:
                raise ConfigError("SegmentTable: give split_mask [S, P] or split [S]")
            split = np.asarray(split)
            self.split_mask = split[:, None] == np.arange(len(self.splits))[None, :]
        self.split_mask = np.asarray(self.split_mask, dtype=bool).reshape(len(self.uid), len(self.splits))
        if self.subset_mask is None:
            self.subset_mask = np.zeros((len(self.uid), 0), bool)
        if self.ids is not None:
            self.ids = np.asarray(self.ids, dtype=object)

    def __len__(self) -> int:
        return len(self.uid)

    # -- keys -----------------------------------------------------------------------

    @property
    def key_type(self) -> str:
        """``"id"`` when the dataset's keys are strings (stored in ``ids``), else ``"uid"``."""
        return "uid" if self.ids is None else "id"

    def id_of(self, row: int) -> int | str:
        """The dataset's own key of a row: a narration id string, or the integer uid."""
        return int(self.uid[row]) if self.ids is None else str(self.ids[row])

    def ids_of(self, rows: Iterable[int]) -> list:
        return [self.id_of(int(r)) for r in rows]

    def describe(self, row: int) -> str:
        """A row as error messages name it: ``UID 1234`` or ``segment P01_11_0``."""
        return f"UID {self.uid[row]}" if self.ids is None else f"segment {self.ids[row]}"

    def row_of(self, keys: Iterable) -> np.ndarray:
        """Row indices of segment keys: integers are uids, strings the dataset's own ids
        (on integer-keyed datasets a string of digits is the uid). MissingError names the
        first unknown key."""
        if not self._index:
            self._index["uid"] = {int(u): i for i, u in enumerate(self.uid)}
            self._index["id"] = {} if self.ids is None else {s: i for i, s in enumerate(self.ids)}
        rows = []
        for k in keys:
            if isinstance(k, (str, np.str_)) and self.ids is not None:
                row = self._index["id"].get(str(k))
            else:
                try:
                    row = self._index["uid"].get(int(k))
                except (TypeError, ValueError):
                    row = None
            if row is None:
                what = f"UID {k}" if self.ids is None else (f"segment {k!r}" if isinstance(k, str) else f"UID {k}")
                raise MissingError(f"{what}: not in the segment table ({len(self)} segments)")
            rows.append(row)
        return np.asarray(rows, dtype=np.int64)

    # -- splits and subsets ----------------------------------------------------------

    def _split_index(self, split: str) -> int:
        if split not in self.splits:
            raise MissingError(f"split {split!r}: not in the store (splits: {', '.join(self.splits)})")
        return self.splits.index(split)

    def in_split(self, split: str) -> np.ndarray:
        """[S] bool: membership of ``split``."""
        return self.split_mask[:, self._split_index(split)]

    def rows_in(self, split: str, labelled: bool = False) -> np.ndarray:
        """Row indices of one split in table order (only its labelled ones with ``labelled``)."""
        mask = self.in_split(split)
        return np.flatnonzero(mask & self.labelled if labelled else mask)

    def splits_of(self, row: int) -> list[str]:
        return [s for s, m in zip(self.splits, self.split_mask[row]) if m]

    def in_subset(self, subset: str) -> np.ndarray:
        """[S] bool: membership of an evaluation subset (``validation_unseen_participants``)."""
        if subset not in self.subsets:
            raise MissingError(f"subset {subset!r}: not in the store (subsets: {', '.join(self.subsets) or 'none'})")
        return self.subset_mask[:, self.subsets.index(subset)]

    @property
    def labelled(self) -> np.ndarray:
        """[S] bool: segments with a label (test segments have none)."""
        return self.action >= 0

    def start_seconds(self) -> np.ndarray:
        """[S] float64 start time of each segment in seconds."""
        return self.start_frame / self.fps


def default_splits(segments: SegmentTable) -> tuple[str, str]:
    """The (training, evaluation) splits a command uses when given none.

    Evaluation: the first labelled split (by name) called ``validation`` or ``validationN``;
    training: the split of the same scheme (``validationN`` -> ``trainingN``), e.g.
    EGTEA ``training1``/``validation1``, EPIC ``training``/``validation``.
    """
    labelled = [s for s in sorted(segments.splits) if (segments.in_split(s) & segments.labelled).any()]
    for s in labelled:
        if re.fullmatch(r"validation\d*", s):
            train = "training" + s[len("validation"):]
            if train in labelled:
                return train, s
    raise MissingError(f"no validationN/trainingN split pair with labels among the splits {segments.splits}; name the splits")


# ---------------------------------------------------------------------------------------
# CSV reading


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
    rows = _open_rows(path)
    if not rows:
        raise AnnotationError(f"{path}: empty class list")
    entries: list[tuple[int, str, int, int, str, str]] = []  # id, action name, verb, noun, verb word, noun word
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
    first: dict = {}  # key -> (raw, index in raw)
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
    keys = sorted(first, key=natural_key) if strings else sorted(first)
    videos = sorted({raw.video[j] for raw, j in first.values()})
    vindex = {v: i for i, v in enumerate(videos)}
    cols = {f: np.array([getattr(first[k][0], f)[first[k][1]] for k in keys]) for f in _FIELDS}
    row = {k: i for i, k in enumerate(keys)}
    split_mask = np.zeros((len(keys), len(splits)), bool)
    for p, raw in enumerate(splits.values()):
        split_mask[[row[k] for k in raw.keys], p] = True
    names = list(subsets or {})
    subset_mask = np.zeros((len(keys), len(names)), bool)
    for q, name in enumerate(names):
        split, path = subsets[name]
        members = split_mask[:, list(splits).index(split)]
        for n, k in read_id_list(path):
            r = row.get(k if strings else _key(k))
            if r is None or not members[r]:
                raise AnnotationError(f"{path}, row {n}: {k} is not a segment of split {split!r}")
            subset_mask[r, q] = True
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


# ---------------------------------------------------------------------------------------
# Histories and action text


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


_WORD_SEP = re.compile(r"[_/]+")


def class_words(name: str, colon: str = "keep") -> str:
    """A class name as plain lowercase words: ``Inspect/Read`` -> ``inspect read``.

    ``_`` and ``/`` separate words. ``:`` joins a compound: EGTEA writes it in reading
    order (``eating:utensil`` -> ``eating utensil``, ``colon="keep"``), EK55 and EK100
    write the head noun first (``pan:dust`` -> ``dust pan``, ``colon="reverse"``).
    """
    parts = [p for p in name.strip().lower().split(":") if p]
    if colon == "reverse":
        parts = parts[::-1]
    return " ".join(w for p in parts for w in _WORD_SEP.split(p) if w)


def pair_words(verb: str, noun: str, colon: str = "keep") -> str:
    """A (verb, noun) pair of class names as teacher text: ``verb <v> noun``."""
    return f"{class_words(verb, colon)} <v> {class_words(noun, colon)}"


def action_words(classes: ClassTable, action: int, colon: str = "keep") -> str:
    """One action as teacher text, from its own name's words: ``verb <v> noun``."""
    return pair_words(classes.surface_verbs[action], classes.surface_nouns[action], colon)


def action_text(classes: ClassTable, actions: Iterable[int], colon: str = "keep") -> str:
    """A sequence of action ids as teacher text: ``verb <v> noun <a> verb <v> noun``."""
    return " <a> ".join(action_words(classes, int(a), colon) for a in actions)
