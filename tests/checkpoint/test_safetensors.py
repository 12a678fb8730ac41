"""HF directory save/load: round trips, transformers compatibility, and clear errors for bad files."""

import json

import pytest
import torch

from qwen2.checkpoint import CheckpointError, load_hf_model, save_hf_model
from qwen2.config import PRESETS
from qwen2.model import Qwen2ForCausalLM


def tiny(preset="tiny"):
    m = Qwen2ForCausalLM(PRESETS[preset])
    m.init_weights(seed=0)
    return m.eval()


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha-untied"])
def test_save_then_load_is_exact(tmp_path, preset):
    model = tiny(preset)
    save_hf_model(model, tmp_path)
    loaded = load_hf_model(tmp_path)
    ids = torch.randint(0, 512, (1, 10))
    with torch.no_grad():
        assert torch.equal(model(ids), loaded(ids))
    assert (loaded.lm_head.weight is loaded.model.embed_tokens.weight) == model.config.tie_word_embeddings


def test_sharded_save_writes_an_index_and_loads(tmp_path):
    model = tiny()
    save_hf_model(model, tmp_path, max_shard_bytes=40_000)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2
    assert not (tmp_path / "model.safetensors").exists()
    ids = torch.randint(0, 512, (1, 6))
    with torch.no_grad():
        assert torch.equal(model(ids), load_hf_model(tmp_path)(ids))


def test_transformers_loads_our_directory(tmp_path):
    transformers = pytest.importorskip("transformers")
    model = tiny("tiny-mha-untied")
    save_hf_model(model, tmp_path)
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    ids = torch.randint(0, 512, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(ids), hf(ids).logits, atol=1e-4, rtol=0)


def test_bfloat16_save_and_dtype_choice(tmp_path):
    save_hf_model(tiny(), tmp_path, dtype=torch.bfloat16)
    assert json.loads((tmp_path / "config.json").read_text())["torch_dtype"] == "bfloat16"
    assert load_hf_model(tmp_path).dtype == torch.bfloat16
    assert load_hf_model(tmp_path, dtype=torch.float32).dtype == torch.float32


def test_truncated_weights_name_the_file(tmp_path):
    save_hf_model(tiny(), tmp_path)
    path = tmp_path / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_hf_model(tmp_path)


def test_garbage_header_names_the_file(tmp_path):
    save_hf_model(tiny(), tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\xff" * 64)
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_hf_model(tmp_path)


def test_missing_and_misshapen_tensors_are_named(tmp_path):
    from safetensors.torch import load_file, save_file

    save_hf_model(tiny(), tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="model.layers.1.mlp.up_proj.weight"):
        load_hf_model(tmp_path)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"up_proj.weight.*shape \(3, 3\), expected \(128, 64\)"):
        load_hf_model(tmp_path)
    state["model.layers.1.mlp.up_proj.weight"] = torch.zeros(128, 64)
    state["model.layers.9.extra.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected tensor 'model.layers.9.extra.weight'"):
        load_hf_model(tmp_path)


def test_config_that_disagrees_with_weights(tmp_path):
    save_hf_model(tiny(), tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 256
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="expected .* from config.json"):
        load_hf_model(tmp_path)


def test_pickle_checkpoints_are_refused(tmp_path):
    save_hf_model(tiny(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04pickle")
    with pytest.raises(CheckpointError, match="pickle"):
        load_hf_model(tmp_path)


def test_index_pointing_outside_the_directory_is_refused(tmp_path):
    save_hf_model(tiny(), tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": 5}}))
    with pytest.raises(CheckpointError, match="not a string"):
        load_hf_model(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {"x": "../../etc/passwd"}}))
    with pytest.raises(CheckpointError, match="not a file inside"):
        load_hf_model(tmp_path)


def test_saving_over_a_sharded_directory_leaves_no_stale_shards(tmp_path):
    save_hf_model(tiny(), tmp_path, max_shard_bytes=40_000)
    other = tiny("tiny")
    with torch.no_grad():
        other.model.norm.weight.fill_(2.0)
    save_hf_model(other, tmp_path)  # now a single file
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    assert torch.equal(load_hf_model(tmp_path).model.norm.weight, other.model.norm.weight)
