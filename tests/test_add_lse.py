"""``kdstore add-lse``: log-sum-exp columns added to an existing prediction group equal those
of a group written with the temperature, through the atomic group commit; KD's topk_lse mode
at a new temperature works once the column is there."""

from __future__ import annotations

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from conftest import SUFFIXES, build_store
from kdstore.errors import ConfigError, DataError, MissingError
from kdstore.predictions import add_lse
from kdstore.store import Store
from kdstore.validate import validate_store
from processes import CRASHED, cli


def _invoke(*args):
    return CliRunner().invoke(app, [str(a) for a in args])


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_added_columns_equal_a_group_written_with_them(tmp_path, synthetic_tables, suffix):
    s = build_store(tmp_path / f"s{suffix}", *synthetic_tables)
    g = s.group("teacher")
    before = {k: np.array(g._array(k)) for k in ("uids", "logits", "topk_values", "topk_indices", "features")}
    old_lse, old_temps, old_attrs = np.array(g.lse), list(g.lse_temperatures), dict(g.attrs)
    # the reference: the same stored logits written with the extra temperatures from the start
    s.write_predictions("ref", g.uids, np.array(g.logits), features=np.array(g.features), topk=10,
                        lse_temperatures=(*old_temps, 5.0, 7.0))
    r = _invoke("add-lse", s.path, "-p", "teacher", "-T", 5, "-T", 7, "-T", 2)
    assert r.exit_code == 0, r.output
    assert r.output.strip() == "teacher/teacher: log-sum-exp added at T = 5, 7 (stored: T = 1, 2, 4, 10, 5, 7)"
    s = Store.open(s.path)
    g, ref = s.group("teacher"), s.group("ref")
    assert g.lse_temperatures == [*old_temps, 5.0, 7.0] == ref.lse_temperatures
    np.testing.assert_array_equal(np.asarray(g.lse), np.asarray(ref.lse))  # to the bit
    np.testing.assert_array_equal(np.asarray(g.lse)[:, : len(old_temps)], old_lse)
    for k, v in before.items():
        np.testing.assert_array_equal(np.asarray(g._array(k)), v)
    assert {**g.attrs, "lse_temperatures": old_temps} == old_attrs
    entry = s.manifest["provenance"][-1]
    assert entry["action"] == "add_lse" and entry["group"] == "teacher/teacher" and entry["temperatures"] == [5.0, 7.0]
    assert validate_store(s.path) == []
    r = _invoke("add-lse", s.path, "-p", "teacher", "-T", 5)  # already there: nothing is rewritten
    assert r.exit_code == 0 and "nothing to add" in r.output
    assert len(Store.open(s.path).manifest["provenance"]) == len(s.manifest["provenance"])


def test_float64_groups_keep_the_writers_arithmetic(tmp_path, synthetic_tables):
    s = build_store(tmp_path / "s.zarr", *synthetic_tables, teachers=())
    seg = s.segments
    logits = np.random.default_rng(1).normal(size=(len(seg), s.classes.num_actions)) * 4  # float64
    s.write_predictions("a", seg.uid, logits, scores_dtype="float64", lse_temperatures=(1.0,))
    s.write_predictions("b", seg.uid, logits, scores_dtype="float64", lse_temperatures=(1.0, 3.0))
    assert add_lse(s, "a", [3.0]) == [3.0]
    np.testing.assert_array_equal(np.asarray(s.group("a").lse), np.asarray(s.group("b").lse))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_a_crash_before_the_commit_leaves_the_old_group(tmp_path, synthetic_tables, suffix):
    s = build_store(tmp_path / f"s{suffix}", *synthetic_tables)
    lse, temps = np.array(s.group("teacher").lse), s.group("teacher").lse_temperatures
    point = "zarr.staged:1" if suffix == ".zarr" else "hdf5.staged:1"
    assert cli("add-lse", s.path, "-p", "teacher", "-T", 5, crash=point).returncode == CRASHED
    g = Store.open(s.path).group("teacher")
    assert g.lse_temperatures == temps
    np.testing.assert_array_equal(np.asarray(g.lse), lse)
    assert Store.open(s.path).manifest["provenance"][-1]["action"] != "add_lse"
    r = cli("add-lse", s.path, "-p", "teacher", "-T", 5)  # the next writer clears the leftover and adds it
    assert r.returncode == 0, r.stderr
    assert Store.open(s.path).group("teacher").lse_temperatures == [*temps, 5.0]
    assert validate_store(s.path) == []


def test_refusals_are_one_line(tmp_path, synthetic_tables):
    s = build_store(tmp_path / "s.zarr", *synthetic_tables)
    g = s.group("teacher")
    arrays = {k: g._array(k) for k in s.backend.children(g.key) if k != "logits"}
    s.backend.write_group("teacher/nologits", arrays, g.attrs)
    with pytest.raises(DataError, match=r"^teacher/nologits: holds no logits, not the full logits \[P, \d+\]"):
        add_lse(s, "nologits", [5.0])
    with pytest.raises(ConfigError, match="must be positive, found 0"):
        add_lse(s, "teacher", [0.0])
    with pytest.raises(MissingError, match="no predictions named 'absent'"):
        add_lse(s, "absent", [5.0])
    r = _invoke("add-lse", s.path, "-p", "nologits", "-T", 5)
    assert r.exit_code != 0 and isinstance(r.exception, DataError) and "\n" not in str(r.exception)


STUDENT = ["--preset", "egtea", "--set", "num_frames=4", "--set", "n_layer=1", "--set", "n_head=2", "--set", "inter_dim=32",
           "--set", "batch_size=16", "--set", "topk=5", "--set", "epochs=1", "--device", "cpu",
           "--set", "distill_mode=topk_lse", "--set", "temperature=5"]


def test_topk_lse_at_a_new_temperature_works_after_add_lse(tmp_path, synthetic_tables, one_thread):
    s = build_store(tmp_path / "s.zarr", *synthetic_tables)
    train = ["train-student", s.path, "-f", "feat", "-t", "teacher", *STUDENT]
    r = _invoke(*train, "--run", tmp_path / "refused")
    assert isinstance(r.exception, MissingError), r.output
    assert f"add it with `kdstore add-lse {s.path} -p teacher -T 5`" in str(r.exception)
    assert _invoke("add-lse", s.path, "-p", "teacher", "-T", 5).exit_code == 0
    r = _invoke(*train, "--run", tmp_path / "run")
    assert r.exit_code == 0, r.output
    assert (tmp_path / "run" / "last.safetensors").is_file()
