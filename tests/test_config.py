"""LightX2V config files load as they are; bad values name key, value and rule."""
import json
from pathlib import Path

import pytest

from model.archs import TINY_T2V, WAN21_I2V_14B, WAN21_T2V_1_3B, WAN21_T2V_14B, DiTArch
from model.config import ConfigError, RunConfig, load_run_config

CONFIGS = sorted((Path(__file__).parent.parent / "configs").rglob("*.json"))

# A LightX2V file verbatim (configs/causvid/wan_t2v_causvid.json upstream), including keys we do not use.
LIGHTX2V_CAUSVID = {
    "infer_steps": 9, "target_video_length": 81, "target_height": 480, "target_width": 832,
    "self_attn_1_type": "flash_attn3", "cross_attn_1_type": "flash_attn3", "cross_attn_2_type": "flash_attn3",
    "sample_guide_scale": 6, "sample_shift": 8, "enable_cfg": False, "cpu_offload": False, "num_fragments": 3,
    "num_frames": 21, "num_frame_per_block": 3, "num_blocks": 7, "frame_seq_length": 1560,
    "denoising_step_list": [999, 934, 862, 756, 603, 410, 250, 140, 74],
}
LIGHTX2V_FP8 = {
    "infer_steps": 4, "target_video_length": 81, "text_len": 512, "target_height": 480, "target_width": 832,
    "self_attn_1_type": "flash_attn3", "cross_attn_1_type": "flash_attn3", "cross_attn_2_type": "flash_attn3",
    "sample_guide_scale": 6, "sample_shift": 5, "enable_cfg": False, "cpu_offload": False,
    "offload_granularity": "model", "denoising_step_list": [1000, 750, 500, 250], "dit_quantized": True,
    "dit_quantized_ckpt": "lightx2v/Wan2.1-Distill-Models/wan2.1_t2v_14b_scaled_fp8_e4m3_lightx2v_4step.safetensors",
    "dit_quant_scheme": "fp8-sgl",
}
LIGHTX2V_LORA_ULYSSES = {
    "infer_steps": 4, "target_video_length": 81, "text_len": 512, "target_height": 480, "target_width": 832,
    "sample_guide_scale": 6, "sample_shift": 5, "enable_cfg": False, "cpu_offload": False,
    "denoising_step_list": [1000, 750, 500, 250],
    "lora_configs": [{"path": "loras/wan2.1_i2v_lora_rank64_lightx2v_4step.safetensors", "strength": 1.0}],
    "parallel": {"seq_p_size": 4, "seq_p_attn_type": "ulysses", "cfg_p_size": 2},
}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_shipped_configs_load(path):
    data = json.loads(path.read_text())
    cls = "wan2.1_causvid" if "causvid" in path.name else ("wan2.1_distill" if "distill" in path.name else "wan2.1")
    cfg = load_run_config(path, model_cls=cls)
    assert cfg.target_video_length == data.get("target_video_length", 81)


def test_lightx2v_files_as_is(tmp_path):
    for i, data in enumerate([LIGHTX2V_CAUSVID, LIGHTX2V_FP8, LIGHTX2V_LORA_ULYSSES]):
        p = tmp_path / f"{i}.json"
        p.write_text(json.dumps(data))
        cfg = load_run_config(p)
        assert cfg.self_attn_1_type == data.get("self_attn_1_type", "torch_sdpa") and not any(
            k.endswith("_attn_1_type") for k in cfg.extras)  # acted on (model/kernels.py), not kept unused
    causvid = load_run_config(LIGHTX2V_CAUSVID, model_cls="wan2.1_causvid")
    assert causvid.steps == 9 and causvid.num_blocks == 7 and causvid.latent_shape == (21, 60, 104)
    causvid.check_arch(WAN21_T2V_14B)  # 1560 tokens per latent frame at 480x832
    fp8 = load_run_config(LIGHTX2V_FP8, model_cls="wan2.1_distill")
    assert fp8.dit_quant_scheme == "fp8-sgl" and fp8.steps == 4
    lora = load_run_config(LIGHTX2V_LORA_ULYSSES, model_cls="wan2.1_distill", task="i2v")
    assert lora.lora_configs[0].strength == 1.0
    assert lora.parallel.degrees() == (4, 1) and lora.parallel.world_size == 8
    lora.check_arch(WAN21_I2V_14B)


def _error(data, **over) -> str:
    with pytest.raises(ConfigError) as e:
        load_run_config(data, **over)
    return str(e.value)


def test_frames_must_be_4n_plus_1():
    msg = _error({"target_video_length": 80})
    assert "target_video_length = 80" in msg and "4n+1" in msg and "77" in msg and "81" in msg


def test_size_multiple_of_16():
    msg = _error({"target_height": 470, "target_width": 830})
    assert "target_height = 470: must be a multiple of 16" in msg and "target_width = 830" in msg


def test_cfg_rejected_for_distill():
    assert "enable_cfg = true: must be false for model_cls=wan2.1_distill" in _error({"enable_cfg": True},
                                                                                      model_cls="wan2.1_distill")


def test_unknown_model_cls_and_task():
    assert "model_cls = 'wan2.2'" in _error({}, model_cls="wan2.2")
    assert "task = 'v2v'" in _error({}, task="v2v")


def test_step_list_rules():
    assert "strictly decreasing" in _error({"denoising_step_list": [250, 500]})
    assert "in (0, 1000]" in _error({"denoising_step_list": [1001, 500]})


def test_causvid_frame_rules():
    msg = _error({**LIGHTX2V_CAUSVID, "num_blocks": 6}, model_cls="wan2.1_causvid")
    assert "num_frames = 21: must equal num_frame_per_block*num_blocks (3*6)" in msg
    cfg = load_run_config({**LIGHTX2V_CAUSVID, "frame_seq_length": 1500}, model_cls="wan2.1_causvid")
    with pytest.raises(ConfigError, match="frame_seq_length = 1500: must equal tokens per latent frame .* = 1560"):
        cfg.check_arch(WAN21_T2V_14B)


def test_heads_must_split_over_ulysses():
    cfg = load_run_config({"parallel": {"seq_p_size": 8, "seq_p_attn_type": "ulysses"}})
    with pytest.raises(ConfigError, match="ulysses degree = 8: must divide num_heads=12"):
        cfg.check_arch(WAN21_T2V_1_3B)
    cfg.check_arch(WAN21_T2V_14B)  # 40 heads
    msg = _error({"parallel": {"seq_p_size": 4, "ulysses_degree": 3, "ring_degree": 2}})
    assert "seq_p_size = 4: must equal ulysses_degree*ring_degree (3*2)" in msg


def test_quant_scheme():
    assert "int8-* or fp8-*" in _error({"dit_quantized": True, "dit_quant_scheme": "nvfp4"})
    assert "needs dit_quant_scheme" in _error({"dit_quantized": True})


def test_bad_file(tmp_path):
    (tmp_path / "c.json").write_text("{not json")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_run_config(tmp_path / "c.json")
    with pytest.raises(ConfigError, match="config file not found"):
        load_run_config(tmp_path / "missing.json")


def test_arch_rules():
    with pytest.raises(ConfigError, match="dim=50 must be divisible by num_heads=3"):
        DiTArch.from_config_json({"dim": 50, "num_heads": 3})
    with pytest.raises(ConfigError, match="i2v needs in_dim = 2\\*out_dim \\+ 4"):
        DiTArch.from_config_json({"model_type": "i2v", "in_dim": 16})
    official = {"_class_name": "WanModel", "_diffusers_version": "0.30.0", "dim": 1536, "eps": 1e-06, "ffn_dim": 8960,
                "freq_dim": 256, "in_dim": 16, "model_type": "t2v", "num_heads": 12, "num_layers": 30, "out_dim": 16,
                "text_len": 512}  # the released T2V-1.3B config.json
    assert DiTArch.from_config_json(official) == WAN21_T2V_1_3B
    assert DiTArch.from_config_json(TINY_T2V.to_diffusers_config()) == TINY_T2V


def test_defaults_are_wan_t2v():
    cfg = RunConfig()
    assert (cfg.infer_steps, cfg.sample_shift, cfg.sample_guide_scale, cfg.target_video_length) == (50, 5.0, 5.0, 81)


def test_weight_keys_are_acted_on_or_refused():
    """Keys the loader would not act on in the given combination are refused, naming the key."""
    distill = {"enable_cfg": False}
    assert "dit_quant_scheme = 'int8-vllm': set dit_quantized = true" in _error({"dit_quant_scheme": "int8-vllm"})
    assert "dit_quantized_ckpt = 'q.safetensors': needs dit_quantized = true" in _error(
        {"dit_quantized_ckpt": "q.safetensors"})
    assert "lora_configs with dit_quantized_ckpt" in _error(
        {"dit_quantized": True, "dit_quant_scheme": "fp8", "dit_quantized_ckpt": "q.safetensors",
         "lora_configs": [{"path": "l.safetensors"}]})
    assert "dit_original_ckpt = 'd.pt': not used (model_cls=wan2.1 loads the base DiT" in _error(
        {"dit_original_ckpt": "d.pt"})
    assert "dit_original_ckpt = 'd.pt': not used (with lora_configs" in _error(
        {**distill, "dit_original_ckpt": "d.pt", "lora_configs": [{"path": "l.safetensors"}]},
        model_cls="wan2.1_distill")
    assert load_run_config({**distill, "dit_original_ckpt": "d.pt"}, model_cls="wan2.1_distill").dit_original_ckpt
    assert "clip_quantized_ckpt = 'c.pt': pre-quantized CLIP files are not supported" in _error(
        {"clip_quantized_ckpt": "c.pt"})
    assert "clip_quantized = true: task 't2v' loads no CLIP image encoder" in _error(
        {"clip_quantized": True, "clip_quant_scheme": "int8"})
    cfg = load_run_config({"t5_quantized": True, "t5_quant_scheme": "fp8-sgl"})
    assert (cfg.t5_quantized, cfg.t5_quant_scheme, cfg.clip_quantized) == (True, "fp8-sgl", False)


def test_model_class_rules_come_from_the_registry():
    from model import registry

    for mc in registry.MODEL_CLASSES.values():
        cfg = {"enable_cfg": False}
        if mc.sessions:
            cfg |= LIGHTX2V_CAUSVID
        assert load_run_config(cfg, model_cls=mc.name).model_class is mc
        if not mc.cfg:
            assert f"enable_cfg = true: must be false for model_cls={mc.name}" in _error({**cfg, "enable_cfg": True},
                                                                                         model_cls=mc.name)
        # the CausVid frame rules apply to the classes with sessions only
        frames = {**cfg, "num_blocks": 6}
        if mc.sessions:
            assert "num_frames = 21: must equal num_frame_per_block*num_blocks" in _error(frames, model_cls=mc.name)
        else:
            assert load_run_config(frames, model_cls=mc.name).num_blocks == 6
    assert set(RunConfig.model_fields["model_cls"].annotation.__args__) == set(registry.NAMES)


def test_validation_messages():
    """The one formatter (model/validation.py) in each caller's words."""
    from pydantic import BaseModel, ConfigDict, Field, ValidationError

    from model.validation import error_lines, format_validation_error

    class Body(BaseModel):
        model_config = ConfigDict(extra="forbid")
        prompt: str
        size: str = Field("832x480", pattern=r"^\d+x\d+$")
        steps: int = Field(4, gt=0)

    with pytest.raises(ValidationError) as e:
        Body.model_validate({"size": "big", "steps": 0, "colour": "red"})
    assert error_lines(e.value, messages={"extra_forbidden": "unknown key"}) == [
        "prompt: Field required", "size = 'big': String should match pattern '^\\d+x\\d+$'",
        "steps = 0: Input should be greater than 0", "colour = 'red': unknown key"]
    errs = [{**x, "loc": ("body", *x["loc"])} for x in e.value.errors()]
    msg = format_validation_error(
        errs, "invalid request", one_line=True, root="body", drop_loc=("body", "query", "path"), show_input=False,
        messages={"extra_forbidden": "unknown field", "missing": "required"},
        rewrite=lambda key, x: "expected WIDTHxHEIGHT" if x["type"] == "string_pattern_mismatch" else None)
    assert msg == ("invalid request: prompt: required; size: expected WIDTHxHEIGHT; steps: Input should be greater "
                   "than 0; colour: unknown field")
    assert format_validation_error(e.value, "invalid args", hide_input=("missing", "extra_forbidden"),
                                   messages={"extra_forbidden": "unknown key (see demo.yaml)"}).endswith(
        "\n  colour: unknown key (see demo.yaml)")
