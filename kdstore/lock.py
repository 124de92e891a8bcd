"""Advisory file locks (``flock``) that keep writers of one store from overlapping.

A store has one writer lock, the file ``<store>.lock`` beside it (it exists before the
store does, so creating and replacing a store are locked too). Readers never take it
(an HDF5 file has its own metadata lock: ``kdstore.hdf5_backend._h5_file_lock``).
The operating system drops a lock when its process dies, so a crashed writer never
leaves a store locked. A process may take a lock it already holds (the calls nest).
"""

from __future__ import annotations

import errno
import fcntl
import json
import os
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .errors import AccessError

TIMEOUT_ENV = "KDSTORE_LOCK_TIMEOUT"  # seconds a writer waits for the store lock; 0 refuses at once
DEFAULT_TIMEOUT_S = 600.0
POLL_S = 0.05

_held: dict[str, list] = {}  # lock file -> [fd, depth], for the locks this process holds
_guard = threading.Lock()


def store_lock_path(store: str | Path) -> Path:
    """The writer lock file of the store at ``store``."""
    store = Path(store)
    return store.with_name(store.name + ".lock")


def _timeout() -> float:
    value = os.environ.get(TIMEOUT_ENV)
    if value is None:
        return DEFAULT_TIMEOUT_S
    try:
        return max(0.0, float(value))
    except ValueError:
        raise AccessError(f"{TIMEOUT_ENV}={value!r}: expected a number of seconds") from None


def holder(path: Path) -> str:
    """Who holds the lock at ``path``, as recorded in it ("pid N (command) since T")."""
    try:
        h = json.loads(Path(path).read_text() or "{}")
        return f"pid {h['pid']} ({h['command']}) since {h['since']}"
    except (OSError, ValueError, KeyError, TypeError):
        return "another process"


def _open(path: Path, what: str) -> int:
    try:
        return os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise AccessError(f"{what}: cannot be written ({path}: {e.strerror})") from None


@contextmanager
def locked(path: str | Path, what: str, timeout: float | None = None) -> Iterator[bool]:
    """Hold the exclusive lock file ``path`` for the ``with`` block.

    Yields True when this call took the lock, False when this process already held it.
    Waits up to ``timeout`` seconds (default ``KDSTORE_LOCK_TIMEOUT`` or 600; 0: do not
    wait), then raises AccessError naming the holder's pid and command.
    """
    path = Path(path)
    key = os.path.abspath(path)
    with _guard:
        if key in _held:
            _held[key][1] += 1
            outer = False
        else:
            outer = True
    if outer:
        fd = _acquire(path, what, _timeout() if timeout is None else timeout, timeout is None)
        with _guard:
            _held[key] = [fd, 1]
    try:
        yield outer
    finally:
        with _guard:
            _held[key][1] -= 1
            done = _held[key][1] == 0
            fd = _held.pop(key)[0] if done else None
        if fd is not None:
            os.close(fd)  # releases the flock


def _acquire(path: Path, what: str, timeout: float, from_env: bool) -> int:
    deadline, told = time.monotonic() + timeout, False
    while True:
        fd = _open(path, what)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                raise AccessError(f"{what}: cannot lock {path} ({e.strerror})") from None
            if time.monotonic() >= deadline:
                waited = f"; waited {timeout:.0f} s ({TIMEOUT_ENV} sets how long)" if from_env and timeout else ""
                raise AccessError(f"{what}: in use by {holder(path)}{waited}") from None
            if not told and timeout >= 5:
                print(f"{what}: waiting for {holder(path)} to finish (up to {timeout:.0f} s)", file=sys.stderr)
                told = True
            time.sleep(POLL_S)
            continue
        try:  # the file may have been replaced while we waited: lock the one at ``path``
            same = os.stat(path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            same = False
        if not same:
            os.close(fd)
            continue
        info = {"pid": os.getpid(), "command": " ".join(sys.argv)[:300], "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, json.dumps(info).encode(), 0)
        except OSError as e:  # a full disk: the lock holds without the note of who holds it
            if e.errno not in (errno.ENOSPC, errno.EDQUOT):
                os.close(fd)
                raise
        return fd


def held(path: str | Path) -> bool:
    """Whether a live process, this one included, holds the lock file ``path``."""
    return os.path.abspath(path) in _held or held_elsewhere(path)


def held_elsewhere(path: str | Path) -> bool:
    """Whether another live process holds the lock file ``path`` (for reports; racy by nature)."""
    path = Path(path)
    if os.path.abspath(path) in _held:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return True
    finally:
        os.close(fd)
    return False
