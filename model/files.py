"""Writing a file so that no reader ever sees half of it, and a crash leaves the old one or the new one.

Every file wanserve writes for others to read (videos, job results, session states, uploads, blocks) goes
through `atomic_path`: write `<name>.part`, flush it to disk, rename it over `<name>`, then flush the folder
entry, so the rename itself survives a power cut.
"""
from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

PART_SUFFIX = ".part"


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a written file (or a folder's entries) to disk."""
    flags = os.O_RDONLY | getattr(os, "O_DIRECTORY", 0) if Path(path).is_dir() else os.O_RDONLY
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """`with atomic_path(p) as part: <write part>`: on success part is fsynced and renamed to p (and p's
    folder fsynced); on error part is removed and p is untouched."""
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    part = final.with_name(final.name + PART_SUFFIX)
    try:
        yield part
        fsync_path(part)
        os.replace(part, final)
        fsync_path(final.parent)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def write_atomic(path: str | os.PathLike, data: bytes) -> Path:
    """Write bytes to path atomically (see atomic_path); returns the path."""
    with atomic_path(path) as part:
        part.write_bytes(data)
    return Path(path)
