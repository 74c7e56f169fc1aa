"""One durability policy for every SQLite file the router keeps (jobs, sessions): WAL, `synchronous=FULL`
(an accepted write survives a power cut), explicit `BEGIN IMMEDIATE` write transactions (a read-then-update
is atomic across threads, store instances and processes), a busy timeout, and numbered schema migrations."""
from __future__ import annotations

import contextlib
import logging
import os
import sqlite3
import threading
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

log = logging.getLogger(__name__)


class Database:
    """A connection shared by threads behind a lock. `migrations[i]` (SQL statements separated by ";")
    brings the schema from version i to i + 1; a file newer than the code is refused."""

    def __init__(self, path: str | os.PathLike, migrations: Sequence[str], what: str, busy_timeout_s: float = 30.0):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        # Autocommit mode (isolation_level=None): transactions are explicit, see write().
        self.conn = sqlite3.connect(str(self.path), timeout=busy_timeout_s, isolation_level=None,
                                    check_same_thread=False)
        self.conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout_s * 1000)}")
        mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning("%s: journal_mode is %r, not WAL (filesystem without shared memory?)", self.path, mode)
        self.conn.execute("PRAGMA synchronous = FULL")
        with self.write() as c:
            version = c.execute("PRAGMA user_version").fetchone()[0]
            if version > len(migrations):
                raise RuntimeError(f"{self.path} has {what} schema version {version}; this wanserve knows up to "
                                   f"{len(migrations)} (downgrade?)")
            for step in range(version, len(migrations)):
                for stmt in filter(str.strip, migrations[step].split(";")):
                    c.execute(stmt)
            c.execute(f"PRAGMA user_version = {len(migrations)}")

    @contextlib.contextmanager
    def write(self) -> Iterator[sqlite3.Connection]:
        """A write transaction: BEGIN IMMEDIATE takes the file's write lock up front."""
        with self.lock:
            self.conn.execute("BEGIN IMMEDIATE")
            try:
                yield self.conn
                self.conn.execute("COMMIT")
            except BaseException:
                if self.conn.in_transaction:
                    self.conn.execute("ROLLBACK")
                raise

    def read(self, sql: str, args: Iterable = ()) -> list[tuple]:
        with self.lock:
            return self.conn.execute(sql, tuple(args)).fetchall()

    def journal_mode(self) -> str:
        return self.read("PRAGMA journal_mode")[0][0]

    def close(self) -> None:
        with self.lock:
            self.conn.close()
