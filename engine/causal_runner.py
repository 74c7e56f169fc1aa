"""One rank's share of CausVid generation and of the sessions a worker group keeps.

Why: a CausVid session is state — its K/V cache, its cross-attention cache, its streaming VAE decoder, its
generators — and under sequence parallelism that state is spread over the ranks of the group (each rank's
cache holds its shard, parallel/causal.py). So a session lives in the worker processes that own the model,
and every rank keeps its own `CausalSession` of the same video, with the same id, advanced by the same
calls in the same order. `CausalRunner` is that per-rank table and the calls on it; `parallel/workers.py`
forwards each call of `SPWorkerGroup` to every rank and returns rank 0's answer.

Who does what (as `ParallelRunner` for the bidirectional pipelines):
* rank 0 loads the whole pipeline; the others the DiT alone (`denoise_only`);
* prompts: rank 0 runs umT5 and broadcasts the context (`SharedTextEncoder`, installed as every rank's
  `text_encoder`); each rank computes its cross-attention K/V from it (cross-attention is per token: every
  rank needs every head);
* noise: not broadcast — every rank's session seeds the same generators and draws the same numbers;
* every rank runs every block forward (its token shard); rank 0 decodes each block as it finishes and
  alone keeps frames, so `fragment_blocks`, `session_video` and `session_state` are rank 0's;
* control: rank 0 alone decides to cancel (one broadcast flag per DiT step), and everything a request can
  get wrong (unknown session, bad prompt or size, a state that does not fit, RoPE's end) is checked on
  every rank from the same arguments before any collective, so all ranks raise the same benign error and
  the group stays usable.

Calls that change a session (open, next_fragment, restore, offload, reload, close) must reach every rank
and run one at a time (SPWorkerGroup's lock); reads (info, list, fragment_blocks, video, stats) are local
and answer while a fragment is being generated.

Tiers: "active" — caches on the compute device, ready; "idle" — caches moved to CPU memory
(`offload`), moved back by `reload` (or by the next `next_fragment`). On a CUDA device that frees GPU
memory; on a CPU-only machine the compute device *is* CPU memory, and offload still makes a real copy into
fresh buffers (the old ones are freed) and moves the session's bytes from the active to the idle
account, so a session manager's accounting behaves the same on both. Whether and when to offload or close
is the replica's session manager's decision; `info` gives it the numbers.
"""
from __future__ import annotations

import contextlib
import gc
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist

from model.attention import LOCAL
from model.causal_pipeline import BlockOutput, CausalSession, CausVidPipeline
from model.config import ConfigError, RunConfig
from model.pipeline import Cancelled, Generation, Progress, Request, RequestError, StageTimer

from parallel.attention import CommStats, SequenceParallelLayout
from parallel.causal import attach
from parallel.group import Group, GroupLayout
from .runner import RemoteError

IDLE_DEVICE = torch.device("cpu")


class SessionNotFound(KeyError):
    """No session with this id here (never opened, closed, or lost with its replica): the router's 404/410."""

    def __init__(self, session_id: str, message: str | None = None):
        self.session_id = session_id
        self.message = message or (f"session {session_id!r} not found: it was closed, evicted, or never opened on "
                                   "this worker group")
        super().__init__(self.message)

    def __str__(self) -> str:  # KeyError would print the repr of its argument
        return self.message

    def __reduce__(self):  # crosses Ray's process boundary intact
        return (type(self), (self.session_id, self.message))


class SessionExists(RequestError):
    """A session with this id is already open here (ids are the router's; reusing one is a caller bug)."""


class SessionsNotSupported(RequestError):
    """Sessions need a CausVid model (model_cls wan2.1_causvid); this group runs another pipeline."""


class InvalidSessionState(RequestError):
    """A state given to restore does not fit this model or config (or is not a session state at all)."""


def load_rank_causal_pipeline(model_path, cfg: RunConfig, rank: int, device: torch.device | str = "cpu",
                              dtype: torch.dtype | None = None, lora_roots=None) -> CausVidPipeline:
    """Rank 0: the whole CausVid pipeline; other ranks: the DiT only (they never encode or decode)."""
    return CausVidPipeline.from_pretrained(model_path, cfg, device=device, dtype=dtype, lora_roots=lora_roots,
                                           denoise_only=rank != 0)


class SharedTextEncoder:
    """The `text_encoder` of every rank under SP: rank 0 encodes, every rank receives the context.

    A collective: every rank calls `encode` at the same point (sessions make identical calls on every rank).
    Rank 0's failure is broadcast instead of the context, so every rank raises (RequestError as is, anything
    else as RemoteError) and none waits for a tensor that never comes.
    """

    def __init__(self, inner, group: Group):
        self.inner, self.group = inner, group
        if group.sp.rank == 0 and inner is None:
            raise ConfigError("rank 0 needs the text encoder (it encodes for the group)")

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, None]:
        group = self.group
        ctx, meta, error = None, None, None
        if group.sp.rank == 0:
            try:
                ctx, _ = self.inner.encode(prompts)
                ctx = ctx.to(group.device).contiguous()
                meta = {"shape": tuple(ctx.shape), "dtype": ctx.dtype}
            except Exception as e:
                error = e
        meta = share_from_rank0(group, meta, error)
        if ctx is None:
            ctx = torch.empty(meta["shape"], dtype=meta["dtype"], device=group.device)
        dist.broadcast(ctx, src=group.sp.ranks[0], group=group.sp.pg)
        return ctx, None


def share_from_rank0(group: Group, value, error: BaseException | None = None):
    """Rank 0's `value` — or its error — on every rank of the SP group (a pickled broadcast).

    An error is raised on every rank: a RequestError as a RequestError (rank 0 raises its own), anything
    else as RemoteError naming rank 0's exception, so every rank leaves the call alike."""
    box = [("error", (type(error).__name__, str(error), isinstance(error, RequestError))) if error is not None
           else ("ok", value)]
    if group.world_size > 1:
        dist.broadcast_object_list(box, src=group.sp.ranks[0], group=group.sp.pg,
                                   device=group.device if group.backend == "nccl" else None)
    kind, payload = box[0]
    if kind == "ok":
        return payload
    name, msg, is_request = payload
    if is_request:
        raise error if error is not None else RequestError(msg)
    raise RemoteError(f"rank 0: {name}: {msg}") from error


@dataclass
class SessionEntry:
    """A session as the runner keeps it: the session, its tier, and the bounds of its running/last call."""

    session: CausalSession
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    tier: str = "active"
    call_first_block: int = 0  # first block (session index) of the running / last next_fragment call
    call_blocks: int = 0  # blocks that call makes
    busy: bool = False

    def touch(self) -> None:
        self.last_used = time.time()


class CausalRunner:
    """CausVid on one rank of a worker group: the session table and the calls on it (module docstring)."""

    BENIGN = (Cancelled, RequestError, RemoteError, SessionNotFound)

    def __init__(self, pipe: CausVidPipeline, group: Group):
        cfg = pipe.cfg
        expected = GroupLayout.from_parallel(cfg.parallel)
        if expected != group.layout:
            raise ConfigError(f"the config's parallel layout {expected} does not match the group's {group.layout}")
        if group.cfg.size > 1:
            raise ConfigError("CausVid has no CFG branch to split: cfg_p_size must be 1")
        if group.rank == 0 and pipe.denoise_only:
            raise ConfigError("rank 0 needs the whole pipeline (it encodes and decodes); load it without denoise_only")
        self.pipe, self.group = pipe, group
        self.comm = CommStats()
        self.layout = SequenceParallelLayout(group, self.comm) if group.sp.size > 1 else LOCAL
        pipe.dit.layout = self.layout
        attach(pipe.causal, self.layout)
        if group.world_size > 1:
            pipe.text_encoder = SharedTextEncoder(pipe.text_encoder, group)
        self.sessions: dict[str, SessionEntry] = {}
        self._table = threading.Lock()  # the dict itself; calls that change sessions are serialised by the caller
        self._alive: weakref.WeakSet = weakref.WeakSet()  # every session ever made here, while it exists
        self.current: dict[str, Any] | None = None  # the running / last next_fragment: session, blocks done
        self.is_decoder = group.rank == 0

    # ---- plumbing --------------------------------------------------------------------------------
    def _entry(self, session_id: str) -> SessionEntry:
        with self._table:
            entry = self.sessions.get(session_id)
        if entry is None:
            raise SessionNotFound(session_id)
        return entry

    def _watch(self, what: str):
        return self.group.watch(what, benign=self.BENIGN)

    def _collective_cancel(self, cancel: Callable[[], bool] | None) -> Callable[[], bool]:
        """Rank 0 asks `cancel`; every rank gets the same answer (one broadcast per question)."""
        group = self.group

        def collective() -> bool:
            mine = bool(group.rank == 0 and cancel is not None and cancel())
            if group.world_size == 1:
                return mine
            flag = torch.tensor([int(mine)], dtype=torch.int32, device=group.device)
            dist.broadcast(flag, src=group.sp.ranks[0], group=group.sp.pg)
            return bool(flag.item())
        return collective

    def _progress(self, progress: Callable[[Progress], None] | None):
        group = self.group

        def on_step(p: Progress) -> None:
            group.phase = f"{p.stage} {p.step}/{p.total}"
            if progress and group.rank == 0:
                progress(p)
        return on_step

    def _track(self, session: CausalSession) -> CausalSession:
        self._alive.add(session)
        return session

    # ---- information (local; answers while a fragment runs) ----------------------------------------
    def info(self, session_id: str) -> dict[str, Any]:
        """This rank's view of a session (rank 0's has the decoded frames)."""
        entry = self._entry(session_id)
        s = entry.session
        return {"session_id": session_id, "fragments": s.fragments, "blocks": s.blocks,
                "partial_blocks": s.partial_blocks, "frames": s.frames, "latent_frames": s.latent_frames,
                "cache_bytes": s.cache_bytes(), "memory_bytes": s.memory_bytes(), "device": str(s.device),
                "tier": entry.tier, "last_used": entry.last_used, "created": entry.created, "busy": entry.busy,
                "seed": s.seed, "height": s.height, "width": s.width, "prompt": s.prompt}

    def list(self) -> list[dict[str, Any]]:
        with self._table:
            ids = list(self.sessions)
        out = []
        for sid in ids:
            with contextlib.suppress(SessionNotFound):  # closed meanwhile
                out.append(self.info(sid))
        return out

    def fragment_blocks(self, session_id: str, since: int = 0) -> list[np.ndarray]:
        """Decoded frames (uint8 [T, H, W, 3]) of each block the running / last next_fragment call has finished,
        from its block `since` on (rank 0; other ranks decode nothing and return [])."""
        entry = self._entry(session_id)
        if since < 0:
            raise RequestError(f"since = {since}: must be >= 0")
        first = entry.call_first_block
        return entry.session.decoded_blocks(first + since, first + entry.call_blocks)

    def video(self, session_id: str) -> np.ndarray:
        return self._entry(session_id).session.video()

    def state(self, session_id: str) -> dict[str, Any]:
        return self._entry(session_id).session.state_dict()

    def stats(self) -> dict[str, Any]:
        """What this rank holds for sessions: counts and cache bytes per tier, and session objects still alive
        after a garbage collection (0 once every session is closed: nothing leaked)."""
        gc.collect()
        with self._table:
            entries = list(self.sessions.values())
        active = sum(e.session.cache_bytes() for e in entries if e.tier == "active")
        idle = sum(e.session.cache_bytes() for e in entries if e.tier == "idle")
        return {"rank": self.group.rank, "sessions": len(entries), "active_bytes": active, "idle_bytes": idle,
                "tracked_bytes": active + idle, "live_session_objects": len(self._alive)}

    # ---- calls that change sessions (every rank, one at a time) ----------------------------------------
    def open(self, session_id: str, prompt: str, seed: int | None = None, height: int | None = None,
             width: int | None = None) -> dict[str, Any]:
        """A new session (no work yet: the prompt is encoded and the caches allocated by its first fragment)."""
        if not isinstance(session_id, str) or not session_id:
            raise RequestError("session id must be a non-empty string")
        with self._table:
            if session_id in self.sessions:
                raise SessionExists(f"session {session_id!r} is already open")
        session = self._track(self.pipe.start_session(prompt, seed, height, width))
        with self._table:
            self.sessions[session_id] = SessionEntry(session)
        return self.info(session_id)

    @torch.no_grad()
    def next_fragment(self, session_id: str, prompt: str | None = None, progress=None, cancel=None) -> dict | None:
        """The session's next fragment (or the rest of an interrupted one) on every rank; rank 0 returns
        {"frames": uint8 [T, H, W, 3], "fragment": index, "blocks": [first, end), "timings", "info"}.

        An idle session is reloaded first. Cancelled / RequestError pass through (the group stays usable);
        blocks finished before a cancel stay in the session."""
        entry = self._entry(session_id)
        s = entry.session
        if entry.tier == "idle":
            self.reload(session_id)
        entry.touch()
        entry.call_first_block = s.blocks
        entry.call_blocks = self.pipe.fragment_blocks(s.fragments) - s.partial_blocks
        self.current = {"session_id": session_id, "blocks": 0, "blocks_total": entry.call_blocks}
        current = self.current

        def on_block(_: BlockOutput) -> None:
            current["blocks"] += 1

        entry.busy = True
        self.comm.reset()
        try:
            with self._watch(f"session {session_id}: next fragment"):
                s.next_fragment(prompt, progress=self._progress(progress), cancel=self._collective_cancel(cancel),
                                on_block=on_block)
        finally:
            entry.busy = False
            entry.touch()
            self.group.phase = "idle"
        if not self.is_decoder:
            return None
        timings = dict(s.timings, communication=self.comm.seconds)
        return {"frames": np.concatenate(s.decoded_blocks(entry.call_first_block)),
                "fragment": s.fragments - 1, "blocks": [entry.call_first_block, s.blocks], "timings": timings,
                "info": self.info(session_id)}

    @torch.no_grad()
    def restore(self, session_id: str, state: dict[str, Any], replace: bool = False, progress=None) -> dict[str, Any]:
        """Rebuild a session from rank 0's `state()` (made by any group size: the state holds no shard):
        decodes the video again on rank 0 and replays each block's clean pass on every rank."""
        with self._table:
            if session_id in self.sessions and not replace:
                raise SessionExists(f"session {session_id!r} is already open; restore with replace=True to rebuild it")
        try:
            CausalSession.check_state(self.pipe, state)
        except ValueError as e:  # RequestError is a ValueError too: a bad size in the state reads the same
            raise InvalidSessionState(str(e)) from None
        self.current = None
        with self._watch(f"session {session_id}: restore"):
            session = self._track(CausalSession.restore(self.pipe, state, self._progress(progress)))
        self.group.phase = "idle"
        with self._table:
            self.sessions[session_id] = SessionEntry(session)
        return self.info(session_id)

    def offload(self, session_id: str) -> dict[str, Any]:
        """Idle tier: this rank's caches into fresh CPU buffers (module docstring: what that means on CPU)."""
        entry = self._entry(session_id)
        if entry.tier != "idle":
            entry.session.to(IDLE_DEVICE, copy=True)
            entry.tier = "idle"
        return self.info(session_id)

    def reload(self, session_id: str) -> dict[str, Any]:
        """Active tier: this rank's caches back onto the compute device (fresh buffers there)."""
        entry = self._entry(session_id)
        if entry.tier != "active":
            entry.session.to(self.pipe.device, copy=True)
            entry.tier = "active"
            entry.touch()
        return self.info(session_id)

    def close(self, session_id: str) -> bool:
        """Forget a session and free its caches on this rank; False if there was none."""
        with self._table:
            entry = self.sessions.pop(session_id, None)
        if entry is None:
            return False
        if self.current is not None and self.current.get("session_id") == session_id:
            self.current = None
        entry.session.release()  # the caches go now, not at the cyclic collector's next run
        return True

    # ---- one-call generation (SPWorkerGroup.run) -------------------------------------------------
    @torch.no_grad()
    def generate(self, request: Request | None = None, progress=None, cancel=None) -> Generation | None:
        """LightX2V's one call (`num_fragments` fragments of one throwaway session) on every rank. Rank 0 needs
        the request, checks it and shares (prompt, seed, size); it returns the Generation, the others None."""
        group, pipe = self.group, self.pipe
        timer = StageTimer(group.device)
        t0 = time.perf_counter()
        self.comm.reset()
        self.current = None  # progress() reports no session for this job
        with self._watch("causvid generation"):
            args, error = None, None
            if group.rank == 0:
                try:
                    args = self._check_request(request)
                except Exception as e:
                    error = e
            with timer("broadcast"):
                args = share_from_rank0(group, args, error)
            session = self._track(pipe.start_session(*args))
            n = pipe.cfg.num_fragments
            videos = []
            with timer("dit"):  # the fragments' own split (text / dit / vae) is in the session's timings
                for _ in range(n):
                    videos.append(session.next_fragment(progress=self._progress(progress),
                                                        cancel=self._collective_cancel(cancel)))
            group.phase = "idle"
        latents, nfe = session.latents(), session.nfe
        session.release()
        if group.rank != 0:
            return None
        timer.timings["communication"] = self.comm.seconds
        timer.timings["total"] = time.perf_counter() - t0
        return Generation(torch.cat(videos, dim=1), latents, session.seed, nfe, timer.timings, fps=pipe.cfg.fps)

    def _check_request(self, request: Request | None) -> tuple[str, int, int, int]:
        pipe = self.pipe
        if request is None:
            raise RequestError("rank 0 needs the request")
        if request.image is not None:
            raise RequestError("CausVid is text-to-video only: an image was given (use an i2v model)")
        n = pipe.cfg.num_fragments
        pipe.check_length(n)
        frames = 1 + 4 * (n * pipe.cfg.num_frames - 1)
        if request.frames is not None and request.frames != frames:
            raise RequestError(f"frames = {request.frames}: a CausVid video is num_fragments x num_frames latent "
                               f"frames ({n} x {pipe.cfg.num_frames} = {frames} frames); change num_fragments in the "
                               "config, or use a session to grow a video fragment by fragment")
        if not isinstance(request.prompt, str) or not request.prompt.strip():
            raise RequestError("prompt must not be empty")
        seed, height, width = pipe.check_request(request.seed, request.height, request.width)
        return request.prompt, seed, height, width
