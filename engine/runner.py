"""One rank's share of a bidirectional (T2V / I2V) generation: inputs once, outputs once.

Rank 0 checks and encodes (and draws the noise), shares the `Conditioning` over engine/protocol.py; every
rank runs the sampler on its token shard (and CFG branch); rank 0 decodes. A seed gives the same video
whatever the group's size. ARCHITECTURE.md ("engine") has the whole protocol.
"""
from __future__ import annotations

import time

import torch
import torch.distributed as dist

from model.attention import LOCAL, TokenLayout
from model.compile import clip_tokens, warm_up
from model.config import ConfigError
from model.kernels import KernelError
from model.pipeline import (Cancelled, Conditioning, Generation, Progress, Request, RequestError, StageTimer, WanPipeline,
                            i2v_video)
from parallel.attention import CommStats, SequenceParallelLayout, load_usp
from parallel.fsdp import shard_dit
from parallel.group import Group, GroupLayout
from parallel.vae import SplitVAE

from .protocol import RemoteError, collective_cancel, rank0_progress, share_result, share_tensors


def split_vae(cfg) -> bool:
    """Does this config split the VAE over its group (parallel.vae_parallel, a group of more than one rank)?"""
    p = cfg.parallel
    return p is not None and p.vae_parallel and GroupLayout.from_parallel(p).world_size > 1


def attach_group(pipe, group: Group) -> tuple[CommStats, TokenLayout]:
    """What both runners check and attach: the config's layout is the group's, rank 0 holds the whole pipeline
    (it encodes and decodes), the DiT shards its tokens over the SP group (one process: LOCAL), and under
    `split_vae` every rank's VAE becomes its row band of one `SplitVAE` over the whole group."""
    expected = GroupLayout.from_parallel(pipe.cfg.parallel)
    if expected != group.layout:
        raise ConfigError(f"the config's parallel layout {expected} does not match the group's {group.layout}")
    if group.rank == 0 and pipe.denoise_only:
        raise ConfigError("rank 0 needs the whole pipeline (it encodes and decodes); load it without denoise_only")
    stats = CommStats()
    kernel = pipe.dit.kernels.self_attn
    if group.ring.size > 1 and not kernel.has_lse:
        raise KernelError(f"self_attn_1_type = {kernel.name} returns no log-sum-exp, which ring attention merges "
                          f"by (ring degree {group.ring.size}); use flash_attn3, flash_attn2 or torch_sdpa, or Ulysses")
    backend = pipe.cfg.parallel.sp_backend if pipe.cfg.parallel is not None else "wanserve"
    layout = SequenceParallelLayout(group, stats, backend) if group.sp.size > 1 else LOCAL
    if backend != "wanserve":  # built now: a backend that cannot run fails the load, not the first request
        if torch.device(pipe.device).type != "cuda":
            raise KernelError(f"parallel.sp_backend = {backend}: runs on CUDA only; this rank is on {pipe.device}")
        layout.attn._usp = load_usp(backend, kernel.name, group.ulysses, group.ring)
    pipe.dit.layout = layout
    if split_vae(pipe.cfg):
        if pipe.vae is None:
            raise ConfigError(f"parallel.vae_parallel: rank {group.rank} has no VAE; load it with "
                              "engine.rank.load_rank_pipeline (it loads the VAE on every rank)")
        # pg None: the default (world) group of the moment. Holding the ProcessGroup object would keep a group
        # that a failure tears down alive (gloo would not close its sockets: the survivors would wait for
        # op_timeout), and a re-joined group is a new one
        base = pipe.vae.vae if isinstance(pipe.vae, SplitVAE) else pipe.vae
        pipe.vae = SplitVAE(base, None, group.rank, group.world_size)
    return stats, layout


def warm_up_group(pipe, group: Group) -> dict:
    """`compile`: every rank of the group warms its DiT up together, at the same sizes (the forwards hold the
    SP collectives), before the first request; the report is what /healthz shows. Rank 0 shares what only it
    knows (the CLIP token count of i2v). {"compiled": False} without compile."""
    if not pipe.cfg.compile:
        return {"compiled": False}
    with group.watch("warm-up"):
        group.phase = "warm-up"
        n_clip = share_result(group, clip_tokens(pipe) if group.rank == 0 else None)
        report = warm_up(pipe, n_clip)
        group.phase = "idle"
    return report


class ParallelRunner:
    """Attaches the SP layout (and optional FSDP sharding) to `pipe.dit` and runs generations on one rank."""

    BENIGN = (Cancelled, RequestError, RemoteError)

    def __init__(self, pipe: WanPipeline, group: Group):
        cfg = pipe.cfg
        if group.cfg.size > 1 and not cfg.enable_cfg:
            raise ConfigError("parallel.cfg_p_size = 2 runs the two CFG branches on different ranks, but this "
                              "config has enable_cfg = false; set cfg_p_size to 1")
        self.pipe, self.group = pipe, group
        self.stats, self.layout = attach_group(pipe, group)
        if cfg.parallel is not None and cfg.parallel.dit_fsdp:
            shard_dit(pipe.dit, group)
        self.guidance = self._cfg_parallel if group.cfg.size > 1 else None
        self.warmup = {"compiled": True, "sizes": {}} if cfg.compile else {"compiled": False}

    def warm_up(self) -> dict:
        """Compile at the configured sizes now (every rank, at start): the first request pays nothing."""
        self.warmup = warm_up_group(self.pipe, self.group)
        return self.warmup

    # ---- collectives of the job ----
    def share_conditioning(self, cond: Conditioning | None, error: BaseException | None = None) -> Conditioning:
        """Rank 0's conditioning (or its error, raised on every rank) on every rank: shapes first, then tensors."""
        rank0 = self.group.rank == 0 and cond is not None
        tensors, (seed, decoder) = share_tensors(self.group, cond.tensors() if rank0 else None,
                                                 (cond.seed, cond.decoder) if rank0 else None, error)
        return Conditioning(tensors["context"], tensors["context_null"], tensors["clip_fea"], tensors["y"],
                            tensors["noise"], seed, decoder)

    def _cfg_parallel(self, dit, x, t, ctx, ctx_null, extra):
        """This rank's CFG branch, the other branch's flow gathered, combined as the serial sampler does."""
        if ctx_null is None:
            raise ConfigError("CFG parallel needs the negative-prompt context (enable_cfg)")
        mine = ctx if self.group.cfg.rank == 0 else ctx_null
        flow = dit(x, t, mine, **extra).float().contiguous()
        parts = [torch.empty_like(flow) for _ in range(self.group.cfg.size)]
        self.stats.timed(dist.all_gather, parts, flow, group=self.group.cfg.pg,
                         sent=flow.numel() * flow.element_size() * (len(parts) - 1))
        cond, uncond = parts
        return uncond + self.pipe.cfg.sample_guide_scale * (cond - uncond), 2

    def _image_latent(self, request: Request | None, timer: StageTimer) -> tuple[Request | None, torch.Tensor]:
        """Split VAE, I2V: rank 0 checks the request and crops the first frame (or shares its error), every rank
        encodes its rows of the conditioning video, every rank gets the whole latent."""
        group, pipe = self.group, self.pipe
        req, first, error = None, None, None
        if group.rank == 0:
            try:
                req = pipe.check(request)
                first = pipe.i2v_first_frame(req)
            except Exception as e:  # forwarded, not swallowed: every rank raises it (engine/protocol.py)
                error = e
        shared, frames = share_tensors(group, {"first": first} if error is None and first is not None else None,
                                       req.frames if req is not None else None, error)
        with timer("image"):
            video = i2v_video(shared["first"].float().cpu(), frames)[None].to(pipe.device)
            return req, pipe.vae.encode(video)[0]

    # ---- the job ----
    def generate(self, request: Request | None = None, mp4: bool = False, progress=None,
                 cancel=None) -> Generation | None:
        """Run one generation on this rank. Rank 0 needs the request and returns the `Generation`; the other
        ranks may pass None and return None. progress/cancel are rank 0's. mp4: the Generation carries the
        mp4 file instead of the video tensor, encoded frame by frame as it decodes (`decode_mp4`)."""
        group, pipe = self.group, self.pipe
        timer = StageTimer(group.device)
        t0 = time.perf_counter()
        self.stats.reset()

        on_step = rank0_progress(group, progress)
        with group.watch("generation", benign=self.BENIGN):
            group.phase = "encode"
            cond, req, latent = None, None, None
            if isinstance(pipe.vae, SplitVAE) and pipe.cfg.task == "i2v":
                req, latent = self._image_latent(request, timer)
            if group.rank == 0:
                try:
                    req = req if req is not None else pipe.check(request)
                    cond = pipe.encode(req, timer, on_step, image_latent=latent)
                except Exception as e:  # forwarded, not swallowed: every rank raises it (engine/protocol.py)
                    self.share_conditioning(None, e)
            with timer("broadcast"):
                cond = self.share_conditioning(cond)
            with timer("dit"):
                latents, nfe = pipe.denoise(cond, on_step, collective_cancel(group, cancel), guidance=self.guidance)
            timer.timings["communication"] = self.stats.seconds
            split = isinstance(pipe.vae, SplitVAE) and cond.decoder == "full"  # the tiny decoder: rank 0 alone
            if split:  # every rank decodes its band, rank 0 gets the video
                group.phase = "decode"
                decoded = self._decode(latents, timer, mp4, "full")
            group.phase = "idle"
        if group.rank != 0:
            return None
        video, encoded, size = decoded if split else self._decode(latents, timer, mp4, cond.decoder)
        on_step(Progress("vae", 1, 1))
        group.phase = "idle"
        timer.timings["total"] = time.perf_counter() - t0
        return Generation(video, latents[0].cpu(), req.seed, nfe, timer.timings, fps=pipe.cfg.fps, mp4=encoded,
                          size=size, decoder=cond.decoder)

    def _decode(self, latents: torch.Tensor, timer: StageTimer, mp4: bool, decoder: str):
        """(video, mp4 bytes, size): the video tensor, or (mp4) its frames encoded as they decode."""
        pipe = self.pipe
        with timer("vae"):
            if mp4:
                encoded, size = pipe.decode_mp4(latents, timer, decoder)
                return None, encoded, size
            if decoder == "full" and isinstance(pipe.vae, SplitVAE):
                video = pipe.vae.decode(latents.to(pipe.device))
                return (video[0].cpu() if video is not None else None), None, None
            return pipe.decode(latents, decoder), None, None
