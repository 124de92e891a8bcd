"""Small file systems for tests of writers at the edges: full, or read-only.

``small_fs`` mounts a tmpfs of a few MiB (needs root, as CI runs; elsewhere the test is
skipped with the reason). ``fill`` then takes all but ``leave`` bytes of its space, so the
next writer runs out of it part-way; ``unfill`` gives the space back.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import pytest

FILLER = "filler"


def _mount(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["mount", *args], capture_output=True, text=True)


@contextmanager
def small_fs(where: Path, mib: int = 32, read_only: bool = False) -> Iterator[Path]:
    """A fresh tmpfs of ``mib`` MiB mounted at ``where`` (read-only: ``read_only``), unmounted after."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root (CI runs the suite as root)")
    where.mkdir(parents=True, exist_ok=True)
    r = _mount("-t", "tmpfs", "-o", f"size={mib}m" + (",ro" if read_only else ""), "tmpfs", str(where))
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()})")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=True)


def read_only(where: Path, on: bool = True) -> None:
    """Remount the tmpfs at ``where`` read-only (or read-write again)."""
    r = _mount("-o", f"remount,{'ro' if on else 'rw'}", str(where))
    assert r.returncode == 0, r.stderr


def free_bytes(where: Path) -> int:
    return shutil.disk_usage(where).free


def fill(where: Path, leave: int = 64 << 10) -> None:
    """Take all but about ``leave`` bytes (whole pages) of the file system at ``where`` with one file."""
    page = os.statvfs(where).f_frsize
    with open(where / FILLER, "ab") as f:
        size = os.fstat(f.fileno()).st_size + (free_bytes(where) - leave) // page * page
        while size > 0:
            try:
                os.posix_fallocate(f.fileno(), 0, size)
                return
            except OSError:  # the file system keeps a page or two for itself
                size -= page


def unfill(where: Path) -> None:
    (where / FILLER).unlink(missing_ok=True)


def entries(where: Path) -> set[str]:
    """Every path under ``where`` but the filler, relative to it (what a writer left)."""
    return {str(p.relative_to(where)) for p in where.rglob("*") if p.name != FILLER}
