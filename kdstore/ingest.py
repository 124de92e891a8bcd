"""Annotations -> a new store."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .annotations import guess_dataset, load_annotations
from .store import Store, provenance_entry


def ingest(
    annotations: str | Path,
    store: str | Path,
    splits: Sequence[str] | None = None,
    fps: float | None = None,
    dataset: str | None = None,
    backend: str | None = None,
    overwrite: bool = False,
) -> Store:
    """Read a RULSTM/AVT annotation folder and create a store holding its classes and segments."""
    annotations = Path(annotations)
    classes, segments = load_annotations(annotations, splits=splits, fps=fps, dataset=dataset)
    inputs = [annotations / "actions.csv", *(annotations / f"{s}.csv" for s in segments.splits)]
    inputs += [p for p in (annotations / "EPIC_many_shot_verbs.csv", annotations / "EPIC_many_shot_nouns.csv") if p.exists()]
    return Store.create(
        store, classes, segments, backend=backend, overwrite=overwrite,
        dataset=dataset or guess_dataset(classes), provenance=provenance_entry("ingest", inputs),
    )
