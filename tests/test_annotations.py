"""Annotation parsing (RULSTM/AVT CSVs, EGTEA and EK55 class lists), histories, action text.

EK55/EK100 layouts, id lists and unlabelled files are tested in test_epic.py."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdstore.histories import histories
from kdstore.rulstm import guess_dataset, load_annotations, read_classes, read_segments_csv
from kdstore.tables import ClassTable, SegmentTable, default_splits
from kdstore.text import action_text, action_words, class_words
from kdstore.errors import AnnotationError, ConfigError, KDStoreError, MissingError
from kdstore.store import Store

FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------
# writers of the three formats


def write_egtea_actions(path: Path, verbs: list[str], nouns: list[str], pairs: list[tuple[int, int]]) -> None:
    """EGTEA ``actions.csv``: ``id, v_n, Verb_noun``, no header."""
    path.write_text("".join(f"{a}, {v}_{n}, {verbs[v]}_{nouns[n]}\n" for a, (v, n) in enumerate(pairs)))


def write_ek55_actions(path: Path, verbs: list[str], nouns: list[str], pairs: list[tuple[int, int]]) -> None:
    """EK55 ``actions.csv``: header ``id,action,verb,noun``, ``action`` is ``verb_noun``."""
    path.write_text("id,action,verb,noun\n" + "".join(f"{a},{verbs[v]}_{nouns[n]},{v},{n}\n" for a, (v, n) in enumerate(pairs)))


def segment_line(row: tuple, pad: int, space: bool) -> str:
    """One RULSTM segment row: ``uid, video, start, end, verb, noun, action``, maybe zero-padded."""
    uid, video, *nums = row
    cells = [f"{uid:0{pad}d}" if pad else str(uid), video, *(f"{x:0{pad}d}" if pad else str(x) for x in nums)]
    return (", " if space else ",").join(cells) + "\n"


WORD = st.text(alphabet="abcdefghijklmnopqrstuvwxyz", min_size=1, max_size=6)


@st.composite
def class_lists(draw):
    """(verbs, nouns, pairs): verb names without '_', nouns maybe with ':' and '/', case-distinct."""
    verbs = draw(st.lists(st.builds(lambda a, b, s: a.capitalize() + (s + b if b else ""), WORD, st.one_of(st.just(""), WORD), st.sampled_from(["/", " "])),
                          min_size=1, max_size=6, unique_by=str.lower))
    nouns = draw(st.lists(st.builds(lambda a, b, s: a + (s + b if b else ""), WORD, st.one_of(st.just(""), WORD), st.sampled_from([":", "/", "_"])),
                          min_size=1, max_size=8, unique_by=str.lower))
    pairs = draw(st.lists(st.tuples(st.integers(0, len(verbs) - 1), st.integers(0, len(nouns) - 1)), min_size=1, max_size=12, unique=True))
    return verbs, nouns, pairs


def check_classes(c: ClassTable, verbs, nouns, pairs) -> None:
    assert c.num_actions == len(pairs)
    assert c.action_verb.tolist() == [v for v, _ in pairs] and c.action_noun.tolist() == [n for _, n in pairs]
    assert c.action_verb.dtype == np.int32 and c.action_noun.dtype == np.int32
    assert c.action_names[0].lower() in {f"{verbs[pairs[0][0]]}_{nouns[pairs[0][1]]}".lower()}
    used_v, used_n = {v for v, _ in pairs}, {n for _, n in pairs}
    assert c.num_verbs == max(used_v) + 1 and c.num_nouns == max(used_n) + 1
    for i, name in enumerate(c.verb_names):
        assert name == (verbs[i] if i in used_v else f"verb_{i}")
    for i, name in enumerate(c.noun_names):
        assert name == (nouns[i] if i in used_n else f"noun_{i}")


# ---------------------------------------------------------------------------------------
# class lists


@FAST
@given(lists=class_lists(), ek55=st.booleans())
def test_read_classes_both_formats(lists, ek55):
    verbs, nouns, pairs = lists
    with tempfile.TemporaryDirectory() as d:
        p = Path(d) / "actions.csv"
        (write_ek55_actions if ek55 else write_egtea_actions)(p, verbs, nouns, pairs)
        c = read_classes(p)
        check_classes(c, verbs, nouns, pairs)
        assert c.action_names == [f"{verbs[v]}_{nouns[n]}" for v, n in pairs]
        assert c.many_shot_verbs is None and c.many_shot_actions is None


@FAST
@given(lists=class_lists(), data=st.data())
def test_ek55_many_shot_lists(lists, data):
    verbs, nouns, pairs = lists
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_ek55_actions(d / "actions.csv", verbs, nouns, pairs)
        nv, nn = max(v for v, _ in pairs) + 1, max(n for _, n in pairs) + 1
        many_v = data.draw(st.lists(st.integers(0, nv - 1), unique=True))
        many_n = data.draw(st.lists(st.integers(0, nn - 1), unique=True))
        (d / "EPIC_many_shot_verbs.csv").write_text("verb_class,verb\n" + "".join(f"{i},v{i}\n" for i in many_v))
        (d / "EPIC_many_shot_nouns.csv").write_text("noun_class,noun\n" + "".join(f"{i},n{i}\n" for i in many_n))
        c = read_classes(d / "actions.csv", d / "EPIC_many_shot_verbs.csv", d / "EPIC_many_shot_nouns.csv")
        assert np.flatnonzero(c.many_shot_verbs).tolist() == sorted(many_v)
        assert np.flatnonzero(c.many_shot_nouns).tolist() == sorted(many_n)
        want = [v in many_v or n in many_n for v, n in pairs]  # RULSTM: verb or noun many-shot
        assert c.many_shot_actions.tolist() == want
        check_classes(c, verbs, nouns, pairs)


def test_ek55_real_layout(tmp_path):
    """The EK55 shapes: header, names with ':' and '-', many-shot lists found by load_annotations."""
    (tmp_path / "actions.csv").write_text("id,action,verb,noun\n0,take_pan:dust,0,1\n1,put-down_cup,1,0\n2,take_cup,0,0\n")
    (tmp_path / "EPIC_many_shot_verbs.csv").write_text("verb_class,verb\n0,take\n")
    (tmp_path / "EPIC_many_shot_nouns.csv").write_text("noun_class,noun\n0,cup\n1,pan:dust\n")
    (tmp_path / "training.csv").write_text("00001, P01_01, 0000008, 0000202, 000, 001, 0000\n00002, P01_01, 0000300, 0000400, 001, 000, 0001\n")
    c, s = load_annotations(tmp_path, dataset="ek55")
    assert c.verb_names == ["take", "put-down"] and c.noun_names == ["cup", "pan:dust"]
    assert c.many_shot_actions.tolist() == [True, True, True]  # a1's noun (cup) is many-shot
    assert s.uid.tolist() == [1, 2] and s.videos == ["P01_01"] and s.splits == ["training"] and s.fps == 30.0
    assert action_text(c, [0, 1], colon="reverse") == "take <v> dust pan <a> put-down <v> cup"
    with pytest.raises(AnnotationError, match="unknown dataset"):
        load_annotations(tmp_path)  # 3 classes: neither EGTEA nor EK55, no fps


@pytest.mark.parametrize(
    "text, msg",
    [
        ("", "empty class list"),
        ("id,action,verb,noun\n", "empty class list"),
        ("0, 0_0, Take_cup\n0, 1_0, Put_cup\n", r"duplicate ids \[0\]"),
        ("0, 0_0, Take_cup\n2, 1_0, Put_cup\n", "ids are not 0..1"),
        ("0, 0-0, Take_cup\n", r"row 1: verb_noun must look like '3_7', found '0-0'"),
        ("0, 0_0, Take_cup\n1, 0_x, Take_pan\n", "row 2: noun id must be an integer, found 'x'"),
        ("0, 0_0, Takecup\n", "row 1: action 0 name 'Takecup' lacks a verb or a noun word \\(like 'Cut_tomato'\\)"),
        ("0, 0_0, _cup\n", "row 1: action 0 name '_cup' lacks a verb or a noun word"),
        ("0, 0_0, \n", "row 1: action 0 has no name"),
        ("id,verb,noun,action\n0,0,0,take\n", "row 2: action 0 name 'take' lacks a verb or a noun word \\(like 'take pan'\\)"),
        ("id,action,verb,noun\n0, take_cup,0,0\n1, get_cup,0,0\n", "actions 0 and 1 are both verb 0 noun 0"),
        ("0, 0_0\n", "row 1: expected 3 columns"),
        ("x, 0_0, Take_cup\n", "row 1: id must be an integer, found 'x'"),
        ("id,action,verb,noun\n0,take_cup,0\n", "row 2: expected 4 columns"),
        ("id,action,verb,noun\n0,take_cup,-1,0\n", "action 0 has negative verb id -1"),
    ],
)
def test_bad_class_lists(tmp_path, text, msg):
    p = tmp_path / "actions.csv"
    p.write_text(text)
    with pytest.raises(AnnotationError, match=msg) as info:
        read_classes(p)
    assert str(p) in str(info.value) and "\n" not in str(info.value)


def test_bad_many_shot_lists(tmp_path):
    write_egtea_actions(tmp_path / "actions.csv", ["Take"], ["cup", "pan"], [(0, 0), (0, 1)])
    (tmp_path / "v.csv").write_text("verb_class,verb\n0,take\n")
    (tmp_path / "n.csv").write_text("noun_class,noun\n0,cup\n5,pot\n")
    with pytest.raises(AnnotationError, match="give both"):
        read_classes(tmp_path / "actions.csv", tmp_path / "v.csv")
    with pytest.raises(AnnotationError, match=r"n.csv, row 3: class id 5 outside 0..1"):
        read_classes(tmp_path / "actions.csv", tmp_path / "v.csv", tmp_path / "n.csv")
    with pytest.raises(AnnotationError, match="missing.csv: file not found"):
        read_classes(tmp_path / "actions.csv", tmp_path / "v.csv", tmp_path / "missing.csv")


# ---------------------------------------------------------------------------------------
# segment CSVs


@st.composite
def segment_rows(draw, pairs):
    n = draw(st.integers(1, 25))
    uids = draw(st.lists(st.integers(0, 10**6), min_size=n, max_size=n, unique=True))
    rows = []
    for u in uids:
        a = draw(st.integers(0, len(pairs) - 1))
        start = draw(st.integers(0, 10**6))
        video = draw(st.sampled_from(["P01_01", "P02-R03-Salad", "OP04-R06-GreekSalad"]))
        rows.append((u, video, start, start + draw(st.integers(0, 10**4)), pairs[a][0], pairs[a][1], a))
    return rows


@FAST
@given(lists=class_lists(), data=st.data(), pad=st.sampled_from([0, 3, 7]), space=st.booleans(), bom=st.booleans())
def test_read_segments_padding_and_spaces(lists, data, pad, space, bom):
    verbs, nouns, pairs = lists
    rows = data.draw(segment_rows(pairs))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_egtea_actions(d / "actions.csv", verbs, nouns, pairs)
        split = len(rows) // 2
        (d / "train.csv").write_text("".join(segment_line(r, pad, space) for r in rows[:split]) or "\n")
        (d / "val.csv").write_text(("\ufeff" if bom else "") + "".join(segment_line(r, pad, space) for r in rows[split:]))
        classes = read_classes(d / "actions.csv")
        raw = read_segments_csv(d / "val.csv", classes)
        assert raw.keys == [r[0] for r in rows[split:]] and raw.video == [r[1] for r in rows[split:]]
        assert list(zip(raw.start, raw.end, raw.verb, raw.noun, raw.action)) == [r[2:] for r in rows[split:]]
        splits = ["val"] if split == 0 else ["train", "val"]
        c, s = load_annotations(d, splits=splits, fps=24.0)
        assert len(s) == len(rows) and s.splits == splits and s.key_type == "uid" and s.ids is None
        assert s.videos == sorted({r[1] for r in rows})
        order = sorted(rows)  # rows are kept in uid order
        assert s.uid.tolist() == [r[0] for r in order]
        assert [s.videos[v] for v in s.video] == [r[1] for r in order]
        assert s.start_frame.tolist() == [r[2] for r in order] and s.end_frame.tolist() == [r[3] for r in order]
        assert s.action.tolist() == [r[6] for r in order] and s.verb.tolist() == [r[4] for r in order]
        in_val = {r[0] for r in rows[split:]}
        assert s.in_split("val").tolist() == [r[0] in in_val for r in order]
        assert (s.split_mask.sum(axis=1) == 1).all()
        assert s.row_of([rows[-1][0]]).tolist() == [order.index(rows[-1])]
        assert s.row_of([str(rows[-1][0])]).tolist() == [order.index(rows[-1])]  # digits name the uid
        assert s.id_of(0) == order[0][0] and s.describe(0) == f"UID {order[0][0]}"
        np.testing.assert_allclose(s.start_seconds(), s.start_frame / 24.0)
        for col in ("uid", "start_frame", "end_frame"):
            assert getattr(s, col).dtype == np.int64
        for col in ("video", "verb", "noun", "action"):
            assert getattr(s, col).dtype == np.int32
        assert s.split_mask.dtype == bool and s.split_mask.shape == (len(rows), len(splits))


def _classes_dir(d: Path) -> Path:
    write_egtea_actions(d / "actions.csv", ["Take", "Put"], ["cup", "pan"], [(0, 0), (1, 1), (0, 1)])
    return d


@pytest.mark.parametrize(
    "lines, msg",
    [
        (["1,v,0,10,0,0,0", "2,v,0,10,0,1,7"], r"row 2: UID 2 has action id 7, not in actions.csv \(0..2\)"),
        (["1,v,0,10,0,0,-1"], "row 1: UID 1 has action id -1, not in actions.csv"),
        (["1,v,0,10,1,0,0"], "row 1: UID 1 action 0 is verb 0 noun 0 in actions.csv, found verb 1 noun 0"),
        (["1,v,0,10,0,0,0", "5,v,30,20,0,0,0"], "row 2: UID 5 ends at frame 20 before it starts at 30"),
        (["1,v,-3,10,0,0,0"], "row 1: UID 1 starts at negative frame -3"),
        (["1,v,0,10,0,0"], "row 1: expected 7 columns uid,video,start,end,verb,noun,action \\(4 in an unlabelled test file\\), found 6"),
        (["1,v,0,10,0,0,0,9"], "found 8"),
        (["1,v,0,10,0,0,0", "2,v,0,10"], "row 2: 4 columns, the file's first row has 7"),
        (["1,v,zero,10,0,0,0"], "row 1: start_frame must be an integer, found 'zero'"),
        (["1,v,0,10,0,0,0", "1.5,v,0,10,0,0,0"], "row 2: segment key '1.5' is not an integer uid like row 1's"),
        (["1,v,0,10,0,0,0", "2,v,3,10,0,0,0", "1,v,0,10,0,0,0"], r"row 3: UID 1 appears twice \(rows 1 and 3\)"),
        ([], "no segments"),
    ],
)
def test_bad_segment_rows(tmp_path, lines, msg):
    classes = read_classes(_classes_dir(tmp_path) / "actions.csv")
    p = tmp_path / "training1.csv"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=msg) as info:
        read_segments_csv(p, classes)
    assert str(p) in str(info.value) and isinstance(info.value, KDStoreError) and "\n" not in str(info.value)


def test_shared_and_conflicting_uids(tmp_path):
    """A uid in several split files is one segment when its rows agree, an error naming both files when not."""
    _classes_dir(tmp_path)
    (tmp_path / "training1.csv").write_text("1,v,0,10,0,0,0\n2,v,20,30,1,1,1\n")
    (tmp_path / "validation1.csv").write_text("3,v,40,50,0,0,0\n2,v,20,30,1,1,1\n")
    c, s = load_annotations(tmp_path, fps=24.0)
    assert s.uid.tolist() == [1, 2, 3] and s.split_mask.tolist() == [[True, False], [True, True], [False, True]]
    assert s.splits_of(1) == ["training1", "validation1"]
    (tmp_path / "validation1.csv").write_text("3,v,40,50,0,0,0\n2,w,20,30,1,1,1\n")
    with pytest.raises(AnnotationError, match=r"training1.csv, row 2 and .*validation1.csv, row 2: UID 2 differs \(video v vs video w\)"):
        load_annotations(tmp_path, fps=24.0)
    (tmp_path / "validation1.csv").write_text("3,v,40,50,0,0,0\n2,v,20,31,1,1,1\n")
    with pytest.raises(AnnotationError, match=r"UID 2 differs \(end 30 vs end 31\)"):
        load_annotations(tmp_path, fps=24.0)
    (tmp_path / "validation1.csv").write_text("3,v,40,50,0,0,0\n2,v,20,30,0,1,2\n")
    with pytest.raises(AnnotationError, match=r"UID 2 differs \(verb 1 vs verb 0\)"):
        load_annotations(tmp_path, fps=24.0)
    (tmp_path / "test1.csv").write_text("2,v,20,30\n")
    with pytest.raises(AnnotationError, match=r"UID 2 differs \(verb 1 vs unlabelled\)"):
        load_annotations(tmp_path, splits=["training1", "test1"], fps=24.0)
    c, s = load_annotations(tmp_path, splits=["training1"], fps=24.0)  # one split alone is fine
    assert len(s) == 2


def test_bad_folders(tmp_path):
    with pytest.raises(AnnotationError, match="annotation folder not found"):
        load_annotations(tmp_path / "nope")
    _classes_dir(tmp_path)
    with pytest.raises(AnnotationError, match="no split CSVs found"):
        load_annotations(tmp_path, fps=24.0)
    with pytest.raises(AnnotationError, match="missing.csv: file not found"):
        load_annotations(tmp_path, splits=["missing"], fps=24.0)
    (tmp_path / "training1.csv").write_bytes(b"1,v,0,10,0,0,0\n\xff\xfe,v\n")
    with pytest.raises(AnnotationError, match="not a readable CSV"):
        load_annotations(tmp_path, fps=24.0)
    (tmp_path / "training1.csv").write_text("1,v,0,10,0,0,0\n")
    for fps in (0.0, -24.0, float("nan")):
        with pytest.raises(AnnotationError, match="frame rate must be positive"):
            load_annotations(tmp_path, fps=fps)


def test_table_lookups(synthetic_tables):
    classes, seg = synthetic_tables
    with pytest.raises(MissingError, match=f"UID 123456: not in the segment table \\({len(seg)} segments\\)"):
        seg.row_of([int(seg.uid[0]), 123456])
    with pytest.raises(MissingError, match="UID nope: not in the segment table"):
        seg.row_of(["nope"])
    with pytest.raises(MissingError, match="split 'test'"):
        seg.rows_in("test")
    with pytest.raises(MissingError, match="subset 'tail': not in the store \\(subsets: none\\)"):
        seg.in_subset("tail")
    assert len(seg.rows_in("training1")) + len(seg.rows_in("validation1")) == len(seg)
    assert seg.labelled.all() and (seg.rows_in("training1", labelled=True) == seg.rows_in("training1")).all()
    assert guess_dataset(classes) is None
    assert default_splits(seg) == ("training1", "validation1")


def test_default_splits_pairing():
    seg = table([(1, 0, 0, 0), (2, 0, 5, 1), (3, 0, 9, 2)], splits=("training2", "validation2", "validation10"))
    with pytest.raises(MissingError, match="no validationN/trainingN split pair"):
        default_splits(table([(1, 0, 0, 0)], splits=("train",)))
    assert default_splits(seg) == ("training2", "validation2")


# ---------------------------------------------------------------------------------------
# the real EGTEA splits


def test_egtea_ingestion(egtea_dir, tmp_path):
    classes, seg = load_annotations(egtea_dir, splits=["training1", "validation1"])
    assert guess_dataset(classes) == "egtea" and seg.fps == 30.0  # RULSTM numbers every dataset's frames at 30 fps
    assert (classes.num_actions, classes.num_verbs, classes.num_nouns) == (106, 19, 51)
    assert len(seg) == 10_321 and len(seg.videos) == 86
    assert seg.splits == ["training1", "validation1"]
    assert (len(seg.rows_in("training1")), len(seg.rows_in("validation1"))) == (8299, 2022)
    assert classes.action_names[3] == "Cut_tomato" and classes.noun_names[2] == "eating:utensil"
    assert class_words(classes.verb_names[0]) == "inspect read"
    assert classes.surface_verbs == [classes.verb_names[v] for v in classes.action_verb]  # one name a class
    # EGTEA splits cut videos, so one split alone gives gappy histories
    both = [v for v in range(len(seg.videos)) if seg.split_mask[seg.video == v].any(axis=0).all()]
    assert len(both) > 40
    # all six files: one store of the 10,321 segments; each scheme k splits them into trainingk and validationk
    c6, s6 = load_annotations(egtea_dir)
    assert len(s6) == 10_321 and s6.splits == [f"{k}{i}" for k in ("training", "validation") for i in (1, 2, 3)]
    assert s6.split_mask.sum(axis=0).tolist() == [8299, 8299, 8300, 2022, 2022, 2021]
    train, val = s6.split_mask[:, :3], s6.split_mask[:, 3:]
    assert (train ^ val).all() and (s6.split_mask.sum(axis=1) == 3).all()
    for k in (1, 2, 3):
        tr, va = (read_segments_csv(egtea_dir / f"{s}{k}.csv", classes) for s in ("training", "validation"))
        assert set(tr.keys) == set(s6.uid[s6.in_split(f"training{k}")].tolist())
        assert set(va.keys) == set(s6.uid[s6.in_split(f"validation{k}")].tolist())
    # into a store and back
    s = Store.open(Store.create(tmp_path / "egtea.h5", c6, s6, dataset="egtea").path)
    assert len(s.segments) == 10_321 and s.classes.action_names == classes.action_names
    np.testing.assert_array_equal(s.segments.split_mask, s6.split_mask)
    assert s.manifest["dataset"] == "egtea" and s.default_splits() == ("training1", "validation1")
    h = histories(seg, np.arange(len(seg)), 5, "complete")
    assert (h[:, -1] >= 0).mean() > 0.9  # nearly every segment has a predecessor


# ---------------------------------------------------------------------------------------
# histories


def brute_histories(seg: SegmentTable, rows, hist_len: int, mode: str, split: str | None = None) -> np.ndarray:
    out = np.full((len(rows), hist_len), -1, np.int64)
    for i, r in enumerate(rows):
        cands = [
            j
            for j in range(len(seg))
            if seg.video[j] == seg.video[r]
            and seg.start_frame[j] < seg.start_frame[r]
            and seg.action[j] >= 0
            and (mode == "complete" or seg.in_split(split)[j])
        ]
        cands.sort(key=lambda j: (seg.start_frame[j], seg.uid[j]))
        cands = cands[-hist_len:]
        if cands:
            out[i, hist_len - len(cands) :] = cands
    return out


def table(rows: list[tuple[int, int, int, int]], splits=("train", "val"), action=None) -> SegmentTable:
    """A segment table from ``(uid, video, start, split)`` rows (end = start + 5, action 0 or ``action``)."""
    a = np.array(rows, np.int64).reshape(-1, 4)
    n = len(a)
    act = np.zeros(n, np.int32) if action is None else np.asarray(action, np.int32)
    return SegmentTable(
        uid=a[:, 0], video=a[:, 1].astype(np.int32), start_frame=a[:, 2], end_frame=a[:, 2] + 5,
        verb=np.where(act >= 0, 0, -1).astype(np.int32), noun=np.where(act >= 0, 0, -1).astype(np.int32), action=act,
        split=a[:, 3], videos=[f"v{i}" for i in range(a[:, 1].max(initial=0) + 1)],
        splits=list(splits), fps=24.0,
    )


def test_histories_by_hand():
    # uid, video, start, split; rows listed out of time order on purpose
    seg = table([
        (10, 0, 100, 0),  # row 0
        (11, 0, 50, 1),   # row 1
        (12, 0, 10, 0),   # row 2
        (13, 1, 5, 0),    # row 3: other video
        (14, 0, 100, 0),  # row 4: same start as row 0 -> not in each other's history
        (15, 0, 200, 0),  # row 5
        (9, 0, 50, 0),    # row 6: same start as row 1, smaller uid
    ])
    comp = histories(seg, np.arange(7), 3, "complete")
    train = histories(seg, np.arange(7), 3, "gappy", split="train")
    val = histories(seg, np.arange(7), 3, "gappy", split="val")
    assert comp.tolist() == [
        [2, 6, 1],     # uid 10 at 100: starts 10, 50(uid 9), 50(uid 11)
        [-1, -1, 2],   # uid 11 at 50: only the one at 10 (uid 9 starts at the same frame)
        [-1, -1, -1],  # earliest
        [-1, -1, -1],  # alone in video 1
        [2, 6, 1],     # uid 14: same as uid 10
        [1, 0, 4],     # uid 15 at 200: the last three by (start, uid)
        [-1, -1, 2],
    ]
    assert train.tolist() == [
        [-1, 2, 6],    # split "train" only: 10, 50(uid 9)
        [-1, -1, 2],   # uid 11 (a val segment) seen through the train split: the one at 10
        [-1, -1, -1],
        [-1, -1, -1],
        [-1, 2, 6],
        [6, 0, 4],
        [-1, -1, 2],
    ]
    assert val.tolist() == [[-1, -1, 1], [-1, -1, -1], [-1, -1, -1], [-1, -1, -1], [-1, -1, 1], [-1, -1, 1], [-1, -1, -1]]
    assert histories(seg, np.array([5]), 1, split="train").tolist() == [[4]]
    assert histories(seg, np.array([5, 5]), 6, "complete").tolist() == [[-1, 2, 6, 1, 0, 4]] * 2
    assert histories(seg, np.array([], np.int64), 2, split="train").shape == (0, 2)
    with pytest.raises(ConfigError, match="history mode"):
        histories(seg, np.arange(2), 3, "full")
    with pytest.raises(ConfigError, match="hist_len"):
        histories(seg, np.arange(2), 0, split="train")
    with pytest.raises(ConfigError, match="gappy histories need the split"):
        histories(seg, np.arange(2), 3)
    with pytest.raises(MissingError, match="split 'test'"):
        histories(seg, np.arange(2), 3, split="test")


def test_unlabelled_segments_are_never_in_a_history():
    seg = table([(1, 0, 0, 0), (2, 0, 10, 0), (3, 0, 20, 0), (4, 0, 30, 0)], action=[0, -1, 0, -1])
    for h in (histories(seg, np.arange(4), 3, "complete"), histories(seg, np.arange(4), 3, split="train")):
        assert h.tolist() == [[-1, -1, -1], [-1, -1, 0], [-1, -1, 0], [-1, 0, 2]]


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 30), st.integers(0, 2), st.booleans()), min_size=1, max_size=40),
    hist_len=st.integers(1, 6),
    mode=st.sampled_from(["gappy", "complete"]),
    split=st.sampled_from("abc"),
    data=st.data(),
)
def test_histories_match_brute_force(rows, hist_len, mode, split, data):
    uids = data.draw(st.lists(st.integers(-1000, 1000), min_size=len(rows), max_size=len(rows), unique=True))
    seg = table([(u, v, s, sp) for u, (v, s, sp, _) in zip(uids, rows)], splits=("a", "b", "c"),
                action=[0 if lab else -1 for *_, lab in rows])
    query = np.array(data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=12)), np.int64)
    np.testing.assert_array_equal(histories(seg, query, hist_len, mode, split), brute_histories(seg, query, hist_len, mode, split))


@pytest.mark.parametrize("mode", ["gappy", "complete"])
def test_histories_synthetic(synthetic_tables, mode):
    _, seg = synthetic_tables
    for split in seg.splits:
        rows = seg.rows_in(split)
        h = histories(seg, rows, 4, mode, split)
        np.testing.assert_array_equal(h, brute_histories(seg, rows, 4, mode, split))
        valid = h >= 0
        assert valid.any() and (~valid).any()
        # left padding, same video, strictly earlier and time-sorted
        assert not (valid[:, :-1] & ~valid[:, 1:]).any()
        for r, hist in zip(rows, h):
            hist = hist[hist >= 0]
            assert (seg.video[hist] == seg.video[r]).all() and (seg.start_frame[hist] < seg.start_frame[r]).all()
            assert (np.diff(seg.start_frame[hist]) >= 0).all()
            if mode == "gappy":
                assert seg.in_split(split)[hist].all()
        if mode == "gappy":  # the synthetic data splits by video (like EK55): no gaps to leave out
            np.testing.assert_array_equal(h, histories(seg, rows, 4, "complete"))


# ---------------------------------------------------------------------------------------
# action text


@pytest.mark.parametrize(
    "name, colon, words",
    [
        ("Inspect/Read", "keep", "inspect read"),
        ("eating:utensil", "keep", "eating utensil"),
        ("pan:dust", "reverse", "dust pan"),
        ("pan:dust", "keep", "pan dust"),
        ("Divide/Pull Apart", "keep", "divide pull apart"),
        ("Turn on", "keep", "turn on"),
        ("condiment:container", "keep", "condiment container"),
        ("put-down", "reverse", "put-down"),
        ("bell_pepper", "keep", "bell pepper"),
        ("  Cup  ", "keep", "cup"),
        ("top:lid:pot", "reverse", "pot lid top"),
    ],
)
def test_class_words(name, colon, words):
    assert class_words(name, colon) == words


@given(parts=st.lists(st.lists(WORD, min_size=1, max_size=3), min_size=1, max_size=3), sep=st.sampled_from(["_", "/"]),
       reverse=st.booleans())
@FAST
def test_class_words_property(parts, sep, reverse):
    name = ":".join(sep.join(w.capitalize() for w in p) for p in parts)
    got = class_words(name, "reverse" if reverse else "keep")
    want = [w for p in (parts[::-1] if reverse else parts) for w in p]
    assert got.split(" ") == want


def test_action_text(synthetic_tables):
    classes = ClassTable(
        action_names=["Inspect/Read_recipe", "Take_eating:utensil", "Put_pan:dust"],
        verb_names=["Inspect/Read", "Take", "Put"],
        noun_names=["recipe", "eating:utensil", "pan:dust"],
        action_verb=np.array([0, 1, 2], np.int32),
        action_noun=np.array([0, 1, 2], np.int32),
    )
    assert action_words(classes, 1) == "take <v> eating utensil"
    assert action_text(classes, [0, 1, 2]) == "inspect read <v> recipe <a> take <v> eating utensil <a> put <v> pan dust"
    assert action_text(classes, np.array([2]), colon="reverse") == "put <v> dust pan"
    assert action_text(classes, []) == ""
    c, _ = synthetic_tables
    text = action_text(c, range(c.num_actions))
    assert text.count(" <a> ") == c.num_actions - 1 and text.count(" <v> ") == c.num_actions
    assert text == text.lower() and "_" not in text and ":" not in text and "/" not in text


def test_egtea_gappy_histories_leave_out_the_other_split(egtea_dir):
    _, seg = load_annotations(egtea_dir)  # all three schemes: a segment is in several splits
    rows = seg.rows_in("validation1")
    gappy, complete = histories(seg, rows, 15, "gappy", "validation1"), histories(seg, rows, 15, "complete")
    assert seg.in_split("validation1")[gappy[gappy >= 0]].all()
    assert seg.in_split("training1")[complete[complete >= 0]].any()
    # the same segments through another scheme's split: their histories come from that split
    other = histories(seg, rows, 15, "gappy", "training2")
    assert seg.in_split("training2")[other[other >= 0]].all() and not np.array_equal(other, gappy)
