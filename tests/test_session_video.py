"""A session's video on disk, without Ray: one mp4 segment per fragment (a retried fragment overwrites its own),
the whole video joined by stream copy (exactly the segments' frames, nothing left in the join folder), 409 /
410 from the router's session service, and every file of a session gone with its state."""
from __future__ import annotations

import asyncio
import os
import time
from types import SimpleNamespace

import numpy as np
import pytest

from deployments.api.errors import ApiError
from deployments.router.sessions import SessionService
from deployments.states import SessionStatus
from deployments.storage.segments import concat_mp4
from deployments.storage.sessions import SessionStore, new_session_id
from model.video import read_mp4, write_mp4

H, W = 32, 48
LENGTHS = (5, 8, 8)  # the first fragment of a CausVid video is 1 frame shorter per block than the others


def moving(n: int, start: int) -> np.ndarray:
    """Frames that move (so the encoder makes P/B frames, as for real video), different per fragment."""
    t = np.arange(start, start + n)[:, None, None]
    y, x = np.arange(H)[None, :, None], np.arange(W)[None, None, :]
    z = np.zeros((n, H, W), int)
    return np.stack([(z + 3 * x + 5 * t) % 256, (z + 4 * y + 2 * t) % 256, (z + 2 * (x + y + t)) % 256],
                    -1).astype(np.uint8)


@pytest.fixture(scope="module")
def segments(tmp_path_factory) -> list[bytes]:
    """mp4 bytes of three fragments, as a replica sends them (model/video.py write_mp4)."""
    root, out, start = tmp_path_factory.mktemp("segments"), [], 0
    for i, n in enumerate(LENGTHS):
        out.append(write_mp4(root / f"f{i}.mp4", moving(n, start)).read_bytes())
        start += n
    return out


def decoded(data: bytes, tmp_path) -> np.ndarray:
    path = tmp_path / f"d{time.monotonic_ns()}.mp4"
    path.write_bytes(data)
    return read_mp4(path)[0]


def test_segments_join_to_exactly_their_frames(tmp_path, segments):
    state = tmp_path / "it's state"  # a quote in the path: the list file quotes every name
    store, sid = SessionStore(state), new_session_id()
    for i, data in enumerate(segments):
        store.save_segment(sid, i, data)
    assert sorted(p.name for p in (state / "sessions" / sid).iterdir()) == ["000000.mp4", "000001.mp4",
                                                                             "000002.mp4"]
    parts = [decoded(d, tmp_path) for d in segments]
    for count in (1, 2, 3):
        with store.open_video(sid, count) as f:
            assert not list(store.tmp_dir.iterdir())  # unlinked once open: nothing to clean up after sending
            whole = decoded(f.read(), tmp_path)
        assert whole.shape == (sum(LENGTHS[:count]), H, W, 3)
        assert np.array_equal(whole, np.concatenate(parts[:count]))  # stream copy: pixel-identical


def test_a_retried_fragment_overwrites_its_segment(tmp_path, segments):
    store, sid = SessionStore(tmp_path), new_session_id()
    store.save_segment(sid, 0, segments[0])
    store.save_segment(sid, 1, segments[2])
    store.save_segment(sid, 1, segments[1])  # the same fragment again (a retry): replaced, not appended
    assert len(list((tmp_path / "sessions" / sid).iterdir())) == 2
    with store.open_video(sid, 2) as f:
        assert len(decoded(f.read(), tmp_path)) == LENGTHS[0] + LENGTHS[1]


def test_segment_names_are_checked(tmp_path, segments):
    store = SessionStore(tmp_path)
    for sid, index in (("../../etc", 0), ("ses_a/b", 0), ("tmp", 0), (new_session_id(), -1),
                       (new_session_id(), 10 ** 6)):
        with pytest.raises(ValueError):
            store.save_segment(sid, index, segments[0])
    with pytest.raises(ValueError, match="no segments"):
        concat_mp4([], tmp_path / "x.mp4")


def test_missing_segments_are_named_and_a_broken_one_fails_the_join(tmp_path, segments):
    store, sid = SessionStore(tmp_path), new_session_id()
    for i in (0, 3, 4, 6):
        store.save_segment(sid, i, segments[0])
    with pytest.raises(FileNotFoundError, match=r"fragment\(s\) 1-2, 5 is gone"):
        store.open_video(sid, 7)
    store.save_segment(sid, 1, b"not an mp4")
    with pytest.raises(RuntimeError, match="ffmpeg could not join 2 segment"):
        store.open_video(sid, 2)
    assert not list(store.tmp_dir.iterdir())


def test_segments_go_with_the_state(tmp_path, segments):
    store, sid, other = SessionStore(tmp_path), new_session_id(), new_session_id()
    for s in (sid, other):
        store.create(s, "m", "a fox", 1, H, W, "r1")
        store.save_state(s, {"fragments": 1})
        store.save_segment(s, 0, segments[0])
    (store.dir / sid / "000001.mp4.part").write_bytes(b"half")  # a write a crash cut short
    store.drop_state(sid)
    assert not (store.dir / sid).exists() and store.load_state(sid) is None
    store.drop_state(sid)  # twice: nothing left to do
    store.update(other, status=SessionStatus.lost, last_used=time.time() - 100)
    assert store.purge(10) == 1 and sorted(p.name for p in store.dir.iterdir()) == []


def test_old_join_leftovers_are_purged(tmp_path):
    store = SessionStore(tmp_path)
    old, fresh = store.tmp_dir / "ses_a.x.mp4", store.tmp_dir / "ses_b.y.mp4"
    for p in (old, fresh):
        p.write_bytes(b"x")
    os.utime(old, (time.time() - 7200, time.time() - 7200))
    store.purge(10)
    assert not old.exists() and fresh.exists()


def test_session_service_serves_the_video_from_disk(tmp_path, segments):
    """after_fragment keeps each fragment's mp4; video() joins them with no replica (handles is empty)."""
    store = SessionStore(tmp_path)
    svc = SessionService(SimpleNamespace(), store, None, None, {}, {})
    sid = new_session_id()
    store.create(sid, "m", "a fox", 1, H, W, "r1")

    def fragment(i: int) -> dict:
        return {"type": "result", "video": segments[i], "info": {"fragments": i + 1}, "replica": "r1"}

    async def run():
        with pytest.raises(ApiError) as e:
            await svc.video(sid)
        assert e.value.status == 409 and e.value.code == "no_frames"
        job = SimpleNamespace(session_id=sid)
        for i in (0, 1, 1):  # fragment 1 twice: a duplicated result overwrites its segment
            await svc.after_fragment(job, fragment(i))
        assert store.get(sid)["fragments"] == 2
        with await svc.video(sid) as f:
            whole = decoded(f.read(), tmp_path)
        assert np.array_equal(whole, np.concatenate([decoded(d, tmp_path) for d in segments[:2]]))
        (store.dir / sid / "000001.mp4").unlink()
        with pytest.raises(ApiError) as e:
            await svc.video(sid)
        assert e.value.status == 410 and e.value.code == "session_video_gone" and "fragment(s) 1 " in e.value.message
        await svc.end(sid, SessionStatus.lost, "its cache and its stored state are gone")
        assert not (store.dir / sid).exists()
        with pytest.raises(ApiError) as e:
            await svc.video(sid)
        assert e.value.status == 410 and e.value.code == "session_lost"
        await svc.after_fragment(job, fragment(2))  # a result after the end keeps nothing
        assert not (store.dir / sid).exists()

    asyncio.run(run())
