"""What a replica does for one job: a T2V / I2V video, the next fragment of a CausVid session (its blocks
streamed as they are decoded), or LightX2V's one-call CausVid video. Each body emits events (`progress`,
`retry`, `block`, then `result` / `error` / `cancelled`) and runs its group calls through the GroupDriver."""
from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Callable

import numpy as np

from ..loops import LoopErrors
from .group import POLL_S, WORKER_FAILURES, GroupDriver, GroupFailed
from .sessions import SessionManager

log = logging.getLogger("ray.serve")

Emit = Callable[[dict], None]


def mp4_bytes(frames, fps: int) -> bytes:
    """Frames ([3, T, H, W] in [-1, 1] or uint8 [T, H, W, 3]) -> mp4 file contents."""
    from model.video import encode_mp4

    data, _ = encode_mp4([frames], fps)
    if data is None:
        raise ValueError("no frames to write")
    return data


class JobBodies:
    def __init__(self, driver: GroupDriver, sessions: SessionManager | None, spec, cfg, replica_id: str,
                 errors: LoopErrors):
        self.driver, self.sessions, self.spec, self.cfg = driver, sessions, spec, cfg
        self.replica_id, self.errors = replica_id, errors

    async def guarded(self, emit: Emit, call) -> Any | None:
        """Map a job's outcome to events: request errors, cancellation, group failures. None = ended."""
        from model.pipeline import Cancelled, RequestError

        try:
            return await self.driver.with_retry(call, emit)
        except RequestError as e:
            emit({"type": "error", "kind": "request", "message": str(e)})
        except Cancelled:
            emit({"type": "cancelled"})
        except GroupFailed as e:
            emit({"type": "error", "kind": "failure", "message": str(e)})
        except WORKER_FAILURES as e:  # the rebuild failed; check_health reports it
            emit({"type": "error", "kind": "failure", "message": f"{type(e).__name__}: {e}"})
        return None

    async def video(self, job: dict, emit: Emit, polled) -> None:
        from model.pipeline import Request

        t0 = time.perf_counter()
        loras = tuple((x["path"], float(x["strength"])) for x in job.get("loras") or ())
        timings: dict[str, float] = {}
        if loras != self.driver.loras:
            t = time.perf_counter()
            refused = await self.driver.use_loras(loras, emit)
            if refused:
                emit({"type": "error", "kind": "request", "message": refused})
                return
            timings["lora_reload"] = time.perf_counter() - t
        request = Request(job["prompt"], job.get("negative_prompt"), job.get("image"), job.get("seed"),
                          job.get("num_frames"), job.get("height"), job.get("width"), decoder=job.get("decoder"))
        # mp4=True: rank 0 feeds the encoder frame by frame as it decodes (no whole-video tensor anywhere)
        gen = await self.guarded(emit, lambda: polled(lambda: self.driver.group.run(request, self.spec.job_timeout_s,
                                                                                    mp4=True)))
        if gen is None:
            return
        video = gen.mp4
        timings.update({k: float(v) for k, v in gen.timings.items()})
        timings["replica_total"] = time.perf_counter() - t0
        frames, height, width = gen.size
        emit({"type": "result", "video": video, "frames": int(frames), "height": int(height), "width": int(width),
              "seed": int(gen.seed), "timings": timings})

    async def session_ready(self, job: dict, emit: Emit) -> bool:
        """Make sure the session is open here: open it, restore it from the router's state, or answer
        `missing` so the router resends with the state."""
        sid, mgr = job["session_id"], self.sessions
        if sid in mgr:
            await asyncio.to_thread(mgr.ready, sid)
            return True
        if job.get("state") is not None:
            emit({"type": "progress", "stage": "restore", "step": 0, "total": 1})
            await asyncio.to_thread(mgr.restore, sid, job["state"])
        elif job.get("open") is not None:
            o = job["open"]
            await asyncio.to_thread(mgr.open, sid, o["prompt"], o.get("seed"), o.get("height"), o.get("width"))
        else:
            emit({"type": "error", "kind": "missing", "message": f"session {sid} is not held by this replica"})
            return False
        await asyncio.to_thread(mgr.ready, sid)
        return True

    async def fragment(self, job: dict, emit: Emit, polled) -> None:
        sid, fps, t0 = job["session_id"], self.cfg.fps, time.perf_counter()

        async def one_fragment():
            if not await self.session_ready(job, emit):
                return None
            group = self.driver.group
            # Blocks are counted from the session's size before the call: fragment_blocks(since) is relative to
            # the running call, and until the call has started it would still describe the previous one.
            before = (await asyncio.to_thread(group.session_info, sid))["blocks"]
            blocks = BlockForwarder(group, sid, before, fps, emit, self.errors, job["job_id"])
            fut = asyncio.ensure_future(polled(lambda: group.next_fragment(sid, job.get("prompt"),
                                                                           self.spec.job_timeout_s)))
            while not fut.done():
                await asyncio.wait({fut}, timeout=POLL_S)
                await blocks.forward()
            out = fut.result()
            await blocks.forward()
            return out

        out = await self.guarded(emit, one_fragment)
        if out is None:
            return
        t = time.perf_counter()
        video = await asyncio.to_thread(mp4_bytes, out["frames"], fps)
        info = await asyncio.to_thread(self.sessions.used, sid)
        state = await asyncio.to_thread(self.driver.group.session_state, sid)
        timings = {k: float(v) for k, v in (out.get("timings") or {}).items()}
        timings["mp4"] = time.perf_counter() - t
        timings["replica_total"] = time.perf_counter() - t0
        frames = out["frames"]
        emit({"type": "result", "video": video, "frames": int(frames.shape[0]), "height": int(frames.shape[1]),
              "width": int(frames.shape[2]), "fragment": int(out.get("fragment", 0)), "timings": timings,
              "info": plain(info), "state": state, "replica": self.replica_id})

    async def causvid_video(self, job: dict, emit: Emit, polled) -> None:
        """LightX2V's one call: a session of `num_fragments` fragments, its whole video, then closed."""
        sid, n, t0 = f"job-{job['job_id']}", int(job.get("num_fragments") or 1), time.perf_counter()
        mgr, parts = self.sessions, {}  # fragment index -> its frames: a retry keeps the fragments it has
        try:
            async def run_all():
                if sid not in mgr:
                    await asyncio.to_thread(mgr.open, sid, job["prompt"], job.get("seed"), job.get("height"),
                                            job.get("width"))
                await asyncio.to_thread(mgr.ready, sid)
                done = (await asyncio.to_thread(self.driver.group.session_info, sid)).get("fragments", 0)
                prompts = job.get("prompts") or [None] * n  # a prompt_schedule: each fragment's prompt
                for i in range(done, n):
                    out = await polled(lambda p=prompts[i]: self.driver.group.next_fragment(sid, p,
                                                                                           self.spec.job_timeout_s))
                    parts[int(out["fragment"])] = out["frames"]
                # the fragments' own results, not the session's frames: sessions keep no decoded video
                return np.concatenate([parts[i] for i in range(n)])

            frames = await self.guarded(emit, run_all)
            if frames is None:
                return
            video = await asyncio.to_thread(mp4_bytes, frames, self.cfg.fps)
            emit({"type": "result", "video": video, "frames": int(frames.shape[0]), "height": int(frames.shape[1]),
                  "width": int(frames.shape[2]), "seed": job.get("seed"),
                  "timings": {"replica_total": time.perf_counter() - t0, "fragments": float(n)}})
        finally:
            try:
                await asyncio.to_thread(mgr.close, sid)
            except Exception as e:  # its caches go with the group at the latest; the next job is unaffected
                self.errors.record("session_close", sid, e)


class BlockForwarder:
    """Streams the blocks a running fragment has decoded, each once and in order. A block that fails to
    encode or read is logged with its job, session and index, counted, and tried again at the next poll."""

    def __init__(self, group, session_id: str, before: int, fps: int, emit: Emit, errors: LoopErrors, job_id: str):
        self.group, self.sid, self.before, self.fps, self.emit = group, session_id, before, fps, emit
        self.errors, self.job_id, self.sent = errors, job_id, 0

    async def forward(self) -> None:
        try:
            done = (await asyncio.to_thread(self.group.session_info, self.sid))["blocks"] - self.before
            if done <= self.sent:
                return
            pending = await asyncio.to_thread(self.group.fragment_blocks, self.sid, self.sent)
        except Exception as e:
            self.errors.record("block_forwarding", f"job {self.job_id} session {self.sid} block {self.sent}", e)
            return
        for frames in pending:
            try:
                data = await asyncio.to_thread(mp4_bytes, frames, self.fps)
            except Exception as e:  # next poll starts again from this block
                self.errors.record("block_forwarding", f"job {self.job_id} session {self.sid} block {self.sent}", e)
                return
            self.emit({"type": "block", "index": self.sent, "video": data, "frames": int(len(frames))})
            self.sent += 1


def plain(info: dict) -> dict:
    """Session info as JSON-friendly values."""
    out = {}
    for k, v in (info or {}).items():
        if isinstance(v, (str, int, float, bool)) or v is None:
            out[k] = v
        elif isinstance(v, dict):
            out[k] = plain(v)
        else:
            out[k] = str(v)
    return out
