"""Form the torch.distributed group of one sequence-parallel replica, and notice when a member is gone.

A replica is N processes (Ray actors, or torchrun / spawned processes) that must agree on one process group
before any tensor moves. Two things make this more than `init_process_group`:

* **Joining is bounded and names the missing.** Rank 0 hosts a TCPStore (on a port it picks itself, or one
  given); every rank writes `join/<rank>` and waits for all the others' keys. A rank that never arrives makes
  every other rank fail after `join_timeout` with "rank 3 did not join"; a rank that cannot reach rank 0's
  store fails with "rank 0 ... is not reachable". Only then is the real (gloo on CPU, nccl on CUDA) group
  created over the same store.
* **Dying is noticed and named.** Each rank runs a heartbeat thread that writes a counter (and what it is
  doing) into the store and watches everybody else's. Work is run inside `Group.watch()`: when a collective
  fails (gloo reports a closed connection as soon as a peer process dies; a hung peer runs into the
  collective timeout `op_timeout`) the rank waits, at most `stale_after` seconds, for the evidence — a peer
  that posted its own error, a peer whose heartbeat stopped, or rank 0's store gone (rank 0 died) — and
  raises `RankFailure` naming the rank(s). A rank that fails on its own (a Python error) posts its error so
  the others can name it and its reason.

Sub-groups follow xDiT's order with sequence-parallel innermost: the world is cfg_p_size x sp_size ranks,
rank = cfg_rank * sp + sp_rank; within an SP group, rank sp_rank = ring_rank * ulysses + ulysses_rank
(yunchang's `use_ulysses_low`). So sp=2, cfg=2 gives SP groups [0,1],[2,3] and CFG groups [0,2],[1,3];
sp=4 as ulysses 2 x ring 2 gives ulysses groups [0,1],[2,3] and ring groups [0,2],[1,3].

Only torch.distributed and the standard library are used here: nothing CUDA-specific is imported on CPU.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

KEY_PREFIX = "wanserve/"


class GroupError(RuntimeError):
    """The group could not be formed (a rank did not join, rank 0 unreachable, bad layout)."""


class RankFailure(RuntimeError):
    """A job failed because another rank of the group died, hung or failed; `ranks` names them."""

    def __init__(self, ranks: list[int], message: str):
        super().__init__(message)
        self.ranks = list(ranks)

    def __reduce__(self):  # crosses process boundaries (Ray) intact
        return (type(self), (self.ranks, str(self)))


# ------------------------------------------------------------------------------------------------
# Layout: which global ranks form which sub-group
# ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class GroupLayout:
    """world = cfg x sp ranks, sp = ulysses x ring; sequence parallel innermost (xDiT's order)."""

    ulysses: int = 1
    ring: int = 1
    cfg: int = 1

    def __post_init__(self):
        for name in ("ulysses", "ring", "cfg"):
            if getattr(self, name) < 1:
                raise GroupError(f"{name} degree must be >= 1; got {getattr(self, name)}")

    @classmethod
    def from_parallel(cls, parallel) -> GroupLayout:
        """From a `model.config.ParallelConfig` (or None: one process)."""
        if parallel is None:
            return cls()
        u, r = parallel.degrees()
        return cls(ulysses=u, ring=r, cfg=parallel.cfg_p_size)

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.sp * self.cfg

    def sp_groups(self) -> list[list[int]]:
        return [list(range(c * self.sp, (c + 1) * self.sp)) for c in range(self.cfg)]

    def cfg_groups(self) -> list[list[int]]:
        return [[c * self.sp + i for c in range(self.cfg)] for i in range(self.sp)]

    def ulysses_groups(self) -> list[list[int]]:
        return [g[j * self.ulysses:(j + 1) * self.ulysses] for g in self.sp_groups() for j in range(self.ring)]

    def ring_groups(self) -> list[list[int]]:
        return [g[i::self.ulysses] for g in self.sp_groups() for i in range(self.ulysses)]

    def coords(self, rank: int) -> dict[str, int]:
        """cfg / sp / ring / ulysses index of a global rank."""
        sp_rank = rank % self.sp
        return {"cfg": rank // self.sp, "sp": sp_rank, "ring": sp_rank // self.ulysses,
                "ulysses": sp_rank % self.ulysses}


@dataclass
class SubGroup:
    """One process group this rank belongs to: its global ranks and this rank's index in it."""

    ranks: list[int]
    rank: int
    pg: object = None  # torch ProcessGroup (every sub-group is a real group, even of one rank)

    @property
    def size(self) -> int:
        return len(self.ranks)


# ------------------------------------------------------------------------------------------------
# Addresses and ports
# ------------------------------------------------------------------------------------------------
def free_port(host: str = "") -> int:
    """A TCP port that is free now (rank 0 may instead let its store pick one: `host_store(port=0)`)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def host_address() -> str:
    """This host's address as other hosts see it (Ray's node address inside a Ray worker)."""
    try:
        import ray  # only when running under Ray; cheap if already imported

        if ray.is_initialized():
            return ray.util.get_node_ip_address()
    except ImportError:
        pass
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # no packet is sent; picks the outgoing interface
            return s.getsockname()[0]
    except OSError:
        return "127.0.0.1"


def default_device() -> torch.device:
    """cuda:<LOCAL_RANK or 0> where CUDA is available (Ray gives each GPU actor one visible device), else CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)) % torch.cuda.device_count())
    return torch.device("cpu")


def backend_for(device: torch.device) -> str:
    """nccl for CUDA devices, gloo for everything else."""
    return "nccl" if torch.device(device).type == "cuda" else "gloo"


def host_store(world_size: int, port: int = 0, timeout: float = 60.0) -> dist.TCPStore:
    """Rank 0's store (port 0: the OS picks a free one; read it back from `.port`)."""
    return dist.TCPStore("0.0.0.0", port, world_size, is_master=True, timeout=timedelta(seconds=timeout),
                         wait_for_workers=False)


def _connect(addr: str, port: int, world_size: int, timeout: float) -> dist.TCPStore:
    return dist.TCPStore(addr, port, world_size, is_master=False, timeout=timedelta(seconds=timeout))


# ------------------------------------------------------------------------------------------------
# Heartbeats
# ------------------------------------------------------------------------------------------------
class _Heartbeat(threading.Thread):
    """Writes this rank's beat into the store every `interval` s and watches everyone else's.

    A beat is JSON {"n": counter, "phase": what the rank is doing, "failed": its own error or null,
    "blames": ranks it found dead}. Staleness is measured on this host's clock (the time since a peer's
    counter last changed), so hosts need no synchronised clocks.
    """

    def __init__(self, store: dist.TCPStore, rank: int, world_size: int, interval: float):
        super().__init__(name=f"wanserve-heartbeat-{rank}", daemon=True)
        self.store = store  # this thread's own client connection (store.clone())
        self.rank, self.world_size, self.interval = rank, world_size, interval
        self.phase, self.failed, self.blames = "joined", None, []
        self.lock = threading.Lock()
        self.stop_event = threading.Event()
        self.wake = threading.Event()  # beat now (the phase changed)
        now = time.monotonic()
        self.peers = {r: {"n": -1, "seen": now, "phase": "?", "failed": None, "blames": []}
                      for r in range(world_size) if r != rank}
        self.store_error: str | None = None
        self.counter = 0

    def beat_value(self) -> str:
        return json.dumps({"n": self.counter, "phase": self.phase, "failed": self.failed, "blames": self.blames})

    def kick(self) -> None:
        self.wake.set()

    def stop(self) -> None:
        self.stop_event.set()
        self.wake.set()

    def run(self):
        keys = [f"{KEY_PREFIX}hb/{r}" for r in self.peers]
        while not self.stop_event.is_set():
            try:
                self.counter += 1
                self.store.set(f"{KEY_PREFIX}hb/{self.rank}", self.beat_value())
                values = self.store.multi_get(keys) if keys else []
            except Exception as e:  # the store lives in rank 0: rank 0 is gone, and so is the group
                with self.lock:
                    self.store_error = str(e).splitlines()[0][:200]
                return
            now = time.monotonic()
            with self.lock:
                for r, raw in zip(self.peers, values):
                    beat = json.loads(bytes(raw).decode())
                    p = self.peers[r]
                    if beat["n"] != p["n"]:
                        p.update(n=beat["n"], seen=now)
                    p.update(phase=beat["phase"], failed=beat["failed"], blames=beat.get("blames", []))
            self.wake.wait(self.interval)
            self.wake.clear()

    def snapshot(self) -> tuple[dict[int, dict], str | None]:
        now = time.monotonic()
        with self.lock:
            peers = {r: {**p, "age": now - p["seen"]} for r, p in self.peers.items()}
            return peers, self.store_error


# ------------------------------------------------------------------------------------------------
# The group
# ------------------------------------------------------------------------------------------------
def is_comm_error(exc: BaseException) -> bool:
    """Did this exception come out of a collective / the store (rather than this rank's own code)?"""
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "gloo", "Gloo", "NCCL", "nccl", "Connection closed", "Connection reset", "Broken pipe", "Timed out",
        "timed out", "Socket", "connect"))


@dataclass
class Group:
    """This rank's membership: the default group (world) and its SP / CFG / ulysses / ring sub-groups."""

    rank: int
    world_size: int
    layout: GroupLayout
    device: torch.device
    backend: str
    store: dist.TCPStore
    addr: str
    port: int
    sp: SubGroup = None
    cfg: SubGroup = None
    ulysses: SubGroup = None
    ring: SubGroup = None
    stale_after: float = 5.0
    heartbeat: _Heartbeat | None = None
    broken: str | None = None
    closed: bool = False
    _owns_pg: bool = field(default=True, repr=False)

    # ---- status ----
    @property
    def phase(self) -> str:
        return self.heartbeat.phase if self.heartbeat else ""

    @phase.setter
    def phase(self, value: str) -> None:
        if self.heartbeat:
            self.heartbeat.phase = value
            self.heartbeat.kick()

    def peers(self) -> dict[int, dict]:
        """What this rank knows of the others: seconds since their last beat, phase, posted failure."""
        if not self.heartbeat:
            return {}
        peers, _ = self.heartbeat.snapshot()
        return {r: {"age_s": round(p["age"], 2), "phase": p["phase"], "failed": p["failed"]} for r, p in peers.items()}

    # ---- failure handling ----
    def diagnose(self, wait: float | None = None) -> tuple[list[int], str]:
        """Who is to blame for a failed collective: (ranks, reason), waiting up to `wait` s for evidence."""
        hb = self.heartbeat
        if hb is None:
            return [], "no heartbeat running"
        deadline = time.monotonic() + (self.stale_after + 2 * hb.interval if wait is None else wait)
        while True:
            peers, store_error = hb.snapshot()
            failed = {r: p["failed"] for r, p in peers.items() if p["failed"]}
            if failed:
                return sorted(failed), "; ".join(f"rank {r} failed: {msg}" for r, msg in sorted(failed.items()))
            stale = sorted(r for r, p in peers.items() if p["age"] > self.stale_after)
            if stale:
                return stale, "; ".join(f"rank {r} stopped responding (no heartbeat for {peers[r]['age']:.1f} s, "
                                        f"last phase: {peers[r]['phase']})" for r in stale)
            blamed = sorted({b for p in peers.values() for b in p["blames"]})
            if blamed:
                return blamed, f"rank(s) {blamed} found dead by the other ranks"
            if store_error is not None and self.rank != 0:
                return [0], (f"rank 0 (it hosts the group's store at {self.addr}:{self.port}) is unreachable: "
                             f"it died or its host is down ({store_error})")
            if time.monotonic() >= deadline:
                phases = ", ".join(f"rank {r}: {p['phase']}" for r, p in sorted(peers.items()))
                return [], f"every rank still has a heartbeat (phases: {phases})"
            time.sleep(min(hb.interval, 0.1))

    def post_failure(self, exc: BaseException) -> None:
        """Tell the others that this rank failed by itself, and why."""
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        if self.heartbeat:
            self.heartbeat.failed = msg
            self._publish()

    def _publish(self) -> None:
        """Write this rank's beat now, from the calling thread (a failure or a verdict must not wait)."""
        with contextlib.suppress(Exception):
            self.store.set_timeout(timedelta(seconds=2))  # rank 0 may be gone: do not block on it
            self.store.set(f"{KEY_PREFIX}hb/{self.rank}", self.heartbeat.beat_value())

    @contextlib.contextmanager
    def watch(self, what: str = "job", benign: tuple[type[BaseException], ...] = ()):
        """Run collective work; turn a peer's death or failure into a `RankFailure` that names it.

        `benign`: exception types every rank raises together by design (a cancelled or rejected request):
        they pass through and leave the group usable.
        """
        if self.broken:
            raise RankFailure([], f"rank {self.rank}: the group is broken ({self.broken}); form a new one")
        try:
            yield self
        except benign:
            raise
        except RankFailure as e:
            self._break(str(e))
            raise
        except Exception as exc:
            if not is_comm_error(exc):
                self.post_failure(exc)
                self._break(f"rank {self.rank} failed: {exc}")
                raise
            ranks, why = self.diagnose()
            if self.heartbeat:
                self.heartbeat.blames = ranks
                self._publish()
            self._break(why)
            first = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
            raise RankFailure(ranks, f"rank {self.rank}: {what} failed: {why} [{first}]") from exc

    def _break(self, reason: str) -> None:
        """Give up the process groups at once: peers blocked in a collective with us then fail right away
        (gloo reports the closed connections) instead of waiting for `op_timeout`. Heartbeats go on."""
        self.broken = reason
        self._release_groups()

    def _release_groups(self) -> None:
        for sub in (self.sp, self.cfg, self.ulysses, self.ring):
            if sub is not None:
                sub.pg = None  # the layouts share these SubGroups: no reference may keep a group alive
        if self._owns_pg and dist.is_initialized():
            if self.backend == "nccl":
                with contextlib.suppress(Exception):
                    dist.distributed_c10d._abort_process_group()
            with contextlib.suppress(Exception):
                dist.destroy_process_group()
        gc.collect()  # a gloo group closes its connections when the last reference goes

    # ---- teardown ----
    def close(self) -> None:
        """Leave the group: stop the heartbeat, destroy the process groups, release the store.

        After a failure, rank 0 keeps its store up (at most `stale_after` s more) until every live peer has
        named the rank that failed, so that they do not blame rank 0 for the store going away.
        """
        if self.closed:
            return
        self.closed = True
        if self.broken and self.rank == 0 and self.heartbeat:
            self._linger()
        if self.heartbeat:
            self.heartbeat.stop()
            self.heartbeat.join(timeout=5)
        self._release_groups()
        self.store = None

    def _linger(self) -> None:
        """Rank 0 after a failure: keep the store up while a live peer has not yet named the culprit."""
        hb = self.heartbeat
        deadline = time.monotonic() + self.stale_after + 2 * hb.interval
        while time.monotonic() < deadline:
            peers, _ = hb.snapshot()
            if all(p["age"] > self.stale_after or p["failed"] or p["blames"] for p in peers.values()):
                return
            time.sleep(min(hb.interval, 0.1))

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def join(rank: int, world_size: int, addr: str, port: int, layout: GroupLayout | None = None, *,
         device: torch.device | str | None = None, store: dist.TCPStore | None = None, join_timeout: float = 60.0,
         op_timeout: float = 600.0, heartbeat_interval: float = 1.0, stale_after: float = 5.0) -> Group:
    """Join the group of `world_size` ranks whose rank 0 hosts the store at addr:port.

    Rank 0 passes `store` when it created it already (`host_store(port=0)`, then published its port); otherwise
    rank 0 hosts one on `port`. Backend: nccl on a CUDA device, gloo otherwise. `op_timeout` bounds every
    collective (a hung peer), `join_timeout` the wait for all ranks to arrive.
    """
    layout = layout or GroupLayout(ulysses=world_size)
    if layout.world_size != world_size:
        raise GroupError(f"world_size = {world_size} but the layout (ulysses {layout.ulysses} x ring {layout.ring} x "
                         f"cfg {layout.cfg}) needs {layout.world_size} ranks")
    if not 0 <= rank < world_size:
        raise GroupError(f"rank {rank} is outside 0..{world_size - 1}")
    if dist.is_initialized():
        raise GroupError("this process is already in a torch.distributed group; close it first")
    device = torch.device(device) if device is not None else default_device()
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t0 = time.monotonic()
    if store is None:
        try:
            if rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
                store = host_store(world_size, port, timeout=join_timeout)
            else:
                store = _connect(addr, port, world_size, join_timeout)
        except Exception as e:
            who = "this rank could not host the store" if rank == 0 else (
                f"rank 0 (the group's store at {addr}:{port}) is not reachable after {join_timeout:.0f} s: it never "
                "came up, or the address is wrong")
            raise GroupError(f"rank {rank}: {who} ({str(e).splitlines()[0][:200]})") from e
    prefixed = dist.PrefixStore(KEY_PREFIX.rstrip("/"), store)  # the torch group's own keys
    _join_barrier(store, rank, world_size, addr, port, t0 + join_timeout)

    hb = _Heartbeat(store.clone(), rank, world_size, heartbeat_interval)
    dist.init_process_group(backend, store=prefixed, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=op_timeout))
    group = Group(rank, world_size, layout, device, backend, store, addr, port, stale_after=stale_after, heartbeat=hb)
    try:
        _make_subgroups(group, timedelta(seconds=op_timeout))
    except Exception:
        dist.destroy_process_group()
        raise
    hb.start()
    log.info("rank %d/%d joined (%s, %s) in %.2f s", rank, world_size, backend, device, time.monotonic() - t0)
    return group


def _join_barrier(store, rank: int, world_size: int, addr: str, port: int, deadline: float) -> None:
    key = f"{KEY_PREFIX}join/{{}}"
    store.set(f"{KEY_PREFIX}hb/{rank}", json.dumps({"n": 0, "phase": "joining", "failed": None, "blames": []}))
    store.set(key.format(rank), str(os.getpid()))
    while True:
        try:
            missing = [r for r in range(world_size) if not store.check([key.format(r)])]
        except Exception as e:
            raise GroupError(f"rank {rank}: lost rank 0's store at {addr}:{port} while waiting for the others to "
                             f"join: rank 0 died ({str(e).splitlines()[0][:200]})") from e
        if not missing:
            return
        if time.monotonic() > deadline:
            names = ", ".join(map(str, missing))
            raise GroupError(f"rank{'s' if len(missing) > 1 else ''} {names} did not join the group of {world_size} "
                             f"within the join timeout (seen from rank {rank}; joined: "
                             f"{sorted(set(range(world_size)) - set(missing))})")
        time.sleep(0.05)


def _make_subgroups(group: Group, timeout: timedelta) -> None:
    """Every rank creates every sub-group (torch requires it), in one fixed order, and keeps its own."""
    layout, rank = group.layout, group.rank
    world = list(range(group.world_size))
    for name, lists in (("sp", layout.sp_groups()), ("cfg", layout.cfg_groups()),
                        ("ulysses", layout.ulysses_groups()), ("ring", layout.ring_groups())):
        for ranks in lists:
            pg = dist.group.WORLD if ranks == world else dist.new_group(ranks, timeout=timeout)
            if rank in ranks:
                setattr(group, name, SubGroup(ranks, ranks.index(rank), pg))


def join_from_env(layout: GroupLayout | None = None, **kw) -> Group:
    """Join from torchrun's variables (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT; LOCAL_RANK picks the GPU)."""
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    except KeyError as e:
        raise GroupError(f"environment variable {e.args[0]} is not set (run under torchrun, or call join())") from None
    return join(rank, world, addr, port, layout, **kw)
