"""The planner's answers for one workload on a named GPU: seconds per video, replicas, memory per GPU.

Here the GPU's own calibration is the default (capacity/calibration.py `CALIBRATED_ON`), so callers
name a GPU and get calibrated figures; the layers below take explicit efficiencies.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from capacity.calibration import calibration_for
from capacity.footprint import (
    RESERVED_BYTES,
    causvid_cache_bytes,
    clip_weight_bytes,
    cross_cache_bytes,
    dit_activation_bytes,
    dit_weight_bytes,
    stream_decoder_bytes,
    t5_weight_bytes,
    vae_weight_bytes,
)
from capacity.hardware import GPU, GPUS
from capacity.timing import Calibration, Projection, decode_split_of, project_with
from capacity.vae_split import gather_buffer_bytes, max_band, split_working_bytes
from capacity.workload import Workload


def project(w: Workload, gpu: GPU | str = "H100", cal: Calibration | None = None) -> Projection:
    """Seconds per video of workload w on gpu, with efficiencies from `cal` (default: `calibration_for(gpu)`)."""
    cal = cal or calibration_for(gpu if isinstance(gpu, str) else "H100")
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    return project_with(w, gpu, cal)


def replicas_for(target_videos_per_minute: float, projection: Projection) -> int:
    """Replicas (each `projection.gpus` GPUs) to sustain a target rate."""
    return max(1, math.ceil(target_videos_per_minute * projection.total_s / 60.0 - 1e-9))


@dataclass(frozen=True)
class Memory:
    """Bytes on the busiest GPU (rank 0: it also decodes) of one replica, as wanserve runs it."""

    dit_weights: int
    t5_weights: int
    clip_weights: int  # I2V only
    vae_weights: int
    dit_activations: int  # peak of one forward (`dit_activation_bytes`)
    vae_decode: int  # decode working memory (calibrated per output pixel); split: rank 0's band, or its gather
    capacity: float
    causvid_session: int  # one session on rank 0: its K/V cache share, cross-attention cache, VAE decoder state
    causvid_activations: int  # one CausVid block forward
    causvid_decode: int  # the streaming decoder's working memory: rank 0's band when split, else the whole frame

    @property
    def weights(self) -> int:
        return self.dit_weights + self.t5_weights + self.clip_weights + self.vae_weights

    @property
    def peak(self) -> int:
        """One video at a time: weights plus the larger of the DiT forward and the VAE decode."""
        return self.weights + max(self.dit_activations, self.vae_decode)

    @property
    def fits(self) -> bool:
        return self.peak + RESERVED_BYTES <= self.capacity

    @property
    def causvid_sessions(self) -> int:
        """KV caches that fit next to the weights and one forward's (or the streaming decode's) working memory."""
        free = self.capacity - RESERVED_BYTES - self.weights - max(self.causvid_activations, self.causvid_decode)
        return max(0, int(free // self.causvid_session))


def memory(w: Workload, gpu: GPU | str = "H100", cal: Calibration | None = None) -> Memory:
    cal = cal or calibration_for(gpu if isinstance(gpu, str) else "H100")
    gpu = GPUS[gpu] if isinstance(gpu, str) else gpu
    arch, shard = w.arch, (w.sp if w.fsdp else 1)
    window = w.causvid_window or w.grid[0]
    block_tokens = min(window, w.causvid_block_frames) * w.frame_tokens
    split, whole = decode_split_of(w), int(cal.vae_bytes_per_pixel * w.width * w.height)
    vae_decode, band_rows = whole, w.height  # band_rows: pixel rows of rank 0's band (a session's decoder state)
    if split.ranks > 1:
        band_rows = 8 * max_band(split.rows, split.ranks)  # rank 0: its band's working memory (halo rows included), or later its gather buffers
        vae_decode = max(split_working_bytes(cal.vae_bytes_per_pixel, w.width, split.rows, split.ranks),
                         gather_buffer_bytes(w.frames, w.height, w.width, split.rows, split.ranks))
    return Memory(
        dit_weights=dit_weight_bytes(arch, w.dtype) // shard,
        t5_weights=(t5_weight_bytes() // shard) if w.t5_on_gpu else 0,
        clip_weights=clip_weight_bytes() if w.task == "i2v" else 0,
        vae_weights=vae_weight_bytes(),
        dit_activations=dit_activation_bytes(arch, w.tokens, w.sp, w.fp8_compute),
        vae_decode=vae_decode,
        capacity=gpu.memory_bytes,
        # rank 0's share of a session: the K/V cache split over the SP group (Ulysses by heads, ring by
        # tokens); the prompt's cross-attention K/V on every rank; the streaming VAE decoder state, of rank 0's
        # band of rows when the VAE is split (each rank keeps its band's causal cache, parallel/vae.py)
        causvid_session=(causvid_cache_bytes(arch, w.frame_tokens, window) // w.sp + cross_cache_bytes(arch)
                         + stream_decoder_bytes(w.width, band_rows)),
        causvid_activations=dit_activation_bytes(arch, block_tokens, w.sp, w.fp8_compute),
        causvid_decode=(split_working_bytes(cal.vae_bytes_per_pixel, w.width, split.rows, split.ranks)
                        if split.ranks > 1 else whole),
    )
