"""Quantized checkpoints: quantize while loading (safetensors and GGUF), save and load back, bad files."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from qwen2.checkpoint import CheckpointError, load_hf_model, save_hf_model
from qwen2.config import PRESETS
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.quant import Int4Linear, Int8Linear, QuantConfig, quantize_

IDS = torch.randint(0, 512, (2, 11), generator=torch.Generator().manual_seed(0))


def float_model(preset="tiny"):
    m = Qwen2ForCausalLM(PRESETS[preset])
    m.init_weights(seed=0)
    return m.eval()


def logits(model):
    with torch.no_grad():
        return model(IDS)


@pytest.mark.parametrize("mode", ["int8", "int4"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-mha-untied"])
def test_quantize_while_loading_equals_quantizing_after(tmp_path, mode, preset):
    model = float_model(preset)
    save_hf_model(model, tmp_path)
    quant = QuantConfig(mode)
    loaded = load_hf_model(tmp_path, quant=quant)
    assert isinstance(loaded.lm_head, Int8Linear if mode == "int8" else Int4Linear)
    assert torch.equal(logits(loaded), logits(quantize_(copy.deepcopy(model), quant)))


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_quantized_checkpoint_round_trip(tmp_path, mode):
    model, quant = float_model(), QuantConfig(mode, group_size=32)
    save_hf_model(model, tmp_path, quant=quant, dtype=torch.float32)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["mode"] == mode
    names = set(load_file(tmp_path / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.qweight" in names and "model.layers.0.mlp.up_proj.weight" not in names
    loaded = load_hf_model(tmp_path)  # quantized as saved, no flag needed
    assert torch.equal(logits(loaded), logits(quantize_(copy.deepcopy(model), quant)))


def test_int4_file_is_much_smaller(tmp_path):
    model = float_model()
    save_hf_model(model, tmp_path / "f", dtype=torch.bfloat16)
    save_hf_model(model, tmp_path / "q", dtype=torch.bfloat16, quant=QuantConfig("int4", include_lm_head=False))
    layers = lambda d: sum(t.numel() * t.element_size() for k, t in load_file(d / "model.safetensors").items()
                           if k.startswith("model.layers.") and "norm" not in k)
    assert layers(tmp_path / "q") < 0.45 * layers(tmp_path / "f")


def test_requantizing_a_quantized_checkpoint_differently_is_refused(tmp_path):
    save_hf_model(float_model(), tmp_path, quant=QuantConfig("int8"))
    with pytest.raises(CheckpointError, match="saved as int8"):
        load_hf_model(tmp_path, quant=QuantConfig("int4"))


def test_foreign_quantization_configs_are_named(tmp_path):
    save_hf_model(float_model(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "awq", "bits": 4}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="unsupported quantization_config"):
        load_hf_model(tmp_path)


def test_damaged_quantized_tensors_are_named(tmp_path):
    save_hf_model(float_model(), tmp_path, quant=QuantConfig("int4"))
    state = load_file(tmp_path / "model.safetensors")
    state["model.layers.1.self_attn.q_proj.qweight"] = state["model.layers.1.self_attn.q_proj.qweight"][:, :5].contiguous()
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj.qweight.*expected \(64, 32\)"):
        load_hf_model(tmp_path)
    del state["model.layers.1.self_attn.q_proj.qweight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"q_proj' lacks \['qweight'\]"):
        load_hf_model(tmp_path)


def test_saving_a_runtime_quantized_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="private layout"):
        save_hf_model(quantize_(float_model(), QuantConfig("int4")), tmp_path)


def test_int8_weights_loaded_from_a_file_own_aligned_memory(tmp_path):
    save_hf_model(float_model(), tmp_path, quant=QuantConfig("int8"))
    loaded = load_hf_model(tmp_path)
    # safetensors hands out views into the file mapping at arbitrary offsets; the kernel needs its own
    layers = [m for m in loaded.modules() if isinstance(m, Int8Linear)]
    assert layers and all(m.qweight.data_ptr() % 64 == 0 for m in layers)
