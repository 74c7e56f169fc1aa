"""python -m training <stage> [options]: the stages that produce demo_model/ (see training/README.md).

Every stage is resumable: it keeps `out/train/<stage>/ckpt.pt` (weights, optimizer, RNG, step) and appends
to `out/train/<stage>/log.jsonl`; rerunning the same command continues where it stopped.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from .common import OUT

STAGES = {
    "text": "training.common",  # the frozen text encoder's contexts of every grammar prompt (optional cache)
    "vae": "training.vae",  # autoencoder on the clips
    "latents": "training.latents",  # encode a fixed clip set with the trained VAE
    "teacher": "training.teacher",  # flow matching + CFG dropout
    "ode-pairs": "training.ode",  # teacher CFG trajectories
    "ode-init": "training.ode",  # student regression on them
    "dmd": "training.dmd",  # DMD: generator / critic / frozen teacher
    "causal-ode": "training.selfforcing",  # causal student: ODE regression under the block-causal mask
    "causal": "training.selfforcing",  # causal student: Self-Forcing DMD over the KV cache
    "tae": "training.tae",  # tiny TAEHV decoder regressed onto the demo VAE's decodes
    "export": "training.export",  # write demo_model/
}


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m training", description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="stage", required=True)
    for name, mod in STAGES.items():
        p = sub.add_parser(name)
        p.add_argument("--out", default=str(OUT), help="work directory (default out/train)")
        p.add_argument("--threads", type=int, default=2)
        p.add_argument("--quiet", action="store_true", help="no progress bar")
        p.add_argument("--log-every", type=int, default=10)
        p.add_argument("--ckpt-every", type=int, default=100)
        p.add_argument("--device", default="cpu",
                       help="cpu (default) or cuda[:i]: where the stage's models run (vae, dmd, causal: CPU only)")
        p.add_argument("--max-minutes", type=float, default=0,
                       help="end a training loop after this much wall time (checkpoint + eval as at the end; "
                            "0: no limit)")
        if argv and argv[0] == name:  # import only the stage that runs
            m = importlib.import_module(mod)
            getattr(m, "add_args_" + name.replace("-", "_"), getattr(m, "add_args", lambda _: None))(p)
    args = ap.parse_args(argv)
    m = importlib.import_module(STAGES[args.stage])
    getattr(m, "train_" + args.stage.replace("-", "_"), getattr(m, "train", None))(args)


if __name__ == "__main__":
    main()
