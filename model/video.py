"""Frames <-> mp4 through imageio-ffmpeg (its bundled ffmpeg binary: nothing to install system-wide)."""
from __future__ import annotations

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


def write_mp4(path: str | Path, video: torch.Tensor | np.ndarray, fps: int = DEFAULT_FPS, quality: float = 8) -> Path:
    """Write frames as H.264 (yuv420p) mp4; height and width must be even (our sizes are multiples of 16)."""
    frames = to_uint8(video)
    t, h, w, _ = frames.shape
    if t == 0:
        raise ValueError("no frames to write")
    if h % 2 or w % 2:
        raise ValueError(f"mp4 (yuv420p) needs even height and width; got {h}x{w}")
    path = Path(path)
    with atomic_path(path) as tmp:  # readers never see a half-written file
        writer = imageio_ffmpeg.write_frames(str(tmp), (w, h), fps=fps, codec="libx264", pix_fmt_out="yuv420p",
                                             quality=quality, macro_block_size=1, ffmpeg_log_level="error",
                                             output_params=["-f", "mp4"])
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
        writer.close()
    return path


def read_mp4(path: str | Path) -> tuple[np.ndarray, float]:
    """Decode an mp4 to ([T, H, W, 3] uint8, fps)."""
    gen = imageio_ffmpeg.read_frames(str(path), pix_fmt="rgb24")
    meta = next(gen)
    w, h = meta["size"]
    frames = [np.frombuffer(buf, dtype=np.uint8).reshape(h, w, 3) for buf in gen]
    return np.stack(frames) if frames else np.zeros((0, h, w, 3), np.uint8), float(meta["fps"])
