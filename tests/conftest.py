"""Shared fixtures: synthetic and real annotations, and ready-made stores.

Fixtures
--------
``synthetic_dir``      a fresh folder with a small synthetic EGTEA-style dataset
                       (``actions.csv``, ``training1.csv``, ``validation1.csv``; 12 videos).
``synthetic_tables``   ``(classes, segments)`` of ``synthetic_dir`` loaded at 24 fps.
``egtea_dir``          the real EGTEA splits in ``../shared/data/egtea``; skips when absent.
``make_synthetic``     :func:`synthetic_annotations` (session-scoped factory).
``make_store``         :func:`build_store`, a factory of stores with features and teachers.
``teacher_ann``        the teacher tests' synthetic dataset (24 videos, module-scoped: read only);
                       :func:`annotation_store` makes a store of it.

Stores are real files on disk (no mocks). Everything is deterministic (fixed seeds).
The synthetic fixtures are function-scoped, so a test may edit the files freely; for
hypothesis tests (which refuse function-scoped fixtures) call :func:`synthetic_annotations`
and :func:`build_store` through the session-scoped ``make_synthetic`` / ``make_store`` instead.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from kdstore.rulstm import load_annotations  # noqa: E402
from kdstore.tables import ClassTable, SegmentTable  # noqa: E402
from kdstore.store import Store  # noqa: E402
from kdstore.synthetic import SyntheticConfig, generate_annotations, synthetic_features  # noqa: E402

#: Real EGTEA splits (RULSTM CSVs), outside the repository; tests using them skip when absent.
EGTEA_DIR = Path(__file__).parents[1].parent / "shared/data/egtea"

#: Config of the small synthetic dataset behind ``synthetic_dir`` (12 videos, ~170 segments).
SMALL = SyntheticConfig(n_videos=12)

#: Both backends, as store-path suffixes (``Store.create`` picks the backend from it).
SUFFIXES = (".zarr", ".h5")


def synthetic_annotations(directory: str | Path, cfg: SyntheticConfig = SMALL) -> tuple[Path, ClassTable, SegmentTable]:
    """Write a synthetic dataset into ``directory``; return it with its (classes, segments)."""
    d = generate_annotations(directory, cfg)
    classes, segments = load_annotations(d, fps=24.0)
    return d, classes, segments


def build_store(
    path: str | Path,
    classes: ClassTable,
    segments: SegmentTable,
    *,
    features: Sequence[tuple[str, int, str]] = (("feat", 16, "float16"),),
    teachers: Sequence[str] = ("teacher",),
    teacher_split: str | None = "training1",
    teacher_hidden: int = 8,
    rate: float = 2.0,
    seed: int = 0,
) -> Store:
    """Create a store at ``path`` (backend from the suffix: ``.h5`` -> HDF5, else Zarr).

    - ``features``: one ``video/<name>`` feature set per ``(name, dim, dtype)``, made by
      :func:`kdstore.synthetic.synthetic_features` at ``rate`` frames a second for every
      video of ``segments``.
    - ``teachers``: one ``teacher/<name>`` group each, with random (seeded) logits over
      the store's actions and ``[P, teacher_hidden]`` features, for the UIDs of
      ``teacher_split`` (every UID when None), so the other split is absent.
    """
    store = Store.create(path, classes, segments)
    for name, dim, dtype in features:
        w = store.video_writer(name, dim, dtype=dtype, frame_rate=rate)
        for video, (f, t) in synthetic_features(classes, segments, dim=dim, rate=rate, seed=seed).items():
            w.put(video, f, t)
        w.commit()
    rng = np.random.default_rng(seed)
    rows = np.arange(len(segments)) if teacher_split is None else segments.rows_in(teacher_split)
    for name in teachers:
        logits = rng.normal(size=(len(rows), classes.num_actions)).astype(np.float32) * 3
        hidden = rng.normal(size=(len(rows), teacher_hidden)).astype(np.float32)
        store.write_predictions(name, segments.uid[rows], logits, features=hidden, topk=10)
    return Store.open(path)


#: The teacher tests' synthetic dataset: 24 videos of 2 recipes, ~200 segments, ~20 actions.
TEACHER_SYN = SyntheticConfig(n_videos=24, n_recipes=2, stages=(4, 6), steps=(1, 2), seed=0)


def annotation_store(path: str | Path, ann: Path) -> Store:
    """A new store (backend from the suffix) of the annotation folder ``ann`` at 24 fps."""
    classes, segments = load_annotations(ann, fps=24.0)
    return Store.create(path, classes, segments)


@pytest.fixture(scope="module")
def teacher_ann(tmp_path_factory) -> Path:
    """A folder with the :data:`TEACHER_SYN` dataset, shared by a test module (do not edit it)."""
    return generate_annotations(tmp_path_factory.mktemp("syn") / "ann", TEACHER_SYN)


@pytest.fixture
def synthetic_dir(tmp_path: Path) -> Path:
    """A fresh folder with a 12-video synthetic EGTEA-style dataset (training1/validation1)."""
    return generate_annotations(tmp_path / "annotations", SMALL)


@pytest.fixture
def synthetic_tables(synthetic_dir: Path) -> tuple[ClassTable, SegmentTable]:
    """``(classes, segments)`` of ``synthetic_dir`` at 24 fps, both splits."""
    return load_annotations(synthetic_dir, fps=24.0)


@pytest.fixture
def egtea_dir() -> Path:
    """The real EGTEA annotation folder; the test is skipped when it is not there."""
    if not (EGTEA_DIR / "actions.csv").is_file():
        pytest.skip(f"real EGTEA annotations not found at {EGTEA_DIR}")
    return EGTEA_DIR


@pytest.fixture(scope="session")
def make_synthetic():
    """:func:`synthetic_annotations`: ``make_synthetic(dir, cfg=SMALL) -> (dir, classes, segments)``."""
    return synthetic_annotations


@pytest.fixture(scope="session")
def make_store():
    """:func:`build_store`: ``make_store(path, classes, segments, features=..., teachers=...)``."""
    return build_store


@pytest.fixture
def one_thread():
    """One torch thread: tests with tiny models only lose time to intra-op threading."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def pytest_terminal_summary(terminalreporter):
    """The kill points the crash-consistency tests tried (``record_property("kill_points", n)``)."""
    rows = [(r.nodeid.split("::")[-1], v) for r in terminalreporter.stats.get("passed", [])
            for k, v in r.user_properties if k == "kill_points"]
    if rows:
        terminalreporter.write_line(f"crash consistency: {sum(v for _, v in rows)} kill points tried ("
                                    + ", ".join(f"{n} {v}" for n, v in rows) + ")")
