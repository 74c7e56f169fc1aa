"""Frames <-> mp4 through imageio-ffmpeg (its bundled ffmpeg binary: nothing to install system-wide)."""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import torch

from .files import atomic_path

DEFAULT_FPS = 16  # Wan2.1's output rate


def to_uint8(video: torch.Tensor | np.ndarray) -> np.ndarray:
    """[3, T, H, W] float in [-1, 1] (the VAE's output) or [T, H, W, 3] uint8 -> [T, H, W, 3] uint8."""
    if isinstance(video, np.ndarray):
        if video.dtype != np.uint8 or video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"numpy frames must be uint8 [T, H, W, 3]; got {video.dtype} {video.shape}")
        return video
    if video.dim() != 4 or video.shape[0] != 3:
        raise ValueError(f"video tensor must be [3, T, H, W] in [-1, 1]; got {tuple(video.shape)}")
    x = ((video.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(1, 2, 3, 0).contiguous().cpu().numpy()


class Mp4Writer:
    """H.264 (yuv420p) mp4 fed chunk by chunk: frames go to ffmpeg as they are decoded, so no whole-video frame
    list is ever built (a 480p 81-frame video is 388 MB in fp32). Atomic like every file we write: readers see
    nothing until `close`; an error (or `abort`) leaves no file.

        with Mp4Writer(path, fps) as w:
            for chunk in decoded_chunks: w.write(chunk)   # [3, t, H, W] in [-1, 1] or uint8 [t, H, W, 3]
    """

    def __init__(self, path: str | Path, fps: int = DEFAULT_FPS, quality: float = 8):
        self.path, self.fps, self.quality = Path(path), fps, quality
        self.frames, self.size = 0, None  # frames written; (H, W) of the first chunk
        self._atomic = self._writer = None

    def write(self, video: torch.Tensor | np.ndarray) -> None:
        frames = to_uint8(video)
        t, h, w, _ = frames.shape
        if self._writer is None:
            if h % 2 or w % 2:
                raise ValueError(f"mp4 (yuv420p) needs even height and width; got {h}x{w}")
            self._atomic = atomic_path(self.path)
            tmp = self._atomic.__enter__()
            self._writer = imageio_ffmpeg.write_frames(str(tmp), (w, h), fps=self.fps, codec="libx264",
                                                       pix_fmt_out="yuv420p", quality=self.quality,
                                                       macro_block_size=1, ffmpeg_log_level="error",
                                                       output_params=["-f", "mp4"])
            self._writer.send(None)
            self.size = (h, w)
        elif (h, w) != self.size:
            raise ValueError(f"mp4 chunk is {h}x{w}; the video's first chunk was {self.size[0]}x{self.size[1]}")
        for frame in frames:
            self._writer.send(np.ascontiguousarray(frame))
        self.frames += t

    def close(self) -> Path:
        """Finish the file (fsync, rename into place); returns its path."""
        if self._writer is None:
            raise ValueError("no frames to write")
        self._writer.close()
        self._writer = None
        self._atomic.__exit__(None, None, None)
        return self.path

    def abort(self) -> None:
        """Drop what was written (no file is left)."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            with contextlib.suppress(_Aborted):  # atomic_path removes the .part and re-raises what it was given
                self._atomic.__exit__(_Aborted, _Aborted(), None)

    def __enter__(self) -> Mp4Writer:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


class _Aborted(Exception):
    """Thrown into atomic_path by Mp4Writer.abort so that it removes its part file."""


def encode_mp4(chunks: Iterable, fps: int = DEFAULT_FPS,
               timed: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
               ) -> tuple[bytes | None, tuple[int, ...]]:
    """(mp4 bytes, (frames, height, width)) of chunks fed to an `Mp4Writer` as they come (None chunks skipped;
    none at all: (None, ())). timed() wraps the encoder's own work, not the time spent waiting for chunks."""
    with tempfile.TemporaryDirectory(prefix="wanserve-") as tmp:
        writer = Mp4Writer(Path(tmp) / "video.mp4", fps)
        try:
            for chunk in chunks:
                if chunk is not None:
                    with timed():
                        writer.write(chunk)
        except BaseException:
            writer.abort()
            raise
        if not writer.frames:
            writer.abort()  # empty chunks may have opened it
            return None, ()
        with timed():
            return writer.close().read_bytes(), (writer.frames, *writer.size)


def write_mp4(path: str | Path, video: torch.Tensor | np.ndarray, fps: int = DEFAULT_FPS, quality: float = 8) -> Path:
    """Write frames as H.264 (yuv420p) mp4; height and width must be even (our sizes are multiples of 16)."""
    frames = to_uint8(video)
    if frames.shape[0] == 0:
        raise ValueError("no frames to write")
    with Mp4Writer(path, fps, quality) as w:
        w.write(frames)
    return Path(path)


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode an mp4 to ([T, H, W, 3] uint8, fps)."""
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(gen)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in gen]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8), float(meta["fps"])
