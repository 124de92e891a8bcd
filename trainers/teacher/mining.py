"""Action mining: recipe steps -> (verb class, noun class) pairs in one store's vocabulary.

A step splits into sentences; a sentence into clauses, each an imperative verb with its
objects. A clause starts a sentence (after a lead-in such as "In a bowl," or "Then"), or
follows ``,``/``and``/``or``/``then`` when the next word is a verb (a word that is also a
noun counts as a verb there only before a determiner: "and water the plants"). The verb
is the longest verb phrase of the store at the clause's start ("turn on"); its objects are
the noun phrases up to the first preposition, split at ``,``/``and``/``or`` ("add broccoli,
carrot and bell pepper" -> three objects; "cut the tofu into cubes" -> tofu). A measure
before "of" is skipped ("20 g of vegetable oil" -> vegetable oil). An object's class is the
longest noun phrase of the store inside it, the rightmost on a tie (its head: "the
chopped nuts" -> nut).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

from .lexicon import Lexicon, lemma

_TOKEN = re.compile(r"[^\W\d_]+(?:'[^\W\d_]+)?|\d+(?:[.,/]\d+)*|[,;:&]")
_SENTENCE = re.compile(r"(?<=[.!?])\s+|;\s*|\n+")
_PARENS = re.compile(r"\([^()]*\)")
DETERMINERS = frozenset("the a an some any all each every your its their this that these those another more few "
                        "half remaining rest other both".split())
PRONOUNS = frozenset("it them everything this that these those all one ones each".split())
PREPOSITIONS = frozenset("in into on onto to with for from over under until at by about through across inside "
                         "around along between after before during while when if as so than till without "
                         "per using like off out up down away back then".split())
PARTICLES = ("up", "out", "down", "off", "away", "back")
LEAD_INS = frozenset("then now next first finally meanwhile also again afterwards after once when while if in on "
                     "using with for to at before until lastly gently carefully slowly quickly".split())
COORD = frozenset({",", "and", "or", "&"})
#: Words after a verb that are no object ("mix well", "let it sit", "serve hot").
NOT_OBJECTS = frozenset("well dry hot cold warm cool aside together again sit rest stand taste desired needed necessary "
                        "minute minutes hour hours second seconds time done ready more less about also completely "
                        "thoroughly immediately evenly lightly gently slightly very too enough".split())
MEASURES = frozenset("cup tablespoon teaspoon tbsp tsp g gram kg kilogram ml l liter litre pinch dash handful piece "
                     "slice clove can pound lb ounce oz bunch sprig stick drop splash bit amount half quarter third "
                     "portion layer spoonful spoon glass jar package packet bag head leaf sheet strip cube".split())
#: Verbs that start a clause after "and"/","/"then" though the store has no class for them:
#: their clauses are counted as unmapped instead of read as objects of the clause before.
COMMON_VERBS = frozenset("add bake beat blend boil break bring brown chill chop coat combine cook cool cover crack "
                         "cut dice drain drizzle dry fill flip fold fry garnish grate grease grill heat knead layer "
                         "let marinate mash melt mince mix peel place pour preheat press put reduce remove rinse "
                         "roast roll saute season serve shred simmer slice soak spread sprinkle squeeze steam stir "
                         "strain stuff sauté taste toast top toss transfer turn whisk wash wipe wrap".split())


@dataclass
class Clause:
    """One verb and its objects, as class ids (None: not a store class) and head words."""

    verb: int | None
    verb_word: str
    objects: list[tuple[int | None, str]] = field(default_factory=list)


def sentences(step: str) -> list[str]:
    """A step's sentences (parentheses dropped)."""
    return [s for s in _SENTENCE.split(_PARENS.sub(" ", step)) if s.strip()]


def tokens(sentence: str) -> list[str]:
    """Lowercase words (hyphens split), numbers and the punctuation that separates clauses."""
    return _TOKEN.findall(sentence.lower().replace("’", "'").replace("-", " "))


def _lead_in(toks: list[str], lem: list[str], lex: Lexicon, verbs_any: frozenset[str]) -> int:
    """Where a sentence's first clause starts: after "In a bowl," / "Once hot," or leading adverbs."""
    i = 0
    while i < len(toks):
        t = toks[i]
        if t in LEAD_INS and t in PREPOSITIONS and "," in toks[i:]:
            i = toks.index(",", i) + 1
        elif t in LEAD_INS or t == "," or (t.endswith("ly") and lex.verbs.match(lem, i) is None and lem[i] not in verbs_any):
            i += 1
        else:
            return i
    return i


def _verb_at(lem: list[str], i: int, lex: Lexicon, first: bool = False) -> tuple[int, int] | None:
    """(verb class, length) at ``i``; a word that is also a noun needs a determiner after it,
    except as a sentence's ``first`` verb."""
    m = lex.verbs.match(lem, i)
    if m is None or first:
        return m
    after = lem[i + m[1]] if i + m[1] < len(lem) else ""
    if lex.nouns.match(lem, i) and not (after in DETERMINERS or after in PRONOUNS or after in PARTICLES):
        return None
    return m


def parse_sentence(sentence: str, lex: Lexicon, verbs_any: frozenset[str] = COMMON_VERBS) -> list[Clause]:
    """The clauses of one sentence (``verbs_any``: lemmas that start a clause though not store verbs)."""
    toks = tokens(sentence)
    lem = [lemma(t) if t[0].isalpha() else t for t in toks]
    clauses, i = [], _lead_in(toks, lem, lex, verbs_any)
    while i < len(toks):
        m = _verb_at(lem, i, lex, first=not clauses)
        clause = Clause(m[0] if m else None, " ".join(lem[i : i + (m[1] if m else 1)]))
        i += m[1] if m else 1
        while i < len(toks) and toks[i] in PARTICLES:
            i += 1
        i = _objects(toks, lem, i, lex, clause, verbs_any)
        clauses.append(clause)
        i = _next_clause(toks, lem, i, lex, verbs_any)
    return clauses


def _starts_clause(lem: list[str], i: int, lex: Lexicon, verbs_any: frozenset[str]) -> bool:
    return i < len(lem) and (_verb_at(lem, i, lex) is not None or lem[i] in verbs_any and not lex.nouns.match(lem, i))


def _objects(toks, lem, i: int, lex: Lexicon, clause: Clause, verbs_any) -> int:
    """Add the clause's noun phrases from ``i`` on; returns where they end."""
    parts, cur = [], []
    while i < len(toks):
        t = toks[i]
        if t in COORD:
            j = i + 1 + (i + 1 < len(toks) and toks[i + 1] in ("then", "and"))
            if _starts_clause(lem, j, lex, verbs_any):
                break
            parts, cur = parts + [cur], []
        elif t == "of":
            if not _measure(toks, lem, cur, lex):
                break
            cur = []  # "20 g of oil", "a pinch of salt": the object follows
        elif t in PREPOSITIONS or t in (";", ":"):
            break
        else:
            cur.append(i)
        i += 1
    for part in parts + [cur]:
        words = [j for j in part if toks[j][0].isalpha() and toks[j] not in DETERMINERS and toks[j] not in PRONOUNS
                 and toks[j] not in NOT_OBJECTS and not (toks[j].endswith("ly") and lex.nouns.match(lem, j) is None)]  # "evenly"
        if words:
            clause.objects.append(_noun(lem, words, lex))
    return i


def _measure(toks, lem, part: list[int], lex: Lexicon) -> bool:
    """Whether the words before "of" are a quantity: measure words, or no store noun."""
    words = [k for k in part if toks[k][0].isalpha() and toks[k] not in DETERMINERS]
    return all(lem[k] in MEASURES for k in words) or not any(lex.nouns.match(lem, k) for k in words)


def _noun(lem: list[str], idx: list[int], lex: Lexicon) -> tuple[int | None, str]:
    """(class, head word) of a noun phrase: its longest store noun, the rightmost on a tie."""
    words, best = [lem[j] for j in idx], None
    for at in range(len(words)):
        m = lex.nouns.match(words, at)
        if m and (best is None or m[1] >= best[1]):
            best = (m[0], m[1], " ".join(words[at : at + m[1]]))
    return (best[0], best[2]) if best else (None, words[-1])


def _next_clause(toks, lem, i: int, lex: Lexicon, verbs_any) -> int:
    """The start of the next clause at or after ``i`` (after a coordinator before a verb), or the end."""
    while i < len(toks):
        if toks[i] in COORD or toks[i] == "then":
            j = i + 1 + (i + 1 < len(toks) and toks[i + 1] in ("then", "and"))
            if _starts_clause(lem, j, lex, verbs_any):
                return j
        i += 1
    return i


@dataclass
class Mined:
    """What one step gave: its actions (verb class, noun class) and what did not map."""

    sentences: int = 0
    pairs: list[tuple[int, int]] = field(default_factory=list)
    unmapped_verbs: Counter = field(default_factory=Counter)
    unmapped_nouns: Counter = field(default_factory=Counter)


def mine_step(step: str, lex: Lexicon, verbs_any: frozenset[str] = COMMON_VERBS) -> Mined:
    """The (verb class, noun class) pairs of one recipe step, in reading order."""
    out = Mined()
    for s in sentences(step):
        out.sentences += 1
        for c in parse_sentence(s, lex, verbs_any):
            if c.verb is None and c.verb_word[:1].isalpha() and c.verb_word not in DETERMINERS | PRONOUNS:
                out.unmapped_verbs[c.verb_word] += 1
            for noun, word in c.objects:
                if noun is None:
                    out.unmapped_nouns[word] += 1
                elif c.verb is not None:
                    out.pairs.append((c.verb, noun))
    return out
