"""Provenance records: what was done to a store, by which command and package, from which files."""

from __future__ import annotations

import hashlib
import sys
import time
from pathlib import Path
from typing import Iterable

from . import __version__


def file_sha256(path: str | Path) -> str:
    """SHA-256 of a file, for provenance."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()



def provenance_entry(action: str, inputs: Iterable[str | Path] = (), **extra) -> dict:
    """One provenance record: what was done, by which command and package, from which files."""
    return {
        "action": action,
        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "command": " ".join(sys.argv),
        "package_version": __version__,
        "inputs": {str(p): file_sha256(p) for p in inputs},
        **extra,
    }
