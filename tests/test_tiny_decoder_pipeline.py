"""The tiny decoder (model/tae.py) behind the pipelines: tae_path / use_tae, a request's `decoder`, the streamed
mp4, and CausVid sessions under use_tae. Each result is checked against `TinyDecoder.decode` of the same
latents in this process (fp32, 1e-5); the full decoder's path is checked to stay as it was."""
import pytest
import torch
from helpers import tiny_dit

from model.archs import TINY_T2V
from model.causal_pipeline import CausVidPipeline
from model.checkpoint import CheckpointError
from model.config import ConfigError, load_run_config
from model.pipeline import RequestError, WanPipeline
from model.tae import TAEHV, TinyDecoder, save_tae
from model.tiny import TINY_VAE, write_tiny_model
from model.video import encode_mp4

WORDS = "a red blue square circle moving left right".split()
DISTILL = {"target_video_length": 9, "target_height": 32, "target_width": 48, "enable_cfg": False,
           "denoising_step_list": [1000, 750, 500, 250], "sample_shift": 5, "seed": 7}
CAUSVID = {"target_video_length": 9, "target_height": 32, "target_width": 48, "num_frames": 3,
           "num_frame_per_block": 1, "num_blocks": 3, "denoising_step_list": [1000, 500], "seed": 7,
           "enable_cfg": False}
TOL = 1e-5


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    root = write_tiny_model(tmp_path_factory.mktemp("tae"), "t2v", words=WORDS, distill=tiny_dit(TINY_T2V, seed=11),
                            causal=tiny_dit(TINY_T2V, seed=21))
    torch.manual_seed(5)
    save_tae(TAEHV(TINY_VAE.z_dim, (16, 8, 8, 4), encoder=False), root / "tae" / "tiny.pth")
    return root


def pipe(root, **keys):
    return WanPipeline.from_pretrained(root, load_run_config({**DISTILL, **keys}, model_cls="wan2.1_distill"))


def test_request_decoder_picks_the_tiny_one(root):
    p = pipe(root, tae_path="tae/tiny.pth")
    ref = TinyDecoder.load(root / "tae" / "tiny.pth")
    full = p.generate("a red square", seed=3)
    tiny = p.generate("a red square", seed=3, decoder="tiny")
    assert full.decoder == "full" and tiny.decoder == "tiny"
    assert torch.equal(full.latents, tiny.latents)  # the same generation, decoded two ways
    assert (full.video - p.vae.decode(full.latents[None])[0]).abs().max().item() <= TOL
    expected = ref.decode(tiny.latents[None])[0]
    assert tiny.video.shape == full.video.shape == (3, 9, 32, 48)
    assert (tiny.video - expected).abs().max().item() <= TOL
    assert (tiny.video - full.video).abs().max().item() > 1e-2  # a different (random) decoder
    data, size = p.decode_mp4(tiny.latents[None], decoder="tiny")  # streamed in chunks = the whole decode
    assert size == (9, 32, 48) and data == encode_mp4([expected], p.cfg.fps)[0]
    assert pipe(root, tae_path="tae/tiny.pth", use_tae=True).generate("a red square", seed=3).decoder == "tiny"


def test_decoder_errors(root, tmp_path):
    with pytest.raises(RequestError, match="no tiny decoder"):
        pipe(root).generate("a red square", decoder="tiny")
    with pytest.raises(RequestError, match="must be one of"):
        pipe(root, tae_path="tae/tiny.pth").generate("a red square", decoder="small")
    with pytest.raises(ConfigError, match="use_tae = true: needs tae_path"):
        load_run_config({**DISTILL, "use_tae": True}, model_cls="wan2.1_distill")
    with pytest.raises(CheckpointError, match="inside the model folder"):
        pipe(root, tae_path="../elsewhere.pth")
    with pytest.raises(CheckpointError, match="no such file"):
        pipe(root, tae_path="tae/missing.pth")
    save_tae(TAEHV(TINY_VAE.z_dim + 1, (8, 8, 8, 4), encoder=False), root / "tae" / "z5.pth")
    with pytest.raises(CheckpointError, match="eats 5 latent channels"):
        pipe(root, tae_path="tae/z5.pth")


def test_causvid_session_under_use_tae_decodes_with_the_tiny_decoder(root):
    cfg = load_run_config({**CAUSVID, "use_tae": True, "tae_path": str(root / "tae" / "tiny.pth")},
                          model_cls="wan2.1_causvid")
    p = CausVidPipeline.from_pretrained(root, cfg)
    s = p.start_session("a red square", seed=3, history=True)
    video = torch.cat([s.next_fragment(), s.next_fragment()], dim=1)
    expected = TinyDecoder.load(root / "tae" / "tiny.pth").decode(s.latents()[None])[0]
    assert video.shape == expected.shape == (3, 21, 32, 48)
    assert (video - expected).abs().max().item() <= TOL
    assert s.memory_bytes()["decoder"] > 0
    state = s.state_dict()  # a restore rebuilds the tiny decoder's state from the last blocks
    restored = type(s).restore(p, state, history=True)
    assert torch.equal(restored.next_fragment(), s.next_fragment())  # bit for bit
