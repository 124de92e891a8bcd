"""An HTML report with PNG plots for any store holding a teacher and students.

It compares every prediction group on one split (metrics table), plots the students'
training curves (from the logs stored with their groups), the per-class top-1 recall
difference between a distilled and a plain student, and the teacher's calibration.
"""

from __future__ import annotations

import html
from pathlib import Path

import numpy as np

from .atomic import os_errors, replace_with, write_text
from .errors import MissingError
from .evaluation import metrics_table, table_columns
from .store import Store
from .predictions import present_logits


def per_class_recall(logits: np.ndarray, labels: np.ndarray, num_classes: int) -> np.ndarray:
    """[A] top-1 recall per class (NaN for classes absent from ``labels``)."""
    hit = logits.argmax(1) == labels
    count = np.bincount(labels, minlength=num_classes).astype(float)
    hits = np.bincount(labels, weights=hit, minlength=num_classes)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(count > 0, hits / count, np.nan)


def _plot_curves(store: Store, students: list[str], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 3.8))
    drew = False
    for name in students:
        log = store.group(name).attrs.get("log", [])
        if not log:
            continue
        ep = [e["epoch"] for e in log]
        ax1.plot(ep, [e.get("train_ce", np.nan) for e in log], label=name)
        ax2.plot(ep, [e.get("eval_mean_top1_recall", np.nan) for e in log], label=name)
        drew = True
    if not drew:
        plt.close(fig)
        return None
    ax1.set(title="training action CE", xlabel="epoch")
    ax2.set(title="validation class-mean top-1 recall (%)", xlabel="epoch")
    ax1.legend(fontsize=7)
    ax2.legend(fontsize=7)
    fig.tight_layout()
    replace_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _plot_recall_diff(store: Store, split: str, kd: str, plain: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    seg, classes = store.segments, store.classes
    rows = seg.rows_in(split, labelled=True)
    r = {}
    for name in (kd, plain):
        logits, kept = present_logits(store.group(name), rows)
        r[name] = per_class_recall(logits, seg.action[kept], classes.num_actions)
    diff = (r[kd] - r[plain]) * 100
    present = np.flatnonzero(~np.isnan(diff))
    order = present[np.argsort(diff[present])]
    fig, ax = plt.subplots(figsize=(10, 3.8))
    ax.bar(np.arange(len(order)), diff[order], color=np.where(diff[order] >= 0, "tab:green", "tab:red"))
    ax.axhline(0, color="black", lw=0.8)
    ax.set(title=f"per-class top-1 recall: {kd} minus {plain} ({split}; mean {np.nanmean(diff):+.2f} points)",
           xlabel="action classes (sorted)", ylabel="recall difference (points)")
    fig.tight_layout()
    replace_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def calibration(logits: np.ndarray, labels: np.ndarray, bins: int = 10) -> dict:
    """Reliability of top-1 confidence: per-bin confidence, accuracy, count and the ECE."""
    z = logits - logits.max(1, keepdims=True)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    conf, hit = p.max(1), p.argmax(1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges) - 1, 0, bins - 1)
    count = np.bincount(which, minlength=bins)
    mean_conf = np.bincount(which, conf, bins) / np.maximum(count, 1)
    acc = np.bincount(which, hit.astype(float), bins) / np.maximum(count, 1)
    ece = float((count / max(len(conf), 1) * np.abs(acc - mean_conf)).sum())
    return {"edges": edges, "confidence": mean_conf, "accuracy": acc, "count": count, "ece": ece}


def _plot_calibration(store: Store, split: str, teacher: str, path: Path) -> Path:
    import matplotlib.pyplot as plt

    seg = store.segments
    logits, kept = present_logits(store.group(teacher), seg.rows_in(split, labelled=True))
    c = calibration(logits, seg.action[kept])
    centers = (c["edges"][:-1] + c["edges"][1:]) / 2
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    used = c["count"] > 0
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    ax.bar(centers[used], c["accuracy"][used], width=0.09, alpha=0.7, label="accuracy")
    ax.plot(c["confidence"][used], c["accuracy"][used], "o-", color="tab:orange", label="per bin")
    ax.set(title=f"teacher/{teacher}: calibration (ECE {c['ece']:.3f})", xlabel="top-1 confidence", ylabel="accuracy",
           xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    replace_with(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)
    return path


def _plot_oof_calibration(store: Store, teacher: str, path: Path) -> Path | None:
    """Reliability diagram of the teacher's out-of-fold training predictions, before and (when
    ``kdstore calibrate`` stored one) after its fitted temperature; None without such rows."""
    import matplotlib.pyplot as plt

    from .calibration import oof_logits, reliability
    from .errors import DataError

    g = store.group(teacher)
    try:
        logits, labels, split = oof_logits(store, g)
    except (MissingError, DataError):
        return None
    if len(labels) == 0:
        return None
    T = g.attrs.get("calibration", {}).get("temperature")
    fig, ax = plt.subplots(figsize=(4.5, 4.2))
    ax.plot([0, 1], [0, 1], "k--", lw=0.8, label="perfect")
    for name, t, color in (("as stored", 1.0, "tab:orange"), (f"T = {T:.3g}" if T else "", T, "tab:blue")):
        if t is None:
            continue
        c = reliability(logits, labels, temperature=t)
        used = c["count"] > 0
        ax.plot(c["confidence"][used], c["accuracy"][used], "o-", color=color, label=f"{name}: ECE {c['ece']:.3f}")
    ax.set(title=f"teacher/{teacher}: out-of-fold {split} ({len(labels)} rows)", xlabel="top-1 confidence",
           ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _tune_dir_of(store: Store, group: str) -> Path | None:
    """The ``tune-kd`` directory whose final run wrote ``group``, when it still exists."""
    run = store.group(group).config.get("run_dir")
    return Path(run).parent if run and (Path(run).parent / "grid.json").is_file() else None


def _plot_tune_grid(cells: list[dict], metric: str, path: Path) -> Path:
    """One heatmap per (KD mode, reduction) of the held-out ``metric``: weight x temperature
    (the best cell where other fields vary); the no-KD value in the title."""
    import matplotlib.pyplot as plt

    kd = [c for c in cells if c.get("distils")]
    plain = [c[metric] for c in cells if not c.get("distils")]
    panels = sorted({(c["distill_mode"], c["distill_reduction"]) for c in kd})
    fig, axes = plt.subplots(1, max(1, len(panels)), figsize=(4.5 * max(1, len(panels)), 3.8), squeeze=False)
    for ax, (mode, red) in zip(axes[0], panels):
        mine = [c for c in kd if (c["distill_mode"], c["distill_reduction"]) == (mode, red)]
        ws, ts = sorted({c["distill"] for c in mine}), sorted({c["temperature"] for c in mine})
        grid = np.full((len(ws), len(ts)), np.nan)
        for c in mine:
            i, j = ws.index(c["distill"]), ts.index(c["temperature"])
            grid[i, j] = np.fmax(grid[i, j], c[metric])
        im = ax.imshow(grid, cmap="viridis", origin="lower", aspect="auto")
        for (i, j), v in np.ndenumerate(grid):
            if np.isfinite(v):
                ax.text(j, i, f"{v:.1f}", ha="center", va="center", color="w")
        ax.set_xticks(range(len(ts)), [f"{t:g}" for t in ts])
        ax.set_yticks(range(len(ws)), [f"{w:g}" for w in ws])
        ax.set_xlabel("temperature")
        ax.set_ylabel("KD weight")
        ax.set_title(f"{mode}, {red}" + (f" (no KD {plain[0]:.1f})" if plain else ""), fontsize=9)
        fig.colorbar(im, ax=ax)
    fig.suptitle(f"held-out {metric} (%)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def tune_section(tune_dir: Path, out: Path) -> str:
    """HTML: the grid of a ``tune-kd`` directory as a heatmap beside the chosen setting (its
    held-out figure and, when trained, its evaluation-split figures)."""
    import json

    grid = json.loads((tune_dir / "grid.json").read_text())
    metric, cells = grid["metric"], grid["cells"]
    img = _plot_tune_grid(cells, metric, out / "kd_grid.png")
    chosen = json.loads((tune_dir / "chosen.json").read_text()) if (tune_dir / "chosen.json").exists() else None
    final = json.loads((tune_dir / "final.json").read_text()) if (tune_dir / "final.json").exists() else None
    side = "<p>No setting chosen yet.</p>"
    if chosen:
        side = (f"<p>Chosen: <b>{html.escape(chosen['cell'])}</b>, held-out {metric} {chosen['held_out'][metric]:.2f} "
                f"(no KD {next(c[metric] for c in cells if not c.get('distils')):.2f}).</p>")
    if final:
        m = final["metrics"]
        side += (f"<p>Trained on the whole training split, evaluated once on {html.escape(final['eval_split'])}: "
                 + ", ".join(f"{k} {m[k]:.2f}" for k in ("top1", "top5", "mean_top1_recall", "mean_top5_recall") if k in m)
                 + f" (group <code>{html.escape(final['group'])}</code>).</p>")
    return (f"<h2>KD settings chosen on held-out training videos</h2><div style='display:flex;gap:1em;align-items:center'>"
            f"<img src='{img.name}' alt='KD grid' style='max-width:65%'><div>{side}</div></div>")


def write_report(
    store: Store,
    out_dir: str | Path,
    split: str | None = None,
    teacher: str | None = None,
    kd_student: str | None = None,
    plain_student: str | None = None,
    extra_html: str = "",
    tune_dir: str | Path | None = None,
) -> Path:
    """Write ``report.html`` and its PNGs into ``out_dir``; returns the HTML path.

    ``split`` defaults to the store's evaluation split. Without explicit names the first
    teacher is used, and the student pair is the first student whose config distils and
    the first whose config does not. ``tune_dir``, a ``tune-kd`` output directory (default:
    the one a student group's run directory lies in, if any), adds its grid as a heatmap.
    """
    import matplotlib

    matplotlib.use("Agg")
    split = split or store.default_splits()[1]
    out = Path(out_dir)
    with os_errors(out, unknown=True):
        out.mkdir(parents=True, exist_ok=True)
    students = store.groups("student")
    teacher = teacher or next(iter(store.groups("teacher")), None)
    if teacher is None:
        raise MissingError(f"{store.path}: no teacher predictions to report on")
    kd_student, plain_student = _student_pair(store, students, kd_student, plain_student)
    table = metrics_table(store, split)
    images = _report_images(store, split, teacher, students, kd_student, plain_student, out)
    tune_dir = tune_dir or next((d for s in students if (d := _tune_dir_of(store, s)) is not None), None)
    if tune_dir is not None:
        extra_html += tune_section(Path(tune_dir), out)
    page = _report_page(store, split, table, images, extra_html)
    path = out / "report.html"
    write_text(path, page)
    return path


def _student_pair(store: Store, students: list[str], kd_student: str | None,
                  plain_student: str | None) -> tuple[str | None, str | None]:
    """The students to compare: those named, else the first that distils and the first that does not."""

    def distils(name: str) -> bool:  # a student trained with a teacher (predict_into_store records it)
        return store.group(name).config.get("teacher") is not None

    kd_student = kd_student or next((s for s in students if distils(s)), None)
    plain_student = plain_student or next((s for s in students if not distils(s)), None)
    return kd_student, plain_student


def _report_images(store: Store, split: str, teacher: str, students: list[str], kd_student: str | None,
                   plain_student: str | None, out: Path) -> list[tuple[str, Path]]:
    """(title, PNG) of each plot the report shows, written into ``out``."""
    images = []
    if (p := _plot_curves(store, students, out / "training_curves.png")) is not None:
        images.append(("Training curves", p))
    if kd_student and plain_student:
        images.append(("Per-class recall: KD vs no KD", _plot_recall_diff(store, split, kd_student, plain_student, out / "recall_difference.png")))
    images.append(("Teacher calibration", _plot_calibration(store, split, teacher, out / "teacher_calibration.png")))
    if (p := _plot_oof_calibration(store, teacher, out / "teacher_calibration_oof.png")) is not None:
        images.append(("Teacher calibration on its out-of-fold training predictions", p))
    return images


def _report_page(store: Store, split: str, table: list[dict], images: list[tuple[str, Path]], extra_html: str) -> str:
    """The report's HTML: the metrics table, ``extra_html`` and the plots."""
    cols = table_columns(table, store.dataset)
    rows_html = "".join(
        "<tr><td>" + html.escape(r["name"]) + f"</td><td>{r['kind']}</td><td>{r['n']}</td>"
        + "".join(f"<td>{r[k]:.2f}</td>" if r.get(k) is not None else "<td>-</td>" for k, _ in cols) + "</tr>"
        for r in table
    )
    figs = "".join(f"<h2>{html.escape(t)}</h2><img src='{p.name}' alt='{html.escape(t)}'>" for t, p in images)
    return f"""<!doctype html><html><head><meta charset="utf-8"><title>kdstore report</title>
<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}
td,th{{border:1px solid #ccc;padding:4px 8px;text-align:right}}td:first-child{{text-align:left}}img{{max-width:100%}}</style>
</head><body><h1>kdstore report</h1><p>Store <code>{html.escape(str(store.path))}</code>, split <b>{html.escape(split)}</b>.</p>
<table><tr><th>model</th><th>kind</th><th>n</th>{''.join(f'<th>{h} (%)</th>' for _, h in cols)}</tr>{rows_html}</table>
{extra_html}{figs}</body></html>"""
