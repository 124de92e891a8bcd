"""Benchmark: a K-fold teacher mixed with the n-grams, weights fitted on out-of-fold training rows.

    python bench/teacher_mixture.py STORE --teacher teacher --split validation1
    python bench/teacher_mixture.py --tiny        # synthetic data, a tiny 2-fold teacher: seconds

On a store holding a teacher built with ``folds >= 2``: the 2- and 3-gram written with their
training rows predicted out-of-fold on the teacher's own folds (``evaluate --baseline ngram
--folds K --seed S``), then two mixtures whose weights EM fits on those out-of-fold training
rows (``ensemble --fit``): teacher + 2-gram, and teacher + 2-gram + 3-gram. No evaluation row
is read before the table below. Appends one row per group to
``bench/results/teacher_mixture.csv`` (the split's metrics, and for the mixtures the weights
and the out-of-fold NLL) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import EPIC_CELLS, METRICS, append_row  # noqa: E402
from kdstore.ensemble import write_ensemble  # noqa: E402
from kdstore.evaluation import evaluate_group  # noqa: E402
from kdstore.store import Store  # noqa: E402

EXTRA = ("many_shot_top5_recall", *EPIC_CELLS)  # EK55's and EK100's, where the store has them
MIXTURES = {"mix2": ("ngram2",), "mix23": ("ngram2", "ngram3")}


def mixtures(store: Store, teacher: str, split: str) -> dict[str, dict]:
    """Write the out-of-fold n-grams and the fitted mixtures; returns each group's metrics on ``split``
    (the mixtures' with their weights and fit)."""
    from trainers.teacher.evaluate import evaluate_ngram

    cfg = store.group(teacher).config
    if int(cfg.get("folds") or 0) < 2:
        raise SystemExit(f"teacher/{teacher}: built with folds={cfg.get('folds')}; the mixtures need out-of-fold training rows")
    for order in (2, 3):
        evaluate_ngram(store, cfg["train_split"], split, order, write=f"ngram{order}", overwrite=True, folds=int(cfg["folds"]),
                       seed=int(cfg.get("seed", 0)))
    out = {}
    for name, ngrams in MIXTURES.items():
        g = write_ensemble(store, [teacher, *ngrams], name, fit=True, overwrite=True)
        out[name] = {"weights": g.config["ensemble"]["weights"], "oof_nll": g.config["ensemble"]["fit"]["nll"]}
    return {name: {**evaluate_group(store, name, split), **out.get(name, {})}
            for name in (teacher, "ngram2", "ngram3", *MIXTURES)}


def tiny_store(work: Path) -> tuple[Store, str, str]:
    """A synthetic store with a tiny 2-fold teacher ``teacher``."""
    from kdstore.ingest import ingest
    from kdstore.synthetic import SyntheticConfig, generate_annotations
    from trainers.teacher.build import build_teacher
    from trainers.teacher.config import preset

    ann = generate_annotations(work / "ann", SyntheticConfig(n_videos=24, n_recipes=2, stages=(4, 6), steps=(1, 2)))
    store = ingest(ann, work / "store.zarr", dataset="egtea", overwrite=True)
    build_teacher(store, "teacher", preset("tiny", epochs=1), train_split="training1", eval_splits=("validation1",),
                  show_progress=False, fresh=True)
    return store, "teacher", "validation1"


def table(rows: dict[str, dict], metrics: tuple[str, ...]) -> str:
    """Markdown: one row per group, the mixtures' weights in the last column."""
    lines = [f"| group | {' | '.join(metrics)} | weights |", "|---|" + "---|" * (len(metrics) + 1)]
    for name, m in rows.items():
        w = " / ".join(f"{x:.3f}" for x in m["weights"]) if "weights" in m else ""
        lines.append(f"| {name} | {' | '.join(f'{m[k]:.2f}' for k in metrics)} | {w} |")
    return "\n".join(lines)


def run(store: Store, teacher: str, split: str, out_dir=None, tiny: bool = False) -> dict[str, dict]:
    """The mixtures on ``split``, one CSV row per group; returns the groups' metrics."""
    rows = mixtures(store, teacher, split)
    for name, m in rows.items():
        keep = {k: m[k] for k in (*METRICS, *EXTRA, "oof_nll") if m.get(k) is not None}
        append_row("teacher_mixture", {"store": str(store.path), "teacher": teacher, "split": split, "tiny": tiny},
                   {"group": name, **keep, **({"weights": " ".join(f"{x:.4f}" for x in m["weights"])} if "weights" in m else {})},
                   out_dir)
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("store", nargs="?", help="store holding a K-fold teacher")
    p.add_argument("--teacher", default="teacher", help="the teacher's group")
    p.add_argument("--split", default=None, help="evaluation split (default: the store's)")
    p.add_argument("--tiny", action="store_true", help="synthetic data and a tiny 2-fold teacher")
    p.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    a = p.parse_args(argv)
    if a.tiny == bool(a.store):
        p.error("give a STORE or --tiny (one of them)")
    with tempfile.TemporaryDirectory() as tmp:
        store, teacher, split = tiny_store(Path(tmp)) if a.tiny else (Store.open(a.store), a.teacher, None)
        split = a.split or split or store.default_splits()[1]
        rows = run(store, teacher, split, a.out_dir, a.tiny)
        print(table(rows, METRICS + tuple(k for k in EXTRA if rows[teacher].get(k) is not None)))


if __name__ == "__main__":
    main()
