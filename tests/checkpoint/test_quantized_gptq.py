"""GPTQ checkpoints: calibrate, save, load back on the same kernels; mixed-precision overrides round-trip."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from qwen2.checkpoint import CheckpointError, Pretrained, load_hf_model, load_pretrained, save_hf_model, save_pretrained
from qwen2.model.gptq import GPTQConfig
from qwen2.model.quant import Int4Linear, Int8Linear, QuantConfig, quantize_
from test_quantized import float_model, logits

GPTQ_INT4 = QuantConfig("int4", method="gptq")


@pytest.fixture
def calibration(tmp_path):
    text = tmp_path / "calibration.py"
    text.write_text("".join(f"def f{i}(x):\n    return x * {i} + {i % 7}\n\n" for i in range(200)))
    return GPTQConfig(num_samples=4, seq_len=64, batch_size=2, calibration_files=(str(text),))


@pytest.mark.parametrize("int8_budget", [0.0, 0.6])  # whole decoder layers: 0.6 fits one of the two
def test_gptq_checkpoint_round_trip(tmp_path, byte_tokenizer, calibration, int8_budget):
    model = float_model()
    calibration = GPTQConfig(**{**calibration.__dict__, "int8_budget": int8_budget})
    stored = save_pretrained(Pretrained(model, byte_tokenizer, source="tiny"), tmp_path / "q", quant=GPTQ_INT4,
                             calibration=calibration, dtype=torch.float32)
    assert stored.method == "gptq" and bool(stored.int8_modules) == (int8_budget > 0)
    config = json.loads((tmp_path / "q" / "config.json").read_text())["quantization_config"]
    assert QuantConfig.from_dict(config) == stored
    names = set(load_file(tmp_path / "q" / "model.safetensors"))
    assert "model.layers.0.mlp.up_proj.qweight" in names and "model.layers.0.mlp.up_proj.weight" not in names
    loaded = load_pretrained(tmp_path / "q", dtype=torch.float32)  # quantized as saved, no flag needed
    merged = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
    for name, module in loaded.model.named_modules():
        prefix, _, leaf = name.rpartition(".")
        parts = [f"{prefix}.{part}" if prefix else part for part in merged.get(leaf, (leaf,))]  # runtime merges
        if all(part in stored.int8_modules for part in parts):
            assert isinstance(module, Int8Linear), name
        elif name.endswith("_proj") or name == "lm_head":
            assert isinstance(module, Int4Linear), name
    # Loading again with an explicit int4 flag is fine (the method is not part of the layout)...
    load_hf_model(tmp_path / "q", quant=QuantConfig("int4", int8_modules=stored.int8_modules))
    # ...but a different layout is refused, naming both.
    if stored.int8_modules:
        with pytest.raises(CheckpointError, match=r"saved as int4 \(group 32, gptq, \d+ layers int8\)"):
            load_hf_model(tmp_path / "q", quant=QuantConfig("int4"))


def test_load_pretrained_with_gptq_equals_saving_and_loading(tmp_path, byte_tokenizer, calibration):
    model = float_model()
    save_pretrained(Pretrained(model, byte_tokenizer), tmp_path / "f", dtype=torch.float32)
    in_memory = load_pretrained(tmp_path / "f", dtype=torch.float32, quant=GPTQ_INT4, calibration=calibration)
    assert isinstance(in_memory.model.model.layers[0].mlp.down_proj, Int4Linear)
    save_pretrained(load_pretrained(tmp_path / "f", dtype=torch.float32), tmp_path / "q", quant=GPTQ_INT4,
                    calibration=calibration)
    reloaded = load_pretrained(tmp_path / "q", dtype=torch.float32)
    torch.testing.assert_close(logits(in_memory.model), logits(reloaded.model), atol=1e-5, rtol=0)


def test_rtn_int8_overrides_round_trip_without_calibration(tmp_path):
    # int8_modules is part of the layout, whatever the method: RTN honours it too.
    model = float_model()
    quant = QuantConfig("int4", int8_modules={"lm_head", "model.layers.1.mlp.down_proj"})
    save_hf_model(model, tmp_path, quant=quant, dtype=torch.float32)
    state = load_file(tmp_path / "model.safetensors")
    assert state["model.layers.1.mlp.down_proj.qweight"].dtype == torch.int8
    assert state["model.layers.0.mlp.down_proj.qweight"].dtype == torch.uint8
    loaded = load_hf_model(tmp_path)
    assert isinstance(loaded.lm_head, Int8Linear) and isinstance(loaded.model.layers[0].mlp.down_proj, Int4Linear)
    assert torch.equal(logits(loaded), logits(quantize_(copy.deepcopy(model), quant)))


def test_gptq_without_calibration_is_refused(tmp_path):
    with pytest.raises(ValueError, match="no GPTQ tensors were given"):
        save_hf_model(float_model(), tmp_path, quant=GPTQ_INT4)
    save_hf_model(float_model(), tmp_path / "f")
    with pytest.raises(ValueError, match="GPTQ needs the whole float model"):
        load_hf_model(tmp_path / "f", quant=GPTQ_INT4)


def test_calibrating_an_already_quantized_model_is_refused(tmp_path, byte_tokenizer, calibration):
    save_pretrained(Pretrained(float_model(), byte_tokenizer), tmp_path, quant=QuantConfig("int8"))
    with pytest.raises(CheckpointError, match="already quantized"):
        load_pretrained(tmp_path, quant=GPTQ_INT4, calibration=calibration)
