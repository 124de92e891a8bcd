"""bench/run_all.py gathers rows of several benchmarks into results.json, a markdown table and
the marked section of docs/results.md."""

import json
import shutil
from pathlib import Path

import pytest

from bench.run_all import BEGIN, END, docs_section, run_all, write_docs

ROOT = Path(__file__).resolve().parents[1]


def test_run_all_tiny(tmp_path):
    docs = tmp_path / "docs-results.md"
    shutil.copy(ROOT / "docs" / "results.md", docs)
    before = docs.read_text()
    res = run_all(tiny=True, skip=("student_step", "video_features", "teacher_build", "epic", "epic_scale", "preread", "kd_demo"),
                  out_dir=tmp_path, docs=docs)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["benches"]) == {"store_read", "topk_kl", "attention"}
    for name, bench in res["benches"].items():
        # on CPU the attention bench records why it has no xformers timing instead of a time
        rows = [r for r in bench["rows"] if '"impl": "xformers"' not in r.get("config", "")]
        assert rows and not any("error" in r for r in rows), name
    md = (tmp_path / "results.md").read_text()
    assert "### store_read" in md and "### topk_kl" in md and "### attention" in md and "median_s" in md
    # the docs copy: its marked section is this run's, every byte outside the markers as it was
    after = docs.read_text()
    b, e = before.index(BEGIN) + len(BEGIN), before.index(END)
    assert after[:b] == before[:b] and after.endswith(before[e:])
    section = after[b: len(after) - len(before[e:])]
    assert section != before[b:e] and md in section and "(tiny sizes)" in section
    assert "`python bench/run_all.py --tiny --skip student_step video_features" in section
    assert "### teacher_build" not in section and "load average" in section


def test_docs_section_is_the_saved_run():
    """The section in docs/results.md is what run_all writes from the committed results.json."""
    text = (ROOT / "docs" / "results.md").read_text()
    saved = json.loads((ROOT / "bench" / "results.json").read_text())
    assert text[text.index(BEGIN) + len(BEGIN): text.index(END)] == f"\n{docs_section(saved).rstrip()}\n"


@pytest.mark.parametrize("body", ["no markers\n", f"{END}\n{BEGIN}\n", f"{BEGIN}\n{BEGIN}\n{END}\n"])
def test_write_docs_refuses_a_file_without_one_pair_of_markers(tmp_path, body):
    docs = tmp_path / "results.md"
    docs.write_text(body)
    saved = json.loads((ROOT / "bench" / "results.json").read_text())
    with pytest.raises(ValueError, match="run_all:begin"):
        write_docs(docs, saved)
    assert docs.read_text() == body
