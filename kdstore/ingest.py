"""Annotations -> a new store."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from .rulstm import AnnotationFolder, guess_dataset, load_annotations
from .provenance import provenance_entry
from .store import Store


def ingest(
    annotations: str | Path,
    store: str | Path,
    splits: Sequence[str] | None = None,
    fps: float | None = None,
    dataset: str | None = None,
    backend: str | None = None,
    overwrite: bool = False,
) -> Store:
    """Read a RULSTM/AVT annotation folder and create a store holding its classes, its
    segments (every split CSV by default) and its evaluation subsets."""
    classes, segments = load_annotations(annotations, splits=splits, fps=fps, dataset=dataset)
    inputs = AnnotationFolder.scan(annotations).inputs(segments.splits)
    return Store.create(
        store, classes, segments, backend=backend, overwrite=overwrite,
        dataset=dataset or guess_dataset(classes), provenance=provenance_entry("ingest", inputs),
    )
