"""Prediction groups (``teacher/<name>``): writing them, with the top-K / log-sum-exp
reduction that distillation reads, and reading them, as a group (:class:`Predictions`) or as
teacher targets gathered by segment row (:class:`TeacherTargets`).

A group holds per-UID logits of any kind of model (a teacher, a student, a baseline, an
ensemble); ``Store.write_predictions`` and ``Store.group`` are the entry points.

Every consumer of stored predictions (the student's batches, ``evaluate``, ``report``, the
demo, the torch dataset) reads them through :class:`TeacherTargets`: it opens the arrays a
consumer asks for once, and :meth:`TeacherTargets.gather` returns them for a batch of segment
rows in one vectorised read each, with a presence mask. Segments without a prediction are
never read from another UID: their rows hold zeros and ``present`` is False for them.
"""

from __future__ import annotations

import time
from typing import Iterable, Sequence

import numpy as np

from .errors import ConfigError, DataError, MissingError, StoreFormatError
from .layout import check_name
from .provenance import provenance_entry
from .ranking import label_ranks, rank_order

DEFAULT_LSE_TEMPERATURES = (1.0, 2.0, 4.0, 10.0)
# Predictions groups keep student predictions too: ``kind`` tells them apart.
PREDICTION_KINDS = ("teacher", "student", "baseline")
WRITE_BLOCK_ROWS = 2048  # rows of predictions checked, reduced and converted at a time
# Stored dtypes of a prediction group's arrays. Scores (logits, verb/noun heads) are float32
# (or float64, ``scores_dtype``): evaluate and export rank them, and float16 would tie distinct
# scores (EK100's 3-gram: 82 validation labels tied with the 5th-best class). The KD kernel
# reads float32 top-K values and LSE, taken from the stored logits. [CLS] features are
# regression targets, never ranked: float16. Groups written with float16 logits are read as they are.
PREDICTION_DTYPES = {"logits": np.float32, "verb_logits": np.float32, "noun_logits": np.float32, "features": np.float16}


def write_predictions(
    store, name: str, uids: Sequence[int | str] | np.ndarray, logits: np.ndarray, *,
    features: np.ndarray | None = None, verb_logits: np.ndarray | None = None,
    noun_logits: np.ndarray | None = None, topk: int = 50,
    lse_temperatures: Sequence[float] = DEFAULT_LSE_TEMPERATURES, kind: str = "teacher",
    config: dict | None = None, metrics: dict | None = None, log: list | None = None,
    overwrite: bool = False, provenance: dict | None = None, block_rows: int = WRITE_BLOCK_ROWS,
    scores_dtype: str = "float32",
) -> Predictions:
    """Check and atomically write per-UID predictions as ``teacher/<name>``.

    ``uids`` are integer uids or the dataset's own ids (``P01_11_0``); rows are stored
    by uid.

    Only UIDs with a prediction are stored; any other segment is absent. The top-K
    logits, their class indices and the full log-sum-exp at each temperature in
    ``lse_temperatures`` are derived here, so top-K distillation reads K numbers a UID.
    Inputs are checked, reduced and converted ``block_rows`` rows at a time, so the
    memory this takes beyond its inputs is the top-K and LSE arrays plus a few
    [block_rows, classes] temporaries.

    ``scores_dtype`` ("float32" or "float64") is the dtype of the stored logits and
    verb/noun logits: float32 holds a network's scores exactly; a model that computes
    in float64 (the n-gram) keeps its ranking only in float64. Top-K values and LSE
    are float32 either way (what the KD kernel reads), taken from the stored logits.
    """
    dtypes = _dtypes(name, scores_dtype, kind)
    rows, uids, inputs = _checked_inputs(
        store, 
        name, uids, logits, verb_logits, noun_logits, features, dtypes, block_rows)
    A = store.classes.num_actions
    k = min(int(topk), A)
    if k < 1:
        raise DataError(f"predictions {name!r}: topk must be >= 1, found {topk}")
    order = np.argsort(rows, kind="stable")  # keep groups in segment-table order
    temps = [float(t) for t in lse_temperatures]
    vals, idx, lse = _topk_and_lse(inputs["logits"], order, k, temps, dtypes["logits"], block_rows)
    # top-K values and LSE are taken from the logits stored (float32: they agree to the bit)
    arrays = {"uids": uids[order], "logits": _Reordered(inputs["logits"], order, dtypes["logits"], block_rows),
              "topk_values": vals, "topk_indices": idx, "lse": lse}
    for key in ("features", "verb_logits", "noun_logits"):
        if key in inputs:
            arrays[key] = _Reordered(inputs[key], order, dtypes[key], block_rows)
    attrs = _attrs(store, kind, A, k, temps, config, metrics, log)
    store.backend.write_group(f"teacher/{name}", arrays, attrs, overwrite=overwrite,
                             provenance=provenance or provenance_entry("write_predictions", group=f"teacher/{name}"))
    return Predictions(store, name)

def _checked_inputs(
    store, name: str, uids, logits, verb_logits, noun_logits, features, dtypes: dict, block_rows: int,
) -> tuple[np.ndarray, np.ndarray, dict[str, np.ndarray]]:
    """(segment rows, uids, input arrays by key, logits first) of ``write_predictions``,
    checked: a valid name, known and distinct UIDs, each array's shape, finite values
    within the range of the dtype it is stored in."""
    check_name(name)
    seg = store.segments
    rows = seg.row_of(np.asarray(uids).tolist())  # uids or the dataset's ids; MissingError names an unknown one
    uids = seg.uid[rows]
    logits = np.asarray(logits)
    if len(np.unique(rows)) != len(rows):
        r, c = np.unique(rows, return_counts=True)
        raise DataError(f"predictions {name!r}: {seg.describe(r[c > 1][0])} given more than once")
    if block_rows < 1:
        raise ConfigError(f"predictions {name!r}: block_rows must be >= 1, found {block_rows}")
    A = store.classes.num_actions
    expect = {"logits": (logits, A)}
    if verb_logits is not None:
        expect["verb_logits"] = (np.asarray(verb_logits), store.classes.num_verbs)
    if noun_logits is not None:
        expect["noun_logits"] = (np.asarray(noun_logits), store.classes.num_nouns)
    if features is not None:
        expect["features"] = (np.asarray(features), None)
    for key, (arr, width) in expect.items():
        _check_array(f"predictions {name!r}: {key}", arr, width, uids, A, dtypes[key], block_rows)
    return rows, uids, {key: arr for key, (arr, _) in expect.items()}

def _attrs(store, kind: str, num_classes: int, k: int, temps: list[float], config: dict | None,
           metrics: dict | None, log: list | None) -> dict:
    """The attributes of a prediction group."""
    return {
        "kind": kind,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "num_classes": num_classes,
        "topk": k,
        "lse_temperatures": temps,
        "segments_sha256": store.manifest["segments_sha256"],
        "config": config or {},
        "metrics": metrics or {},
        "log": log or [],
    }

def _check_finite(arr: np.ndarray, uids: np.ndarray, what: str) -> None:
    if arr.dtype.kind == "f" and not np.isfinite(arr).all():
        row = int(np.flatnonzero(~np.isfinite(arr).all(axis=tuple(range(1, arr.ndim))))[0])
        raise DataError(f"{what}: UID {uids[row]} has NaN or inf")



def _check_range(arr: np.ndarray, uids: np.ndarray, what: str, dtype) -> None:
    top = float(np.finfo(dtype).max)
    if arr.size and arr.dtype.kind in "fiu" and np.abs(arr).max() > top:
        row = int(np.flatnonzero((np.abs(arr) > top).any(axis=1))[0])
        raise DataError(f"{what}: UID {uids[row]} has a value beyond the {np.dtype(dtype).name} range (|x| > {top:g}) it is stored in")


class _Reordered:
    """``array[order]`` cast to ``dtype`` as an ArraySource, gathered ``block_rows`` rows at a time."""

    def __init__(self, array: np.ndarray, order: np.ndarray, dtype, block_rows: int):
        self.array, self.order, self.dtype, self.block_rows = array, order, np.dtype(dtype), block_rows
        self.shape = (len(order), *array.shape[1:])

    def blocks(self):
        for lo in range(0, len(self.order), self.block_rows):
            yield self.array[self.order[lo : lo + self.block_rows]].astype(self.dtype)


def _dtypes(name: str, scores_dtype: str, kind: str) -> dict:
    """The stored dtype of each prediction array, after checking ``scores_dtype`` and ``kind``."""
    if scores_dtype not in ("float32", "float64"):
        raise DataError(f"predictions {name!r}: scores_dtype must be 'float32' or 'float64', found {scores_dtype!r}")
    dtypes = {**PREDICTION_DTYPES, "logits": np.dtype(scores_dtype), "verb_logits": np.dtype(scores_dtype),
              "noun_logits": np.dtype(scores_dtype)}
    if kind not in PREDICTION_KINDS:
        raise DataError(f"predictions {name!r}: kind must be one of {PREDICTION_KINDS}, found {kind!r}")
    return dtypes


def _check_array(what: str, arr: np.ndarray, width: int | None, uids: np.ndarray, num_actions: int,
                            dtype, block_rows: int) -> None:
    """Raise DataError unless ``arr`` is [len(uids), width] (width None: any) with finite values
    that ``dtype`` holds, checked ``block_rows`` rows at a time."""
    if arr.ndim != 2 or arr.shape[0] != len(uids) or (width is not None and arr.shape[1] != width):
        want = f"[{len(uids)}, {width if width is not None else 'H'}]"
        raise DataError(f"{what} has shape {list(arr.shape)}, expected {want} (store has {num_actions} actions)")
    for lo in range(0, len(arr), block_rows):
        sl = slice(lo, lo + block_rows)
        _check_finite(arr[sl], uids[sl], what)
        # a larger finite value would be read back as inf
        _check_range(arr[sl], uids[sl], what, dtype)


def _topk_and_lse(logits: np.ndarray, order: np.ndarray, k: int, temps: list[float], dtype,
                  block_rows: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Top-``k`` values [N, k] float32 and class indices [N, k] int32 of ``logits[order]`` cast
    to ``dtype`` (as stored), ranked as evaluate and export rank, and its log-sum-exp at each
    temperature [N, len(temps)] float32."""
    vals, idx = np.empty((len(order), k), np.float32), np.empty((len(order), k), np.int32)
    lse = np.empty((len(order), len(temps)), np.float32)
    # row blocks: every temporary is [block_rows, A], whatever the number of rows
    for lo in range(0, len(order), block_rows):
        x = logits[order[lo : lo + block_rows]].astype(dtype)  # [b, A], as stored
        bi = rank_order(x, k)  # [b, k] the ranking rule of evaluate and export
        idx[lo : lo + len(x)], vals[lo : lo + len(x)] = bi, np.take_along_axis(x, bi, axis=1)  # values to float32
        for j, t in enumerate(temps):
            lse[lo : lo + len(x), j] = _logsumexp(x / t)
    return vals, idx, lse


def _logsumexp(x: np.ndarray) -> np.ndarray:
    m = x.max(axis=1, keepdims=True)
    return (m + np.log(np.exp(x - m).sum(axis=1, keepdims=True)))[:, 0]


def add_lse(store, name: str, temperatures: Sequence[float], provenance: dict | None = None,
            block_rows: int = WRITE_BLOCK_ROWS) -> list[float]:
    """Add log-sum-exp columns at ``temperatures`` to the group ``teacher/<name>`` of the open
    store ``store``; returns the temperatures added (those already stored are skipped).

    The columns are computed from the stored logits as ``write_predictions`` computes them
    (in the logits' stored dtype, ``block_rows`` rows at a time), so they equal those of a
    group written with these temperatures. The group is rewritten through the backend's
    atomic group commit, with ``provenance`` (default: an ``add_lse`` record): a crash
    leaves the old group.
    """
    temps = [float(t) for t in temperatures]
    bad = next((t for t in temps if not (np.isfinite(t) and t > 0)), None)
    if bad is not None:
        raise ConfigError(f"teacher/{name}: a log-sum-exp temperature must be positive, found {bad:g}")
    with store.backend.writing():  # no other writer replaces the group between the read and the commit
        group = store.group(name)
        stored = [float(t) for t in group.lse_temperatures]
        new = [t for t in dict.fromkeys(temps) if not group.has_lse(t)]
        if not new:
            return []
        logits = _full_logits(store, group)  # [P, A] as stored
        lse = np.empty((len(group), len(stored) + len(new)), np.float32)  # [P, nT + new]
        lse[:, : len(stored)] = group.lse
        for lo in range(0, len(logits), block_rows):
            x = np.asarray(logits[lo : lo + block_rows])  # [b, A], the stored dtype, as the writer reduces it
            for j, t in enumerate(new):
                lse[lo : lo + len(x), len(stored) + j] = _logsumexp(x / t)
        arrays = {key: group._array(key) for key in store.backend.children(group.key)}
        arrays["lse"] = lse
        attrs = {**group.attrs, "lse_temperatures": stored + new}
        store.backend.write_group(group.key, arrays, attrs, overwrite=True, provenance=provenance or provenance_entry(
            "add_lse", group=group.key, temperatures=new))
    return new


def _full_logits(store, group: Predictions) -> np.ndarray:
    """The group's stored logits [P, A]; DataError when it holds none over every class."""
    key, actions = f"{group.key}/logits", store.classes.num_actions
    shape = store.backend.array_info(key)[0] if store.backend.has(key) else None
    if shape is None or len(shape) != 2 or shape[1] != actions:
        found = "no logits" if shape is None else f"logits of shape {list(shape)}"
        raise DataError(f"{group.key}: holds {found}, not the full logits [P, {actions}] that log-sum-exp columns are"
                        " computed from; rewrite the group with write_predictions")
    return group.logits



class Predictions:
    """A ``teacher/<name>`` group: per-UID logits, top-K, LSE and features, memory-mapped."""

    def __init__(self, store, name: str):
        self.store, self.name = store, name  # an open Store
        self.key = f"teacher/{name}"
        self.attrs = store.backend.attrs(self.key)
        if not store.made_for_segments(self.attrs.get("segments_sha256")):
            raise StoreFormatError(
                f"{store.path}: predictions {name!r} were made for other segments (other uids, ids, labels or splits:"
                f" segments sha256 {str(self.attrs.get('segments_sha256'))[:12]}, store {store.manifest.get('segments_sha256', '')[:12]})"
            )
        self.uids = np.array(self._array("uids"))
        # segment row -> prediction row (-1: absent), for vectorised gathers by segment row
        seg_uid = store.segments.uid
        order = np.argsort(self.uids)
        pos = np.searchsorted(self.uids, seg_uid, sorter=order).clip(0, max(len(self.uids) - 1, 0))
        hit = (self.uids[order[pos]] == seg_uid) if len(self.uids) else np.zeros(len(seg_uid), bool)
        self.row_of_segment = np.where(hit, order[pos] if len(self.uids) else -1, -1).astype(np.int64)

    def _array(self, key: str) -> np.ndarray:
        return self.store.backend.memmap(f"{self.key}/{key}")

    def _optional(self, key: str) -> np.ndarray | None:
        return self._array(key) if self.store.backend.has(f"{self.key}/{key}") else None

    kind = property(lambda self: self.attrs["kind"])
    config = property(lambda self: self.attrs.get("config", {}))
    metrics = property(lambda self: self.attrs.get("metrics", {}))
    topk = property(lambda self: self.attrs["topk"])
    lse_temperatures = property(lambda self: self.attrs["lse_temperatures"])
    logits = property(lambda self: self._array("logits"))  # [P, A] fp32 or fp64 (an fp16 group is read as stored)
    topk_values = property(lambda self: self._array("topk_values"))  # [P, K] fp32
    topk_indices = property(lambda self: self._array("topk_indices"))  # [P, K] int32
    lse = property(lambda self: self._array("lse"))  # [P, nT] fp32
    features = property(lambda self: self._optional("features"))  # [P, H] fp16
    verb_logits = property(lambda self: self._optional("verb_logits"))
    noun_logits = property(lambda self: self._optional("noun_logits"))

    def __len__(self) -> int:
        return len(self.uids)

    @property
    def segment_rows(self) -> np.ndarray:
        """[P] the segment-table row of each prediction row."""
        return self.store.segments.row_of(self.uids.tolist())

    def ids(self) -> list:
        """The dataset's own id of each prediction row (narration ids, or the uids)."""
        return self.store.segments.ids_of(self.segment_rows)

    @property
    def present(self) -> np.ndarray:
        """[N] bool over the store's segments: which have a prediction."""
        return self.row_of_segment >= 0

    def has_lse(self, temperature: float) -> bool:
        """Whether a log-sum-exp column at ``temperature`` is stored."""
        return self._lse_index(temperature) is not None

    def _lse_index(self, temperature: float) -> int | None:
        return next((i for i, t in enumerate(self.lse_temperatures) if abs(t - temperature) < 1e-9), None)

    def lse_column(self, temperature: float) -> int:
        i = self._lse_index(temperature)
        if i is not None:
            return i
        raise MissingError(
            f"predictions {self.name!r}: no log-sum-exp stored at T={temperature} (have {self.lse_temperatures});"
            f" add it with `kdstore add-lse {self.store.path} -p {self.name} -T {temperature:g}`"
        )

    def predict(self, key: int | str, k: int = 5) -> dict:
        """The top-``k`` actions for one segment (its dataset id, e.g. ``"P01_11_0"``, or its
        uid) with names and probabilities, and the true label (None for an unlabelled one)."""
        if int(k) < 1:
            raise DataError(f"top-k: k must be >= 1, found {k}")
        seg = self.store.segments
        row = int(seg.row_of([key])[0])
        prow = int(self.row_of_segment[row])
        cls = self.store.classes
        true = int(seg.action[row])
        result = {
            "id": seg.id_of(row),
            "predictions": self.name,
            "kind": self.kind,
            "splits": seg.splits_of(row),
            "video": seg.videos[seg.video[row]],
            "true": {"action": true, "name": cls.action_names[true]} if true >= 0 else None,
            "present": prow >= 0,
        }
        if prow < 0:
            return result
        logits = self.logits[prow].astype(np.float64)
        p = np.exp(logits - logits.max())
        p /= p.sum()
        top = rank_order(p[None], k)[0]
        result["top"] = [{"action": int(a), "name": cls.action_names[a], "prob": float(p[a])} for a in top]
        if true >= 0:
            result["true"]["prob"] = float(p[true])
            result["true"]["rank"] = int(label_ranks(p[None], [true])[0]) + 1
        feats = self.features
        if feats is not None:
            result["feature_norm"] = float(np.linalg.norm(feats[prow].astype(np.float32)))
        return result


# What a consumer may ask for, and the dtype it gets: [B, A] logits, [B, k] top-K logits and
# their class indices, [B] log-sum-exp of logits / T, [B, H] [CLS] features, [B, V] / [B, N]
# logits of a model's own verb and noun heads (groups of models without them store none).
FIELDS = {"logits": np.float32, "topk_values": np.float32, "topk_indices": np.int32, "lse": np.float32,
          "features": np.float32, "verb_logits": np.float32, "noun_logits": np.float32}
HEADS = ("verb_logits", "noun_logits")
_SCORES = {"logits", *HEADS}  # the fields ``exact`` reads at their stored precision
_TOPK = {"topk_values", "topk_indices"}  # the fields ``k`` cuts


class TeacherTargets:
    """Selected arrays of one prediction group, gathered by segment row.

    Args:
        group: the prediction group (``Store.group(name)``).
        fields: names from :data:`FIELDS`.
        temperature: the temperature of ``lse`` (required when ``lse`` is asked for; unused otherwise).
        k: how many of the stored top-K columns ``topk_values``/``topk_indices`` return
            (default: all stored; unused without them).
        exact: return logits and verb/noun logits at their stored precision when it is
            above float32 (a float64 group's scores, which evaluate and export rank);
            otherwise every field has the dtype of :data:`FIELDS`.
        calibrated: divide the logits (``logits``, ``topk_values``, and ``lse``'s) by the
            temperature ``kdstore calibrate`` stored with the group (kdstore.calibration).

    Raises:
        ConfigError: an unknown field, ``lse`` without a temperature, ``k`` above the stored
            top-K, or a group whose class count differs from its store's.
        MissingError: ``features`` of a group stored without them, ``lse`` at a temperature
            the group has no column for, or ``calibrated`` for a group without a fitted temperature.
    """

    def __init__(self, group: Predictions, fields: Iterable[str], temperature: float | None = None,
                 k: int | None = None, exact: bool = False, calibrated: bool = False):
        self.group, self.fields = group, tuple(dict.fromkeys(fields))
        unknown = [f for f in self.fields if f not in FIELDS]
        if unknown:
            raise ConfigError(f"teacher targets: unknown field(s) {unknown}; expected some of {list(FIELDS)}")
        actions = group.store.classes.num_actions
        if group.attrs["num_classes"] != actions:
            raise ConfigError(f"teacher/{group.name}: {group.attrs['num_classes']} classes, store has {actions}")
        self.k = group.topk if k is None else int(k)
        if _TOPK & set(self.fields) and not 1 <= self.k <= group.topk:
            raise ConfigError(f"teacher/{group.name}: stores top-{group.topk}, asked for top-{self.k}")
        self.row_of_segment = group.row_of_segment  # [N] segment row -> prediction row, -1: absent
        self._arrays: dict[str, np.ndarray] = {}
        self._dtypes: dict[str, np.dtype] = {}
        self._lse_col = None
        self.scale = 1.0  # logits are divided by it
        if calibrated:
            self.scale = stored_temperature(group)
        for field in self.fields:
            if field == "lse":
                if temperature is None:
                    raise ConfigError(f"teacher/{group.name}: 'lse' needs a temperature")
                self._lse_t = temperature * self.scale
                if not calibrated or group.has_lse(self._lse_t):
                    self._lse_col = group.lse_column(self._lse_t)  # MissingError names the stored ones
                else:  # no stored column at T x the fitted temperature: computed from the logits rows
                    self._open("logits_for_lse", group.logits, exact=False)
            self._open(field, getattr(group, field), exact=exact)

    def _open(self, field: str, a: np.ndarray | None, exact: bool) -> None:
        if a is None:
            raise MissingError(f"teacher/{self.group.name}: stores no {field} (it was written without them)")
        # memmaps opened once; an empty group gets one zero row for the masked-out reads
        self._arrays[field] = a if len(a) else np.zeros((1, *a.shape[1:]), a.dtype)
        if field in FIELDS:
            exact_here = exact and field in _SCORES
            self._dtypes[field] = np.promote_types(a.dtype, FIELDS[field]) if exact_here else np.dtype(FIELDS[field])

    def width(self, field: str) -> int:
        """Columns of ``field`` as :meth:`gather` returns it (0 for the per-row ``lse``)."""
        if field == "lse":
            return 0
        return self.k if field in _TOPK else int(self._arrays[field].shape[1])

    def gather(self, segment_rows: np.ndarray) -> dict[str, np.ndarray]:
        """``present [B] bool`` and each field for a batch of segment rows (zeros where absent)."""
        prow = self.row_of_segment[np.asarray(segment_rows)]  # [B]
        present = prow >= 0
        take = np.where(present, prow, 0)  # absent rows read row 0, then are zeroed
        out = {"present": present}
        for field, a in self._arrays.items():
            if field == "logits_for_lse":
                continue
            if field == "lse" and self._lse_col is None:
                z = self._arrays["logits_for_lse"][take].astype(np.float64) / self._lse_t  # [B, A]
                m = z.max(1)
                x = m + np.log(np.exp(z - m[:, None]).sum(1))  # [B]
            elif field == "lse":
                x = a[take, self._lse_col]  # [B]
            elif field in _TOPK:
                x = a[take, : self.k]  # [B, k]
            else:
                x = a[take]  # [B, A] or [B, H]
            if self.scale != 1.0 and field in ("logits", "topk_values"):
                x = x / np.float32(self.scale)
            mask = present if x.ndim == 1 else present[:, None]
            out[field] = np.where(mask, x, 0).astype(self._dtypes[field], copy=False)
        return out


def present_scores(group: Predictions, segment_rows: np.ndarray) -> tuple[dict[str, np.ndarray | None], np.ndarray]:
    """({"logits": [n, A], "verb_logits": [n, V] or None, "noun_logits": [n, N] or None},
    segment rows [n]) of those ``segment_rows`` the group predicts, at their stored precision
    (float32, or float64 for a float64 group); a head is None where the group stores none."""
    return _present(group, segment_rows, ("logits", *(h for h in HEADS if getattr(group, h) is not None)))


def present_logits(group: Predictions, segment_rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(logits [n, A] float32 or float64 as stored, segment rows [n]) of those ``segment_rows`` the group predicts."""
    scores, rows = _present(group, segment_rows, ("logits",))
    return scores["logits"], rows


def _present(group: Predictions, segment_rows: np.ndarray, fields: tuple[str, ...]) -> tuple[dict, np.ndarray]:
    rows = np.asarray(segment_rows)
    g = TeacherTargets(group, fields, exact=True).gather(rows)
    keep = g["present"]
    return {f: g[f][keep] if f in g else None for f in ("logits", *HEADS)}, rows[keep]


def stored_temperature(group: Predictions) -> float:
    """The temperature ``calibrate`` stored with ``group``; MissingError naming the command when none."""
    cal = group.attrs.get("calibration")
    if not cal:
        raise MissingError(f"teacher/{group.name}: no fitted temperature; run `kdstore calibrate STORE -p {group.name}` first")
    return float(cal["temperature"])
