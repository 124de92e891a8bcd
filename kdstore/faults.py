"""Deterministic crash points for crash-consistency tests.

Writers call ``crash_point("name")`` at each step of their work. Normally it does nothing.
With ``KDSTORE_CRASH=name:N`` in the environment the process exits at once (``os._exit``,
no cleanup, no buffered writes flushed, as a SIGKILL would) on the N-th time it reaches
that point; ``KDSTORE_CRASH_TRACE=FILE`` appends each point's name to FILE as it is
reached, so a test can list every point of an uninterrupted run and kill a rerun at each.
"""

from __future__ import annotations

import os

CRASH_ENV = "KDSTORE_CRASH"
TRACE_ENV = "KDSTORE_CRASH_TRACE"
EXIT_CODE = 86  # the exit status of a process stopped at a crash point

_hits: dict[str, int] = {}


def crash_point(name: str) -> None:
    """Exit the process here if ``KDSTORE_CRASH`` selects this point and hit; else return."""
    spec, trace = os.environ.get(CRASH_ENV), os.environ.get(TRACE_ENV)
    if not spec and not trace:
        return
    _hits[name] = n = _hits.get(name, 0) + 1
    if trace:
        with open(trace, "a") as f:
            f.write(name + "\n")
    if spec:
        target, _, hit = spec.rpartition(":")
        if target == name and n == int(hit):
            os._exit(EXIT_CODE)
