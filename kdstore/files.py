"""Helpers on files and folders that writers share: sizes, removal, and swapping two paths
in one step (``exchange``). Replacing one file's content goes through ``kdstore.atomic``."""

from __future__ import annotations

import ctypes
import errno
import functools
import os
import shutil
import sys
from pathlib import Path


def inode(path: Path) -> int | None:
    """The inode number at ``path``, or None where nothing is."""
    try:
        return path.stat().st_ino
    except FileNotFoundError:
        return None


def du(path: Path) -> int:
    """Bytes under ``path`` (a file or a directory tree)."""
    if not path.is_dir():
        return path.stat().st_size if path.exists() else 0
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def mib(n: int) -> str:
    return f"{n / 2**20:.1f} MiB"


def remove(path: Path) -> None:
    """Remove a file or a folder tree; a link is removed itself, never what it points to."""
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)


EXCHANGE = True  # False: commit by two renames, as on file systems without RENAME_EXCHANGE (tests)
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


@functools.cache
def _renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except AttributeError:  # glibc before 2.28
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


def exchange(a: Path, b: Path) -> bool:
    """Swap the paths ``a`` and ``b`` in one step (Linux ``renameat2(RENAME_EXCHANGE)``).
    False, with nothing changed, where the system or the file system cannot."""
    fn = _renameat2() if EXCHANGE else None
    if fn is None:
        return False
    if fn(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))
