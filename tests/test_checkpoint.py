"""Weight files in every supported layout load to the same model; every bad file fails clearly."""
import json

import pytest
import torch
from helpers import dit_inputs, tiny_dit, write_diffusers_dit, write_official_dit
from safetensors.torch import save_file

from model.archs import TINY_I2V, TINY_T2V
from model.checkpoint import (
    CLIP_FILE,
    T5_FILE,
    VAE_FILE,
    CheckpointError,
    ModelFolder,
    load_state_dict,
    to_diffusers_dit,
)
from model.loader import load_dit, read_dit_arch


def outputs(model, arch):
    with torch.no_grad():
        return model(**dit_inputs(arch))


@pytest.fixture(params=[TINY_T2V, TINY_I2V], ids=["t2v", "i2v"])
def reference(request):
    arch = request.param
    model = tiny_dit(arch, seed=3)
    return arch, model, outputs(model, arch)


def test_official_single_file(tmp_path, reference):
    arch, model, want = reference
    write_official_dit(tmp_path, model)
    loaded = load_dit(tmp_path)
    assert loaded.arch == arch
    assert torch.equal(outputs(loaded, arch), want)


def test_official_sharded_with_index(tmp_path, reference):
    arch, model, want = reference
    index = write_official_dit(tmp_path, model, shard_bytes=40_000)
    shards = json.loads(index.read_text())["weight_map"].values()
    assert len(set(shards)) >= 3
    assert torch.equal(outputs(load_dit(tmp_path), arch), want)


def test_pth_weights_only(tmp_path, reference):
    arch, model, want = reference
    torch.save({"generator_ema": model.state_dict()}, tmp_path / "distill_model.pt")  # training-style nesting
    loaded = load_dit(tmp_path / "distill_model.pt", arch=arch)
    assert torch.equal(outputs(loaded, arch), want)


def test_diffusers_layout(tmp_path, reference):
    arch, model, want = reference
    write_diffusers_dit(tmp_path, model)
    mf = ModelFolder.open(tmp_path)
    assert mf.layout == "diffusers"
    assert read_dit_arch(mf) == arch
    assert torch.equal(outputs(load_dit(tmp_path), arch), want)


def test_prefixed_single_file(tmp_path, reference):
    """Third-party single files prefix keys with `model.diffusion_model.`."""
    arch, model, want = reference
    save_file({"model.diffusion_model." + k: v for k, v in model.state_dict().items()}, str(tmp_path / "w.safetensors"))
    assert torch.equal(outputs(load_dit(tmp_path / "w.safetensors", arch=arch), arch), want)


def test_diffusers_single_file(tmp_path, reference):
    arch, model, want = reference
    save_file(to_diffusers_dit(model.state_dict()), str(tmp_path / "w.safetensors"))
    assert torch.equal(outputs(load_dit(tmp_path / "w.safetensors", arch=arch), arch), want)


def test_bf16_on_disk_fp32_compute(tmp_path):
    model = tiny_dit(TINY_T2V)
    write_official_dit(tmp_path, model, dtype=torch.bfloat16)
    loaded = load_dit(tmp_path)
    assert all(p.dtype == torch.float32 for p in loaded.parameters())
    rounded = tiny_dit(TINY_T2V)
    rounded.load_state_dict({k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()})
    assert torch.equal(outputs(loaded, TINY_T2V), outputs(rounded, TINY_T2V))
    assert load_dit(tmp_path, dtype=torch.bfloat16).blocks[0].self_attn.q.weight.dtype == torch.bfloat16


# --- bad files ------------------------------------------------------------------------------------------
def test_missing_weights_lists_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(TINY_T2V.to_config_json()))
    with pytest.raises(CheckpointError) as e:
        load_dit(tmp_path)
    msg = str(e.value)
    assert "diffusion_pytorch_model.safetensors.index.json" in msg and "diffusion_pytorch_model.safetensors" in msg
    assert "diffusion_pytorch_model.pth" in msg


def test_not_a_model_folder(tmp_path):
    with pytest.raises(CheckpointError, match="not a Wan2.1 model folder"):
        ModelFolder.open(tmp_path)
    with pytest.raises(CheckpointError, match="model folder not found"):
        ModelFolder.open(tmp_path / "nope")


def test_component_files_of_official_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    mf = ModelFolder.open(tmp_path)
    for getter, name in ((mf.text_encoder, T5_FILE), (mf.vae, VAE_FILE), (mf.image_encoder, CLIP_FILE)):
        with pytest.raises(CheckpointError, match="looked for"):
            getter()
        (tmp_path / name).write_bytes(b"x")
        assert getter() == tmp_path / name


def test_corrupt_safetensors(tmp_path):
    model = tiny_dit(TINY_T2V)
    path = write_official_dit(tmp_path, model)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="cannot read safetensors file .*corrupt or truncated"):
        load_dit(tmp_path)


def test_corrupt_and_unsafe_pth(tmp_path):
    (tmp_path / "a.pth").write_bytes(b"not a zip file at all")
    with pytest.raises(CheckpointError, match="cannot read torch file"):
        load_state_dict(tmp_path / "a.pth")
    torch.save({"w": torch.zeros(2), "f": print}, tmp_path / "b.pth")  # a callable: weights_only refuses it
    with pytest.raises(CheckpointError, match="cannot read torch file"):
        load_state_dict(tmp_path / "b.pth")


def test_index_with_missing_shard(tmp_path):
    index = write_official_dit(tmp_path, tiny_dit(TINY_T2V), shard_bytes=40_000)
    shard = sorted(tmp_path.glob("*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"missing.*{shard.name}"):
        load_state_dict(index)


def _write(tmp_path, sd, arch=TINY_T2V):
    (tmp_path / "config.json").write_text(json.dumps(arch.to_config_json()))
    save_file(sd, str(tmp_path / "diffusion_pytorch_model.safetensors"))


def test_missing_key(tmp_path):
    sd = tiny_dit(TINY_T2V).state_dict()
    del sd["blocks.1.ffn.2.bias"]
    _write(tmp_path, sd)
    with pytest.raises(CheckpointError, match=r"1 missing keys, e.g. \['blocks.1.ffn.2.bias'\]"):
        load_dit(tmp_path)


def test_unexpected_key(tmp_path):
    sd = tiny_dit(TINY_T2V).state_dict()
    sd["blocks.0.extra.weight"] = torch.zeros(3)
    _write(tmp_path, sd)
    with pytest.raises(CheckpointError, match=r"unexpected keys, e.g. \['blocks.0.extra.weight'\]"):
        load_dit(tmp_path)


def test_shape_mismatch_names_key_expected_found(tmp_path):
    sd = tiny_dit(TINY_T2V).state_dict()
    sd["blocks.0.self_attn.q.weight"] = torch.zeros(48, 40)
    _write(tmp_path, sd)
    with pytest.raises(CheckpointError, match=r"shape mismatch for blocks.0.self_attn.q.weight: expected \(48, 48\), "
                                              r"found \(48, 40\)"):
        load_dit(tmp_path)


def test_bare_file_needs_arch(tmp_path):
    path = write_official_dit(tmp_path, tiny_dit(TINY_T2V))
    with pytest.raises(CheckpointError, match="pass the architecture"):
        load_dit(path)


# --------------------------------------------------------------------------------------------------
# The loader's steps give the weights of the primitive path, bit for bit
# --------------------------------------------------------------------------------------------------
def _primitive_module(sd, arch, dtype):
    """The module built by hand: strict load into a float WanModel, then cast to the compute dtype."""
    from model.dit import WanModel

    model = WanModel(arch)
    model.load_state_dict(sd)
    return model.to(dtype)


def _same_weights(got, want):
    a, b = got.state_dict(), want.state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype and a[k].device == b[k].device, k
        assert torch.equal(a[k].view(torch.uint8), b[k].view(torch.uint8)), k  # bits, fp8 included
    kinds = [{n: type(m).__name__ for n, m in model.named_modules()} for model in (got, want)]
    assert kinds[0] == kinds[1]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_loader_equals_primitive_steps(tmp_path, dtype):
    """load_pipeline_dit (files -> state dict -> keys -> LoRA -> quantization -> module) against building the
    module, merging the LoRAs into it and quantizing it, for: the student file; base + LoRA; base + LoRA +
    int8 quantize-on-load; a pre-quantized fp8 file. bf16 checks the cast order: cast, LoRA delta in fp32
    and cast back, then quantize."""
    from model.config import LoraConfig, load_run_config
    from model.loader import load_pipeline_dit
    from model.lora import merge_loras
    from model.quant import quantize_dit, quantized_state_dict

    arch = TINY_T2V
    base, student = tiny_dit(arch, seed=5), tiny_dit(arch, seed=6)
    write_official_dit(tmp_path, base)
    (tmp_path / "distill_models").mkdir()
    save_file(student.state_dict(), str(tmp_path / "distill_models" / "distill_model.safetensors"))
    g = torch.Generator().manual_seed(7)
    save_file({"diffusion_model.blocks.0.self_attn.q.lora_down.weight": torch.randn(4, 48, generator=g),
               "diffusion_model.blocks.0.self_attn.q.lora_up.weight": torch.randn(48, 4, generator=g),
               "diffusion_model.blocks.0.self_attn.q.alpha": torch.tensor(2.0),
               "diffusion_model.blocks.1.ffn.2.diff_b": torch.randn(48, generator=g)}, str(tmp_path / "l1.safetensors"))
    save_file({"blocks.1.cross_attn.k.lora_B.weight": torch.randn(48, 2, generator=g),
               "blocks.1.cross_attn.k.lora_A.weight": torch.randn(2, 48, generator=g)},
              str(tmp_path / "l2.safetensors"))
    loras = [LoraConfig(path="l1.safetensors", strength=0.7), LoraConfig(path="l2.safetensors", strength=-1.5)]
    quantized = quantize_dit(_primitive_module(student.state_dict(), arch, torch.bfloat16), "fp8")
    save_file(quantized_state_dict(quantized), str(tmp_path / "distill_models" / "fp8.safetensors"))
    folder = ModelFolder.open(tmp_path)
    lora_cfg = [c.model_dump() for c in loras]

    def load(**cfg):
        return load_pipeline_dit(folder, load_run_config({"enable_cfg": False, **cfg}, model_cls="wan2.1_distill"),
                                 dtype, "cpu")

    _same_weights(load(), _primitive_module(student.state_dict(), arch, dtype))

    want = _primitive_module(base.state_dict(), arch, dtype)
    merge_loras(want, loras, roots=[tmp_path])
    got = load(lora_configs=lora_cfg)
    _same_weights(got, want)
    assert not torch.equal(got.blocks[0].self_attn.q.weight, base.blocks[0].self_attn.q.weight.to(dtype))

    quantize_dit(want, "int8")
    _same_weights(load(lora_configs=lora_cfg, dit_quantized=True, dit_quant_scheme="int8-vllm"), want)

    from model.dit import WanModel

    with torch.device("meta"):  # the quantized module's skeleton, its tensors assigned from the file
        want = quantize_dit(WanModel(arch).to(dtype), "fp8")
    expected = want.state_dict()
    file = load_state_dict(tmp_path / "distill_models" / "fp8.safetensors")
    want.load_state_dict({k: v.to(expected[k].dtype) for k, v in file.items()}, assign=True)
    _same_weights(load(dit_quantized=True, dit_quant_scheme="fp8-sgl",
                       dit_quantized_ckpt="distill_models/fp8.safetensors"), want.eval().requires_grad_(False))
