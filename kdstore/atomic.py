"""Atomic replacement of files: every writer that replaces a file goes through here.

The new content is written under a temporary name in the target's folder, synced, renamed
over the target, and the folder synced, so a crash leaves the old file or the new one,
never half of one. Only a regular file (or nothing) is replaced: a symbolic link, a
device, a folder or a pipe at the target is refused, so no writer ever writes through a
link or turns ``/dev/full`` into a file. What a user can act on (a full disk, a read-only
file system, a folder in the way, no permission) becomes one line naming the path and
what to do (``os_errors``).
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Callable, Iterator

from .errors import AccessError, KDStoreError

_KINDS = {stat.S_IFDIR: "a folder", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFIFO: "a named pipe", stat.S_IFSOCK: "a socket"}


def temp_name(path: Path) -> Path:
    """A fresh hidden sibling of ``path`` (``.<name>.<id>.tmp``), removed as a leftover if a crash strands it."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")


def link_message(link: Path, inside: bool = False) -> str:
    """One line about a symbolic link a writer refuses to write or delete through
    (``inside``: a link inside a store, which holds none)."""
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    advice = ("a store holds no links: move what it points to into the store in its place, or remove it" if inside
              else "remove the link, or give the real path")
    return f"{link}: a symbolic link (to {target}); kdstore never writes or deletes through a link: {advice}"


def check_replaceable(path: Path) -> None:
    """Raise AccessError unless ``path`` is absent or a regular file (not a link, device or folder)."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if stat.S_ISLNK(mode):
        raise AccessError(link_message(path))
    if not stat.S_ISREG(mode):
        raise AccessError(f"{path}: is {_KINDS.get(stat.S_IFMT(mode), 'not a regular file')}, not a regular file;"
                          " kdstore only replaces regular files: give a file path")


_ADVICE = {
    errno.ENOSPC: "no space left on the device: free space there (kdstore gc removes what crashed writers left) and rerun",
    errno.EDQUOT: "disk quota exceeded: free space there and rerun",
    errno.EFBIG: "file too large for the file system: write elsewhere",
    errno.EROFS: "cannot be written (read-only file system): write elsewhere, or remount it read-write",
    errno.EISDIR: "is a folder: give a file path",
    errno.EACCES: "cannot be written (permission denied): change its permissions, or write elsewhere",
    errno.EPERM: "cannot be written (operation not permitted): write elsewhere",
    errno.ENOTDIR: "a part of the path is not a folder: give a path inside a folder",
}


def describe(path: Path, e: Exception) -> str | None:
    """The one-line message for an OSError a user can act on, or None."""
    code = getattr(e, "errno", None)
    if code is None and "No space left on device" in str(e):  # h5py reports HDF5's write errors without errno,
        code = errno.ENOSPC  # some as RuntimeError
    advice = _ADVICE.get(code)
    if advice is None:
        return None
    name = Path(str(getattr(e, "filename", None) or "")).name
    temp = name.startswith(".") and name.endswith(".tmp")  # a writer's own temporary file says nothing more
    where = f" ({e.filename})" if name and str(e.filename) != str(path) and not temp else ""
    return f"{path}: {advice}{where}"


@contextmanager
def os_errors(path: str | Path, unknown: bool = False) -> Iterator[None]:
    """Turn the OSErrors of ``describe`` raised in the block into a one-line AccessError;
    ``unknown``: every other OSError too (writing a file a user named)."""
    try:
        yield
    except KDStoreError:
        raise
    except (OSError, RuntimeError) as e:
        msg = describe(Path(path), e)
        if msg is None and (not unknown or isinstance(e, RuntimeError)):
            raise
        raise AccessError(msg or f"{path}: cannot be written ({e.strerror or e})") from None


def fsync(path: Path | str) -> None:
    """Flush a file's or a folder's entries to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """Flush every file and folder under ``root`` (links are not followed)."""
    for dirpath, _, files in os.walk(root):
        for name in files:
            p = os.path.join(dirpath, name)
            if not os.path.islink(p):
                fsync(p)
        fsync(dirpath)


def _commit(tmp: Path, path: Path) -> None:
    fsync(tmp)
    check_replaceable(path)  # again: something may have appeared meanwhile
    os.replace(tmp, path)
    fsync(path.parent)


@contextmanager
def replacing(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file object whose content replaces ``path`` atomically once the block ends without error."""
    path = Path(path)
    tmp = temp_name(path)
    with os_errors(path, unknown=True):
        check_replaceable(path)
        try:
            with open(tmp, mode) as f:
                yield f
            _commit(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def replace_with(path: str | Path, write: Callable[[Path], object]) -> None:
    """Replace ``path`` atomically by what ``write(tmp)`` writes to the temporary path ``tmp``
    (for writers that take a path, such as safetensors' ``save_file``)."""
    path = Path(path)
    tmp = temp_name(path)
    with os_errors(path, unknown=True):
        check_replaceable(path)
        try:
            write(tmp)
            _commit(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)


def write_json(path: str | Path, obj, indent: int | None = 1) -> None:
    """Write ``obj`` as JSON to ``path`` atomically."""
    with replacing(path) as f:
        json.dump(obj, f, indent=indent, sort_keys=True)


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with replacing(path) as f:
        f.write(text)


def replace_folder(path: str | Path, write: Callable[[Path], object], marker: str) -> None:
    """Replace the folder ``path`` by what ``write(tmp)`` puts in a new folder ``tmp``.

    An existing ``path`` is replaced only if it is a real folder, empty or holding ``marker``
    (one this writer made); a crash leaves the old folder, the new one, or the old one set aside as
    ``.<name>.<id>.tmp`` beside the new one.
    """
    path = Path(path)
    tmp, aside = temp_name(path), temp_name(path)
    with os_errors(path, unknown=True):
        try:
            mode = os.lstat(path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None and stat.S_ISLNK(mode):
            raise AccessError(link_message(path))
        if mode is not None and not (stat.S_ISDIR(mode) and ((path / marker).is_file() or not any(path.iterdir()))):
            raise AccessError(f"{path}: exists and is not a folder this command wrote (no {marker} in it):"
                              " remove it, or choose another path")
        try:
            tmp.mkdir()
            write(tmp)
            fsync_tree(tmp)
            if mode is not None:
                os.replace(path, aside)
            os.replace(tmp, path)
            fsync(path.parent)
        finally:
            for p in (tmp, aside):
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p)
