"""Qwen2Config: JSON round trips, presets, and validation that names the bad field."""

import json

import pytest

from qwen2.config import PRESETS, ConfigError, Qwen2Config

# The official Qwen2.5-0.5B-Instruct config.json, as published on the hub.
OFFICIAL_QWEN25_05B = {
    "architectures": ["Qwen2ForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 151643,
    "eos_token_id": 151645, "hidden_act": "silu", "hidden_size": 896, "initializer_range": 0.02,
    "intermediate_size": 4864, "max_position_embeddings": 32768, "max_window_layers": 21, "model_type": "qwen2",
    "num_attention_heads": 14, "num_hidden_layers": 24, "num_key_value_heads": 2, "rms_norm_eps": 1e-06,
    "rope_theta": 1000000.0, "sliding_window": 32768, "tie_word_embeddings": True, "torch_dtype": "bfloat16",
    "transformers_version": "4.43.1", "use_cache": True, "use_sliding_window": False, "vocab_size": 151936,
}


def test_official_config_round_trips_every_key(tmp_path):
    path = tmp_path / "config.json"
    path.write_text(json.dumps(OFFICIAL_QWEN25_05B))
    config = Qwen2Config.from_json_file(path)
    assert config.dim_per_head == 64 and config.tie_word_embeddings
    assert config.layer_type(23) == "full_attention"  # use_sliding_window is false
    assert config.extra == {"transformers_version": "4.43.1"}
    config.save(tmp_path / "out.json")
    assert json.loads((tmp_path / "out.json").read_text()) == OFFICIAL_QWEN25_05B


@pytest.mark.parametrize("preset,billions", [("qwen2-0.5b", 0.494), ("qwen2-1.5b", 1.544), ("qwen2-7b", 7.616),
                                             ("qwen2-72b", 72.706)])
def test_preset_parameter_counts_match_the_report(preset, billions):
    assert PRESETS[preset].num_parameters() / 1e9 == pytest.approx(billions, abs=0.001)


def test_yarn_and_sliding_fields():
    config = Qwen2Config.from_dict({**OFFICIAL_QWEN25_05B, "use_sliding_window": True, "max_window_layers": 20,
                                    "rope_scaling": {"type": "yarn", "factor": 4.0,
                                                     "original_max_position_embeddings": 32768}})
    assert config.rope_type == "yarn"
    assert [config.layer_type(i) for i in (19, 20)] == ["full_attention", "sliding_attention"]


def test_transformers_v5_rope_parameters_are_read():
    data = {k: v for k, v in OFFICIAL_QWEN25_05B.items() if k != "rope_theta"}
    data["rope_parameters"] = {"rope_type": "default", "rope_theta": 10000.0}
    assert Qwen2Config.from_dict(data).rope_theta == 10000.0


@pytest.mark.parametrize("field,value,message", [
    ("hidden_size", 900, "hidden_size"),
    ("num_key_value_heads", 3, "num_key_value_heads"),
    ("vocab_size", -1, "vocab_size"),
    ("vocab_size", "151936", "vocab_size"),
    ("hidden_size", 1 << 40, "implausibly large"),
    ("rope_theta", float("nan"), "rope_theta"),
    ("model_type", "llama", "model_type"),
    ("rope_scaling", {"type": "yarn", "factor": 0.5}, "rope_scaling"),
    ("layer_types", ["full_attention"], "layer_types"),
    ("layer_types", "full_attention", "layer_types"),
    ("tie_word_embeddings", "false", "tie_word_embeddings"),  # a truthy string would silently tie
    ("use_sliding_window", 1, "use_sliding_window"),
    ("max_window_layers", "21", "max_window_layers"),
    ("torch_dtype", "int8", "torch_dtype"),
    ("rope_scaling", {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": "x"},
     "original_max_position_embeddings"),
    ("rope_scaling", {"type": "yarn"}, "factor"),
    ("rope_scaling", "yarn", "rope_scaling"),
])
def test_bad_fields_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        Qwen2Config.from_dict({**OFFICIAL_QWEN25_05B, field: value})


def test_unreadable_config_files(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        Qwen2Config.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match="invalid JSON at line 1"):
        Qwen2Config.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_bytes(b'{"a": "\xff"}')
    with pytest.raises(ConfigError, match="UTF-8"):
        Qwen2Config.from_json_file(tmp_path / "config.json")
    (tmp_path / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="expected a JSON object"):
        Qwen2Config.from_json_file(tmp_path / "config.json")
