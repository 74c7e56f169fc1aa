"""What every training stage shares: the demo architectures, the frozen text encoder, flow-matching maths,
checkpoints (atomic, resumable), logging (tqdm + JSONL) and a small AdamW/EMA toolkit.

The demo model is the Wan2.1 architecture with small numbers (the same classes the pipelines load):

    DiT   WanModel  dim 192, 7 layers, 4 heads, ffn 768, patch (1, 1, 1), text_len 16   4.5 M params
    VAE   AutoencoderKLWan  base_dim 4, z_dim 8, 1 res block per stage                 0.17 M params
    T5    UMT5EncoderModel  dim 64, 2 layers, 4 heads, vocab 32 (grammar words)       random, frozen

Why patch (1, 1, 1): the 4-step student must be >= 15x faster end to end than 50-step CFG, which needs the
DiT call to cost at least ~1/3 of the VAE decode; with patch 2 a 64x64 clip is 80 tokens and the tiny DiT
would cost ~15 % of the decode. Patch 1 gives 320 tokens at the same VAE cost.
"""
from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from model.archs import ComponentArchs, DiTArch, T5Arch, VaeArch
from model.config import shift_sigma
from model.files import atomic_path
from model.tiny import TINY_CLIP, random_weights, t5_official_shapes, word_tokenizer

from .data import GRAMMAR_WORDS

if TYPE_CHECKING:  # transformers is imported only when a prompt must be encoded
    from model.encoders import TextEncoder

ROOT = Path(__file__).resolve().parent.parent
OUT = ROOT / "out" / "train"
DEMO_MODEL = ROOT / "demo_model"

Z_DIM = 8
DIT_ARCH = DiTArch(model_type="t2v", patch_size=(1, 1, 1), text_len=16, in_dim=Z_DIM, out_dim=Z_DIM, dim=192,
                   ffn_dim=768, freq_dim=256, text_dim=64, num_heads=4, num_layers=7)
T5_ARCH = T5Arch(vocab_size=32, dim=64, dim_attn=64, ffn_dim=128, num_heads=4, num_layers=2)
T5_SEED = 6  # the frozen random text encoder
VAE_BASE = {"base_dim": 4, "z_dim": Z_DIM, "num_res_blocks": 1}


def vae_arch(mean: Iterable[float] | None = None, std: Iterable[float] | None = None) -> VaeArch:
    return VaeArch(**VAE_BASE, latents_mean=tuple(mean or (0.0,) * Z_DIM), latents_std=tuple(std or (1.0,) * Z_DIM))


def component_archs(vae: VaeArch) -> ComponentArchs:
    return ComponentArchs(t5=T5_ARCH, clip=TINY_CLIP, vae=vae)


# The pipeline's CFG branch uses Wan's (Chinese) default negative prompt unless a request gives one; with the
# grammar tokenizer it is a run of <unk>. CFG dropout trains both it and the empty prompt as "unconditional".
def null_prompts() -> tuple[str, str]:
    from model.pipeline import WAN_NEGATIVE_PROMPT
    return "", WAN_NEGATIVE_PROMPT


# --------------------------------------------------------------------------------------------------
# Text encoder (frozen, random) and a prompt -> context cache
# --------------------------------------------------------------------------------------------------
def t5_state() -> dict[str, torch.Tensor]:
    """The frozen text encoder's weights, with Wan's official key names (what the model folder stores)."""
    return random_weights(t5_official_shapes(T5_ARCH), T5_SEED)


def build_text_encoder() -> TextEncoder:
    from transformers import UMT5EncoderModel  # imported only when a prompt must be encoded

    from model.checkpoint import load_into
    from model.encoders import TextEncoder, _build, convert_t5_official, t5_config
    model = _build(UMT5EncoderModel, t5_config(T5_ARCH), torch.float32, "cpu")
    load_into(model, convert_t5_official(t5_state()), "umT5 text encoder")
    return TextEncoder(model, word_tokenizer(GRAMMAR_WORDS), text_len=DIT_ARCH.text_len)


class TextCache:
    """Contexts [text_len, text_dim] of prompts, encoded once (the grammar has 360 prompts).

    With `root`, the contexts `python -m training text` saved in root/text_contexts.pt are used as they are
    (checked against this encoder's seed and architecture), so a stage can run where the text encoder's
    libraries are not installed (a borrowed GPU machine); the encoder is built only for a prompt not there.
    """

    def __init__(self, root: Path | None = None, encoder: TextEncoder | None = None):
        self._encoder = encoder
        self._cache: dict[str, torch.Tensor] = {}
        path = Path(root) / TEXT_CONTEXTS if root is not None else None
        if path is not None and path.is_file():
            ck = torch.load(path, weights_only=True)
            if ck.get("fingerprint") == text_fingerprint():
                self._cache.update(ck["contexts"])
            else:
                print(f"{path}: made by another text encoder; ignored", flush=True)

    @property
    def encoder(self) -> TextEncoder:
        if self._encoder is None:
            self._encoder = build_text_encoder()
        return self._encoder

    def __call__(self, prompts: list[str]) -> torch.Tensor:
        todo = [p for p in dict.fromkeys(prompts) if p not in self._cache]
        if todo:
            ctx, _ = self.encoder.encode(todo)
            self._cache.update(zip(todo, ctx))
        return torch.stack([self._cache[p] for p in prompts])

    def save(self, root: Path) -> Path:
        path = Path(root) / TEXT_CONTEXTS
        save_atomic({"fingerprint": text_fingerprint(), "contexts": dict(self._cache)}, path)
        return path


TEXT_CONTEXTS = "text_contexts.pt"


def text_fingerprint() -> str:
    return f"umT5 seed {T5_SEED} {T5_ARCH} text_len {DIT_ARCH.text_len} words {' '.join(GRAMMAR_WORDS)}"


def train_text(args) -> Path:
    """Stage `text`: encode every prompt of the grammar and the null prompts once (root/text_contexts.pt)."""
    from .data import all_prompts
    text = TextCache()
    text(all_prompts() + list(null_prompts()))
    path = text.save(Path(args.out))
    print(f"text: {len(text._cache)} contexts -> {path}", flush=True)
    return path


# --------------------------------------------------------------------------------------------------
# Flow matching (x_s = (1 - s) x0 + s eps, v = eps - x0, t = 1000 s)
# --------------------------------------------------------------------------------------------------
def add_noise(x0: torch.Tensor, eps: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    s = sigma.view(-1, *([1] * (x0.dim() - 1))).to(x0)
    return (1 - s) * x0 + s * eps


def x0_from_flow(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return x - sigma.view(-1, *([1] * (x.dim() - 1))).to(x) * v


def flow_from_x0(x: torch.Tensor, x0: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return (x - x0) / sigma.view(-1, *([1] * (x.dim() - 1))).to(x)


def sample_sigma(n: int, gen: torch.Generator, shift: float = 5.0, lo: float = 0.0, hi: float = 1.0) -> torch.Tensor:
    """u ~ U[lo, hi), sigma = shift(u) (Self-Forcing's DMD/critic sampling with [lo, hi] = [0.02, 0.98])."""
    u = lo + (hi - lo) * torch.rand(n, generator=gen, dtype=torch.float64)
    return shift_sigma(u, shift).float()


# --------------------------------------------------------------------------------------------------
# Runtime, logging, checkpoints
# --------------------------------------------------------------------------------------------------
def setup(threads: int = 2, seed: int = 0, device: str = "cpu") -> torch.device:
    """Threads, seeds and the device the stage trains on. Data, noise and RNGs stay on the CPU whatever the
    device (the same batches on every device); only the model and each batch's tensors move."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2**32)
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise SystemExit(f"--device {device}: torch sees no CUDA device here")
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return dev


def stage_device(args, cpu_only: str = "") -> str:
    """The stage's --device (cpu when the caller's args have none); cpu_only names a stage that refuses others."""
    device = getattr(args, "device", "cpu") or "cpu"
    if cpu_only and torch.device(device).type != "cpu":
        raise SystemExit(f"the {cpu_only} stage runs on the CPU only; run it without --device {device}")
    return device


def device_of(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device


def autocast(device: torch.device, enabled: bool = True):
    """bf16 autocast on the stage's device (CPU or CUDA), fp32 master weights."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


class Log:
    """JSONL log (one record per logged step, appended across resumes) + a tqdm bar with the latest losses."""

    def __init__(self, path: Path, total: int, start: int = 0, desc: str = "", quiet: bool = False):
        from tqdm import tqdm
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = self.path.open("a")
        self.t0 = time.time()
        self.bar = tqdm(total=total, initial=start, desc=desc, disable=quiet, mininterval=5, dynamic_ncols=True,
                        file=None)

    def step(self, step: int, **values: Any) -> None:
        rec = {"step": step, "time": round(time.time() - self.t0, 2),
               **{k: (round(float(v), 6) if isinstance(v, (float, int, torch.Tensor)) else v) for k, v in values.items()}}
        self.f.write(json.dumps(rec) + "\n")
        self.f.flush()
        self.bar.set_postfix({k: f"{v:.4g}" for k, v in rec.items() if k not in ("step", "time") and isinstance(v, float)},
                             refresh=False)

    def advance(self, n: int = 1) -> None:
        self.bar.update(n)

    def close(self) -> None:
        self.bar.close()
        self.f.close()


def save_atomic(obj: Any, path: Path) -> None:
    """torch.save through model/files.py: a crash mid-save leaves the previous checkpoint."""
    with atomic_path(path) as part:
        torch.save(obj, part)


def rng_state() -> dict:
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])


class EMA:
    """Exponential moving average of a module's parameters (decay warmed up as min(d, (1+n)/(10+n)))."""

    def __init__(self, module: torch.nn.Module, decay: float):
        self.decay = decay
        self.n = 0
        self.shadow = {k: v.detach().clone().float() for k, v in module.state_dict().items()}
        self.device = device_of(module)

    @torch.no_grad()
    def update(self, module: torch.nn.Module) -> None:
        self.n += 1
        d = min(self.decay, (1 + self.n) / (10 + self.n))
        for k, v in module.state_dict().items():
            self.shadow[k].mul_(d).add_(v.detach().float(), alpha=1 - d)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "n": self.n, "shadow": self.shadow}

    def load_state_dict(self, sd: dict) -> None:
        self.decay, self.n = sd["decay"], sd["n"]
        self.shadow = {k: v.to(self.device) for k, v in sd["shadow"].items()}


def lr_at(step: int, base: float, warmup: int, total: int, final_frac: float = 0.1) -> float:
    """Linear warm-up, then cosine decay to final_frac * base."""
    if step < warmup:
        return base * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return base * (final_frac + (1 - final_frac) * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


def new_dit(seed: int = 0):
    from model.dit import WanModel
    torch.manual_seed(seed)
    return WanModel(DIT_ARCH).init_weights()


def dit_from_state(sd: dict[str, torch.Tensor]):
    from model.dit import WanModel
    m = WanModel(DIT_ARCH)
    m.load_state_dict({k: v.float() for k, v in sd.items()})
    return m


def read_jsonl(path: Path) -> list[dict]:
    path = Path(path)
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def write_json(path: Path, obj: Any) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj, indent=1))


# --------------------------------------------------------------------------------------------------
# The supervised training loop (vae, teacher, ode-init, causal-ode) and its resumable checkpoint
# --------------------------------------------------------------------------------------------------
def save_checkpoint(path: Path, step: int, model: torch.nn.Module, opt: torch.optim.Optimizer,
                    gen: torch.Generator, ema: EMA | None = None) -> None:
    """Everything a resumed run needs: weights, optimizer, the data generator, the global RNGs and the step."""
    ck = {"model": model.state_dict(), "opt": opt.state_dict(), "gen": gen.get_state(), "rng": rng_state(),
          "step": step}
    if ema is not None:
        ck["ema"] = ema.state_dict()
    save_atomic(ck, path)


def load_checkpoint(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
                    ema: EMA | None = None) -> int:
    """Restore what `save_checkpoint` wrote (if the file exists); returns the step to continue from (0 if none).
    A resumed EMA keeps its average but takes the decay of the new run (`ema.decay` as constructed)."""
    path = Path(path)
    if not path.is_file():
        return 0
    # our own file: tensors, optimizer state and RNG states (map to the CPU: a CUDA run resumes anywhere; the
    # optimizer's state follows its parameters' device on load)
    ck = torch.load(path, weights_only=False, map_location="cpu")
    model.load_state_dict(ck["model"])
    opt.load_state_dict(ck["opt"])
    gen.set_state(ck["gen"])
    set_rng_state(ck["rng"])
    if ema is not None:
        decay = ema.decay
        ema.load_state_dict(ck["ema"])
        ema.decay = decay
    return int(ck["step"])


def fit(stage: str, out: Path, args, model: torch.nn.Module, opt: torch.optim.Optimizer, gen: torch.Generator,
        loss_fn, *, ema: EMA | None = None, lr_fn=None, clip: float = 1.0, eval_fn=None, eval_every: int = 0,
        eval_at_start: bool = False) -> int:
    """The resumable loop every supervised stage runs, up to `args.steps` optimizer steps.

    Per step: lr = lr_fn(step) (if given), (loss, parts) = loss_fn(step), backward, grad-norm clip, AdamW
    step, EMA update. Every `args.log_every` steps the mean loss/parts, grad norm and lr go to
    out/log.jsonl; every `args.ckpt_every` steps (and at the end) out/ckpt.pt is written; every `eval_every`
    steps (and at the end) eval_fn(step) -> dict is logged with an `eval_` prefix. With `args.max_minutes`
    the run also ends (checkpoint, log and eval as at the end) once that much wall time has passed: a
    time-boxed run on a borrowed GPU; rerunning the command with a larger --steps continues it.
    Returns the final step.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path = out / "ckpt.pt"
    step = load_checkpoint(ckpt_path, model, opt, gen, ema)
    if step:
        print(f"resumed {stage} at step {step}", flush=True)
    log = Log(out / "log.jsonl", args.steps, step, desc=stage, quiet=args.quiet)

    def run_eval(at: int, what: str) -> None:
        res = eval_fn(at)
        log.step(at, **{f"eval_{k}": v for k, v in res.items()})
        print(f"{stage} {what}: eval {res}", flush=True)

    if eval_fn is not None and eval_at_start and step == 0:
        run_eval(0, "start")
    acc: dict[str, list[float]] = {}
    minutes = float(getattr(args, "max_minutes", 0) or 0)
    deadline = time.time() + 60 * minutes if minutes > 0 else float("inf")
    while step < args.steps:
        model.train()
        if lr_fn is not None:
            set_lr(opt, lr_fn(step))
        loss, parts = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        gn = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if ema is not None:
            ema.update(model)
        step += 1
        log.advance()
        for k, v in {"loss": loss.item(), "grad_norm": gn.item(), **parts}.items():
            acc.setdefault(k, []).append(float(v))
        out_of_time = time.time() > deadline
        if out_of_time and step < args.steps:
            print(f"{stage}: --max-minutes reached at step {step}", flush=True)
        last = step == args.steps or out_of_time  # log, checkpoint and eval as at the end
        if step % args.log_every == 0 or last:
            log.step(step, lr=opt.param_groups[0]["lr"], **{k: sum(v) / len(v) for k, v in acc.items()})
            acc = {}
        if step % args.ckpt_every == 0 or last:
            save_checkpoint(ckpt_path, step, model, opt, gen, ema)
        if eval_fn is not None and eval_every and (step % eval_every == 0 or last):
            run_eval(step, f"step {step}")
        if out_of_time:
            break
    log.close()
    return step


def save_final(path: Path, state: dict[str, torch.Tensor], summary: dict, **extra: Any) -> Path:
    """The stage's result (`{"state": weights, **extra}`) and its summary.json next to it."""
    path = Path(path)
    save_atomic({"state": {k: v.detach().to("cpu", copy=True) for k, v in state.items()}, **extra}, path)
    write_json(path.parent / "summary.json", summary)
    return path


def load_state(path: Path, key: str = "state") -> dict[str, torch.Tensor]:
    """The weights a stage saved with `save_final` (plain tensors: weights_only)."""
    return torch.load(Path(path), weights_only=True)[key]
