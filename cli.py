"""The ``kdstore`` command line: parses arguments and calls library functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from kdstore.errors import KDStoreError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__)
console = Console(stderr=True)


# --- store commands ---------------------------------------------------------------------


@app.command()
def ingest(
    annotations: Path = typer.Argument(..., help="RULSTM/AVT annotation folder (actions.csv + split CSVs)."),
    store: Path = typer.Argument(..., help="New store: a directory (Zarr) or a .h5 file (HDF5)."),
    splits: Optional[list[str]] = typer.Option(None, "--split", help="Split CSV stems to read (default: all)."),
    fps: Optional[float] = typer.Option(None, help="Annotation frame rate (default: by dataset)."),
    dataset: Optional[str] = typer.Option(None, help="egtea or ek55 (default: guessed from the class count)."),
    backend: Optional[str] = typer.Option(None, help="zarr or hdf5 (default: by suffix)."),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
) -> None:
    """Read annotations into a new store."""
    from kdstore.ingest import ingest as run

    s = run(annotations, store, splits=splits, fps=fps, dataset=dataset, backend=backend, overwrite=overwrite)
    seg = s.segments
    console.print(f"{s.path}: {len(seg)} segments, {len(seg.videos)} videos, {s.classes.num_actions} actions")


@app.command()
def info(store: Path, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Summarise a store: counts, arrays, sizes, feature sets and predictions."""
    from kdstore.inspect import summary
    from kdstore.store import Store

    s = summary(Store.open(store))
    if as_json:
        print(json.dumps(s, indent=1))
        return
    out = Console()
    out.print(f"[bold]{s['path']}[/bold] ({s['backend']}, schema v{s['schema_version']}, {s['dataset'] or 'custom'} data)")
    c = s["classes"]
    out.print(f"classes: {c['actions']} actions, {c['verbs']} verbs, {c['nouns']} nouns")
    g = s["segments"]
    out.print(f"segments: {g['total']} in {g['videos']} videos at {g['fps']} fps; " + ", ".join(f"{k} {v}" for k, v in g["splits"].items()))
    for n, v in s["video"].items():
        out.print(f"video/{n}: {v['frames']} frames x {v['dim']} {v['dtype']} in {v['videos']} videos, "
                  f"{v['bytes'] / 2**20:.1f} MiB, {v['segments_without_features']} segments without features")
    for n, p in s["predictions"].items():
        met = ", ".join(f"{k} {v:.2f}" for k, v in p["metrics"].items() if isinstance(v, (int, float)))
        out.print(f"teacher/{n}: {p['kind']}, {p['uids']} UIDs, top-{p['topk']}, {p['bytes'] / 2**20:.1f} MiB" + (f"; {met}" if met else ""))


@app.command()
def validate(store: Path, quick: bool = typer.Option(False, help="Skip the NaN/inf scan of big arrays.")) -> None:
    """Check a store against the published format (schemas/) and for consistency."""
    from kdstore.validate import validate_store

    problems = validate_store(store, deep=not quick)
    for p in problems:
        console.print(f"[red]invalid:[/red] {p}", highlight=False)
    if problems:
        raise typer.Exit(code=1)
    console.print(f"{store}: valid")


@app.command()
def query(
    store: Path,
    uids: list[int] = typer.Argument(..., help="Segment UIDs."),
    predictions: Optional[str] = typer.Option(None, "--teacher", "-t", help="Prediction group (default: the only/first teacher)."),
    k: int = typer.Option(5, "-k", help="How many top actions."),
    as_json: bool = typer.Option(False, "--json", help="One JSON object per line."),
) -> None:
    """The top-k predicted actions for UIDs, with the true label."""
    from kdstore.store import Store

    s = Store.open(store)
    name = predictions or (s.teachers() or s.predictions() or [None])[0]
    if name is None:
        raise typer.BadParameter(f"{store}: holds no predictions")
    group = s.teacher(name)
    out = Console()
    for uid in uids:
        r = group.predict(uid, k=k)
        if as_json:
            print(json.dumps(r))
            continue
        out.print(f"[bold]UID {uid}[/bold] ({r['video']}, {r['split']}) true: {r['true']['name']}"
                  + (f" (p={r['true']['prob']:.3f}, rank {r['true']['rank']})" if r["present"] else ""))
        if not r["present"]:
            out.print(f"  no prediction in {name}")
            continue
        for i, t in enumerate(r["top"], 1):
            out.print(f"  {i}. {t['name']:<30} {t['prob']:.3f}")
        if "feature_norm" in r:
            out.print(f"  feature norm {r['feature_norm']:.2f}")


@app.command()
def export(
    store: Path,
    name: str = typer.Argument(..., help="Prediction group to export."),
    out: Path = typer.Argument(..., help="Output file: .jsonl or .npz."),
    k: int = typer.Option(5, "-k", help="Top-k per UID in JSONL."),
) -> None:
    """Export a prediction group to JSONL or NPZ."""
    from kdstore.inspect import export_predictions
    from kdstore.store import Store

    console.print(f"wrote {export_predictions(Store.open(store), name, out, k=k)}")

# --- teacher commands -------------------------------------------------------------------

# --- video feature commands -------------------------------------------------------------

# --- student commands -------------------------------------------------------------------

# --- demo and report commands -----------------------------------------------------------


def main() -> None:
    """Entry point that turns kdstore errors into one-line messages."""
    try:
        app()
    except KDStoreError as e:
        console.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(2)


if __name__ == "__main__":
    main()
