"""The end-to-end demo and the report, at a tiny size."""

import json

import pytest
from typer.testing import CliRunner

from cli import app
from kdstore.errors import KDStoreError
from kdstore.report import calibration, per_class_recall
from kdstore.synthetic import SyntheticConfig
from bench.kd_demo import TINY
from trainers.demo import DemoConfig, run_demo, summary_text


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "tiny"  # where bench/kd_demo.py --tiny --work <parent> puts it
    run_demo(out, TINY)
    return out


def test_demo_builds_everything_and_reports(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    names = [r["name"] for r in summary["table"]]
    assert names == ["teacher", "ngram", "ngram-corpus", "student-no-kd-s0", "student-kd-s0", "student-tuned-s0"]
    for png in ("training_curves.png", "recall_difference.png", "teacher_calibration.png"):
        data = (demo_dir / png).read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
    page = (demo_dir / "report.html").read_text()
    assert "student-kd-s0" in page and "teacher_calibration.png" in page
    text = summary_text(summary)
    assert "class-mean top-1 recall" in text and "kd" in text


def test_demo_trains_the_setting_chosen_on_held_out_training_videos(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    chosen = json.loads((demo_dir / "tune" / "chosen.json").read_text())
    grid = summary["tune"]["grid"]
    assert [c["cell"] for c in grid] == ["no KD", "distill_reduction=rows distill=1.0 temperature=1.0",
                                         "distill_reduction=rows distill=1.0 temperature=4.0"]
    assert summary["tune"]["chosen"] == chosen["cell"] == max(grid, key=lambda c: c["mean_top1_recall"])["cell"]
    assert set(summary["students"]) == {"no-kd", "kd", "tuned"}
    run = json.loads((demo_dir / "runs" / "student-tuned-s0" / "last.json").read_text())
    if chosen["cell"] == "no KD":
        assert run["teacher"] is None
    else:  # the chosen cell's setting on the demo's student, trained on the whole training split
        assert run["teacher"] == "teacher" and "train_videos" not in run
        assert {k: run["config"][k] for k in chosen["setting"]} == chosen["setting"]
    assert "tuned: " + chosen["cell"] in summary_text(summary)
    page = (demo_dir / "report.html").read_text()
    assert "kd_grid.png" in page and "held-out training videos" in page
    assert (demo_dir / "kd_grid.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_kd_demo_bench_tiny_and_its_docs_section(demo_dir, tmp_path):
    from bench.kd_demo import BEGIN, END, docs_section, results_of, run, write_docs

    rows = run(tiny=True, out_dir=tmp_path, work=demo_dir.parent)  # the fixture's demo, resumed
    students = [r for r in rows if json.loads(r["config"])["variant"] != "grid"]
    assert len(students) == 3 and len(rows) == 6 and (tmp_path / "kd_demo.csv").exists()
    summary = json.loads((demo_dir / "summary.json").read_text())
    tuned = next(r for r in students if json.loads(r["config"])["variant"] == "tuned")
    assert float(tuned["mean_top1_recall"]) == pytest.approx(summary["students"]["tuned"]["mean_top1_recall"][0], abs=1e-5)
    docs = tmp_path / "distillation.md"
    docs.write_text(f"before\n{BEGIN}\nold\n{END}\nafter\n")
    write_docs(docs, results_of(rows, tiny=True))
    text = docs.read_text()
    assert text.startswith(f"before\n{BEGIN}\n") and text.endswith(f"{END}\nafter\n")
    assert "| tuned: " in text and " (chosen) |" in text and "old" not in text
    assert docs_section(results_of(rows, tiny=True)) in text


def test_synthetic_corpus_is_deterministic(tmp_path):
    from kdstore.synthetic import generate_annotations

    cfg = SyntheticConfig(n_videos=12, seed=5, shared_stages=6, corpus_size=40)
    a, b = generate_annotations(tmp_path / "a", cfg), generate_annotations(tmp_path / "b", cfg)
    for f in ("actions.csv", "training1.csv", "validation1.csv", "recipes.txt"):
        assert (a / f).read_bytes() == (b / f).read_bytes()
    plain = generate_annotations(tmp_path / "c", SyntheticConfig(n_videos=12, seed=5, shared_stages=6))
    assert (plain / "training1.csv").read_bytes() == (a / "training1.csv").read_bytes()  # the corpus has its own stream
    assert not (plain / "recipes.txt").exists()
    lines = (a / "recipes.txt").read_text().splitlines()
    assert len(lines) == 40 and all("<v>" in line for line in lines)


def test_second_run_reuses_what_is_built(demo_dir):
    log = demo_dir / "runs" / "student-kd-s0" / "log.jsonl"
    before = log.read_text()
    teacher_ckpt = next((demo_dir / "store.zarr.teacher-work" / "teacher").rglob("*.safetensors"))
    mtime = teacher_ckpt.stat().st_mtime_ns
    run_demo(demo_dir, TINY)
    assert log.read_text() == before and teacher_ckpt.stat().st_mtime_ns == mtime


def test_refuses_a_directory_holding_something_else(tmp_path):
    (tmp_path / "thesis.tex").write_text("precious")
    with pytest.raises(KDStoreError, match="not a kdstore demo directory"):
        run_demo(tmp_path, TINY)
    assert (tmp_path / "thesis.tex").read_text() == "precious"


def test_refuses_a_demo_with_other_settings(demo_dir):
    other = DemoConfig(**{**TINY.__dict__, "feature_noise": 0.5})
    with pytest.raises(KDStoreError, match=r"other settings \(config.feature_noise: saved [\d.]+, now 0.5\)"):
        run_demo(demo_dir, other)


def test_report_command_on_the_demo_store(demo_dir, tmp_path):
    r = CliRunner().invoke(app, ["report", str(demo_dir / "store.zarr"), "--out", str(tmp_path / "rep")])
    assert r.exit_code == 0, r.output
    assert (tmp_path / "rep" / "report.html").exists() and "student-kd-s0" in r.stdout


def test_report_helpers_by_hand():
    import numpy as np

    logits = np.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 0.0]])
    labels = np.array([0, 0, 0, 1])
    r = per_class_recall(logits, labels, 3)
    assert r[0] == pytest.approx(2 / 3) and r[1] == 0.0 and np.isnan(r[2])
    c = calibration(np.log(np.array([[0.9, 0.1], [0.6, 0.4]])), np.array([0, 1]))
    assert c["count"].sum() == 2
    assert c["ece"] == pytest.approx(0.5 * abs(1 - 0.9) + 0.5 * abs(0 - 0.6))


def test_kd_sweep_tiny(demo_dir, tmp_path):
    from bench.kd_sweep import NO_KD, SETTINGS, read_rows, run, student_config, table

    rows = run(demo_dir, seeds=(0, 1), settings=[NO_KD, "paper: full, elements, w150 T10", "paper + feature cosine w1"],
               tiny=True, out_dir=tmp_path)
    assert len(rows) == 6 and (tmp_path / "kd_sweep.csv").exists()
    assert all(float(r["seconds"]) > 0 and "error" not in r for r in rows)
    md = table(rows).splitlines()
    assert len(md) == 5 and md[2].startswith(f"| {NO_KD} |") and " ± " in md[3]
    assert table(read_rows([tmp_path / "kd_sweep.csv"])) == table(rows)  # --table: the same table from the CSV
    # the sweep's "paper" setting is the demo's KD student; every setting is a valid config
    assert student_config("paper: full, elements, w150 T10", 0) == student_config(NO_KD, 0).__class__(
        **{**student_config(NO_KD, 0).to_dict(), "distill_mode": "full", "distill": 150.0})
    for name in SETTINGS:
        student_config(name, 0)
    # --set overrides apply under every setting, the setting's own fields still win
    shorter = student_config("full, elements, w150 T5", 0, overrides={"epochs": 3, "temperature": 1.0})
    assert shorter.epochs == 3 and shorter.temperature == 5.0


def test_demo_seed_means_come_from_the_table(demo_dir):
    summary = json.loads((demo_dir / "summary.json").read_text())
    rows = {r["name"]: r for r in summary["table"]}
    for variant in ("kd", "no-kd", "tuned"):
        mean, std = summary["students"][variant]["mean_top1_recall"]
        assert mean == rows[f"student-{variant}-s0"]["mean_top1_recall"] and std == 0.0


def test_demo_fps_needs_annotations(tmp_path):
    r = CliRunner().invoke(app, ["demo", str(tmp_path / "d"), "--fps", "30"])
    assert r.exit_code != 0 and "--fps" in r.output


def test_demo_on_an_annotation_folder_uses_its_frame_rate(demo_dir, tmp_path):
    from kdstore.store import Store

    cfg = DemoConfig(**{**TINY.__dict__, "annotations": str(demo_dir / "annotations"), "fps": 30.0})
    run_demo(tmp_path / "d", cfg)
    assert Store.open(tmp_path / "d" / "store.zarr").segments.fps == 30.0


def test_demo_on_an_epic100_layout_tunes_by_top5_recall_and_reports_the_subsets(tmp_path):
    from kdstore.synthetic import generate_epic100

    ann = generate_epic100(tmp_path / "ek100", SyntheticConfig(n_videos=24, seed=3, shared_stages=8))
    cfg = DemoConfig(**{**TINY.__dict__, "annotations": str(ann), "fps": 30.0, "tune_grid": {"distill": [1.0]}})
    summary = run_demo(tmp_path / "d", cfg)
    assert summary["eval_split"] == "validation" and summary["tune"]["metric"] == "mean_top5_recall"
    tuned = next(r for r in summary["table"] if r["name"] == "student-tuned-s0")
    assert "unseen_action_mean_top5_recall" in tuned and "tail_action_mean_top5_recall" in tuned


def test_distillation_docs_section_is_the_saved_kd_demo_run():
    """The kd_demo section of docs/distillation.md is what bench/kd_demo.py writes from bench/kd_demo.json."""
    from pathlib import Path

    from bench.kd_demo import BEGIN, END, SAVED, docs_section

    if not SAVED.exists():
        pytest.skip("no saved kd_demo run")
    text = (Path(__file__).resolve().parents[1] / "docs" / "distillation.md").read_text()
    saved = json.loads(SAVED.read_text())
    assert text[text.index(BEGIN) + len(BEGIN): text.index(END)] == f"\n{docs_section(saved).rstrip()}\n"
