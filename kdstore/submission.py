"""EPIC-KITCHENS anticipation leaderboard files from a prediction group.

The format of RULSTM's ``predictions_to_json`` and the challenges' validators::

    {"version": "0.1" (EK55) | "0.2" (EK100), "challenge": "action_anticipation",
     "sls_pt": 0-5, "sls_tl": 0-5, "sls_td": 0-5,            (version 0.2 only)
     "results": {"<segment id>": {"verb": {"0": p, ..., "<V-1>": p},
                                  "noun": {"0": p, ..., "<N-1>": p},
                                  "action": {"<verb>,<noun>": p, ...}}}}   (the top 100 actions)

Every segment of the split has an entry (the validators reject missing and unexpected
ids). Scores are probabilities: the softmax of the action logits, of the verb/noun heads
when the group has them, else the action probabilities summed per verb and noun; the
float64 values ``evaluate`` ranks, written exactly (shortest round-trip repr). Equal scores
are moved apart by a few ulps in ``kdstore.ranking``'s order (``ranked_scores``), so the
official scorer's ``np.argsort(scores)[::-1]`` ranks the file as ``evaluate`` does, whatever
numpy's sort does with ties.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import numpy as np

from .atomic import replacing
from .errors import DataError, MissingError
from .faults import crash_point
from .metrics import marginalise, softmax
from .ranking import ranked_scores
from .store import Store
from .predictions import HEADS, TeacherTargets

#: RULSTM's supervision levels (``predictions_to_json(..., sls=True)``): pretraining 1,
#: training labels 4, training data 3. Set your model's with ``sls``.
RULSTM_SLS = (1, 4, 3)
TOP_ACTIONS = 100


def submission_split(store: Store) -> str:
    """The split a submission covers by default: the store's one unlabelled split."""
    seg = store.segments
    test = [s for s in seg.splits if not (seg.in_split(s) & seg.labelled).any()]
    if len(test) != 1:
        raise MissingError(f"{store.path}: name the split to export (splits: {', '.join(seg.splits)})")
    return test[0]


def epic_entries(
    store: Store, name: str, split: str | None = None, version: str | None = None,
    sls: tuple[int, int, int] = RULSTM_SLS, fill_missing: bool = False, batch: int = 512,
) -> tuple[dict, Iterator[tuple[str, dict]]]:
    """(header, entries): the submission's top-level fields, and (id, scores) per segment.

    ``split`` defaults to the store's unlabelled split, ``version`` to "0.2" on EK100
    and "0.1" otherwise. A segment of the split without a prediction is an error unless
    ``fill_missing``, which writes zero scores for it as RULSTM does for the segments
    its loader discards.
    """
    seg, cls = store.segments, store.classes
    split = split or submission_split(store)
    version = version or ("0.2" if store.dataset == "ek100" else "0.1")
    if version not in ("0.1", "0.2"):
        raise DataError(f"EPIC submission version must be '0.1' (EK55) or '0.2' (EK100), found {version!r}")
    header = {"version": version, "challenge": "action_anticipation"}
    if version == "0.2":
        if len(sls) != 3 or not all(isinstance(x, int) and 0 <= x <= 5 for x in sls):
            raise DataError(f"EPIC submission: sls must be three levels 0..5 (pretraining, labels, data), found {list(sls)}")
        header |= dict(zip(("sls_pt", "sls_tl", "sls_td"), sls))
    group = store.group(name)
    rows = seg.rows_in(split)
    heads = tuple(h for h in HEADS if getattr(group, h) is not None)
    targets = TeacherTargets(group, ("logits", *heads), exact=True)  # the precision evaluate ranks
    missing = np.flatnonzero(targets.row_of_segment[rows] < 0)
    if len(missing) and not fill_missing:
        raise DataError(f"predictions {name!r} cover {len(rows) - len(missing)} of the {len(rows)} segments of split {split!r}"
                        f" (first missing: {seg.id_of(rows[missing[0]])}); pass fill_missing (--fill-missing) to write zero scores for them")
    pairs = [f"{v},{n}" for v, n in zip(cls.action_verb.tolist(), cls.action_noun.tolist())]
    k = min(TOP_ACTIONS, cls.num_actions)

    def scores(g: dict, act: np.ndarray, task: str) -> np.ndarray:
        if f"{task}_logits" in g:
            return softmax(g[f"{task}_logits"])
        index, num = (cls.action_verb, cls.num_verbs) if task == "verb" else (cls.action_noun, cls.num_nouns)
        return marginalise(act, index, num)

    def entries() -> Iterator[tuple[str, dict]]:
        for lo in range(0, len(rows), batch):
            r = rows[lo : lo + batch]
            g = targets.gather(r)
            have = g["present"][:, None]  # absent segments (fill_missing) get zero scores
            act = softmax(g["logits"])  # [b, A]
            verb = _by_class(*ranked_scores(scores(g, act, "verb")), have)  # [b, V]
            noun = _by_class(*ranked_scores(scores(g, act, "noun")), have)  # [b, N]
            top, top_p = ranked_scores(act, k)  # [b, k] classes best first, their scores
            top_p = np.where(have, top_p, 0.0)
            for i, row in enumerate(r):
                yield str(seg.id_of(row)), {
                    "verb": {str(j): x for j, x in enumerate(verb[i].tolist())},
                    "noun": {str(j): x for j, x in enumerate(noun[i].tolist())},
                    "action": {pairs[a]: x for a, x in zip(top[i].tolist(), top_p[i].tolist())},
                }

    return header, entries()


def _by_class(classes: np.ndarray, values: np.ndarray, have: np.ndarray) -> np.ndarray:
    """[b, C] ``values [b, C]`` put back at their ``classes [b, C]``; zeros where not ``have [b, 1]``."""
    out = np.zeros(values.shape)
    np.put_along_axis(out, classes, values, axis=1)
    return np.where(have, out, 0.0)


def write_epic_submission(store: Store, name: str, out: str | Path, **options) -> dict:
    """Write the leaderboard JSON of ``teacher/<name>`` to ``out`` (streamed, one segment at
    a time, renamed into place when whole); returns the header and the number of segments written."""
    header, entries = epic_entries(store, name, **options)
    n = 0
    with replacing(out) as f:
        f.write(json.dumps(header)[:-1] + ', "results": {')
        for key, value in entries:
            f.write(("" if n == 0 else ", ") + json.dumps(key) + ": " + json.dumps(value))
            n += 1
            crash_point("export.segment")
        f.write("}}\n")
    return {**header, "segments": n}
