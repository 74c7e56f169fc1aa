"""One video request and its layout on GPUs: the question every other module of the planner answers.

Also the token sharding rule every sequence-parallel term (bytes sent, activations per rank) shares.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from model.archs import VAE_SPACE_STRIDE, WAN21_I2V_14B, WAN21_T2V_1_3B, WAN21_T2V_14B, DiTArch, latent_frames

MODELS: dict[tuple[str, str], DiTArch] = {
    ("t2v", "1.3B"): WAN21_T2V_1_3B,
    ("t2v", "14B"): WAN21_T2V_14B,
    ("i2v", "14B"): WAN21_I2V_14B,
}
DTYPES = ("fp32", "bf16", "int8", "fp8")  # DiT weight storage; fp32 = upstream Wan's master weights
COMPUTE_BYTES = 2  # activations, q/k/v and collectives run in bf16 on GPU (model/loader.default_dtype)
DECODERS = ("full", "tiny")  # the Wan2.1 VAE's decoder, or TAEHV's tiny one for Wan latents (use_tae)


@dataclass(frozen=True)
class Workload:
    """One generation: model, size, sampler and parallel layout (`gpus` = ulysses · ring · cfg_parallel)."""

    model: str = "14B"  # "1.3B" | "14B"
    task: str = "t2v"  # "t2v" | "i2v"
    width: int = 832
    height: int = 480
    frames: int = 81
    steps: int = 50
    cfg: bool = True  # two DiT forwards per step (cond + uncond), run one after the other
    ulysses: int = 1
    ring: int = 1
    cfg_parallel: int = 1  # 2: cond and uncond on two SP groups, one latent all-gather per step
    dtype: str = "bf16"  # DiT weights; int8/fp8 weight-only (compute stays bf16) unless fp8_compute
    fsdp: bool = False  # DiT (and T5) weights sharded over the SP group, gathered per forward
    offload: bool = False  # upstream --offload_model: DiT and T5 copied host->GPU->host for every video
    t5_on_gpu: bool = True
    causvid_window: int | None = None  # latent frames in a CausVid KV cache (None: the whole video)
    causvid_block_frames: int = 3  # latent frames generated per CausVid forward
    fp8_compute: bool = False  # fp8 weights through scaled fp8 GEMMs (model/quant.py set_fp8_compute)
    vae_parallel: bool = True  # the VAE split by latent rows over the replica's GPUs (parallel.vae_parallel)
    decoder: str = "full"  # "full": the Wan2.1 VAE decoder; "tiny": TAEHV's (use_tae), on rank 0 alone

    def __post_init__(self):
        if (self.task, self.model) not in MODELS:
            raise ValueError(f"no Wan2.1 {self.task} {self.model} model; choose from {sorted(MODELS)}")
        if self.width % 16 or self.height % 16:
            raise ValueError(f"size {self.width}x{self.height}: width and height must be multiples of 16")
        if (self.frames - 1) % 4:
            raise ValueError(f"frames = {self.frames}: must be 4n+1 (the VAE compresses time by 4)")
        if self.arch.num_heads % self.ulysses:
            raise ValueError(f"ulysses = {self.ulysses} must divide num_heads = {self.arch.num_heads}")
        if self.cfg_parallel not in (1, 2) or (self.cfg_parallel == 2 and not self.cfg):
            raise ValueError("cfg_parallel is 1, or 2 with CFG on")
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype = {self.dtype!r}: choose from {DTYPES}")
        if self.fp8_compute and self.dtype != "fp8":
            raise ValueError(f"fp8_compute needs fp8 weights (dtype = 'fp8'), not dtype = {self.dtype!r}")
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder = {self.decoder!r}: choose from {DECODERS}")
        if min(self.ulysses, self.ring, self.steps, self.causvid_block_frames) < 1:
            raise ValueError("ulysses, ring, steps and causvid_block_frames must be >= 1")

    @property
    def arch(self) -> DiTArch:
        return MODELS[(self.task, self.model)]

    @property
    def grid(self) -> tuple[int, int, int]:
        """Latent (frames, height, width)."""
        return latent_frames(self.frames), self.height // VAE_SPACE_STRIDE, self.width // VAE_SPACE_STRIDE

    @property
    def tokens(self) -> int:
        return self.arch.num_tokens(*self.grid)

    @property
    def frame_tokens(self) -> int:
        return self.arch.num_tokens(1, *self.grid[1:])

    @property
    def sp(self) -> int:
        return self.ulysses * self.ring

    @property
    def gpus(self) -> int:
        return self.sp * self.cfg_parallel

    @property
    def vae_ranks(self) -> int:
        """Ranks the Wan VAE's decode and encode are split over (parallel/vae.py): with vae_parallel every GPU
        of the replica (the whole group, CFG-parallel included), unless the latent has fewer rows than that
        (then every rank runs it whole); else 1 (rank 0 alone, as upstream Wan2.1 decodes)."""
        return self.gpus if self.vae_parallel and self.grid[1] >= self.gpus else 1

    @property
    def forwards_per_step(self) -> int:
        """DiT forwards one SP group runs per sampler step."""
        return 2 if self.cfg and self.cfg_parallel == 1 else 1


def shard_tokens(tokens: int, sp: int) -> int:
    """Tokens per rank: the sequence is zero-padded to a multiple of sp and cut in equal contiguous shards."""
    return math.ceil(tokens / sp)
