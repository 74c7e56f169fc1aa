"""Files named by users (LoRAs, images, weights) are opened only under configured root folders."""
from __future__ import annotations

from pathlib import Path
from typing import Iterable


class PathNotAllowed(PermissionError):
    """A path points outside every configured root (or into a symlink that leaves them)."""


def resolve_under(path: str | Path, roots: Iterable[str | Path], what: str = "file") -> Path:
    """The real path of `path` if it lies under one of `roots`; relative paths are taken from each root.

    Symlinks are resolved before the check, so a link inside a root cannot reach outside it.
    """
    roots = [Path(r).resolve() for r in roots]
    if not roots:
        raise PathNotAllowed(f"{what} {path}: no root folders are configured for {what}s")
    p = Path(path)
    candidates = [p.resolve()] if p.is_absolute() else [(r / p).resolve() for r in roots]
    for cand in candidates:
        if any(cand == r or r in cand.parents for r in roots):
            if not cand.exists():
                raise FileNotFoundError(f"{what} not found: {path}")
            return cand
    raise PathNotAllowed(f"{what} {path} is outside the allowed folders ({', '.join(map(str, roots))})")
