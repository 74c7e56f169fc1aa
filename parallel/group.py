"""Form the torch.distributed group of one sequence-parallel replica, and notice when a member is gone.

Joining is bounded and names the missing rank (rank 0 hosts a TCPStore; every rank waits for the others'
`join/<rank>` keys). Dying is noticed and named: work runs inside `Group.watch()`, and a failed collective
is turned, with the heartbeat's evidence (parallel/heartbeat.py), into a `RankFailure` naming the rank(s);
a rank that fails by itself posts its error so the others name it and its reason. Sub-groups follow
xDiT's order, sequence parallel innermost. Only torch.distributed and the standard library are used here.
ARCHITECTURE.md ("parallel") has the design.
"""
from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import socket
import time
from dataclasses import dataclass, field
from datetime import timedelta

import torch
import torch.distributed as dist

from .heartbeat import KEY_PREFIX, Heartbeat, beat_key

log = logging.getLogger(__name__)
_DIST_DIR = os.path.dirname(os.path.abspath(dist.__file__)) + os.sep


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
# The group
# ------------------------------------------------------------------------------------------------
def first_line(exc: BaseException, limit: int = 200) -> str:
    """The first line of an exception's message (its type's name when it has none)."""
    text = str(exc)
    return text.splitlines()[0][:limit] if text.strip() else type(exc).__name__


class CollectiveError(dist.DistError):
    """A collective's failure that no torch.distributed frame shows: the RuntimeError of a p2p `Work.wait()`."""


def wait(work) -> None:
    """`work.wait()` of an async (p2p) op: gloo raises a plain RuntimeError in the caller's frame, so name it."""
    try:
        work.wait()
    except dist.DistError:
        raise
    except RuntimeError as e:
        raise CollectiveError(str(e)) from e


def raised_in_distributed(exc: BaseException) -> bool:
    """Was `exc` raised from inside torch.distributed (its innermost frame is torch.distributed's code)?"""
    tb = exc.__traceback__
    if tb is None:
        return False
    while tb.tb_next is not None:
        tb = tb.tb_next
    return os.path.abspath(tb.tb_frame.f_code.co_filename).startswith(_DIST_DIR)


def is_comm_error(exc: BaseException) -> bool:
    """Did this exception come out of a collective or the store, rather than this rank's own code? By type:
    torch's DistError (and subclasses: backend, network, store; CollectiveError), or a RuntimeError raised
    from inside torch.distributed (gloo's errors are plain RuntimeErrors thrown in its collective calls).
    Whether a peer is gone is the other half of the verdict (`Group.watch`)."""
    if isinstance(exc, dist.DistError):
        return True
    return isinstance(exc, RuntimeError) and raised_in_distributed(exc)


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
    heartbeat: Heartbeat | None = None
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
            found = hb.evidence(self.stale_after, f"{self.addr}:{self.port}")
            if found is not None:
                return found
            if time.monotonic() >= deadline:
                peers, _ = hb.snapshot()
                phases = ", ".join(f"rank {r}: {p['phase']}" for r, p in sorted(peers.items()))
                return [], f"every rank still has a heartbeat (phases: {phases})"
            time.sleep(min(hb.interval, 0.1))

    def peer_gone(self) -> bool:
        """Does the heartbeat show, right now, that another rank is gone (failed, stale, found dead, or rank
        0's store lost)?"""
        found = self.heartbeat.evidence(self.stale_after, f"{self.addr}:{self.port}") if self.heartbeat else None
        return found is not None and bool(set(found[0]) - {self.rank})

    def post_failure(self, exc: BaseException) -> None:
        """Tell the others that this rank failed by itself, and why."""
        msg = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]
        if self.heartbeat:
            self.heartbeat.failed = msg
            self._publish()

    def _publish(self) -> None:
        """Write this rank's beat now, from the calling thread (a failure or a verdict must not wait)."""
        try:
            self.store.set_timeout(timedelta(seconds=2))  # rank 0 may be gone: do not block on it
            self.store.set(beat_key(self.rank), self.heartbeat.beat_value())
        except (RuntimeError, OSError) as e:  # the store's errors are DistErrors (RuntimeError)
            # safe to go on: the heartbeat thread writes the same beat on its next round, and if rank 0's store
            # is gone the peers learn of this rank's end from its silence instead
            log.warning("rank %d could not publish its beat now (%s)", self.rank, first_line(e))

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
            if not is_comm_error(exc) and not self.peer_gone():  # this rank's own failure
                self.post_failure(exc)
                self._break(f"rank {self.rank} failed: {exc}")
                raise
            ranks, why = self.diagnose()
            if self.heartbeat:
                self.heartbeat.blames = ranks
                self._publish()
            self._break(why)
            first = first_line(exc)
            raise RankFailure(ranks, f"rank {self.rank}: {what} failed: {why} [{first}]") from exc

    def _break(self, reason: str) -> None:
        """Give up the process groups at once: peers blocked in a collective with us then fail right away
        (gloo reports the closed connections) instead of waiting for `op_timeout`. Heartbeats go on."""
        self.broken = reason
        self._release_groups()

    def _release_groups(self) -> None:
        subs = [sub for sub in (self.sp, self.cfg, self.ulysses, self.ring) if sub is not None]
        if self._owns_pg and dist.is_initialized() and self.backend == "nccl":
            _abort_nccl(self.rank, [sub.pg for sub in subs])  # peers stuck in a NCCL kernel need an abort
        for sub in subs:
            sub.pg = None  # the layouts share these SubGroups: no reference may keep a group alive
        if self._owns_pg and dist.is_initialized():
            try:
                dist.destroy_process_group()
            except (RuntimeError, ValueError) as e:  # already torn down (an abort, a failed backend)
                # safe to go on: this rank is leaving the group, and nothing uses its process groups again
                log.warning("rank %d: destroying the process group failed (%s)", self.rank, e)
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


def _abort_nccl(rank: int, pgs: list) -> None:
    """`ProcessGroup.abort()` (torch >= 2.7) on every sub-group, newest first, then the world (the order of
    torch's own group abort): pending NCCL work ends now instead of at `op_timeout`."""
    seen = set()
    for pg in [*reversed(pgs), dist.group.WORLD]:
        if pg is None or id(pg) in seen:
            continue
        seen.add(id(pg))
        try:
            pg.abort()
        except RuntimeError as e:  # safe to go on: destroy_process_group frees the groups either way
            log.warning("rank %d: aborting a NCCL process group failed (%s)", rank, e)


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
            raise GroupError(f"rank {rank}: {who} ({first_line(e)})") from e
    prefixed = dist.PrefixStore(KEY_PREFIX.rstrip("/"), store)  # the torch group's own keys
    _join_barrier(store, rank, world_size, addr, port, t0 + join_timeout)

    hb = Heartbeat(store.clone(), rank, world_size, heartbeat_interval)
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
    store.set(beat_key(rank), json.dumps({"n": 0, "phase": "joining", "failed": None, "blames": []}))
    store.set(key.format(rank), str(os.getpid()))
    while True:
        try:
            missing = [r for r in range(world_size) if not store.check([key.format(r)])]
        except Exception as e:
            raise GroupError(f"rank {rank}: lost rank 0's store at {addr}:{port} while waiting for the others to "
                             f"join: rank 0 died ({first_line(e)})") from e
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
