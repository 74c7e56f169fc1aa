"""A CausVid session's video on disk: one mp4 per completed fragment, joined into the whole video only when it
is asked for, by ffmpeg's concat demuxer with stream copy. No re-encode, so the joined file holds exactly the
segments' frames, and no process holds the video in memory however long the session runs (storage/sessions.py
places the files: `<state_dir>/sessions/<id>/<fragment:06d>.mp4`)."""
from __future__ import annotations

import re
import subprocess
from collections.abc import Sequence
from pathlib import Path

import imageio_ffmpeg

SEGMENT_RE = re.compile(r"^\d{6}\.mp4$")
MAX_SEGMENTS = 10 ** 6  # six digits: fragments of 1 s make 11 days of video
JOIN_TIMEOUT_S = 600.0  # a stream copy only moves bytes: this is a hung ffmpeg, not a long video


def segment_name(index: int) -> str:
    """`<index:06d>.mp4`: names sort in fragment order and are never a caller's text."""
    if not 0 <= int(index) < MAX_SEGMENTS:
        raise ValueError(f"not a fragment index: {index!r}")
    return f"{int(index):06d}.mp4"


def concat_mp4(segments: Sequence[Path], out: Path, timeout_s: float = JOIN_TIMEOUT_S) -> Path:
    """Join mp4 segments of one encoding (size, codec, fps) into `out` without re-encoding. The list file is
    ours, written beside `out` and removed; ffmpeg runs from an argument list, never a shell."""
    if not segments:
        raise ValueError("no segments to join")
    out = Path(out)
    listing = out.with_name(out.name + ".txt")
    listing.write_text("ffconcat version 1.0\n" + "".join(f"file {_quoted(p)}\n" for p in segments))
    # -xerror: a segment that cannot be read fails the join (without it ffmpeg ends the video there, exit 0)
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-loglevel", "error", "-xerror", "-y",
           "-f", "concat", "-safe", "0", "-i", str(listing), "-map", "0", "-c", "copy", "-f", "mp4", str(out)]
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout_s, check=False)
    except subprocess.TimeoutExpired:
        out.unlink(missing_ok=True)
        raise RuntimeError(f"ffmpeg took more than {timeout_s:.0f} s to join {len(segments)} segment(s)") from None
    finally:
        listing.unlink(missing_ok=True)
    if done.returncode != 0:
        out.unlink(missing_ok=True)
        tail = (done.stderr or "").strip().splitlines()[-3:]
        raise RuntimeError(f"ffmpeg could not join {len(segments)} segment(s) (exit {done.returncode}): "
                           + " | ".join(tail))
    return out


def _quoted(path: Path) -> str:
    """An absolute path in ffconcat's single quotes (a quote inside is closed, escaped, reopened)."""
    return "'" + str(Path(path).resolve()).replace("'", "'\\''") + "'"
