"""The dataset's class and segment tables: what every store holds and every reader indexes.

``ClassTable`` names the actions, verbs and nouns and maps each action to its (verb, noun);
``SegmentTable`` holds the segments as column arrays with their splits and evaluation
subsets. kdstore/rulstm.py reads them from a RULSTM/AVT annotation folder.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import InitVar, dataclass, field
from typing import Iterable

import numpy as np

from .errors import ConfigError, MissingError


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


def segment_problems(classes: ClassTable, seg: SegmentTable) -> list[str]:
    """What is wrong with a segment table for these classes, one line per kind of problem
    naming its first segment: action ids out of range, labels that disagree with the class
    table, repeated UIDs or ids, segments that end before they start. A store refuses to be
    created or read with the first (``Store``); ``validate`` lists them all."""
    out = []
    bad = np.flatnonzero((seg.action < -1) | (seg.action >= classes.num_actions))
    if len(bad):
        out.append(f"{seg.describe(bad[0])}: unknown action id {seg.action[bad[0]]} (classes: 0..{classes.num_actions - 1}, -1: unlabelled)")
    known = (seg.action >= -1) & (seg.action < classes.num_actions)
    labelled, a = known & (seg.action >= 0), seg.action.clip(0, max(classes.num_actions - 1, 0))
    bad = np.flatnonzero(labelled & ((classes.action_verb[a] != seg.verb) | (classes.action_noun[a] != seg.noun)))
    bad = np.concatenate([bad, np.flatnonzero((seg.action == -1) & ((seg.verb != -1) | (seg.noun != -1)))])
    if len(bad):
        r = bad[0]
        out.append(f"{seg.describe(r)}: action {seg.action[r]} with verb {seg.verb[r]} noun {seg.noun[r]} disagrees with the class table")
    if len(np.unique(seg.uid)) != len(seg.uid):
        u, c = np.unique(seg.uid, return_counts=True)
        out.append(f"UID {u[c > 1][0]}: appears more than once in the segment table")
    if seg.ids is not None and len(set(seg.ids)) != len(seg.ids):
        dup = next(k for k, c in Counter(seg.ids).items() if c > 1)
        out.append(f"segment {dup}: appears more than once in the segment table")
    bad = np.flatnonzero(seg.end_frame < seg.start_frame)
    if len(bad):
        out.append(f"{seg.describe(bad[0])}: ends at frame {seg.end_frame[bad[0]]} before it starts at {seg.start_frame[bad[0]]}")
    return out
