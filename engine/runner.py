"""One rank's share of a parallel generation: inputs once, outputs once.

Rank 0 validates the request and runs the text / image encoders and the noise draw (`WanPipeline.encode`),
then broadcasts the `Conditioning` — its shapes first, then its tensors — to every rank. Every rank runs the
sampler (`WanPipeline.denoise`) with its DiT's tokens sharded over its SP group, so all ranks hold the same
latents after every step. Rank 0 decodes. Since the noise is drawn once, from the seed, on rank 0, a seed
gives the same video whatever sp_size.

CFG parallel (cfg_p_size 2): the ranks of CFG index 0 run the conditional branch, those of index 1 the
unconditional one (each an SP group); one all-gather of the flow per step over the CFG group, and every rank
combines the two flows exactly as the serial sampler does and takes the same scheduler step.

Control crosses ranks too: rank 0 alone decides whether to cancel (one broadcast flag per step) and its
request errors are broadcast so every rank leaves the job in the same state and the group stays usable.
"""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from model.attention import LOCAL
from model.config import ConfigError, RunConfig
from model.pipeline import (
    Cancelled,
    Conditioning,
    Generation,
    Progress,
    Request,
    RequestError,
    StageTimer,
    WanPipeline,
)

from parallel.attention import CommStats, SequenceParallelLayout
from parallel.fsdp import shard_dit
from parallel.group import Group, GroupLayout


class RemoteError(RuntimeError):
    """Rank 0 failed before the denoising started (the message is rank 0's); the group is still usable."""


def load_rank_pipeline(model_path: str | Path, cfg: RunConfig, rank: int, device: torch.device | str = "cpu",
                       dtype: torch.dtype | None = None, lora_roots=None) -> WanPipeline:
    """Rank 0: the whole pipeline; other ranks: the DiT only (they never encode or decode)."""
    return WanPipeline.from_pretrained(model_path, cfg, device=device, dtype=dtype, lora_roots=lora_roots,
                                       denoise_only=rank != 0)


class ParallelRunner:
    """Attaches the SP layout (and optional FSDP sharding) to `pipe.dit` and runs generations on one rank."""

    BENIGN = (Cancelled, RequestError, RemoteError)

    def __init__(self, pipe: WanPipeline, group: Group):
        cfg = pipe.cfg
        expected = GroupLayout.from_parallel(cfg.parallel)
        if expected != group.layout:
            raise ConfigError(f"the config's parallel layout {expected} does not match the group's {group.layout}")
        if group.cfg.size > 1 and not cfg.enable_cfg:
            raise ConfigError("parallel.cfg_p_size = 2 runs the two CFG branches on different ranks, but this "
                              "config has enable_cfg = false; set cfg_p_size to 1")
        if group.rank == 0 and pipe.denoise_only:
            raise ConfigError("rank 0 needs the whole pipeline (it encodes and decodes); load it without denoise_only")
        self.pipe, self.group = pipe, group
        self.stats = CommStats()
        self.layout = SequenceParallelLayout(group, self.stats) if group.sp.size > 1 else LOCAL
        pipe.dit.layout = self.layout
        if cfg.parallel is not None and cfg.parallel.dit_fsdp:
            shard_dit(pipe.dit, group)
        self.guidance = self._cfg_parallel if group.cfg.size > 1 else None

    # ---- collectives of the job ----
    def _broadcast_object(self, obj):
        box = [obj]
        dist.broadcast_object_list(box, src=0, device=self.group.device if self.group.backend == "nccl" else None)
        return box[0]

    def share_conditioning(self, cond: Conditioning | None, error: BaseException | None = None) -> Conditioning:
        """Rank 0's conditioning (or its error) on every rank: metadata first, then each tensor."""
        meta = None
        if self.group.rank == 0:
            err = None if error is None else (type(error).__name__, str(error))
            tensors = {} if cond is None else {k: None if v is None else (tuple(v.shape), v.dtype)
                                               for k, v in cond.tensors().items()}
            meta = {"error": err, "seed": None if cond is None else cond.seed, "tensors": tensors}
        meta = self._broadcast_object(meta)
        if meta["error"] is not None:
            name, msg = meta["error"]
            if self.group.rank == 0:
                if isinstance(error, RequestError):
                    raise error
                raise RemoteError(f"rank 0: {name}: {msg}") from error
            raise (RequestError(msg) if name == "RequestError" else RemoteError(f"rank 0: {name}: {msg}"))
        dev = self.group.device
        out = {}
        for name, spec in meta["tensors"].items():
            if spec is None:
                out[name] = None
                continue
            shape, dtype = spec
            t = (getattr(cond, name).to(dev).contiguous() if self.group.rank == 0
                 else torch.empty(shape, dtype=dtype, device=dev))
            dist.broadcast(t, src=0)
            out[name] = t
        return Conditioning(out["context"], out["context_null"], out["clip_fea"], out["y"], out["noise"], meta["seed"])

    def _cancel_fn(self, cancel):
        """Rank 0 asks `cancel`; every rank gets the same answer."""
        def collective() -> bool:
            flag = torch.zeros(1, dtype=torch.int32, device=self.group.device)
            if self.group.rank == 0 and cancel is not None and cancel():
                flag.fill_(1)
            dist.broadcast(flag, src=0)
            return bool(flag.item())
        return collective

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

    # ---- the job ----
    def generate(self, request: Request | None = None, progress=None, cancel=None) -> Generation | None:
        """Run one generation on this rank. Rank 0 needs the request and returns the `Generation`; the other
        ranks may pass None and return None. progress/cancel are rank 0's."""
        group, pipe = self.group, self.pipe
        timer = StageTimer(group.device)
        t0 = time.perf_counter()
        self.stats.reset()

        def on_step(p: Progress):
            group.phase = f"{p.stage} {p.step}/{p.total}"
            if progress and group.rank == 0:
                progress(p)

        with group.watch("generation", benign=self.BENIGN):
            group.phase = "encode"
            cond, req = None, None
            if group.rank == 0:
                try:
                    req = pipe.check(request)
                    cond = pipe.encode(req, timer, on_step)
                except Exception as e:
                    self.share_conditioning(None, e)  # tell the others; raises e
            with timer("broadcast"):
                cond = self.share_conditioning(cond)
            with timer("dit"):
                latents, nfe = pipe.denoise(cond, on_step, self._cancel_fn(cancel), guidance=self.guidance)
            timer.timings["communication"] = self.stats.seconds
            group.phase = "idle"
        if group.rank != 0:
            return None
        with timer("vae"):
            video = pipe.decode(latents)
        on_step(Progress("vae", 1, 1))
        group.phase = "idle"
        timer.timings["total"] = time.perf_counter() - t0
        return Generation(video, latents[0].cpu(), req.seed, nfe, timer.timings, fps=pipe.cfg.fps)
