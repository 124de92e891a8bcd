"""EPIC-KITCHENS as published: EK55's layout (a faithful fixture: RULSTM's data/ek55 is not
shared), EK100's narration ids, unlabelled test files and id lists (synthetic, and a
slice of the real files that skips when they are absent), and one-line errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from cli import app
from kdstore.rulstm import guess_dataset, load_annotations, read_classes
from kdstore.text import action_text, action_words
from kdstore.errors import AnnotationError, ConfigError, DataError, KDStoreError, MissingError
from kdstore.ingest import ingest
from kdstore.inspect import export_predictions, summary
from kdstore.store import Store
from kdstore.synthetic import SyntheticConfig, generate_epic100
from kdstore.validate import store_warnings, validate_store

EK100_DIR = Path(__file__).parents[1].parent / "shared/data/ek100"
runner = CliRunner()


# ---------------------------------------------------------------------------------------
# EK55 as RULSTM publishes it (data/ek55): a faithful small fixture

EK55_ACTIONS = [  # (verb class, noun class, the narration's surface words), as in RULSTM's actions.csv
    (0, 0, "take_pan"), (0, 1, "get_fish"), (0, 2, "pick-up_jug:measuring"), (0, 3, "take_cup"),
    (1, 0, "put-down_saucepan"), (1, 1, "put_fish"), (1, 3, "place_cup"), (2, 2, "open_jug:measuring"),
    (2, 0, "open_pan:frying"), (1, 2, "put_jug"),
]


def ek55_line(*cells, pads=(5, 0, 10, 10, 3, 3, 4)) -> str:
    """A row as RULSTM's EK55 CSVs write it: zero-padded numbers, a space after each comma."""
    return ", ".join(c if isinstance(c, str) else f"{c:0{p}d}" for c, p in zip(cells, pads)) + "\n"


def write_ek55(d: Path, class_keys: bool = False) -> Path:
    """The files of RULSTM's data/ek55 (with EPIC_*_classes.csv when ``class_keys``)."""
    d.mkdir(parents=True, exist_ok=True)
    (d / "actions.csv").write_text("id,action,verb,noun\n" + "".join(f"{a}, {name},{v},{n}\n" for a, (v, n, name) in enumerate(EK55_ACTIONS)))
    train = [(330, "P01_01", 152, 205, 0), (331, "P01_01", 230, 260, 4), (332, "P01_01", 261, 300, 1), (333, "P01_01", 310, 400, 5),
             (340, "P01_02", 10, 40, 2), (341, "P01_02", 50, 80, 7), (342, "P01_02", 90, 99, 9), (343, "P01_02", 120, 150, 3)]
    val = [(1001, "P01_03", 5, 30, 8), (1002, "P01_03", 40, 60, 6), (1003, "P01_03", 70, 90, 0)]
    for name, rows in (("training", train), ("validation", val)):
        (d / f"{name}.csv").write_text("".join(ek55_line(u, vid, s, e, EK55_ACTIONS[a][0], EK55_ACTIONS[a][1], a)
                                               for u, vid, s, e, a in rows))
        (d / f"{name}_videos.csv").write_text("".join(f"{v}\n" for v in dict.fromkeys(r[1] for r in rows)))
    (d / "test_seen.csv").write_text("".join(ek55_line(u, "P01_11", s, s + 30) for u, s in ((1924, 1), (1925, 46), (1926, 89))))
    (d / "test_unseen.csv").write_text("".join(ek55_line(u, "P12_01", s, s + 20) for u, s in ((5001, 3), (5002, 40))))
    (d / "EPIC_many_shot_verbs.csv").write_text("verb_class,verb\n0,take\n1,put\n")
    (d / "EPIC_many_shot_nouns.csv").write_text("noun_class,noun\n0,pan\n")
    if class_keys:  # the epic-kitchens-55-annotations release
        (d / "EPIC_verb_classes.csv").write_text(
            "verb_id,class_key,verbs\n0,take,\"['take', 'get', 'pick-up', 'grab']\"\n1,put,\"['put', 'put-down', 'place']\"\n"
            "2,open,\"['open']\"\n")
        (d / "EPIC_noun_classes.csv").write_text(
            "noun_id,class_key,nouns\n0,pan,\"['pan', 'saucepan', 'pan:frying']\"\n1,fish,\"['fish']\"\n2,jug,\"['jug', 'jug:measuring']\"\n"
            "3,cup,\"['cup']\"\n")
    return d


def test_ek55_as_published(tmp_path):
    d = write_ek55(tmp_path / "ek55")
    s = ingest(d, tmp_path / "ek55.zarr", dataset="ek55")
    seg, cls = s.segments, s.classes
    assert s.dataset == "ek55" and seg.fps == 30.0 and seg.key_type == "uid"
    assert seg.splits == ["test_seen", "test_unseen", "training", "validation"]  # the *_videos.csv lists are not splits
    assert seg.uid.tolist() == sorted([330, 331, 332, 333, 340, 341, 342, 343, 1001, 1002, 1003, 1924, 1925, 1926, 5001, 5002])
    assert seg.start_frame[seg.row_of([330])[0]] == 152 and seg.id_of(seg.row_of([330])[0]) == 330
    test = seg.in_split("test_seen") | seg.in_split("test_unseen")
    assert (seg.action[test] == -1).all() and (seg.action[~test] >= 0).all() and (~seg.labelled).sum() == 5
    # one display name a class: its most frequent surface word (ties: the lowest action id's)
    assert cls.verb_names == ["take", "put", "open"] and cls.noun_names == ["pan", "fish", "jug:measuring", "cup"]
    # ... while each action keeps its own words as teacher text
    assert cls.surface_verbs[1] == "get" and action_words(cls, 1, "reverse") == "get <v> fish"
    assert action_text(cls, [2, 4], "reverse") == "pick-up <v> measuring jug <a> put-down <v> saucepan"
    assert cls.surface_names("noun")[0] == ["pan", "saucepan", "pan:frying"]
    info = summary(s)
    assert info["classes"]["several_names"] == {"verbs": 2, "nouns": 2}
    assert info["segments"]["unlabelled"] == {"test_seen": 3, "test_unseen": 2, "training": 0, "validation": 0}
    assert cls.many_shot_actions.tolist() == [v in (0, 1) or n == 0 for v, n, _ in EK55_ACTIONS]
    assert validate_store(s.path) == [] and store_warnings(s.path) == []
    assert s.default_splits() == ("training", "validation")
    r = runner.invoke(app, ["info", str(s.path)])
    assert r.exit_code == 0 and "several surface names: 2 verbs, 2 nouns" in " ".join(r.output.split())


def test_ek55_class_keys_name_the_classes(tmp_path):
    d = write_ek55(tmp_path / "ek55", class_keys=True)
    c, _ = load_annotations(d, dataset="ek55")
    assert c.noun_names == ["pan", "fish", "jug", "cup"] and c.surface_nouns[2] == "jug:measuring"
    (d / "EPIC_noun_classes.csv").write_text("noun_id,class_key,nouns\n0,pan,x\n1,,x\n2,jug,x\n3,cup,x\n")
    with pytest.raises(AnnotationError, match=r"EPIC_noun_classes.csv, row 3: noun class 1 has no name"):
        load_annotations(d, dataset="ek55")
    (d / "EPIC_noun_classes.csv").write_text("noun_id,class_key,nouns\n0,pan,x\n1,fish,x\n3,cup,x\n")
    with pytest.raises(AnnotationError, match=r"EPIC_noun_classes.csv: noun class 2 \(used by actions.csv\) has no name"):
        load_annotations(d, dataset="ek55")
    (d / "EPIC_noun_classes.csv").write_text("noun,name\n0,pan\n")
    with pytest.raises(AnnotationError, match="expected a header 'noun_id,class_key,...' or 'id,key,...'"):
        load_annotations(d, dataset="ek55")


def test_ek55_size_is_recognised(tmp_path):
    """RULSTM's EK55 class list has 2513 actions over 125 verbs and 352 nouns: ingested at 30 fps without options."""
    d = tmp_path / "ek55"
    d.mkdir()
    rows = [(a % 125, 7 * a % 352) for a in range(2513)]  # distinct (verb, noun) pairs
    (d / "actions.csv").write_text("id,action,verb,noun\n" + "".join(f"{a}, v{v}_n{n},{v},{n}\n" for a, (v, n) in enumerate(rows)))
    (d / "training.csv").write_text(ek55_line(1, "P01_01", 4, 101, rows[7][0], rows[7][1], 7))
    c, s = load_annotations(d)
    assert guess_dataset(c) == "ek55" and s.fps == 30.0 and (c.num_verbs, c.num_nouns) == (125, 352)


# ---------------------------------------------------------------------------------------
# EK100 layout (synthetic)


@pytest.fixture
def ek100_dir(tmp_path) -> Path:
    return generate_epic100(tmp_path / "ek100", SyntheticConfig(n_videos=16))


def test_ek100_layout(ek100_dir, tmp_path):
    s = ingest(ek100_dir, tmp_path / "s.zarr", dataset="ek100")
    seg = s.segments
    assert seg.key_type == "id" and seg.splits == ["test_timestamps", "training", "validation"]
    assert seg.subsets == [f"validation_{k}" for k in ("tail_actions", "tail_nouns", "tail_verbs", "unseen_participants")]
    assert seg.subset_splits == ["validation"] * 4
    # uids follow the natural order of the narration ids: P01_01_9 before P01_01_10
    ids = list(seg.ids)
    assert seg.uid.tolist() == list(range(len(seg))) and ids.index("P01_01_9") < ids.index("P01_01_10")
    assert ids == sorted(ids, key=lambda i: (i.split("_")[0], int(i.split("_")[1]), int(i.split("_")[2])))
    listed = (ek100_dir / "validation_unseen_participants_ids.csv").read_text().split()
    assert sorted(seg.ids[seg.in_subset("validation_unseen_participants")]) == sorted(listed)
    assert (seg.action[seg.in_split("test_timestamps")] == -1).all()
    again = Store.open(s.path).segments  # the ids round-trip through segments/id
    assert list(again.ids) == ids and again.subsets == seg.subsets
    np.testing.assert_array_equal(again.subset_mask, seg.subset_mask)
    arr = np.asarray(s.backend.memmap("segments/id"))
    assert arr.dtype == np.uint8 and arr.shape == (len(seg), max(len(i) for i in ids))
    assert validate_store(s.path) == []


def test_predictions_by_narration_id(ek100_dir, tmp_path):
    s = ingest(ek100_dir, tmp_path / "s.zarr", dataset="ek100")
    seg, A = s.segments, s.classes.num_actions
    val = seg.rows_in("validation")
    logits = np.zeros((len(val), A), np.float32)
    logits[np.arange(len(val)), seg.action[val]] = 4.0
    g = s.write_predictions("t", list(seg.ids[val]), logits, topk=5)  # written by the dataset's ids
    key = str(seg.ids[val[3]])
    by_id, by_uid = g.predict(key), g.predict(int(seg.uid[val[3]]))
    assert by_id == by_uid and by_id["id"] == key and by_id["true"]["rank"] == 1 and by_id["splits"] == ["validation"]
    test_key = str(seg.ids[seg.rows_in("test_timestamps")[0]])
    assert g.predict(test_key) == {**g.predict(test_key), "true": None, "present": False}
    with pytest.raises(MissingError, match="segment 'P99_99_0': not in the segment table"):
        g.predict("P99_99_0")
    r = runner.invoke(app, ["query", str(s.path), key, test_key, "--json"])
    assert r.exit_code == 0, r.output
    docs = json.loads(r.stdout)
    assert [d["id"] for d in docs] == [key, test_key] and docs[1]["true"] is None
    r = runner.invoke(app, ["query", str(s.path), key])
    assert r.exit_code == 0 and r.output.startswith(key)
    out = tmp_path / "t.jsonl"
    export_predictions(s, "t", out)
    assert [json.loads(line)["id"] for line in out.read_text().splitlines()] == list(seg.ids[val])
    export_predictions(s, "t", tmp_path / "t.npz")
    with np.load(tmp_path / "t.npz") as z:
        assert z["ids"].tolist() == list(seg.ids[val]) and z["ids"].dtype.kind == "U"
    with pytest.raises(ConfigError, match="the folder .*nope does not exist"):
        export_predictions(s, "t", tmp_path / "nope" / "t.jsonl")


def test_unlabelled_segments_are_left_out_and_said(ek100_dir, tmp_path):
    from kdstore.evaluation import evaluate_group
    from trainers.teacher.evaluate import evaluate_ngram

    s = ingest(ek100_dir, tmp_path / "s.zarr", dataset="ek100")
    seg = s.segments
    m = evaluate_ngram(s, "training", "validation", write="ngram")
    assert m["n"] == len(seg.rows_in("validation")) and m["unlabelled"] == 0
    with pytest.raises(DataError, match=r"no labelled segments in split 'test_timestamps' \(\d+ unlabelled\)"):
        evaluate_ngram(s, "training", "test_timestamps")
    # a group that also covers the test segments: metrics on the labelled ones only
    rows = np.concatenate([seg.rows_in("validation"), seg.rows_in("test_timestamps")])
    s.write_predictions("all", seg.uid[rows], np.zeros((len(rows), s.classes.num_actions)))
    with pytest.raises(DataError, match="no labelled segments in split 'test_timestamps'"):
        evaluate_group(s, "all", "test_timestamps")
    assert evaluate_group(s, "all")["n"] == len(seg.rows_in("validation"))
    r = runner.invoke(app, ["evaluate", str(s.path), "--baseline", "ngram"])  # default splits: training -> validation
    assert r.exit_code == 0, r.output
    assert "overall" in r.output and "unseen" in r.output and "tail" in r.output


def test_teacher_leaves_out_unlabelled_splits(ek100_dir, tmp_path):
    from trainers.teacher.build import build_teacher
    from trainers.teacher.config import preset

    s = ingest(ek100_dir, tmp_path / "s.zarr", dataset="ek100")
    with pytest.raises(DataError, match="no labelled segments in split 'test_timestamps' .*the teacher predicts labelled segments only"):
        build_teacher(s, "t", preset("tiny", epochs=1, folds=1), train_split="training", eval_splits=("test_timestamps",),
                      show_progress=False)


# ---------------------------------------------------------------------------------------
# bad input: one line each, naming the file and row


def ek100_files(d: Path, **replace: str) -> Path:
    """A minimal hand-written EK100 folder; ``replace`` overrides files by stem."""
    d.mkdir(parents=True, exist_ok=True)
    files = {
        "actions": "id,verb,noun,action\n0,0,0,take tap\n1,0,1,take spoon\n2,1,1,wash spoon\n3,1,2,wash liquid:washing\n",
        "training": "P01_01_0,P01_01,4,101,0,0,0\nP01_01_1,P01_01,131,185,0,1,1\nP01_01_2,P01_01,190,230,1,1,2\n",
        "validation": "P02_01_0,P02_01,1,56,1,2,3\nP02_01_1,P02_01,46,73,0,0,0\n",
        "test_timestamps": "P03_01_0,P03_01,85,116\nP03_01_1,P03_01,149,172\n",
        "validation_unseen_participants_ids": "P02_01_0\nP02_01_1\n",
        "validation_tail_actions_ids": "P02_01_0\n",
    }
    for stem, text in {**files, **replace}.items():
        (d / f"{stem}.csv").write_text(text)
    return d


@pytest.mark.parametrize(
    "replace, msg",
    [
        ({"training": "P01_01_0,P01_01,4,101,0,0,0\nP01_01_0,P01_01,131,185,0,1,1\n"},
         r"training.csv, row 2: segment P01_01_0 appears twice \(rows 1 and 2\)"),
        ({"training": "P01_01_0,P01_01,4,101,0,0,0\nP01_01_1,P01_01,131,185,0,1,7\n"},
         r"training.csv, row 2: segment P01_01_1 has action id 7, not in actions.csv \(0..3\)"),
        ({"test_timestamps": "P03_01_0,P03_01,85,116,0,0,0\n"},
         r"test_timestamps.csv, row 1: a test file holds unlabelled segments \(uid, video, start, end\), found a labelled row"),
        ({"test_timestamps": "P03_01_0,P03_01,85,116\nP03_01_1,P03_01,149,172,0,0,0\n"},
         "test_timestamps.csv, row 2: 7 columns, the file's first row has 4"),
        ({"validation_tail_actions_ids": "P02_01_0\nP01_01_2\n"},
         "validation_tail_actions_ids.csv, row 2: P01_01_2 is not a segment of split 'validation'"),
        ({"validation_tail_actions_ids": "P02_01_0\nP09_09_9\n"},
         "validation_tail_actions_ids.csv, row 2: P09_09_9 is not a segment of split 'validation'"),
        ({"validation_unseen_participants_ids": "P02_01_0\nP02_01_0\n"},
         r"validation_unseen_participants_ids.csv, row 2: P02_01_0 listed twice \(rows 1 and 2\)"),
        ({"actions": "id,verb,noun,action\n0,0,0,take tap\n1,0,1,\n"}, "actions.csv, row 3: action 1 has no name"),
        ({"actions": "id,verb,noun,action\n0,0,0,take tap\n1,0,1,take\n"},
         r"actions.csv, row 3: action 1 name 'take' lacks a verb or a noun word \(like 'take pan'\)"),
        ({"validation": "P02_01_0,P02_01,1,56,1,2,3\n7,P02_01,46,73,0,0,0\n"},
         "validation.csv, row 2: segment key '7' is not a string id like row 1's"),
        ({"validation": "P02_01_0,P02_01,1,99999999999999999999999,1,2,3\n"},
         "validation.csv, row 1: end_frame 99999999999999999999999 is beyond the int64 range"),
        ({"stray_ids": "P02_01_0\n"}, r"stray_ids.csv: an id list is named <split>_<subset>_ids.csv; no split CSV matches"),
    ],
)
def test_bad_epic_input_is_one_line(tmp_path, replace, msg):
    d = ek100_files(tmp_path / "ek100", **replace)
    with pytest.raises(AnnotationError, match=msg) as info:
        load_annotations(d, fps=30.0)
    assert "\n" not in str(info.value)
    with pytest.raises(AnnotationError, match=msg):
        ingest(d, tmp_path / "s.zarr", fps=30.0)
    assert not (tmp_path / "s.zarr").exists()  # nothing written


def test_a_key_in_files_of_both_kinds_is_refused(tmp_path):
    d = ek100_files(tmp_path / "ek100", test_timestamps="5,P03_01,85,116\n")
    with pytest.raises(AnnotationError, match="test_timestamps.csv has integer segment keys, .*training.csv string ones"):
        load_annotations(d, fps=30.0)


def test_utf8_bom_is_accepted(tmp_path):
    d = ek100_files(tmp_path / "ek100")
    for f in ("actions.csv", "training.csv", "validation_tail_actions_ids.csv"):
        (d / f).write_bytes(b"\xef\xbb\xbf" + (d / f).read_bytes())
    c, s = load_annotations(d, fps=30.0)
    assert c.num_actions == 4 and s.id_of(0) == "P01_01_0" and s.in_subset("validation_tail_actions").sum() == 1


def test_query_k_is_checked_and_json_is_one_document(tmp_path):
    d = ek100_files(tmp_path / "ek100")
    s = ingest(d, tmp_path / "s.zarr", fps=30.0)
    s.write_predictions("t", ["P02_01_0", "P02_01_1"], np.zeros((2, 4)))
    for k in ("0", "-3"):
        r = runner.invoke(app, ["query", str(s.path), "P02_01_0", "-k", k])
        assert r.exit_code != 0 and "greater than or equal to 1" in r.output
    with pytest.raises(DataError, match="k must be >= 1, found 0"):
        s.group("t").predict("P02_01_0", k=0)
    one = json.loads(runner.invoke(app, ["query", str(s.path), "P02_01_0", "--json"]).stdout)
    two = json.loads(runner.invoke(app, ["query", str(s.path), "P02_01_0", "P02_01_1", "--json"]).stdout)
    assert one["id"] == "P02_01_0" and [t["id"] for t in two] == ["P02_01_0", "P02_01_1"]


# ---------------------------------------------------------------------------------------
# the real EK100 files (skip when absent)


@pytest.fixture
def ek100_real() -> Path:
    if not (EK100_DIR / "actions.csv").is_file():
        pytest.skip(f"real EK100 annotations not found at {EK100_DIR}")
    return EK100_DIR


def ek100_slice(src: Path, dst: Path, videos: dict[str, int]) -> Path:
    """The real files cut to ``videos[split]`` videos of each split, the first ones (half of
    validation's from unseen participants), with the id lists cut alike."""
    dst.mkdir(parents=True, exist_ok=True)
    shutil.copy(src / "actions.csv", dst / "actions.csv")
    unseen = list(dict.fromkeys(i.rsplit("_", 1)[0] for i in (src / "validation_unseen_participants_ids.csv").read_text().split()))
    kept: set[str] = set()
    for split, n in videos.items():
        lines = (src / f"{split}.csv").read_text().splitlines()
        vids = list(dict.fromkeys(line.split(",")[1] for line in lines))
        vids = vids[: n - n // 2] + unseen[: n // 2] if split == "validation" else vids[:n]
        keep = [line for line in lines if line.split(",")[1] in vids]
        kept |= {line.split(",")[0] for line in keep}
        (dst / f"{split}.csv").write_text("\n".join(keep) + "\n")
    for p in src.glob("validation_*_ids.csv"):
        (dst / p.name).write_text("".join(f"{i}\n" for i in p.read_text().split() if i in kept))
    return dst


def test_real_ek100_classes_and_teacher_text(ek100_real):
    c = read_classes(ek100_real / "actions.csv")
    assert (c.num_actions, c.num_verbs, c.num_nouns) == (3806, 97, 300) and guess_dataset(c) == "ek100"
    assert c.action_names[0] == "take tap" and action_words(c, 0, "reverse") == "take <v> tap"
    a = c.action_names.index("pour liquid:washing") if "pour liquid:washing" in c.action_names else next(
        i for i, n in enumerate(c.action_names) if n.endswith("liquid:washing"))
    assert action_words(c, a, "reverse").endswith("<v> washing liquid")  # EK100 puts the head noun first
    assert all(" <v> " in action_words(c, i, "reverse") and ":" not in action_words(c, i, "reverse") for i in range(c.num_actions))
    # 7 noun ids that no action uses keep a placeholder name, and info counts them
    unused = sorted(set(range(300)) - set(c.action_noun.tolist()))
    assert len(unused) == 7 and c.noun_names[unused[0]] == f"noun_{unused[0]}"


def test_real_ek100_full_ingest(ek100_real, tmp_path):
    s = ingest(ek100_real, tmp_path / "ek100.zarr")
    seg = s.segments
    assert s.dataset == "ek100" and seg.fps == 30.0
    assert {k: int(seg.in_split(k).sum()) for k in seg.splits} == {"test_timestamps": 13092, "training": 67217, "validation": 9668}
    assert {k: int(seg.in_subset(k).sum()) for k in seg.subsets} == {
        "validation_tail_actions": 3105, "validation_tail_nouns": 1900, "validation_tail_verbs": 1760,
        "validation_unseen_participants": 1065}
    assert seg.row_of(["P01_11_0"]).tolist() == seg.row_of([int(seg.uid[seg.row_of(["P01_11_0"])[0]])]).tolist()
    assert validate_store(s.path, deep=False) == [] and store_warnings(s.path) == []


def test_real_ek100_slice_pipeline(ek100_real, tmp_path):
    """ingest, validate, query by narration id, evaluate (challenge metrics), export a submission."""
    from kdstore.submission import write_epic_submission
    from trainers.teacher.evaluate import evaluate_ngram

    d = ek100_slice(ek100_real, tmp_path / "slice", {"training": 40, "validation": 8, "test_timestamps": 2})
    s = ingest(d, tmp_path / "s.zarr")
    assert s.dataset == "ek100" and len(s.segments.subsets) == 4
    assert validate_store(s.path) == []
    m = evaluate_ngram(s, write="ngram")
    assert 0 < m["mean_top5_recall"] < 100 and m["unseen_action_mean_top5_recall"] is not None
    r = runner.invoke(app, ["query", str(s.path), "P01_11_0", "-t", "ngram"])
    assert r.exit_code == 0 and r.output.startswith("P01_11_0")
    out = tmp_path / "val.json"
    head = write_epic_submission(s, "ngram", out, split="validation")
    assert head["version"] == "0.2" and head["segments"] == len(s.segments.rows_in("validation"))
    doc = json.loads(out.read_text())
    assert set(doc["results"]) == set(s.segments.ids[s.segments.rows_in("validation")])


def test_student_predictions_cover_unlabelled_segments(ek100_dir, tmp_path, one_thread):
    from kdstore.synthetic import synthetic_features
    from trainers.student.config import preset as student_preset
    from trainers.student.train import predict_into_store, train_student

    s = ingest(ek100_dir, tmp_path / "s.zarr", dataset="ek100")
    w = s.video_writer("feat", 16, frame_rate=2.0)
    for video, (f, t) in synthetic_features(s.classes, s.segments, dim=16, rate=2.0).items():
        w.put(video, f, t)
    w.commit()
    cfg = student_preset("egtea", num_frames=4, n_layer=1, n_head=2, inter_dim=32, epochs=1, batch_size=16,
                         distill_mode="none", topk=5)
    train_student(s, "feat", tmp_path / "run", cfg, train_split="training", eval_split="validation", progress=False)
    metrics = predict_into_store(s, tmp_path / "run", "student")
    seg = Store.open(s.path).segments
    g = Store.open(s.path).group("student")
    assert g.present.all()  # features and student predictions cover the unlabelled test segments too
    assert metrics["test_timestamps"] == {"unlabelled": int(seg.in_split("test_timestamps").sum())}
    assert metrics["validation"]["n"] == int(seg.in_split("validation").sum())


def test_report_uses_the_challenge_metrics(ek100_dir, tmp_path):
    from kdstore.evaluation import format_table, metrics_table
    from kdstore.report import write_report

    s = ingest(ek100_dir, tmp_path / "s.zarr", dataset="ek100")
    seg = s.segments
    rows = seg.rows_in("validation")
    s.write_predictions("t", seg.uid[rows], np.random.default_rng(0).normal(size=(len(rows), s.classes.num_actions)))
    page = write_report(s, tmp_path / "report").read_text()  # default split: validation
    assert "split <b>validation</b>" in page and "action tail (%)" in page and "verb unseen (%)" in page
    [row] = metrics_table(s)
    assert row["n"] == len(rows) and row["tail_action_mean_top5_recall"] is not None
    assert "action overall" in format_table([row], "ek100")
