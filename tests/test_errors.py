"""Bad input and bad states end in one-line errors, nothing stored is
lost, and a finished student run can be extended on resume."""

from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from conftest import SUFFIXES, build_store
from kdstore.rulstm import load_annotations
from kdstore.errors import AnnotationError, ConfigError, DataError, KDStoreError
from kdstore.store import Store
from processes import cli
from test_store import assert_same, snapshot

pytestmark = pytest.mark.usefixtures("one_thread")
STUDENT = ["--preset", "egtea", "--set", "num_frames=4", "--set", "n_layer=1", "--set", "n_head=2", "--set", "inter_dim=32",
           "--set", "batch_size=16", "--set", "topk=5", "--device", "cpu"]


def raised(args: list) -> KDStoreError:
    """The KDStoreError the CLI command ``args`` ends with (in this process)."""
    r = CliRunner().invoke(app, [str(a) for a in args])
    assert isinstance(r.exception, KDStoreError), (r.exception, r.output)
    assert "\n" not in str(r.exception)
    return r.exception


def one_line(r: subprocess.CompletedProcess) -> str:
    """The CLI's error message: exit 2 and a single line on stderr."""
    assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
    lines = [line for line in r.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr[-3000:]
    return lines[0]


@pytest.fixture
def trained(tmp_path, synthetic_tables):
    """A store with features and a teacher, and a student run of one epoch."""
    from trainers.student.config import preset
    from trainers.student.train import train_student

    path = tmp_path / "s.zarr"
    build_store(path, *synthetic_tables, teacher_split=None)
    cfg = preset("egtea", num_frames=4, n_layer=1, n_head=2, inter_dim=32, batch_size=16, topk=5, epochs=1)
    train_student(Store.open(path), "feat", tmp_path / "run", cfg, teacher="teacher", progress=False, device="cpu")
    return path, tmp_path / "run"


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_checkpoint_on_predict_and_resume(trained, damage):
    path, run = trained
    ckpt = run / "last.safetensors"
    data = ckpt.read_bytes()
    ckpt.write_bytes(data[: len(data) // 2] if damage == "truncated" else np.random.default_rng(0).bytes(len(data)))
    msg = one_line(cli("predict", path, "--run", run, "--name", "p"))
    assert f"{ckpt}: not a readable checkpoint" in msg
    e = raised(["train-student", path, "-f", "feat", "-t", "teacher", "--run", run, *STUDENT, "--set", "epochs=2"])
    assert isinstance(e, ConfigError) and f"{ckpt}: not a readable checkpoint" in str(e)
    assert "p" not in Store.open(path).groups()
    e = raised(["predict", path, "--run", run.parent / "nothing", "--name", "p"])
    assert "no student checkpoint" in str(e)


def test_a_finished_run_extends_to_more_epochs(trained):
    from trainers.student.config import preset
    from trainers.student.train import read_log, train_student

    path, run = trained
    first = read_log(run)
    cfg = preset("egtea", num_frames=4, n_layer=1, n_head=2, inter_dim=32, batch_size=16, topk=5, epochs=3)
    train_student(Store.open(path), "feat", run, cfg, teacher="teacher", progress=False, device="cpu")
    log = read_log(run)
    assert [e["epoch"] for e in log] == [1, 2, 3] and log[0] == first[0]
    assert json.loads((run / "last.json").read_text())["config"]["epochs"] == 3
    with pytest.raises(ConfigError, match="has trained 3 epochs, more than epochs=2"):
        train_student(Store.open(path), "feat", run, preset("egtea", **{**cfg.to_dict(), "epochs": 2}), teacher="teacher",
                      progress=False, device="cpu")
    with pytest.raises(ConfigError, match=r"checkpoint of another run \(config.lr: saved 0.001, now 0.5\)"):  # other settings stay refused
        train_student(Store.open(path), "feat", run, preset("egtea", **{**cfg.to_dict(), "lr": 0.5}), teacher="teacher",
                      progress=False, device="cpu")


def test_action_id_out_of_range_in_a_store(tmp_path, synthetic_tables):
    for suffix in SUFFIXES:
        path = tmp_path / f"s{suffix}"
        s = build_store(path, *synthetic_tables, teacher_split=None)
        A, uid = s.classes.num_actions, s.segments.uid[0]
        if suffix == ".zarr":
            chunk = path / "segments" / "action" / "c" / "0"
            raw = np.fromfile(chunk, "<i4")
            raw[0] = A + 7
            raw.tofile(chunk)
        else:
            with h5py.File(path, "r+") as f:
                f["segments/action"][0] = A + 7
        for args in (["query", path, uid], ["train-student", path, "-f", "feat", "-t", "teacher", "--run", tmp_path / "r",
                                             *STUDENT, "--set", "epochs=1"]):
            e = raised(args)
            assert isinstance(e, DataError) and f"UID {uid}: unknown action id {A + 7}" in str(e), (suffix, e)
        assert not (tmp_path / "r" / "last.safetensors").exists()


def test_export_into_a_missing_folder(tmp_path, synthetic_tables):
    s = build_store(tmp_path / "s.zarr", *synthetic_tables)
    e = raised(["export", s.path, "teacher", tmp_path / "no" / "such" / "out.jsonl"])
    assert isinstance(e, ConfigError) and f"the folder {tmp_path / 'no' / 'such'} does not exist" in str(e)


def test_frame_numbers_beyond_int64(synthetic_dir):
    csv = synthetic_dir / "training1.csv"
    rows = csv.read_text().splitlines()
    cells = rows[2].split(",")
    cells[3] = "99999999999999999999"
    rows[2] = ",".join(cells)
    csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(AnnotationError, match=rf"training1.csv, row 3: end_frame 99999999999999999999 is beyond the int64 range"):
        load_annotations(synthetic_dir, fps=24.0)
    cells[3], cells[6] = "10000", str(2**31)
    rows[2] = ",".join(cells)
    csv.write_text("\n".join(rows) + "\n")
    with pytest.raises(AnnotationError, match="row 3: action 2147483648 is beyond the int32 range"):
        load_annotations(synthetic_dir, fps=24.0)


def test_two_imports_of_one_name_at_once(tmp_path, synthetic_tables):
    s = build_store(tmp_path / "s.h5", *synthetic_tables, features=(), teachers=())
    src = tmp_path / "npy"
    src.mkdir()
    for v in s.segments.videos:
        np.save(src / f"{v}.npy", np.ones((6, 8), np.float32))
    w = s.video_writer("imp", 8, "float32", frame_rate=1.0)  # an import in progress (this process)
    w.put(s.segments.videos[0], np.zeros((6, 8), np.float32), np.arange(6.0))
    msg = one_line(cli("import-features", s.path, src, "--name", "imp", "--native-fps", 1, "--no-progress"))
    assert f"video/imp: in use by pid {os.getpid()} (" in msg
    w.commit()
    assert cli("import-features", s.path, src, "--name", "imp", "--native-fps", 1, "--no-progress", "--overwrite").returncode == 0
    assert (Store.open(s.path).video("imp").features[:] == 1).all()


def _drop_dac_override() -> None:
    """In the child: give up root's right to ignore file permissions (CAP_DAC_OVERRIDE)."""
    if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP
        os._exit(99)


def test_read_only_store(tmp_path, synthetic_tables):
    """A read-only store: one line before any work (build-teacher trains nothing), no traceback."""
    as_root = os.geteuid() == 0
    if as_root and sys.platform != "linux":
        pytest.skip("runs the commands without CAP_DAC_OVERRIDE, which needs Linux")
    zarr_store = build_store(tmp_path / "s.zarr", *synthetic_tables, features=(), teachers=())
    h5 = build_store(tmp_path / "s.h5", *synthetic_tables, features=(), teachers=())
    before = {p: snapshot(p) for p in (zarr_store.path, h5.path)}
    src = tmp_path / "npy"
    src.mkdir()
    for v in zarr_store.segments.videos:
        np.save(src / f"{v}.npy", np.ones((6, 8), np.float32))
    for p in [*zarr_store.path.rglob("*"), zarr_store.path, h5.path]:
        p.chmod(0o555 if p.is_dir() else 0o444)
    try:
        kw = {"preexec_fn": _drop_dac_override} if as_root else {}
        r = cli("import-features", h5.path, src, "--name", "f", "--native-fps", 1, "--no-progress", **kw)
        if r.returncode == 99:
            pytest.skip("cannot drop CAP_DAC_OVERRIDE here")
        assert f"error: {h5.path}: cannot be written" in one_line(r)
        for store in (zarr_store.path, h5.path):
            r = cli("build-teacher", store, "--name", "t", "--preset", "tiny", "--folds", "1", "--epochs", "50",
                    "--set", "threads=1", **kw)
            assert f"error: {store}: cannot be written" in one_line(r)
            assert not Path(f"{store}.teacher-work").exists()  # refused before training
        r = cli("import-features", zarr_store.path, src, "--name", "f", "--native-fps", 1, "--no-progress", **kw)
        assert f"{zarr_store.path}: cannot be written" in one_line(r)
    finally:
        for p in [zarr_store.path, *zarr_store.path.rglob("*"), h5.path]:
            p.chmod(0o755 if p.is_dir() else 0o644)
    for p, snap in before.items():
        assert_same(snap, snapshot(p))
