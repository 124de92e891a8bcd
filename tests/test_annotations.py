"""Annotation parsing (RULSTM/AVT CSVs, EGTEA and EK55 class lists), histories, action text."""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kdstore.annotations import (
    ClassTable,
    SegmentTable,
    action_text,
    action_words,
    class_words,
    guess_dataset,
    histories,
    load_annotations,
    read_classes,
    read_segments_csv,
)
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
        want = [v in many_v and n in many_n for v, n in pairs]
        assert c.many_shot_actions.tolist() == want
        check_classes(c, verbs, nouns, pairs)


def test_ek55_real_layout(tmp_path):
    """The EK55 shapes: header, names with ':' and '-', many-shot lists found by load_annotations."""
    (tmp_path / "actions.csv").write_text("id,action,verb,noun\n0,take_pan:dust,0,1\n1,put-down_cup,1,0\n2,take_cup,0,0\n")
    (tmp_path / "EPIC_many_shot_verbs.csv").write_text("verb_class,verb\n0,take\n")
    (tmp_path / "EPIC_many_shot_nouns.csv").write_text("noun_class,noun\n0,cup\n1,pan:dust\n")
    (tmp_path / "training.csv").write_text("00001, P01_01, 0000008, 0000202, 000, 001, 0000\n00002, P01_01, 0000300, 0000400, 001, 000, 0001\n")
    c, s = load_annotations(tmp_path, fps=60.0)
    assert c.verb_names == ["take", "put-down"] and c.noun_names == ["cup", "pan:dust"]
    assert c.many_shot_actions.tolist() == [True, False, True]
    assert s.uid.tolist() == [1, 2] and s.videos == ["P01_01"] and s.splits == ["training"] and s.fps == 60.0
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
        ("0, 0_0, Takecup\n", "row 1: Verb_noun must look like 'Cut_tomato'"),
        ("0, 0_0\n", "row 1: expected 3 columns"),
        ("0, 0_0, Take_cup\n1, 0_1, Grab_pan\n", "verb id 0 has two names, 'Take' and 'Grab'"),
        ("x, 0_0, Take_cup\n", "row 1: id must be an integer, found 'x'"),
        ("id,action,verb,noun\n0,take_cup,0\n", "row 2: expected 4 columns"),
        ("id,action,verb,noun\n0,take_cup,-1,0\n", "negative verb id -1"),
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
@given(lists=class_lists(), data=st.data(), pad=st.sampled_from([0, 3, 7]), space=st.booleans())
def test_read_segments_padding_and_spaces(lists, data, pad, space):
    verbs, nouns, pairs = lists
    rows = data.draw(segment_rows(pairs))
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        write_egtea_actions(d / "actions.csv", verbs, nouns, pairs)
        split = len(rows) // 2
        (d / "train.csv").write_text("".join(segment_line(r, pad, space) for r in rows[:split]) or "\n")
        (d / "val.csv").write_text("".join(segment_line(r, pad, space) for r in rows[split:]))
        classes = read_classes(d / "actions.csv")
        raw = read_segments_csv(d / "val.csv", classes)
        assert raw.uid == [r[0] for r in rows[split:]] and raw.video == [r[1] for r in rows[split:]]
        assert list(zip(raw.start, raw.end, raw.verb, raw.noun, raw.action)) == [r[2:] for r in rows[split:]]
        splits = ["val"] if split == 0 else ["train", "val"]
        c, s = load_annotations(d, splits=splits, fps=24.0)
        assert len(s) == len(rows) and s.splits == splits
        assert s.videos == sorted({r[1] for r in rows})
        order = rows if split else rows[split:]
        assert s.uid.tolist() == [r[0] for r in order]
        assert [s.videos[v] for v in s.video] == [r[1] for r in order]
        assert s.start_frame.tolist() == [r[2] for r in order] and s.end_frame.tolist() == [r[3] for r in order]
        assert s.action.tolist() == [r[6] for r in order] and s.verb.tolist() == [r[4] for r in order]
        assert s.split.tolist() == [0] * split + [len(splits) - 1] * (len(rows) - split)
        assert s.row_of([rows[-1][0]]).tolist() == [len(rows) - 1]
        np.testing.assert_allclose(s.start_seconds(), s.start_frame / 24.0)
        for col in ("uid", "start_frame", "end_frame"):
            assert getattr(s, col).dtype == np.int64
        for col in ("video", "verb", "noun", "action"):
            assert getattr(s, col).dtype == np.int32
        assert s.split.dtype == np.int8


def _classes_dir(d: Path) -> Path:
    write_egtea_actions(d / "actions.csv", ["Take", "Put"], ["cup", "pan"], [(0, 0), (1, 1), (0, 1)])
    return d


@pytest.mark.parametrize(
    "lines, msg",
    [
        (["1,v,0,10,0,0,0", "2,v,0,10,0,1,7"], r"row 2: UID 2 has unknown action id 7 \(classes: 0..2\)"),
        (["1,v,0,10,0,0,-1"], "row 1: UID 1 has unknown action id -1"),
        (["1,v,0,10,1,0,0"], "row 1: UID 1 action 0 is verb 0 noun 0, found verb 1 noun 0"),
        (["1,v,0,10,0,0,0", "5,v,30,20,0,0,0"], "row 2: UID 5 ends at frame 20 before it starts at 30"),
        (["1,v,-3,10,0,0,0"], "row 1: UID 1 starts at negative frame -3"),
        (["1,v,0,10,0,0"], "row 1: expected 7 columns uid,video,start,end,verb,noun,action, found 6"),
        (["1,v,0,10,0,0,0,9"], "found 8"),
        (["1,v,zero,10,0,0,0"], "row 1: start_frame must be an integer, found 'zero'"),
        (["1.5,v,0,10,0,0,0"], "row 1: uid must be an integer"),
        ([], "no segments"),
    ],
)
def test_bad_segment_rows(tmp_path, lines, msg):
    classes = read_classes(_classes_dir(tmp_path) / "actions.csv")
    p = tmp_path / "training1.csv"
    p.write_text("\n".join(lines) + "\n")
    with pytest.raises(AnnotationError, match=msg) as info:
        read_segments_csv(p, classes)
    assert str(p) in str(info.value) and isinstance(info.value, KDStoreError)


def test_duplicate_uids(tmp_path):
    _classes_dir(tmp_path)
    (tmp_path / "training1.csv").write_text("1,v,0,10,0,0,0\n2,v,20,30,1,1,1\n")
    (tmp_path / "validation1.csv").write_text("3,v,40,50,0,0,0\n2,w,0,5,0,1,2\n")
    with pytest.raises(AnnotationError, match=r"validation1.csv, row 2: duplicate UID 2 \(already in .*training1.csv\)"):
        load_annotations(tmp_path, fps=24.0)
    (tmp_path / "validation1.csv").write_text("3,v,40,50,0,0,0\n3,w,0,5,0,1,2\n")
    with pytest.raises(AnnotationError, match=r"validation1.csv, row 2: duplicate UID 3 \(already in .*validation1.csv\)"):
        load_annotations(tmp_path, fps=24.0)
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
    with pytest.raises(MissingError, match="split 'test'"):
        seg.rows_in("test")
    assert len(seg.rows_in("training1")) + len(seg.rows_in("validation1")) == len(seg)
    assert guess_dataset(classes) is None


# ---------------------------------------------------------------------------------------
# the real EGTEA splits


def test_egtea_ingestion(egtea_dir, tmp_path):
    classes, seg = load_annotations(egtea_dir, splits=["training1", "validation1"])
    assert guess_dataset(classes) == "egtea" and seg.fps == 24.0
    assert (classes.num_actions, classes.num_verbs, classes.num_nouns) == (106, 19, 51)
    assert len(seg) == 10_321 and len(seg.videos) == 86
    assert seg.splits == ["training1", "validation1"]
    assert (len(seg.rows_in("training1")), len(seg.rows_in("validation1"))) == (8299, 2022)
    assert classes.action_names[3] == "Cut_tomato" and classes.noun_names[2] == "eating:utensil"
    assert class_words(classes.verb_names[0]) == "inspect read"
    # EGTEA splits cut videos, so one split alone gives gappy histories
    both = [v for v in range(len(seg.videos)) if len(set(seg.split[seg.video == v].tolist())) == 2]
    assert len(both) > 40
    # every split pair covers the same 10,321 segments
    counts = {1: (8299, 2022), 2: (8299, 2022), 3: (8300, 2021)}
    for k, (n_train, n_val) in counts.items():
        tr, va = (read_segments_csv(egtea_dir / f"{s}{k}.csv", classes) for s in ("training", "validation"))
        assert (len(tr.uid), len(va.uid)) == (n_train, n_val)
        assert set(tr.uid) | set(va.uid) == set(seg.uid.tolist()) and not set(tr.uid) & set(va.uid)
    # all six files at once repeat UIDs across splits: refused, naming both files
    with pytest.raises(AnnotationError, match=r"training2.csv, row \d+: duplicate UID \d+ \(already in .*training1.csv\)"):
        load_annotations(egtea_dir)
    # into a store and back
    s = Store.open(Store.create(tmp_path / "egtea.h5", classes, seg, dataset="egtea").path)
    assert len(s.segments) == 10_321 and s.classes.action_names == classes.action_names
    assert s.manifest["dataset"] == "egtea"
    h = histories(seg, np.arange(len(seg)), 5, "complete")
    assert (h[:, -1] >= 0).mean() > 0.9  # nearly every segment has a predecessor


# ---------------------------------------------------------------------------------------
# histories


def brute_histories(seg: SegmentTable, rows, hist_len: int, mode: str) -> np.ndarray:
    out = np.full((len(rows), hist_len), -1, np.int64)
    for i, r in enumerate(rows):
        cands = [
            j
            for j in range(len(seg))
            if seg.video[j] == seg.video[r]
            and seg.start_frame[j] < seg.start_frame[r]
            and (mode == "complete" or seg.split[j] == seg.split[r])
        ]
        cands.sort(key=lambda j: (seg.start_frame[j], seg.uid[j]))
        cands = cands[-hist_len:]
        if cands:
            out[i, hist_len - len(cands) :] = cands
    return out


def table(rows: list[tuple[int, int, int, int]], splits=("train", "val")) -> SegmentTable:
    """A segment table from ``(uid, video, start, split)`` rows (end = start + 5, action 0)."""
    a = np.array(rows, np.int64).reshape(-1, 4)
    n = len(a)
    return SegmentTable(
        uid=a[:, 0], video=a[:, 1].astype(np.int32), start_frame=a[:, 2], end_frame=a[:, 2] + 5,
        verb=np.zeros(n, np.int32), noun=np.zeros(n, np.int32), action=np.zeros(n, np.int32),
        split=a[:, 3].astype(np.int8), videos=[f"v{i}" for i in range(a[:, 1].max(initial=0) + 1)],
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
    gappy = histories(seg, np.arange(7), 3, "gappy")
    assert comp.tolist() == [
        [2, 6, 1],     # uid 10 at 100: starts 10, 50(uid 9), 50(uid 11)
        [-1, -1, 2],   # uid 11 at 50: only the one at 10 (uid 9 starts at the same frame)
        [-1, -1, -1],  # earliest
        [-1, -1, -1],  # alone in video 1
        [2, 6, 1],     # uid 14: same as uid 10
        [1, 0, 4],     # uid 15 at 200: the last three by (start, uid)
        [-1, -1, 2],
    ]
    assert gappy.tolist() == [
        [-1, 2, 6],    # split 0 only: 10, 50(uid 9)
        [-1, -1, -1],  # uid 11 is alone in split 1
        [-1, -1, -1],
        [-1, -1, -1],
        [-1, 2, 6],
        [6, 0, 4],
        [-1, -1, 2],
    ]
    assert histories(seg, np.array([5]), 1).tolist() == [[4]]
    assert histories(seg, np.array([5, 5]), 6, "complete").tolist() == [[-1, 2, 6, 1, 0, 4]] * 2
    assert histories(seg, np.array([], np.int64), 2).shape == (0, 2)
    with pytest.raises(ConfigError, match="history mode"):
        histories(seg, np.arange(2), 3, "full")
    with pytest.raises(ConfigError, match="hist_len"):
        histories(seg, np.arange(2), 0)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 30), st.integers(0, 2)), min_size=1, max_size=40),
    hist_len=st.integers(1, 6),
    mode=st.sampled_from(["gappy", "complete"]),
    data=st.data(),
)
def test_histories_match_brute_force(rows, hist_len, mode, data):
    uids = data.draw(st.lists(st.integers(-1000, 1000), min_size=len(rows), max_size=len(rows), unique=True))
    seg = table([(u, v, s, sp) for u, (v, s, sp) in zip(uids, rows)], splits=("a", "b", "c"))
    query = np.array(data.draw(st.lists(st.integers(0, len(rows) - 1), max_size=12)), np.int64)
    np.testing.assert_array_equal(histories(seg, query, hist_len, mode), brute_histories(seg, query, hist_len, mode))


@pytest.mark.parametrize("mode", ["gappy", "complete"])
def test_histories_synthetic(synthetic_tables, mode):
    _, seg = synthetic_tables
    rows = np.arange(len(seg))
    h = histories(seg, rows, 4, mode)
    np.testing.assert_array_equal(h, brute_histories(seg, rows, 4, mode))
    valid = h >= 0
    assert valid.any() and (~valid).any()
    # left padding, same video, strictly earlier and time-sorted
    assert not (valid[:, :-1] & ~valid[:, 1:]).any()
    for r, hist in zip(rows, h):
        hist = hist[hist >= 0]
        assert (seg.video[hist] == seg.video[r]).all() and (seg.start_frame[hist] < seg.start_frame[r]).all()
        assert (np.diff(seg.start_frame[hist]) >= 0).all()
        if mode == "gappy":
            assert (seg.split[hist] == seg.split[r]).all()
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
    _, seg = load_annotations(egtea_dir, splits=["training1", "validation1"])
    rows = seg.rows_in("validation1")
    gappy, complete = histories(seg, rows, 15, "gappy"), histories(seg, rows, 15, "complete")
    assert (seg.split[gappy[gappy >= 0]] == seg.splits.index("validation1")).all()
    assert (seg.split[complete[complete >= 0]] == seg.splits.index("training1")).any()
