"""The store commands of the CLI, run in-process on a synthetic dataset."""

import json

import pytest
from typer.testing import CliRunner

from cli import app
from kdstore.errors import KDStoreError
from kdstore.store import Store
from kdstore.synthetic import SyntheticConfig, generate_annotations

runner = CliRunner()


@pytest.fixture
def ingested(tmp_path):
    ann = generate_annotations(tmp_path / "ann", SyntheticConfig(n_videos=6))
    store = tmp_path / "s.zarr"
    r = runner.invoke(app, ["ingest", str(ann), str(store), "--fps", "24"])
    assert r.exit_code == 0, r.output
    return store


def test_ingest_info_validate(ingested):
    r = runner.invoke(app, ["info", str(ingested), "--json"])
    assert r.exit_code == 0, r.output
    info = json.loads(r.stdout)
    seg = Store.open(ingested).segments
    assert info["segments"]["total"] == len(seg)
    assert info["segments"]["splits"] == {"training1": len(seg.rows_in("training1")), "validation1": len(seg.rows_in("validation1"))}
    r = runner.invoke(app, ["validate", str(ingested)])
    assert r.exit_code == 0 and "valid" in r.output
    assert Store.open(ingested).manifest["provenance"][0]["action"] == "ingest"


def test_query_and_export(ingested, tmp_path):
    import numpy as np

    s = Store.open(ingested)
    uids = s.segments.uid[:10]
    logits = np.zeros((10, s.classes.num_actions), np.float32)
    logits[np.arange(10), s.segments.action[:10]] = 5.0
    s.write_predictions("t", uids, logits, topk=3)
    r = runner.invoke(app, ["query", str(ingested), str(uids[0]), str(s.segments.uid[20]), "--json"])
    assert r.exit_code == 0, r.output
    first, second = json.loads(r.stdout)  # one JSON document: a list for several ids
    assert first["top"][0]["action"] == first["true"]["action"] and first["true"]["rank"] == 1
    assert second["present"] is False and "top" not in second
    out = tmp_path / "t.npz"
    assert runner.invoke(app, ["export", str(ingested), "t", str(out)]).exit_code == 0
    with np.load(out) as z:
        assert (z["uids"] == uids).all() and z["topk_indices"].shape == (10, 3)


def test_validate_reports_a_corrupted_array(ingested):
    chunk = ingested / "segments" / "action" / "c" / "0"
    chunk.write_bytes(chunk.read_bytes()[:-4])
    r = runner.invoke(app, ["validate", str(ingested)])
    assert r.exit_code == 1 and "segments/action" in r.output


def test_errors_are_one_line(tmp_path):
    (tmp_path / "junk.h5").write_bytes(b"not a store")
    with pytest.raises(KDStoreError, match="junk.h5: not a kdstore store"):
        runner.invoke(app, ["info", str(tmp_path / "junk.h5")], catch_exceptions=False)


def test_real_egtea_one_store_for_every_scheme(egtea_dir, tmp_path):
    """No --split: all six EGTEA CSVs in one store; commands default to training1/validation1."""
    store = tmp_path / "egtea.zarr"
    r = runner.invoke(app, ["ingest", str(egtea_dir), str(store)])
    assert r.exit_code == 0, r.output
    assert "10321 segments (0 unlabelled) in 86 videos at 30 fps" in " ".join(r.output.split())
    r = runner.invoke(app, ["evaluate", str(store), "--baseline", "ngram", "--order", "2", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["n"] == 2022  # validation1, fitted on training1
    r = runner.invoke(app, ["evaluate", str(store), "--baseline", "ngram", "--split", "validation3", "--train-split",
                            "training3", "--json"])
    assert json.loads(r.stdout)["n"] == 2021
