"""T2V / I2V generation: encode -> denoise -> decode, for the base sampler (UniPC + CFG) and the 4-step student.

The three stages are separate methods because sequence parallelism runs them on different ranks (rank 0
encodes and decodes, every rank denoises). Long work reports progress and checks for cancellation between
DiT steps; every stage is timed.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .archs import ComponentArchs, latent_frames
from .checkpoint import CheckpointError, ModelFolder
from .compile import compile_dit
from .config import ConfigError, RunConfig
from .dit import WanModel
from .encoders import ImageEncoder, TextEncoder
from .files import write_atomic
from .kernels import resolve_kernels
from .loader import default_dtype, load_pipeline_dit, read_dit_arch
from .schedulers import make_sampler
from .tae import TinyDecoder
from .vae import WanVAE, stream_chunks
from .validation import validated
from .video import encode_mp4, write_mp4

log = logging.getLogger(__name__)

# Wan2.1's default negative prompt (wan/configs/shared_config.py), used when CFG is on and none is given.
WAN_NEGATIVE_PROMPT = ("色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，JPEG压缩残留，"
                       "丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，手指融合，"
                       "静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走")


class RequestError(ValueError):
    """The request cannot be generated as asked (bad prompt, size, frames, missing image...)."""


DECODERS = ("full", "tiny")  # the VAE's decoder, or the tiny one (TAEHV, tae_path)


def check_prompt(prompt: object, limit: int, param: str = "prompt") -> str:
    """The prompt itself, or a RequestError: it must be a non-blank string of at most `limit` characters."""
    if not isinstance(prompt, str):
        raise RequestError(f"{param} must be a string, got {type(prompt).__name__}")
    if not prompt.strip():
        raise RequestError(f"{param} must not be empty")
    if len(prompt) > limit:
        raise RequestError(f"{param} is {len(prompt)} characters; at most {limit}")
    return prompt


class Cancelled(Exception):
    """The caller cancelled the generation; raised between DiT steps."""


@dataclass(frozen=True)
class Progress:
    stage: str  # "text" | "image" | "dit" | "vae"
    step: int
    total: int


ProgressFn = Callable[[Progress], None]
CancelFn = Callable[[], bool]


@dataclass
class Conditioning:
    """Everything the DiT needs besides the latents; small, so it is what rank 0 broadcasts."""

    context: torch.Tensor  # [1, text_len, text_dim]
    context_null: torch.Tensor | None  # negative prompt, when CFG is on
    clip_fea: torch.Tensor | None  # [1, 257, img_dim] (I2V)
    y: torch.Tensor | None  # [1, 4 + z_dim, F, H, W] mask + image latent (I2V)
    noise: torch.Tensor  # [1, z_dim, F, H, W] float32, from the seed
    seed: int
    decoder: str = "full"  # which decoder turns the latents into pixels: "full" (the VAE) or "tiny" (TAEHV)

    def tensors(self) -> dict[str, torch.Tensor | None]:
        return {"context": self.context, "context_null": self.context_null, "clip_fea": self.clip_fea, "y": self.y,
                "noise": self.noise}


@dataclass
class Generation:
    video: torch.Tensor | None  # [3, T, H, W] float in [-1, 1], on CPU; None when decoded straight into `mp4`
    latents: torch.Tensor  # [z_dim, F, H/8, W/8]
    seed: int
    nfe: int  # DiT forward calls
    timings: dict[str, float] = field(default_factory=dict)
    fps: int = 16
    mp4: bytes | None = None  # the video's mp4 file, when it was encoded as it decoded (`decode_mp4`)
    size: tuple[int, int, int] | None = None  # (frames, height, width) of the video
    decoder: str = "full"  # the decoder that made the pixels ("full" | "tiny")

    def __post_init__(self):
        if self.size is None and self.video is not None:
            self.size = tuple(int(n) for n in self.video.shape[1:])

    def save(self, path: str | Path) -> Path:
        if self.video is None:
            return write_atomic(path, self.mp4)
        return write_mp4(path, self.video, fps=self.fps)


@dataclass
class Request:
    prompt: str
    negative_prompt: str | None = None
    image: torch.Tensor | np.ndarray | None = None  # [3, H, W] in [-1, 1], or uint8 [H, W, 3]
    seed: int | None = None
    frames: int | None = None
    height: int | None = None
    width: int | None = None
    prompt_schedule: list | None = None  # CausVid one call: [(prompt, fragments), ...] (causal_pipeline.fragment_prompts)
    decoder: str | None = None  # "full" | "tiny" (needs tae_path); None: the config's (use_tae: tiny)


class StageTimer:
    """`with timer("dit"): ...` adds the block's wall time to timings["dit"] (synchronising CUDA first)."""

    def __init__(self, device: torch.device):
        self.device, self.timings = device, {}

    @contextlib.contextmanager
    def __call__(self, stage: str):
        t0 = time.perf_counter()
        try:
            yield
        finally:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.timings[stage] = self.timings.get(stage, 0.0) + time.perf_counter() - t0


def image_to_tensor(image) -> torch.Tensor:
    """PIL image, uint8 [H, W, 3] array or [3, H, W] tensor in [-1, 1] -> float32 [3, H, W] in [-1, 1]."""
    if hasattr(image, "convert"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
            raise RequestError(f"image array must be uint8 [H, W, 3]; got {image.dtype} {image.shape}")
        return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 127.5 - 1
    if isinstance(image, torch.Tensor) and image.dim() == 3 and image.shape[0] == 3:
        return image.float()
    raise RequestError(f"unsupported image: {type(image).__name__}")


def i2v_size(image_hw: tuple[int, int], height: int, width: int, resize_mode: str) -> tuple[int, int]:
    """Output size for I2V: the requested one ('fixed'), or Wan's area-preserving fit of the image's aspect
    ratio into height*width pixels ('adaptive', LightX2V's default), in multiples of 16."""
    if resize_mode == "fixed":
        return height, width
    aspect = image_hw[0] / image_hw[1]
    area = height * width
    lat_h = round(math.sqrt(area * aspect) // 8 // 2 * 2)
    lat_w = round(math.sqrt(area / aspect) // 8 // 2 * 2)
    return max(lat_h, 2) * 8, max(lat_w, 2) * 8


def center_crop_resize(img: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """[3, H0, W0] -> [3, h, w]: crop to the target aspect ratio, then bicubic resize."""
    _, h0, w0 = img.shape
    if h0 * w > w0 * h:  # too tall
        ch = round(w0 * h / w)
        top = (h0 - ch) // 2
        img = img[:, top:top + ch]
    elif h0 * w < w0 * h:
        cw = round(h0 * w / h)
        left = (w0 - cw) // 2
        img = img[:, :, left:left + cw]
    return F.interpolate(img[None], size=(h, w), mode="bicubic", align_corners=False)[0].clamp(-1, 1)


def i2v_video(first: torch.Tensor, frames: int) -> torch.Tensor:
    """What I2V encodes: the first frame [3, h, w], then frames - 1 black (zero) frames: [3, frames, h, w]."""
    return torch.cat([first[:, None], first.new_zeros(3, frames - 1, *first.shape[1:])], dim=1)


def i2v_mask(frames: int, lat_h: int, lat_w: int) -> torch.Tensor:
    """[4, F_lat, lat_h, lat_w]: 1 for the given first pixel frame, 0 for frames to generate (Wan's layout:
    channel k of latent frame t stands for pixel frame 4t+k-3)."""
    msk = torch.ones(1, frames, lat_h, lat_w)
    msk[:, 1:] = 0
    msk = torch.cat([msk[:, :1].repeat_interleave(4, dim=1), msk[:, 1:]], dim=1)
    return msk.view(1, msk.shape[1] // 4, 4, lat_h, lat_w).transpose(1, 2)[0]


class WanPipeline:
    """A loaded Wan2.1 model (DiT, text encoder, VAE, CLIP for I2V) and the sampler its config asks for."""

    def __init__(self, dit: WanModel, text_encoder: TextEncoder | None, vae: WanVAE | None, cfg: RunConfig,
                 image_encoder: ImageEncoder | None = None, device: str | torch.device = "cpu"):
        """text_encoder and vae None: a denoise-only pipeline (the ranks > 0 of a parallel group)."""
        self.dit, self.text_encoder, self.vae, self.image_encoder = dit, text_encoder, vae, image_encoder
        self.tiny: TinyDecoder | None = None  # the tiny decoder (tae_path), rank 0 only
        self.denoise_only = text_encoder is None and vae is None
        self.cfg = cfg
        self.device = torch.device(device)
        self.arch = dit.arch
        check_task(cfg, self.arch)
        if cfg.task == "i2v" and image_encoder is None and not self.denoise_only:
            raise ConfigError("task = 'i2v' needs the CLIP image encoder")

    # ---------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, model_path: str | Path, cfg: RunConfig, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, lora_roots: list[str | Path] | None = None,
                        denoise_only: bool = False) -> "WanPipeline":
        """denoise_only: load the DiT alone (the ranks > 0 of a parallel group never encode or decode)."""
        dit, text, vae, image = load_components(model_path, cfg, check_task, device, dtype, lora_roots, denoise_only)
        pipe = cls(dit, text, vae, cfg, image, device)
        pipe.tiny = None if denoise_only else load_tiny_decoder(model_path, cfg, vae, device)
        return pipe

    # ---------------------------------------------------------------------------------------------
    def check(self, req: Request) -> Request:
        """Fill defaults from the config and reject what cannot be generated, with a message that says why."""
        cfg = self.cfg
        check_prompt(req.prompt, cfg.max_prompt_chars)
        over = {k: v for k, v in dict(target_video_length=req.frames, target_height=req.height,
                                      target_width=req.width, seed=req.seed).items() if v is not None}
        try:
            merged = validated(RunConfig, {**cfg.model_dump(), **over}, "request")
            merged.check_arch(self.arch)
        except ConfigError as e:
            raise RequestError(str(e)) from None
        if cfg.task == "i2v" and req.image is None:
            raise RequestError("task i2v needs an image (the first frame)")
        if cfg.task == "t2v" and req.image is not None:
            raise RequestError("an image was given but this model is text-to-video; use an i2v model")
        return Request(req.prompt, req.negative_prompt, req.image, merged.seed, merged.target_video_length,
                       merged.target_height, merged.target_width, decoder=self.check_decoder(req.decoder))

    def check_decoder(self, decoder: str | None) -> str:
        """A request's decoder ("full" | "tiny"), or the config's default (use_tae: "tiny")."""
        if decoder is None:
            return "tiny" if self.cfg.use_tae else "full"
        if decoder not in DECODERS:
            raise RequestError(f"decoder = {decoder!r}: must be one of {list(DECODERS)}")
        if decoder == "tiny" and self.cfg.tae_path is None:
            raise RequestError("decoder = 'tiny': this model has no tiny decoder (its config sets no tae_path)")
        return decoder

    def i2v_first_frame(self, req: Request) -> torch.Tensor:
        """I2V: the request's image as the VAE encodes it, [3, h, w] in [-1, 1] at the size `i2v_size` picks."""
        img = image_to_tensor(req.image)
        h, w = i2v_size(tuple(img.shape[1:]), req.height, req.width, self.cfg.extras.get("resize_mode", "fixed"))
        return center_crop_resize(img, h, w)

    def encode(self, req: Request, timer: StageTimer | None = None, progress: ProgressFn | None = None,
               image_latent: torch.Tensor | None = None) -> Conditioning:
        """Text (+ negative prompt under CFG), and for I2V the CLIP tokens and the VAE latent of the first frame
        (`image_latent`: that latent, encoded already, by a split VAE)."""
        self._need_codecs("encode")
        timer = timer or StageTimer(self.device)
        cfg, arch = self.cfg, self.arch
        with timer("text"):
            prompts = [req.prompt]
            if cfg.enable_cfg:
                prompts.append(req.negative_prompt if req.negative_prompt is not None else
                               (cfg.sample_neg_prompt or WAN_NEGATIVE_PROMPT))
            ctx, _ = self.text_encoder.encode(prompts)
        if progress:
            progress(Progress("text", 1, 1))
        h, w, clip_fea, y = req.height, req.width, None, None
        if cfg.task == "i2v":
            with timer("image"):
                img = image_to_tensor(req.image)
                h, w = i2v_size(tuple(img.shape[1:]), req.height, req.width, cfg.extras.get("resize_mode", "fixed"))
                clip_fea = self.image_encoder.encode(img[None])
                lat = image_latent
                if lat is None:
                    lat = self.vae.encode(i2v_video(center_crop_resize(img, h, w), req.frames)[None].to(self.device))[0]
                y = torch.cat([i2v_mask(req.frames, h // 8, w // 8).to(lat), lat])[None]
            if progress:
                progress(Progress("image", 1, 1))
        gen = torch.Generator("cpu").manual_seed(req.seed)
        shape = (1, arch.out_dim, latent_frames(req.frames), h // 8, w // 8)
        noise = torch.randn(shape, generator=gen, dtype=torch.float32)
        return Conditioning(ctx[:1], ctx[1:] if cfg.enable_cfg else None, clip_fea, y, noise, req.seed,
                            req.decoder or "full")

    def _need_codecs(self, what: str) -> None:
        if self.denoise_only:
            raise RuntimeError(f"{what}: this pipeline was loaded with denoise_only=True (no encoders / VAE)")

    def guided_flow(self, dit: Callable, x: torch.Tensor, t: torch.Tensor, ctx: torch.Tensor,
                    ctx_null: torch.Tensor | None, extra: dict) -> tuple[torch.Tensor, int]:
        """The flow one sampler step uses and the DiT calls it took: with CFG, cond then uncond, combined."""
        flow = dit(x, t, ctx, **extra).float()
        if ctx_null is None:
            return flow, 1
        uncond = dit(x, t, ctx_null, **extra).float()
        return uncond + self.cfg.sample_guide_scale * (flow - uncond), 2

    @torch.no_grad()
    def denoise(self, cond: Conditioning, progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                dit: Callable | None = None, guidance: Callable | None = None) -> tuple[torch.Tensor, int]:
        """The sampler loop; returns (clean latents [1, z, F, h, w], number of DiT calls).

        guidance(dit, x, t, ctx, ctx_null, extra) -> (flow, calls) replaces `guided_flow` (CFG parallel
        runs the two branches on different ranks)."""
        cfg = self.cfg
        dit = dit or self.dit
        guidance = guidance or self.guided_flow
        sampler = make_sampler(cfg, cfg.task)
        gen = torch.Generator("cpu").manual_seed(cond.seed + 1)  # fresh-noise re-noising draws (Self-Forcing mode)
        dev = self.device
        x = cond.noise.to(dev)
        extra = {k: (v.to(dev) if v is not None else None) for k, v in (("clip_fea", cond.clip_fea), ("y", cond.y))}
        ctx = cond.context.to(dev)
        ctx_null = cond.context_null.to(dev) if cond.context_null is not None else None
        nfe, n = 0, len(sampler)
        for i in range(n):
            t = sampler.timesteps[i].reshape(1).to(dev)
            flow, calls = guidance(dit, x, t, ctx, ctx_null, extra)
            nfe += calls
            x = sampler.step(i, flow, x, generator=gen)
            if progress:
                progress(Progress("dit", i + 1, n))
            if cancel and i + 1 < n and cancel():
                raise Cancelled(f"cancelled after step {i + 1} of {n}")
        return x, nfe

    def decoder(self, name: str = "full"):
        """The module behind a decoder name: the VAE ("full") or the tiny decoder ("tiny"). A rank > 0 holds a VAE
        only where the group splits it (parallel/vae.py), and then decodes its band."""
        if name == "full" and self.vae is None:
            raise RuntimeError("decode: this pipeline has no VAE (denoise_only=True, and no split VAE)")
        if name == "tiny":
            if self.tiny is None:
                raise RequestError("decoder = 'tiny': this model has no tiny decoder (its config sets no tae_path)")
            return self.tiny
        return self.vae

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, decoder: str = "full") -> torch.Tensor:
        return self.decoder(decoder).decode(latents.to(self.device))[0].cpu()

    @torch.no_grad()
    def decode_mp4(self, latents: torch.Tensor, timer: StageTimer | None = None,
                   decoder: str = "full") -> tuple[bytes | None, tuple]:
        """(mp4 bytes, (frames, height, width)): each latent frame's pixels go to the encoder as they are decoded,
        so the decode + encode stage holds a few frames, not the video. Every rank of a split VAE calls it
        (parallel/vae.py); the ones that get no pixels return (None, ()). timer gets "mp4": the encoder's share."""
        timer = timer or StageTimer(self.device)
        chunks = stream_chunks(self.decoder(decoder), latents.to(self.device))  # one latent frame at a time
        chunks = (c[0] if c is not None else None for c in chunks)
        return encode_mp4(chunks, self.cfg.fps, lambda: timer("mp4"))

    # ---------------------------------------------------------------------------------------------
    def generate(self, prompt: str, negative_prompt: str | None = None, image=None, seed: int | None = None,
                 frames: int | None = None, height: int | None = None, width: int | None = None,
                 progress: ProgressFn | None = None, cancel: CancelFn | None = None,
                 decoder: str | None = None) -> Generation:
        req = self.check(Request(prompt, negative_prompt, image, seed, frames, height, width, decoder=decoder))
        timer = StageTimer(self.device)
        t0 = time.perf_counter()
        cond = self.encode(req, timer, progress)
        if cancel and cancel():
            raise Cancelled("cancelled before denoising")
        with timer("dit"):
            latents, nfe = self.denoise(cond, progress, cancel)
        with timer("vae"):
            video = self.decode(latents, req.decoder)
        if progress:
            progress(Progress("vae", 1, 1))
        timer.timings["total"] = time.perf_counter() - t0
        return Generation(video, latents[0].cpu(), req.seed, nfe, timer.timings, fps=self.cfg.fps, decoder=req.decoder)


# -------------------------------------------------------------------------------------------------
# Loading (the DiT's steps: model/loader.py)
# -------------------------------------------------------------------------------------------------
def check_task(cfg: RunConfig, arch) -> None:
    cfg.check_arch(arch)
    if cfg.task == "i2v" and not arch.is_i2v:
        raise ConfigError("task = 'i2v': this model folder holds a T2V DiT (config.json model_type t2v)")
    if cfg.task == "t2v" and arch.is_i2v:
        raise ConfigError("task = 't2v': this model folder holds an I2V DiT; use task i2v")
    if cfg.model_class.sessions:
        raise ConfigError(f"model_cls = {cfg.model_cls!r} generates block by block: use the CausVid pipeline")


def load_components(model_path: str | Path, cfg: RunConfig, check: Callable, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None, lora_roots: list[str | Path] | None = None,
                    denoise_only: bool = False):
    """(dit, text encoder, VAE, CLIP) of a model folder as cfg asks; check(cfg, arch) runs before any weight
    is read. denoise_only: the DiT alone (None for the rest); CLIP only for i2v."""
    device = torch.device(device)
    dtype = dtype or default_dtype(device)
    folder = ModelFolder.open(model_path)
    arch = read_dit_arch(folder)
    check(cfg, arch)  # before loading gigabytes
    archs = component_archs(folder)
    kernels = resolve_kernels(cfg.kernel_names, device, dtype)  # before any weight is read: fail fast
    dit = load_pipeline_dit(folder, cfg, dtype, device, lora_roots, arch).use_kernels(kernels)
    if cfg.compile:  # the blocks; warmed up by model.compile.warm_up once the layout is attached
        compile_dit(dit)
    if denoise_only:
        return dit, None, None, None
    text = TextEncoder.load(folder, archs.t5, archs.tokenizer_dir, text_len=dit.arch.text_len, dtype=dtype,
                            device=device, quant_scheme=cfg.t5_quant_scheme if cfg.t5_quantized else None)
    vae = load_vae(folder, device)
    image = (ImageEncoder.load(folder, archs.clip, dtype=dtype, device=device,
                               quant_scheme=cfg.clip_quant_scheme if cfg.clip_quantized else None)
             if cfg.task == "i2v" else None)
    return dit, text, vae, image


def load_tiny_decoder(model_path: str | Path, cfg: RunConfig, vae: WanVAE | None,
                      device: str | torch.device = "cpu") -> TinyDecoder | None:
    """The config's tiny decoder (tae_path; relative: inside the model folder), None without tae_path. It decodes
    the VAE's latents, so their channels must match."""
    if cfg.tae_path is None:
        return None
    path = Path(cfg.tae_path)
    if not path.is_absolute():
        root = ModelFolder.open(model_path).root
        path = (root / path).resolve()
        if not path.is_relative_to(root.resolve()):
            raise CheckpointError(f"tae_path = {cfg.tae_path!r}: a relative path must stay inside the model folder")
    if not path.is_file():
        raise CheckpointError(f"tae_path = {cfg.tae_path!r}: no such file ({path})")
    tiny = TinyDecoder.load(path, device=device)
    if vae is not None and tiny.z_dim != vae.z_dim:
        raise CheckpointError(f"tae_path = {cfg.tae_path!r}: the tiny decoder eats {tiny.z_dim} latent channels, this "
                              f"model's VAE makes {vae.z_dim}")
    return tiny


def load_vae(folder: ModelFolder | str | Path, device: str | torch.device = "cpu") -> WanVAE:
    """The model folder's VAE in fp32 (its architecture: vae/config.json, else wanserve.json, else the release)."""
    folder = folder if isinstance(folder, ModelFolder) else ModelFolder.open(folder)
    arch = None if folder.diffusers else component_archs(folder).vae
    return WanVAE.load(folder, arch, dtype=torch.float32, device=device)


def component_archs(folder: ModelFolder) -> ComponentArchs:
    """Architectures of T5/CLIP/VAE: the Wan2.1 release unless `<model>/wanserve.json` says otherwise."""
    p = folder.root / "wanserve.json"
    if not p.is_file():
        return ComponentArchs()
    try:
        data = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{p} is not valid JSON: {e}") from None
    return validated(ComponentArchs, data, str(p))
