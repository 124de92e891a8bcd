"""``kdstore export --format epic``: the EPIC-KITCHENS anticipation leaderboard JSON, checked
against the format's rules (the EK55 submission guide, version 0.1; the EK100 validator of
epic-kitchens/C3-Action-Anticipation, version 0.2) and against the stored scores."""

from __future__ import annotations

import json

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from kdstore.errors import DataError, MissingError
from kdstore.ingest import ingest
from kdstore.metrics import marginalise, softmax
from kdstore.submission import epic_entries, write_epic_submission
from kdstore.synthetic import SyntheticConfig, generate_epic100
from test_epic import write_ek55

runner = CliRunner()


def check_submission(doc: dict, version: str, ids: list[str], num_verbs: int, num_nouns: int, num_actions: int) -> None:
    """The rules a leaderboard applies: version and challenge, supervision levels (0.2),
    exactly the expected segment ids, every verb and noun class, ``num_actions`` actions
    keyed ``verb,noun`` over valid classes, numeric scores."""
    assert doc["version"] == version and doc["challenge"] == "action_anticipation"
    if version == "0.2":
        for k in ("sls_pt", "sls_tl", "sls_td"):
            assert isinstance(doc[k], int) and 0 <= doc[k] <= 5
    else:
        assert not any(k.startswith("sls") for k in doc)
    assert set(doc) <= {"version", "challenge", "results", "sls_pt", "sls_tl", "sls_td"}
    assert sorted(doc["results"]) == sorted(ids)
    for entry in doc["results"].values():
        assert set(entry) == {"verb", "noun", "action"}
        assert sorted(map(int, entry["verb"])) == list(range(num_verbs))
        assert sorted(map(int, entry["noun"])) == list(range(num_nouns))
        assert len(entry["action"]) == num_actions
        for key in entry["action"]:
            v, n = (int(x) for x in key.split(","))
            assert 0 <= v < num_verbs and 0 <= n < num_nouns
        for part in ("verb", "noun", "action"):
            assert all(isinstance(x, (int, float)) and np.isfinite(x) for x in entry[part].values())


@pytest.fixture
def ek100(tmp_path):
    s = ingest(generate_epic100(tmp_path / "ann", SyntheticConfig(n_videos=24)), tmp_path / "s.zarr", dataset="ek100")
    seg = s.segments
    rows = np.concatenate([seg.rows_in("validation"), seg.rows_in("test_timestamps")])
    rng = np.random.default_rng(0)
    s.write_predictions("student", seg.uid[rows], rng.normal(size=(len(rows), s.classes.num_actions)) * 3, kind="student")
    return s


def test_ek100_submission_follows_the_format(ek100, tmp_path):
    s, seg, cls = ek100, ek100.segments, ek100.classes
    out = tmp_path / "test.json"
    r = runner.invoke(app, ["export", str(s.path), "student", str(out), "--format", "epic", "--sls", "2,3,4"])
    assert r.exit_code == 0, r.output
    doc = json.loads(out.read_text())
    test_ids = list(seg.ids[seg.rows_in("test_timestamps")])  # the default: the store's unlabelled split
    check_submission(doc, "0.2", test_ids, cls.num_verbs, cls.num_nouns, min(100, cls.num_actions))
    assert (doc["sls_pt"], doc["sls_tl"], doc["sls_td"]) == (2, 3, 4)
    # the scores: softmax of the stored logits, top actions in order; verbs and nouns marginalised
    g = s.group("student")
    key = test_ids[5]
    logits = np.asarray(g.logits[g.row_of_segment[seg.row_of([key])[0]]], np.float32)[None]
    p = softmax(logits)[0]
    top = np.argsort(-p, kind="stable")[: len(doc["results"][key]["action"])]
    assert list(doc["results"][key]["action"]) == [f"{cls.action_verb[a]},{cls.action_noun[a]}" for a in top]
    assert list(doc["results"][key]["action"].values()) == pytest.approx(p[top], rel=1e-6)
    verb = marginalise(p[None], cls.action_verb, cls.num_verbs)[0]
    assert [doc["results"][key]["verb"][str(v)] for v in range(cls.num_verbs)] == pytest.approx(verb, rel=1e-6, abs=1e-12)


def test_ek55_submission_follows_the_format(tmp_path):
    s = ingest(write_ek55(tmp_path / "ek55"), tmp_path / "s.zarr", dataset="ek55")
    seg, cls = s.segments, s.classes
    rows = seg.rows_in("test_seen")
    s.write_predictions("m", seg.uid[rows], np.random.default_rng(1).normal(size=(len(rows), cls.num_actions)),
                        verb_logits=np.zeros((len(rows), cls.num_verbs)), noun_logits=np.zeros((len(rows), cls.num_nouns)))
    with pytest.raises(MissingError, match="name the split to export"):  # test_seen and test_unseen: one file each
        epic_entries(s, "m")
    head = write_epic_submission(s, "m", tmp_path / "seen.json", split="test_seen")
    doc = json.loads((tmp_path / "seen.json").read_text())
    assert head == {"version": "0.1", "challenge": "action_anticipation", "segments": 3}
    check_submission(doc, "0.1", ["1924", "1925", "1926"], cls.num_verbs, cls.num_nouns, cls.num_actions)
    # the group's own verb/noun heads (uniform here) are used, not the marginals
    assert list(doc["results"]["1924"]["verb"].values()) == pytest.approx([1 / cls.num_verbs] * cls.num_verbs)


def test_missing_predictions_are_refused_or_zero_filled(ek100, tmp_path):
    s, seg = ek100, ek100.segments
    rows = seg.rows_in("test_timestamps")
    s.write_predictions("part", seg.uid[rows[1:]], np.zeros((len(rows) - 1, s.classes.num_actions)))
    first = seg.ids[rows[0]]
    with pytest.raises(DataError, match=f"cover {len(rows) - 1} of the {len(rows)} segments of split 'test_timestamps' \\(first missing: {first}\\)"):
        write_epic_submission(s, "part", tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()
    write_epic_submission(s, "part", tmp_path / "x.json", fill_missing=True)
    doc = json.loads((tmp_path / "x.json").read_text())
    assert set(doc["results"][first]["verb"].values()) == {0.0} and len(doc["results"]) == len(rows)
    with pytest.raises(DataError, match=r"sls must be three levels 0..5 .*found \[1, 9, 3\]"):
        write_epic_submission(s, "student", tmp_path / "y.json", sls=(1, 9, 3))
    with pytest.raises(DataError, match="version must be '0.1' .* or '0.2' .*found '0.3'"):
        write_epic_submission(s, "student", tmp_path / "y.json", version="0.3")
    r = runner.invoke(app, ["export", str(s.path), "student", str(tmp_path / "y.json"), "--sls", "1,x"])
    assert r.exit_code != 0 and "expected three integers" in r.output
