"""``kdstore corpus``: recipe sources -> an action-sequence corpus in one store's vocabulary.

Each recipe with at least one kept action becomes one line ``verb <v> noun <a> verb <v> noun``
(the format ``read_corpus`` reads, for ``pretrain-lm`` and ``build-teacher --corpus``), in
the order of the sources and of their recipes, so the same inputs give the same file.
An action is kept when its (verb class, noun class) pair is in the store's action table
(written with that action's own words, as the teacher reads its histories), or, with
``any_pair``, any pair of store classes (written with the classes' display names). The file
is written beside its final name and renamed at the end; the coverage report is JSON.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from kdstore.text import action_words, pair_words
from kdstore.errors import ConfigError
from kdstore.store import Store

from .lexicon import Lexicon, build_lexicon
from .mining import mine_step
from .recipes import Recipe, read_recipes, source_files

TOP_WORDS = 30  # unmapped verbs and nouns listed in the report


@dataclass
class Coverage:
    """What mining read and kept (the report ``kdstore corpus`` writes)."""

    recipes: int = 0
    lines: int = 0  # recipes with at least one kept action
    steps: int = 0
    steps_with_action: int = 0
    sentences: int = 0
    pairs: int = 0  # verb and noun both store classes
    actions_kept: int = 0
    not_in_table: int = 0  # pairs that are no action of the store (left out unless any_pair)
    unmapped_verbs: Counter = field(default_factory=Counter)
    unmapped_nouns: Counter = field(default_factory=Counter)
    per_action: Counter = field(default_factory=Counter)

    def report(self, num_actions: int) -> dict:
        """The JSON report: counts, shares, the most frequent unmapped words, actions per class."""
        d = {k: v for k, v in asdict(self).items() if not isinstance(v, Counter)}
        d["step_share"] = self.steps_with_action / max(self.steps, 1)
        d["distinct_actions"] = len(self.per_action)
        d["store_actions"] = num_actions
        for key in ("unmapped_verbs", "unmapped_nouns"):
            d[key] = dict(_top(getattr(self, key), TOP_WORDS))
        d["per_action"] = dict(_top(self.per_action, len(self.per_action)))
        return d


def _top(c: Counter, n: int) -> list[tuple[str, int]]:
    return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[:n]


def default_colon(store: Store) -> str:
    """The teacher presets' compound order for the store's dataset: EGTEA keep, EPIC reverse."""
    return "reverse" if store.dataset in ("ek55", "ek100") else "keep"


def recipe_actions(recipe: Recipe, lex: Lexicon, words: Callable[[int, int], str | None], cov: Coverage) -> list[str]:
    """The kept actions of one recipe as ``verb <v> noun`` texts, counting into ``cov``."""
    out = []
    for step in recipe.steps:
        m = mine_step(step, lex)
        cov.steps += 1
        cov.sentences += m.sentences
        cov.unmapped_verbs.update(m.unmapped_verbs)
        cov.unmapped_nouns.update(m.unmapped_nouns)
        kept = [w for w in (words(v, n) for v, n in m.pairs) if w is not None]
        cov.pairs += len(m.pairs)
        cov.not_in_table += sum(p not in lex.actions for p in m.pairs)
        cov.steps_with_action += bool(kept)
        cov.per_action.update(kept)
        out += kept
    return out


def action_namer(store: Store, lex: Lexicon, colon: str, any_pair: bool) -> Callable[[int, int], str | None]:
    """(verb class, noun class) -> the action's text, or None when it is left out."""
    classes = store.classes
    table = {vn: action_words(classes, a, colon) for vn, a in lex.actions.items()}

    def words(v: int, n: int) -> str | None:
        if (v, n) in table:
            return table[(v, n)]
        return pair_words(classes.verb_names[v], classes.noun_names[n], colon) if any_pair else None

    return words


def mine_corpus(
    store: Store, sources: list[str | Path], out: str | Path, any_pair: bool = False, colon: str | None = None,
    class_lists: str | Path | None = None, borrow: Store | None = None, limit: int | None = None, on_step: Callable[[int, int], None] | None = None,
    overwrite: bool = False,
) -> dict:
    """Mine ``sources`` into the corpus file ``out`` and return the coverage report
    (also written to ``<out>.coverage.json``). ``limit`` stops after that many recipes;
    ``on_step(bytes read, bytes in all)`` reports progress; ``borrow``: another store whose
    same-named classes lend their surface words (``lexicon.borrowed``); an existing ``out`` is
    replaced only with ``overwrite``."""
    out = Path(out)
    if out.exists() and not overwrite:
        raise ConfigError(f"{out}: already exists (--overwrite replaces it)")
    colon = colon or default_colon(store)
    if colon not in ("keep", "reverse"):
        raise ConfigError(f"--colon {colon!r}: expected keep or reverse")
    lex = build_lexicon(store.classes, colon, class_lists, (borrow.classes, default_colon(borrow)) if borrow else None)
    words = action_namer(store, lex, colon, any_pair)
    files = [f for s in sources for f in source_files(s)]
    total, base, cov = sum(f.stat().st_size for f in files), 0, Coverage()
    tmp = out.with_name(f".{out.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "w", encoding="utf-8") as fh:
            for f in files:
                for recipe, done in read_recipes(f):
                    if limit is not None and cov.recipes >= limit:
                        break
                    cov.recipes += 1
                    acts = recipe_actions(recipe, lex, words, cov)
                    if acts:
                        fh.write(" <a> ".join(acts) + "\n")
                        cov.lines += 1
                    if on_step:
                        on_step(base + done, total)
                base += f.stat().st_size
        cov.actions_kept = sum(cov.per_action.values())
        report = {"sources": [str(s) for s in sources], "store": str(store.path), "colon": colon, "any_pair": any_pair,
              "borrow": str(borrow.path) if borrow else None,
                  **cov.report(store.classes.num_actions)}
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    _write_json(out.with_name(out.name + ".coverage.json"), report)
    return report


def _write_json(path: Path, doc: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(doc, indent=1))
    tmp.replace(path)
