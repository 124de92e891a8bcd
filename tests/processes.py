"""Real child processes for tests of writers: the ``kdstore`` CLI and small Python scripts,
optionally stopped at a crash point (``kdstore.faults``)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from kdstore.faults import CRASH_ENV, EXIT_CODE, TRACE_ENV

ROOT = Path(__file__).resolve().parents[1]
CRASHED = EXIT_CODE


def _env(crash: str | None, trace: Path | None, env: dict | None) -> dict:
    out = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    for k in (CRASH_ENV, TRACE_ENV):
        out.pop(k, None)
    if crash:
        out[CRASH_ENV] = crash
    if trace:
        out[TRACE_ENV] = str(trace)
    return out


def cli(*args, crash: str | None = None, trace: Path | None = None, env: dict | None = None, cwd=None,
        timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """``kdstore ARGS...`` in a fresh process; ``crash="point:N"`` stops it at that crash point."""
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          env=_env(crash, trace, env), cwd=cwd, timeout=timeout, **kw)


def script(code: str, *args, crash: str | None = None, trace: Path | None = None, env: dict | None = None,
           timeout: float = 300, **kw) -> subprocess.CompletedProcess:
    """Python ``code`` (``sys.argv[1:]`` = ``args``) in a fresh process."""
    return subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          env=_env(crash, trace, env), timeout=timeout, **kw)


def crash_points(trace: Path) -> list[str]:
    """``point:N`` for every crash point hit in ``trace``, in order (N: the point's N-th hit)."""
    seen: dict[str, int] = {}
    out = []
    for name in trace.read_text().split():
        seen[name] = seen.get(name, 0) + 1
        out.append(f"{name}:{seen[name]}")
    return out
