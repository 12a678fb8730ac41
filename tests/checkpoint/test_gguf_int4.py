"""A GGUF's 4-bit blocks (Q4_0, Q4_1, Q4_K) go into int4 layers exactly, not rounded a second time."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from qwen2.checkpoint.gguf import GGUFFile, load_gguf_model
from qwen2.checkpoint.gguf_int4 import BLOCK_BYTES, BLOCK_WEIGHTS, decode_int4_blocks
from qwen2.config import PRESETS
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.gptq import GPTQConfig, gptq_quantize_model
from qwen2.model.quant import Int4Linear, QuantConfig, dequantize_weight
from test_gguf import gguf_name

gguf = pytest.importorskip("gguf")
INT4_32 = QuantConfig("int4", group_size=32)


def random_blocks(qtype: int, rows: int, cols: int, seed: int) -> np.ndarray:
    """Raw blocks (rows, bytes per row) with random codes and small positive f16 scales, as a
    quantizer would write (every byte pattern of the codes is legal)."""
    rng = np.random.default_rng(seed)
    n_blocks = rows * cols // BLOCK_WEIGHTS[qtype]
    raw = rng.integers(0, 256, size=(n_blocks, BLOCK_BYTES[qtype]), dtype=np.uint8)
    headers = {2: 1, 3: 2, 12: 2}[qtype]  # f16 fields at the start: d (Q4_0); d, m (Q4_1); d, dmin (Q4_K)
    values = rng.uniform(-0.02, 0.02, size=(n_blocks, headers)).astype(np.float16)
    if qtype != 3:
        values = np.abs(values)
    raw[:, :2 * headers] = values.view(np.uint8).reshape(n_blocks, 2 * headers)
    return raw.reshape(rows, -1)


@pytest.mark.parametrize("qtype", ["Q4_0", "Q4_1", "Q4_K"])
def test_decoded_blocks_equal_ggufs_own_dequantization(qtype):
    t = getattr(gguf.GGMLQuantizationType, qtype)
    raw = random_blocks(int(t), rows=12, cols=512, seed=int(t))
    tensors = decode_int4_blocks(raw, int(t), 512)
    assert tensors["qweight"].shape == (12, 256) and tensors["scales"].shape == (12, 16)
    assert torch.equal(dequantize_weight(tensors, INT4_32), torch.from_numpy(gguf.quants.dequantize(raw, t)))


def write_q4k_model(path, config):
    """A GGUF whose linear weights are random Q4_K blocks (gguf's writer cannot quantize to k-quants,
    but stores raw blocks); returns the float weights they stand for."""
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=0)
    writer = gguf.GGUFWriter(str(path), "qwen2")
    for add, value in [(writer.add_block_count, config.num_hidden_layers),
                       (writer.add_context_length, config.max_position_embeddings),
                       (writer.add_embedding_length, config.hidden_size),
                       (writer.add_feed_forward_length, config.intermediate_size),
                       (writer.add_head_count, config.num_attention_heads),
                       (writer.add_head_count_kv, config.num_key_value_heads),
                       (writer.add_rope_freq_base, config.rope_theta),
                       (writer.add_layer_norm_rms_eps, config.rms_norm_eps), (writer.add_eos_token_id, 1)]:
        add(value)
    floats = {}
    for i, (name, tensor) in enumerate(model.state_dict().items()):
        if name.startswith("model.layers.") and name.endswith("proj.weight"):
            rows, cols = tensor.shape
            raw = random_blocks(int(gguf.GGMLQuantizationType.Q4_K), rows, cols, seed=i)
            writer.add_tensor(gguf_name(name), raw, raw_dtype=gguf.GGMLQuantizationType.Q4_K)
            floats[name.removesuffix(".weight")] = torch.from_numpy(
                gguf.quants.dequantize(raw, gguf.GGMLQuantizationType.Q4_K))
        else:
            writer.add_tensor(gguf_name(name), tensor.numpy())
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return floats


@pytest.fixture(scope="module")
def q4k_file(tmp_path_factory):
    config = dataclasses.replace(PRESETS["tiny"], vocab_size=256, hidden_size=256, intermediate_size=512,
                                 num_hidden_layers=1, max_window_layers=1)
    path = tmp_path_factory.mktemp("q4k") / "m.gguf"
    return path, write_q4k_model(path, config)


def layer_error(layer: nn.Module, weight: torch.Tensor) -> float:
    x = torch.randn(8, weight.shape[1], generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    return float((layer(x).float() - x.float() @ weight.t()).abs().max() / (x.float() @ weight.t()).abs().max())


def test_int4_load_takes_the_blocks_as_they_are(q4k_file):
    path, floats = q4k_file
    exact = load_gguf_model(path, dtype=torch.bfloat16, quant=INT4_32)
    rounded = load_gguf_model(path, dtype=torch.bfloat16, quant=QuantConfig("int4", group_size=64))  # no exact path
    name = "model.layers.0.mlp.down_proj"
    assert isinstance(exact.get_submodule(name), Int4Linear)
    # exact: only bf16 rounding of scales and activations; requantized: a new grid per group
    exact_error, rounded_error = layer_error(exact.get_submodule(name), floats[name]), \
        layer_error(rounded.get_submodule(name), floats[name])
    assert exact_error < 0.01 and exact_error < rounded_error / 5, (exact_error, rounded_error)
    for tensors in (GGUFFile(path).int4_tensors(f"{name}.weight", 32),):
        assert torch.equal(dequantize_weight(tensors, INT4_32), floats[name])
    assert GGUFFile(path).int4_tensors("model.layers.0.input_layernorm.weight", 32) is None  # float in the file


def test_gptq_keeps_given_int4_tensors_and_calibrates_the_rest(q4k_file):
    path, floats = q4k_file
    model = load_gguf_model(path)  # float32, the weights GPTQ would round
    f = GGUFFile(path)
    exact = {"model.layers.0.mlp.down_proj": f.int4_tensors("model.layers.0.mlp.down_proj.weight", 32)}
    ids = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))
    result = gptq_quantize_model(model, ids, QuantConfig("int4", include_lm_head=False), GPTQConfig(batch_size=4),
                                 exact=exact)
    assert all(torch.equal(result.tensors["model.layers.0.mlp.down_proj"][k], v)
               for k, v in exact["model.layers.0.mlp.down_proj"].items())
    assert result.relative_errors["model.layers.0.mlp.down_proj"] < 1e-10
    # the others were calibrated as usual (their random Q4_K codes span each group, so GPTQ's min-max
    # grid is close to the file's)
    assert set(result.tensors) == {n for n, m in model.named_modules() if isinstance(m, nn.Linear) and n != "lm_head"}
    assert all(result.relative_errors[n] < 1e-2 for n in result.tensors)
