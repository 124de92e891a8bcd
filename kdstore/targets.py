"""Teacher targets by segment row: the one reader of a prediction group's per-UID arrays.

Every consumer of stored predictions (the student's batches, ``evaluate``, ``report``, the
demo, the torch dataset) reads them through :class:`TeacherTargets`: it opens the arrays a
consumer asks for once, and :meth:`TeacherTargets.gather` returns them for a batch of segment
rows in one vectorised read each, with a presence mask. Segments without a prediction are
never read from another UID: their rows hold zeros and ``present`` is False for them.
"""

from __future__ import annotations

from typing import Iterable

import numpy as np

from .errors import ConfigError, MissingError
from .store import Predictions

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
                if not calibrated or any(abs(t - self._lse_t) < 1e-9 for t in group.lse_temperatures):
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
