"""One rank's share of CausVid generation and of the sessions a worker group keeps.

A session is state (K/V and cross-attention caches, streaming VAE decoder, generators) spread over the
ranks under SP, so it lives in the worker processes: every rank keeps its own `CausalSession` of the same
video under the same id, advanced by the same calls in the same order. Everything a request can get wrong
is checked on every rank before any collective, so all ranks raise the same benign error. Tiers: active
(caches on the compute device) / idle (in fresh CPU buffers). ARCHITECTURE.md ("engine") has the rest.
"""
from __future__ import annotations

import contextlib
import gc
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from model.causal_pipeline import BlockOutput, CausalSession, CausVidPipeline, fragment_prompts
from model.config import ConfigError
from model.pipeline import Cancelled, Generation, Request, RequestError, StageTimer
from model.video import encode_mp4
from parallel.causal import attach
from parallel.group import Group

from .protocol import RemoteError, collective_cancel, rank0_progress, share_result, share_tensors
from .runner import attach_group, warm_up_group
from .tiers import Tier

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
    """Sessions need a model class with sessions (a CausVid one); this group runs another pipeline."""


class InvalidSessionState(RequestError):
    """A state given to restore does not fit this model or config (or is not a session state at all)."""


class SharedTextEncoder:
    """The `text_encoder` of every rank under SP: rank 0 encodes, every rank receives the context.

    A collective: every rank calls `encode` at the same point (sessions make identical calls on every rank).
    Rank 0's failure is broadcast instead of the context, so every rank raises (RequestError as is, anything
    else as RemoteError) and none waits for a tensor that never comes.
    """

    def __init__(self, inner, group: Group):
        self.inner, self.group = inner, group
        if group.rank == 0 and inner is None:
            raise ConfigError("rank 0 needs the text encoder (it encodes for the group)")

    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, None]:
        ctx, error = None, None
        if self.group.rank == 0:
            try:
                ctx, _ = self.inner.encode(prompts)
            except Exception as e:  # forwarded: every rank raises it (engine/protocol.py)
                error = e
        shared, _ = share_tensors(self.group, {"context": ctx} if ctx is not None else None, error=error)
        return shared["context"], None


@dataclass
class SessionEntry:
    """A session as the runner keeps it: the session, its tier, and the bounds of its running/last call."""

    session: CausalSession
    created: float = field(default_factory=time.time)
    last_used: float = field(default_factory=time.time)
    tier: Tier = Tier.active
    call_first_block: int = 0  # first block (session index) of the running / last next_fragment call
    call_blocks: int = 0  # blocks that call makes
    busy: bool = False

    def touch(self) -> None:
        self.last_used = time.time()


class CausalRunner:
    """CausVid on one rank of a worker group: the session table and the calls on it (module docstring)."""

    BENIGN = (Cancelled, RequestError, RemoteError, SessionNotFound)

    def __init__(self, pipe: CausVidPipeline, group: Group):
        if group.cfg.size > 1:
            raise ConfigError("CausVid has no CFG branch to split: cfg_p_size must be 1")
        self.pipe, self.group = pipe, group
        self.comm, self.layout = attach_group(pipe, group)
        attach(pipe.causal, self.layout)
        if group.world_size > 1:
            pipe.text_encoder = SharedTextEncoder(pipe.text_encoder, group)
        self.sessions: dict[str, SessionEntry] = {}
        self._table = threading.Lock()  # the dict itself; calls that change sessions are serialised by the caller
        self._alive: weakref.WeakSet = weakref.WeakSet()  # every session ever made here, while it exists
        self.current: dict[str, Any] | None = None  # the running / last next_fragment: session, blocks done
        self.is_decoder = group.rank == 0
        self.warmup = {"compiled": True, "sizes": {}} if pipe.cfg.compile else {"compiled": False}

    def warm_up(self) -> dict:
        """Compile the block forward at the configured sizes now (every rank, at start; one block covers a
        session: the cache attention stays eager, model/compile.py)."""
        self.warmup = warm_up_group(self.pipe, self.group)
        return self.warmup

    # ---- plumbing --------------------------------------------------------------------------------
    def _entry(self, session_id: str) -> SessionEntry:
        with self._table:
            entry = self.sessions.get(session_id)
        if entry is None:
            raise SessionNotFound(session_id)
        return entry

    def _watch(self, what: str):
        return self.group.watch(what, benign=self.BENIGN)

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

    def state(self, session_id: str) -> dict[str, Any]:
        return self._entry(session_id).session.state_dict()

    def stats(self) -> dict[str, Any]:
        """What this rank holds for sessions: counts and cache bytes per tier, and session objects still alive
        after a garbage collection (0 once every session is closed: nothing leaked)."""
        gc.collect()
        with self._table:
            entries = list(self.sessions.values())
        active = sum(e.session.cache_bytes() for e in entries if e.tier == Tier.active)
        idle = sum(e.session.cache_bytes() for e in entries if e.tier == Tier.idle)
        return {"rank": self.group.rank, "sessions": len(entries), "active_bytes": active, "idle_bytes": idle,
                "tracked_bytes": active + idle, "live_session_objects": len(self._alive)}

    # ---- calls that change sessions (every rank, one at a time) ----------------------------------------
    def open(self, session_id: str, prompt: str, seed: int | None = None, height: int | None = None,
             width: int | None = None, history: bool = False) -> dict[str, Any]:
        """A new session (no work yet: the prompt is encoded and the caches allocated by its first fragment).
        history=True keeps the whole video in the session (tests and scripts; a server's memory stays flat)."""
        if not isinstance(session_id, str) or not session_id:
            raise RequestError("session id must be a non-empty string")
        with self._table:
            if session_id in self.sessions:
                raise SessionExists(f"session {session_id!r} is already open")
        session = self._track(self.pipe.start_session(prompt, seed, height, width, history))
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
        if entry.tier == Tier.idle:
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
                s.next_fragment(prompt, progress=rank0_progress(self.group, progress),
                                cancel=collective_cancel(self.group, cancel), on_block=on_block)
        finally:
            entry.busy = False
            entry.touch()
            self.group.phase = "idle"
        if not self.is_decoder:
            return None
        timings = dict(s.timings, communication=self.comm.seconds)
        first = s.fragment_first_block  # the whole fragment, also when this call finished a cancelled one
        return {"frames": np.concatenate(s.decoded_blocks(first)),
                "fragment": s.fragments - 1, "blocks": [first, s.blocks], "timings": timings,
                "info": self.info(session_id)}

    @torch.no_grad()
    def restore(self, session_id: str, state: dict[str, Any], replace: bool = False, progress=None) -> dict[str, Any]:
        """Rebuild a session from rank 0's `state()` (made by any group size: the state holds no shard):
        resumes rank 0's streaming decoder from its last blocks and replays the clean passes the cache still
        depends on, on every rank (bounded by the window, not by the video's length)."""
        with self._table:
            if session_id in self.sessions and not replace:
                raise SessionExists(f"session {session_id!r} is already open; restore with replace=True to rebuild it")
        try:
            CausalSession.check_state(self.pipe, state)
        except ValueError as e:  # RequestError is a ValueError too: a bad size in the state reads the same
            raise InvalidSessionState(str(e)) from None
        self.current = None
        with self._watch(f"session {session_id}: restore"):
            session = self._track(CausalSession.restore(self.pipe, state, rank0_progress(self.group, progress)))
        self.group.phase = "idle"
        with self._table:
            self.sessions[session_id] = SessionEntry(session, call_first_block=session.blocks)
        return self.info(session_id)

    def offload(self, session_id: str) -> dict[str, Any]:
        """Idle tier: this rank's caches into fresh CPU buffers — on a CPU-only machine too (a real copy, the old
        buffers freed, the bytes moved from the active to the idle account)."""
        entry = self._entry(session_id)
        if entry.tier != Tier.idle:
            entry.session.to(IDLE_DEVICE, copy=True)
            entry.tier = Tier.idle
        return self.info(session_id)

    def reload(self, session_id: str) -> dict[str, Any]:
        """Active tier: this rank's caches back onto the compute device (fresh buffers there)."""
        entry = self._entry(session_id)
        if entry.tier != Tier.active:
            entry.session.to(self.pipe.device, copy=True)
            entry.tier = Tier.active
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
    def generate(self, request: Request | None = None, mp4: bool = False, progress=None,
                 cancel=None) -> Generation | None:
        """LightX2V's one call (`num_fragments` fragments of one throwaway session) on every rank. Rank 0 needs
        the request, checks it and shares (prompt, seed, size); it returns the Generation, the others None.
        mp4: the Generation carries the mp4 file, the fragments fed to the encoder one by one, not the frames."""
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
                except Exception as e:  # forwarded, not swallowed: every rank raises it (engine/protocol.py)
                    error = e
            with timer("broadcast"):
                args = share_result(group, args, error)
            *args, prompts = args
            session = self._track(pipe.start_session(*args, history=True))
            videos = []
            with timer("dit"):  # the fragments' own split (text / dit / vae) is in the session's timings
                for p in prompts:
                    videos.append(session.next_fragment(p, progress=rank0_progress(self.group, progress),
                                                        cancel=collective_cancel(self.group, cancel)))
            group.phase = "idle"
        latents, nfe = session.latents(), session.nfe
        session.release()
        if group.rank != 0:
            return None
        timer.timings["communication"] = self.comm.seconds
        encoded, size = encode_mp4(videos, pipe.cfg.fps, lambda: timer("mp4")) if mp4 else (None, None)
        timer.timings["total"] = time.perf_counter() - t0
        return Generation(None if mp4 else torch.cat(videos, dim=1), latents, session.seed, nfe, timer.timings,
                          fps=pipe.cfg.fps, mp4=encoded, size=size)

    def _check_request(self, request: Request | None) -> tuple[str, int, int, int, list[str]]:
        pipe = self.pipe
        if request is None:
            raise RequestError("rank 0 needs the request")
        if request.image is not None:
            raise RequestError("CausVid is text-to-video only: an image was given (use an i2v model)")
        schedule = request.prompt_schedule
        prompts = fragment_prompts(request.prompt, schedule, None if schedule else pipe.cfg.num_fragments,
                                   pipe.cfg.max_prompt_chars)
        n = len(prompts)
        pipe.check_length(n)
        frames = 1 + 4 * (n * pipe.cfg.num_frames - 1)
        if request.frames is not None and request.frames != frames:
            raise RequestError(f"frames = {request.frames}: a CausVid video is num_fragments x num_frames latent "
                               f"frames ({n} x {pipe.cfg.num_frames} = {frames} frames); change num_fragments in the "
                               "config, or use a session to grow a video fragment by fragment")
        seed, height, width = pipe.check_request(request.seed, request.height, request.width)
        return request.prompt, seed, height, width, prompts
