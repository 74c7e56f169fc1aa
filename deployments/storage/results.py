"""A job's files under results_dir: the result `<id>.mp4`, CausVid blocks `<id>.block<k>.mp4`, and `.part`
leftovers of writes that never finished. Names are checked here, so no caller can point outside the folder."""
from __future__ import annotations

import contextlib
import logging
import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from model.files import PART_SUFFIX, atomic_path

log = logging.getLogger(__name__)

JOB_ID_RE = re.compile(r"^vid_[0-9a-f]{24}$")
RESULT_SUFFIX = ".mp4"
OnError = Callable[[str, BaseException], None]  # (item, error) of a retention round; None: raise


class ResultFiles:
    def __init__(self, results_dir: str | os.PathLike):
        self.dir = Path(results_dir)
        self.dir.mkdir(parents=True, exist_ok=True)

    def result_path(self, job_id: str) -> Path:
        """Where the job's mp4 goes: `<dir>/<id>.mp4` (write it with `atomic`)."""
        if not JOB_ID_RE.match(job_id):
            raise ValueError(f"not a job id: {job_id!r}")
        return self.dir / f"{job_id}{RESULT_SUFFIX}"

    def block_path(self, job_id: str, index: int) -> Path:
        """Where block `index` of a CausVid fragment job goes: `<dir>/<id>.block<k>.mp4`."""
        if not JOB_ID_RE.match(job_id) or not 0 <= int(index) < 10000:
            raise ValueError(f"not a job id and block index: {job_id!r}, {index!r}")
        return self.dir / f"{job_id}.block{int(index):04d}{RESULT_SUFFIX}"

    @contextlib.contextmanager
    def atomic(self, job_id: str) -> Iterator[Path]:
        """`with files.atomic(id) as part: <write part>` -> fsynced and renamed to result_path(id) on
        success, removed on error. Yields the `.part` path."""
        with atomic_path(self.result_path(job_id)) as part:
            yield part

    def write(self, job_id: str, data: bytes) -> str:
        """Write bytes atomically as the job's result; returns the file name for `JobStore.complete()`."""
        with self.atomic(job_id) as part:
            part.write_bytes(data)
        return self.result_path(job_id).name

    def relative(self, result_file: str | os.PathLike) -> str:
        """A result file's name relative to the folder; ValueError for anything outside it."""
        p = Path(result_file)
        if p.is_absolute():
            try:
                p = p.resolve().relative_to(self.dir.resolve())
            except ValueError:
                raise ValueError(f"result file {result_file} is not inside {self.dir}") from None
        if not p.parts or ".." in p.parts or p.is_absolute():
            raise ValueError(f"bad result file name {str(result_file)!r}")
        return p.as_posix()

    def of_job(self, job_id: str, results: bool = True, extra: str | None = None) -> list[str]:
        """Names of the job's files: `<id>.*` (with results=False only `.part` leftovers) and `extra`."""
        names = set()
        if JOB_ID_RE.match(job_id):
            for p in self.dir.glob(f"{job_id}.*"):
                if results or p.name.endswith(PART_SUFFIX):
                    names.add(p.name)
        if extra:
            try:
                names.add(self.relative(extra))
            except ValueError:  # a stored name from outside the folder: never deleted from here
                log.warning("job %s: result %r is not a file under %s; left alone", job_id, extra, self.dir)
        return sorted(names)

    def unlink(self, names: Iterable[str], on_error: OnError | None = None) -> list[str]:
        """Delete files of the folder; returns the names actually deleted. A file that cannot be deleted is
        logged (and reported to on_error); the next retention round tries it again."""
        removed = []
        for name in names:
            try:
                (self.dir / name).unlink()
                removed.append(name)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("could not delete %s: %s", self.dir / name, e)
                if on_error is not None:
                    on_error(name, e)
        return removed
