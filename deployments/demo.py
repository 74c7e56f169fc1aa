"""One command, the whole service: start the Serve app of configs/serve/demo.yaml on this machine, send it
a 4-step distilled T2V job and a 2-fragment CausVid session through the Python client, write the videos
to out/, print their URLs and timings, shut down.

    python -m deployments.demo                      # needs demo_model/ (python -m training ...)
    python -m deployments.demo --keep               # ... and keep serving until Ctrl-C (web page at /)

The demo model is the tiny model trained by `python -m training` into demo_model/; without it there is
nothing to serve and the command says so and exits with status 2. `--model-path` serves another folder of
the same architecture.
"""
from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

import yaml

from model.registry import CAUSVID, DISTILL, model_class

REPO = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO / "configs" / "serve" / "demo.yaml"
# The demo model knows the words of its training grammar (training/data.py): shapes, colours, directions.
PROMPT = "a red square moving right on a blue background"


def load_app_config(path: Path) -> tuple[dict, dict]:
    """(http_options, application) of a Serve config file with one application."""
    cfg = yaml.safe_load(path.read_text())
    (app,) = cfg["applications"]
    return cfg.get("http_options", {}), app


def check_model_files(args: dict) -> list[str]:
    """Models whose files are missing: a missing model folder ends the demo, a missing CausVid student only
    drops the session part."""
    problems = []
    for m in list(args["models"]):
        root = Path(m["model_path"])
        if not root.is_absolute():
            root = REPO / root
        if not root.is_dir():
            problems.append(f"model folder {root} not found (model {m['name']})")
            continue
        student = model_class(m["model_cls"]).student
        sub = student[0] if student else None
        if sub and not any((root / sub).glob("*.safetensors")) and not any((root / sub).glob("*.pt")):
            print(f"note: {root / sub} is missing: model {m['name']} is left out of the demo")
            args["models"].remove(m)
    return problems


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m deployments.demo", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", type=Path, default=DEFAULT_CONFIG)
    ap.add_argument("--model-path", help="serve this model folder instead of the config's (same architecture)")
    ap.add_argument("--port", type=int, default=None, help="HTTP port (default: the config's)")
    ap.add_argument("--out", type=Path, default=REPO / "out")
    ap.add_argument("--keep", action="store_true", help="keep serving after the demo requests (Ctrl-C ends)")
    ap.add_argument("--device", choices=("cpu", "cuda"), help="run every model on this device (default: the config's)")
    opts = ap.parse_args(argv)

    http, app = load_app_config(opts.config)
    args = copy.deepcopy(app["args"])
    for m in args["models"]:
        if opts.model_path:
            m["model_path"] = opts.model_path
        if opts.device:
            m["device"] = opts.device
        if not Path(m["config_json"]).is_absolute():
            m["config_json"] = str(REPO / m["config_json"])
    args["state_dir"] = str(opts.out / "demo-state")
    args["image_roots"] = [str(opts.out / "demo-state" / "uploads")]
    problems = check_model_files(args)
    if problems:
        print("cannot run the demo:\n  " + "\n  ".join(problems) + "\nThe demo serves the tiny trained model in "
              "demo_model/ (made by `python -m training`, see training/README.md); or pass --model-path.",
              file=sys.stderr)
        return 2

    import ray
    from ray import serve

    from deployments.app import build_app
    from deployments.client import WanClient

    port = opts.port or http.get("port", 8000)
    url = f"http://127.0.0.1:{port}"
    t0 = time.perf_counter()
    import logging

    ray.init(include_dashboard=False, logging_level="WARNING", log_to_driver=False)  # replica logs stay in Ray's
    logging.getLogger("ray.serve").setLevel(logging.WARNING)  # log files: the demo prints its own lines
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(args), name=app["name"], route_prefix=app.get("route_prefix", "/"))
        print(f"serving {[m['name'] for m in args['models']]} at {url}/ (web page), {url}/docs (API) "
              f"— up in {time.perf_counter() - t0:.1f} s")
        client = WanClient(url)
        models = {m["model_cls"]: m["name"] for m in args["models"]}
        opts.out.mkdir(parents=True, exist_ok=True)
        if DISTILL.name in models:
            job = client.generate(PROMPT, model=models[DISTILL.name], seed=7)
            done = job.wait(progress=True, timeout=300)
            path = job.save(opts.out / "demo_t2v.mp4")
            print(f"T2V {job.id}: {url}/v1/videos/{job.id}/content -> {path}")
            print("  timings: " + ", ".join(f"{k} {v:.2f} s" for k, v in done["timings"].items()))
        if CAUSVID.name in models:
            with client.session(model=models[CAUSVID.name], prompt=PROMPT, seed=7) as session:
                for k, prompt in enumerate((None, None)):  # fragment 2 continues the same prompt from the cache
                    part = session.next_fragment(prompt=prompt)
                    blocks = [(i, time.perf_counter()) for i, _ in part.blocks(timeout=300)]
                    done = part.wait(timeout=300)
                    path = part.save(opts.out / f"demo_session_fragment{k + 1}.mp4")
                    print(f"session {session.id} fragment {k + 1} ({len(blocks)} blocks streamed): "
                          f"{url}/v1/videos/{part.id}/content -> {path}")
                    print("  timings: " + ", ".join(f"{k2} {v:.2f} s" for k2, v in done["timings"].items()))
                whole = session.video(opts.out / "demo_session.mp4")
                info = session.info()
                print(f"session video ({info['frames']} frames, cache {info['cache_bytes']} bytes): "
                      f"{url}/v1/sessions/{session.id}/video -> {whole}")
        print(f"demo done in {time.perf_counter() - t0:.1f} s")
        if opts.keep:
            print(f"serving at {url}/ until Ctrl-C")
            while True:
                time.sleep(3600)
        return 0
    except KeyboardInterrupt:
        return 0
    finally:
        serve.shutdown()
        ray.shutdown()


if __name__ == "__main__":
    sys.exit(main())
