"""Diagnosis: how well a teacher recipe fits its own training rows as the optimizer steps go by.

Fine-tunes the full model of a ``build-teacher`` recipe (the same texts, tokenizer and model
the build uses, no folds, no pretraining) and every ``--every`` steps scores top-1 on a fixed
sample of training rows and of the eval split, beside the class prior and the bigram on the
same rows. A recipe that never leaves the class prior shows it here within an epoch.

    python bench/teacher_fit.py ek55.zarr --preset ek100-cpu --train-split training --eval-split validation
    python bench/teacher_fit.py ek55.zarr --preset ek100-cpu --set pooling=mean --epochs 1
    python bench/teacher_fit.py --tiny      # synthetic data, tiny preset: seconds

Appends one row per scoring point to ``bench/results/teacher_fit.csv`` (``--label`` names the run).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from bench.common import append_row  # noqa: E402
from kdstore.rulstm import load_annotations  # noqa: E402
from kdstore.store import Store  # noqa: E402
from kdstore.synthetic import SyntheticConfig, generate_annotations  # noqa: E402
from trainers.config import parse_set  # noqa: E402
from trainers.teacher.build import make_model, plan_build, stage_examples  # noqa: E402
from trainers.teacher.config import TeacherConfig, preset  # noqa: E402
from trainers.teacher.finetune import finetune, predict  # noqa: E402
from trainers.teacher.fit_check import ngram_top1, prior_top1  # noqa: E402
from trainers.teacher.optim import num_threads  # noqa: E402


def _top1(model, ids, labels) -> float:
    pred = predict(model, ids)["action"].argmax(1)
    model.train()
    return float(100.0 * (pred == labels).mean())


def run(store: Store, cfg: TeacherConfig, train_split: str, eval_split: str, every: int, sample: int, label: str,
        work: Path) -> list[dict]:
    """Fine-tune ``cfg``'s full model, scoring training/eval top-1 every ``every`` steps; the rows."""
    plan = plan_build(store, cfg, train_split, (eval_split,), work_dir=work)
    tok = plan.tokenizer()
    ids = plan.encode(tok)[cfg.hist_lens[0]]
    seg = store.segments
    rng = np.random.default_rng(0)
    n_train = plan.n_train
    picks = {"train": rng.choice(n_train, min(sample, n_train), replace=False),
             "eval": n_train + rng.choice(len(plan.all_rows) - n_train, min(sample, len(plan.all_rows) - n_train),
                                          replace=False)}
    labels = {k: seg.action[plan.all_rows[v]] for k, v in picks.items()}
    train_rows, A = plan.rows[train_split], store.classes.num_actions
    train_labels = seg.action[train_rows]
    base = {"prior_train": prior_top1(train_labels, labels["train"]), "prior_eval": prior_top1(train_labels, labels["eval"]),
            "bigram_train": ngram_top1(seg, A, train_rows, train_split, plan.all_rows[picks["train"]], train_split),
            "bigram_eval": ngram_top1(seg, A, train_rows, train_split, plan.all_rows[picks["eval"]], eval_split)}
    data = stage_examples(plan, tok, plan.encode(tok), np.arange(n_train))
    model = make_model(cfg, tok, None, plan.nums, cfg.seed)
    rows, t0 = [], time.perf_counter()

    def on_step(done: int, total: int) -> None:
        if done % every and done != total:
            return
        row = {"label": label, "step": done, "steps": total, "epoch": round(done / (total / cfg.epochs), 3),
               "train_top1": _top1(model, ids.take(picks["train"]), labels["train"]),
               "eval_top1": _top1(model, ids.take(picks["eval"]), labels["eval"]), **base,
               "seconds": round(time.perf_counter() - t0, 1)}
        rows.append(row)
        print(" ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)

    with num_threads(cfg.threads):
        finetune(model, data, cfg, tok, cfg.seed, on_step=on_step)
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("store", nargs="?", help="A store with the annotations (kdstore ingest).")
    ap.add_argument("--preset", default="ek100-cpu")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="TeacherConfig key=value (repeatable).")
    ap.add_argument("--train-split", default="training")
    ap.add_argument("--eval-split", default="validation")
    ap.add_argument("--every", type=int, default=250, help="Score every this many optimizer steps.")
    ap.add_argument("--sample", type=int, default=2000, help="Rows scored per split.")
    ap.add_argument("--label", default="")
    ap.add_argument("--tiny", action="store_true", help="Synthetic data and the tiny preset.")
    ap.add_argument("--out-dir", type=Path, default=None, help="Where teacher_fit.csv goes (default bench/results).")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.tiny:
            ann = generate_annotations(Path(tmp) / "ann", SyntheticConfig(n_videos=12))
            store = Store.create(Path(tmp) / "s.zarr", *load_annotations(ann, fps=24.0))
            args.preset, args.train_split, args.eval_split, args.every = "tiny", "training1", "validation1", 5
        elif not args.store:
            ap.error("give a store, or --tiny")
        else:
            store = Store.open(args.store)
        cfg = preset(args.preset, **parse_set(TeacherConfig, args.overrides))
        label = args.label or f"{args.preset} {' '.join(args.overrides)}".strip()
        rows = run(store, cfg, args.train_split, args.eval_split, args.every, args.sample, label, Path(tmp) / "work")
    config = {"store": args.store or "synthetic", "preset": args.preset, "overrides": " ".join(args.overrides),
              "sample": args.sample}
    return [append_row("teacher_fit", config, row, args.out_dir) for row in rows]


if __name__ == "__main__":
    main()
