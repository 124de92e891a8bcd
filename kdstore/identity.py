"""Same settings or refuse: what a resumed run, build or import checks against what it saved.

Work that resumes (a staged feature import, a teacher build, a student run, the demo) saves
the settings it started with; a later call with other settings must not mix its results in.
``check_same`` compares the two as JSON (a tuple equals the list it is saved as) and names
each differing key with both values.
"""

from __future__ import annotations

import json
from typing import Any, Iterable, Mapping

from .errors import ConfigError



class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()  # a key on one side only


def _as_json(value: Any) -> Any:
    return json.loads(json.dumps(value))


def differences(saved: Mapping, now: Mapping, ignore: Iterable[str] = ()) -> list[tuple[str, Any, Any]]:
    """(dotted key, saved value, value now) of every key whose values differ, in key order;
    mappings on both sides are compared key by key (``config.lr``), a key on one side only is
    ``(absent)`` on the other, and keys in ``ignore`` (dotted) are skipped."""
    skip = set(ignore)

    def walk(a: Any, b: Any, prefix: str) -> Iterable[tuple[str, Any, Any]]:
        for key in sorted(set(a) | set(b), key=str):
            path = f"{prefix}{key}"
            if path in skip:
                continue
            x, y = a.get(key, _ABSENT), b.get(key, _ABSENT)
            if isinstance(x, dict) and isinstance(y, dict):
                yield from walk(x, y, path + ".")
            elif x != y:
                yield path, x, y

    return list(walk(_as_json(dict(saved)), _as_json(dict(now)), ""))


def check_same(saved: Mapping, now: Mapping, what: str, *, hint: str = "", ignore: Iterable[str] = (),
               error: type[Exception] = ConfigError) -> None:
    """Raise ``error`` when ``saved`` and ``now`` differ (see :func:`differences`):
    ``{what} (key: saved X, now Y; ...); {hint}``."""
    diff = differences(saved, now, ignore)
    if diff:
        detail = "; ".join(f"{k}: saved {x!r}, now {y!r}" for k, x, y in diff)
        raise error(f"{what} ({detail})" + (f"; {hint}" if hint else ""))
