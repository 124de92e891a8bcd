"""Action labels as teacher text: ``verb <v> noun <a> verb <v> noun``."""

from __future__ import annotations

import re
from typing import Iterable

from .tables import ClassTable

_WORD_SEP = re.compile(r"[_/]+")


def class_words(name: str, colon: str = "keep") -> str:
    """A class name as plain lowercase words: ``Inspect/Read`` -> ``inspect read``.

    ``_`` and ``/`` separate words. ``:`` joins a compound: EGTEA writes it in reading
    order (``eating:utensil`` -> ``eating utensil``, ``colon="keep"``), EK55 and EK100
    write the head noun first (``pan:dust`` -> ``dust pan``, ``colon="reverse"``).
    """
    parts = [p for p in name.strip().lower().split(":") if p]
    if colon == "reverse":
        parts = parts[::-1]
    return " ".join(w for p in parts for w in _WORD_SEP.split(p) if w)


def pair_words(verb: str, noun: str, colon: str = "keep") -> str:
    """A (verb, noun) pair of class names as teacher text: ``verb <v> noun``."""
    return f"{class_words(verb, colon)} <v> {class_words(noun, colon)}"


def action_words(classes: ClassTable, action: int, colon: str = "keep") -> str:
    """One action as teacher text, from its own name's words: ``verb <v> noun``."""
    return pair_words(classes.surface_verbs[action], classes.surface_nouns[action], colon)


def action_text(classes: ClassTable, actions: Iterable[int], colon: str = "keep") -> str:
    """A sequence of action ids as teacher text: ``verb <v> noun <a> verb <v> noun``."""
    return " <a> ".join(action_words(classes, int(a), colon) for a in actions)
