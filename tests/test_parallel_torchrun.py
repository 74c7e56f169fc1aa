"""`torchrun -m engine.generate`: the group formed from torchrun's environment (its agent hosts the store),
the config's `parallel` block as the layout, rank 0 writing the same video as one process would."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
from helpers import tiny_dit

from model.archs import TINY_T2V
from model.config import load_run_config
from model.pipeline import WanPipeline
from model.video import read_mp4

CONFIG = {"target_video_length": 9, "target_height": 48, "target_width": 48, "enable_cfg": False,
          "denoising_step_list": [1000, 750, 500, 250], "seed": 5}
ROOT = Path(__file__).parent.parent


def test_torchrun_ring2_generation_matches_one_process(tmp_path):
    from model.tiny import write_tiny_model

    model = write_tiny_model(tmp_path / "model", "t2v", words="a red square".split(), distill=tiny_dit(TINY_T2V, 3))
    cfg_path = tmp_path / "cfg.json"
    cfg_path.write_text(json.dumps({**CONFIG, "parallel": {"seq_p_size": 2, "seq_p_attn_type": "ring"}}))
    out = tmp_path / "sp.mp4"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "engine.generate",
           "--model_cls", "wan2.1_distill", "--task", "t2v", "--model_path", str(model), "--config_json",
           str(cfg_path), "--prompt", "a red square", "--save_result_path", str(out), "--device", "cpu"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["world_size"] == 2 and summary["nfe"] == 4 and summary["frames"] == 9

    serial = WanPipeline.from_pretrained(model, load_run_config(CONFIG, model_cls="wan2.1_distill", task="t2v"))
    ref = serial.generate("a red square").save(tmp_path / "one.mp4")
    (got, fps), (want, _) = read_mp4(out), read_mp4(ref)
    assert got.shape == want.shape == (9, 48, 48, 3) and fps == 16
    assert np.abs(got.astype(int) - want.astype(int)).max() <= 1
