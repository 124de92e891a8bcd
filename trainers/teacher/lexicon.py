"""A store's verb and noun classes as phrases of lemmas, for finding them in recipe text.

Every surface name the annotations give becomes a phrase of its class: the display name,
each action's own words (EK55 names verb class 0 ``take``, ``get``, ``pick-up``, ``grab``...),
and, where a user has them, the word lists of EPIC's ``EPIC_verb_classes.csv`` /
``EPIC_noun_classes.csv`` (``verb_id,class_key,verbs``) or ``EPIC_100_*_classes.csv``
(``id,key,instances,...``). ``/`` separates alternatives (``Inspect/Read``), ``-`` and ``_``
words (``turn-on``); a ``name:subtype`` compound reads in the store's colon order
(``bell:pepper`` -> bell pepper, EK's ``pan:frying`` -> frying pan), and its head
(``pepper``, ``pan``) joins the class when no other class claims that word. A phrase claimed
by two classes keeps the first claim: display names first, then surface words, then the
EPIC lists, each in class order. Words are matched as lemmas (``simplemma``, English).
"""

from __future__ import annotations

import ast
import csv
import re
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

from kdstore.tables import ClassTable
from kdstore.errors import AnnotationError, DependencyError

_SPLIT = re.compile(r"[\s_\-]+")
#: (verb file, noun file, word-list column) of EPIC's class lists, in order of preference.
EPIC_LISTS = (("EPIC_verb_classes.csv", "EPIC_noun_classes.csv", ("verbs", "nouns")),
              ("EPIC_100_verb_classes.csv", "EPIC_100_noun_classes.csv", ("instances", "instances")))


#: Words simplemma's English table reads as another word in recipes (imperative "dice" -> "die").
LEMMA_FIXES = {"dice": "dice", "diced": "dice", "dicing": "dice"}


@lru_cache(maxsize=1 << 16)
def lemma(word: str) -> str:
    """The English lemma of a lowercase word (``chopped`` -> ``chop``, ``tomatoes`` -> ``tomato``)."""
    try:
        import simplemma
    except ImportError:
        raise DependencyError("recipe mining needs simplemma: pip install 'kdstore[corpus]'") from None
    return LEMMA_FIXES.get(word) or simplemma.lemmatize(word, lang="en").lower()


def phrase(words: str) -> tuple[str, ...]:
    """Words as a tuple of lemmas (``Bell peppers`` -> ``("bell", "pepper")``)."""
    return tuple(lemma(w) for w in _SPLIT.split(words.strip().lower()) if w)


def surface_forms(name: str, colon: str) -> tuple[list[str], list[str]]:
    """(phrases, heads) of one class name: ``/`` alternatives, ``:`` compounds in ``colon`` order."""
    forms, heads = [], []
    for alt in name.split("/"):
        parts = [p.strip() for p in alt.split(":") if p.strip()]
        if not parts:
            continue
        if colon == "reverse":
            parts = parts[::-1]
        forms.append(" ".join(parts))
        if len(parts) > 1:
            heads.append(parts[-1])
        elif len(_SPLIT.split(parts[0])) > 1:  # "Move Around" -> move, "pick-up" -> pick
            heads.append(_SPLIT.split(parts[0])[0])
    return forms, heads


@dataclass
class Vocabulary:
    """Phrase (tuple of lemmas) -> class id, for one kind (verb or noun)."""

    phrases: dict[tuple[str, ...], int] = field(default_factory=dict)
    longest: int = 1

    def add(self, words: str, cls: int) -> None:
        key = phrase(words)
        if key and key not in self.phrases:
            self.phrases[key] = cls
            self.longest = max(self.longest, len(key))

    def match(self, lemmas: list[str], at: int) -> tuple[int, int] | None:
        """(class, length) of the longest phrase starting at ``lemmas[at]``, or None."""
        for n in range(min(self.longest, len(lemmas) - at), 0, -1):
            cls = self.phrases.get(tuple(lemmas[at : at + n]))
            if cls is not None:
                return cls, n
        return None


def build_vocabulary(names: list[str], surfaces: dict[int, list[str]], extra: dict[int, list[str]], colon: str) -> Vocabulary:
    """A Vocabulary from display names, surface words and extra word lists (class id -> words)."""
    voc, heads = Vocabulary(), {}
    for source in ({i: [n] for i, n in enumerate(names)}, surfaces, extra):
        for cls in sorted(source):
            for name in source[cls]:
                forms, hs = surface_forms(name, colon)
                for f in forms:
                    voc.add(f, cls)
                for h in hs:
                    heads.setdefault(phrase(h), set()).add(cls)
    for key, owners in sorted(heads.items()):
        if len(owners) == 1 and key and key not in voc.phrases:
            voc.phrases[key] = owners.pop()
    return voc


@dataclass
class Lexicon:
    """A store's verbs and nouns as phrases, and its action table as (verb, noun) -> action."""

    verbs: Vocabulary
    nouns: Vocabulary
    actions: dict[tuple[int, int], int]


def build_lexicon(
    classes: ClassTable, colon: str, class_lists: str | Path | None = None, borrow: tuple[ClassTable, str] | None = None,
) -> Lexicon:
    """The Lexicon of a store's classes, plus EPIC's class word lists found in ``class_lists``
    and the words ``borrow`` = (another dataset's classes, their colon order) lends (``borrowed``)."""
    extra_v, extra_n = read_class_lists(Path(class_lists)) if class_lists else ({}, {})
    if borrow is not None:
        for kind, names, extra in (("verb", classes.verb_names, extra_v), ("noun", classes.noun_names, extra_n)):
            for cls, words in borrowed(names, classes.surface_names(kind), colon, borrow[0], kind, borrow[1]).items():
                extra.setdefault(cls, []).extend(words)
    verbs = build_vocabulary(classes.verb_names, classes.surface_names("verb"), extra_v, colon)
    nouns = build_vocabulary(classes.noun_names, classes.surface_names("noun"), extra_n, colon)
    actions = {(int(v), int(n)): a for a, (v, n) in enumerate(zip(classes.action_verb, classes.action_noun))}
    return Lexicon(verbs, nouns, actions)


def _reading_order(name: str, colon: str) -> list[str]:
    """A class name's alternatives in reading order, without ``:`` (``pan:frying`` -> frying pan)."""
    return surface_forms(name, colon)[0]


def borrowed(names: list[str], surfaces: dict[int, list[str]], colon: str, other: ClassTable, kind: str,
             other_colon: str) -> dict[int, list[str]]:
    """Class id -> the surface words of the ``other`` dataset's classes that share a phrase with it
    (EGTEA's ``Cut`` gains EK55's ``slice``, ``chop``, ``trim``...)."""
    mine: dict[tuple[str, ...], set[int]] = {}
    for cls, name in enumerate(names):
        for w in [name, *surfaces.get(cls, [])]:
            for f in _reading_order(w, colon):
                mine.setdefault(phrase(f), set()).add(cls)
    theirs = {i: [n, *other.surface_names(kind).get(i, [])] for i, n in enumerate(other.verb_names if kind == "verb" else other.noun_names)}
    out: dict[int, list[str]] = {}
    for words in theirs.values():
        forms = [f for w in words for f in _reading_order(w, other_colon)]
        owners = sorted({c for f in forms for c in mine.get(phrase(f), ())})
        if len(owners) == 1:
            got = out.setdefault(owners[0], [])
            got += [f for f in dict.fromkeys(forms) if f not in got]
    return out


def read_class_lists(folder: Path) -> tuple[dict[int, list[str]], dict[int, list[str]]]:
    """Class id -> words of EPIC's verb and noun class lists in ``folder``."""
    for vfile, nfile, cols in EPIC_LISTS:
        if (folder / vfile).is_file() and (folder / nfile).is_file():
            return _word_lists(folder / vfile, cols[0]), _word_lists(folder / nfile, cols[1])
    raise AnnotationError(f"{folder}: no EPIC class lists ({', '.join(f'{v} + {n}' for v, n, _ in EPIC_LISTS)})")


def _word_lists(path: Path, column: str) -> dict[int, list[str]]:
    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.reader(fh))
    header = [c.strip().lower() for c in rows[0]] if rows else []
    if column not in header:
        raise AnnotationError(f"{path}, row 1: expected a '{column}' column, found {header}")
    col, out = header.index(column), {}
    for n, row in enumerate(rows[1:], start=2):
        try:
            words = ast.literal_eval(row[col])
            out[int(row[0])] = [str(w) for w in words]
        except (ValueError, SyntaxError, IndexError, TypeError):
            raise AnnotationError(f"{path}, row {n}: expected an id and a word list like \"['take', 'grab']\"") from None
    return out
