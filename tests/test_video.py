"""mp4 written from known frames decodes back with the right count, size, rate and colours."""
import numpy as np
import pytest
import torch

from model.video import Mp4Writer, encode_mp4, read_mp4, to_uint8, write_mp4

COLOURS = [(-1.0, -1.0, -1.0), (1.0, -1.0, -1.0), (-1.0, 1.0, -1.0), (-1.0, -1.0, 1.0), (1.0, 1.0, 1.0)]


def test_round_trip_count_size_colour(tmp_path):
    t, h, w = 17, 48, 80
    video = torch.empty(3, t, h, w)
    for i in range(t):  # each frame one flat colour from [-1, 1] space
        video[:, i] = torch.tensor(COLOURS[i % len(COLOURS)]).view(3, 1, 1)
    path = write_mp4(tmp_path / "sub" / "v.mp4", video, fps=16)
    frames, fps = read_mp4(path)
    assert frames.shape == (t, h, w, 3) and fps == 16
    expected = to_uint8(video).astype(np.float32)
    err = np.abs(frames.astype(np.float32).mean(axis=(1, 2)) - expected.mean(axis=(1, 2)))
    assert err.max() < 12, err.max()  # H.264 + yuv420p: flat colours come back within a few levels
    assert not (tmp_path / "sub" / "v.mp4.part").exists()


def test_uint8_frames_and_gradient(tmp_path):
    x = np.linspace(0, 255, 64, dtype=np.float32)
    frame = np.stack([np.tile(x, (32, 1))] * 3, -1).astype(np.uint8)
    frames = np.stack([frame] * 5)
    out, _ = read_mp4(write_mp4(tmp_path / "g.mp4", frames, fps=8))
    assert out.shape == frames.shape
    assert np.abs(out.astype(int) - frames.astype(int)).mean() < 4


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match=r"\[3, T, H, W\]"):
        write_mp4(tmp_path / "a.mp4", torch.zeros(4, 2, 16, 16))
    with pytest.raises(ValueError, match="even height and width"):
        write_mp4(tmp_path / "a.mp4", np.zeros((2, 15, 16, 3), np.uint8))
    with pytest.raises(ValueError, match="no frames"):
        write_mp4(tmp_path / "a.mp4", np.zeros((0, 16, 16, 3), np.uint8))


# ---- streaming: chunks fed to the encoder as they come (model/video.py Mp4Writer, encode_mp4) ----
def test_chunked_writer_equals_one_write(tmp_path):
    """The encoder gets the same raw frames whether they come as one array or in chunks: same file."""
    g = torch.Generator().manual_seed(0)
    video = torch.rand(3, 9, 32, 48, generator=g) * 2 - 1
    whole = write_mp4(tmp_path / "whole.mp4", video, fps=16).read_bytes()
    data, size = encode_mp4([video[:, :1], None, video[:, 1:5], video[:, 5:]], fps=16)
    assert size == (9, 32, 48)
    assert data == whole
    path = tmp_path / "w.mp4"
    with Mp4Writer(path, fps=16) as w:
        for i in range(9):
            w.write(to_uint8(video[:, i:i + 1]))
    assert path.read_bytes() == whole and w.frames == 9


def test_writer_errors_leave_no_file(tmp_path):
    path = tmp_path / "x.mp4"
    with pytest.raises(ValueError, match="first chunk was 16x16"):
        with Mp4Writer(path) as w:
            w.write(np.zeros((2, 16, 16, 3), np.uint8))
            w.write(np.zeros((2, 16, 32, 3), np.uint8))
    assert not path.exists() and not (tmp_path / "x.mp4.part").exists()
    w = Mp4Writer(path)
    w.write(np.zeros((2, 16, 16, 3), np.uint8))
    w.abort()
    assert list(tmp_path.iterdir()) == []
    assert encode_mp4([None, np.zeros((0, 16, 16, 3), np.uint8)]) == (None, ())
    with pytest.raises(ValueError, match="no frames"):
        Mp4Writer(path).close()
