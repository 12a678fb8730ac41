"""GGUF import on small files written with gguf's own writer: names, config, dequantization, bad files."""

import dataclasses

import numpy as np
import pytest
import torch

from qwen2.checkpoint import CheckpointError
from qwen2.checkpoint.gguf import GGUFFile, hf_name, load_gguf_model
from qwen2.config import PRESETS
from qwen2.model import Qwen2ForCausalLM

gguf = pytest.importorskip("gguf")

_TO_GGUF = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}


def gguf_name(name: str) -> str:
    """Written independently of the loader's table: the llama.cpp names for our parameters."""
    if name.startswith("model.layers."):
        _, _, layer, rest = name.split(".", 3)
        module, kind = rest.rsplit(".", 1)
        return f"blk.{layer}.{_TO_GGUF[module]}.{kind}"
    return {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
            "lm_head.weight": "output.weight"}[name]


def write_gguf(path, model, *, quant=None, arch="qwen2", skip=()):
    config = model.config
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_eos_token_id(1)
    expected = {}
    for name, tensor in model.state_dict().items():
        if name in skip or (name == "lm_head.weight" and config.tie_word_embeddings):
            continue
        array = tensor.detach().numpy().astype(np.float32)
        if quant is not None and array.ndim == 2:
            data = gguf.quants.quantize(array, quant)
            writer.add_tensor(gguf_name(name), data, raw_dtype=quant)
            expected[name] = torch.from_numpy(gguf.quants.dequantize(data, quant))
        else:
            writer.add_tensor(gguf_name(name), array)
            expected[name] = tensor.detach()
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@pytest.fixture
def tiny():
    m = Qwen2ForCausalLM(dataclasses.replace(PRESETS["tiny"], vocab_size=256))
    m.init_weights(seed=0)
    return m.eval()


def test_float_gguf_loads_exactly(tmp_path, tiny):
    write_gguf(tmp_path / "m.gguf", tiny)
    loaded = load_gguf_model(tmp_path / "m.gguf")
    assert loaded.config.tie_word_embeddings  # no output.weight in the file
    ids = torch.randint(0, 256, (1, 9))
    with torch.no_grad():
        assert torch.equal(loaded(ids), tiny(ids))


# gguf's Python writer cannot produce k-quants (Q4_K, Q6_K); those are covered by the real demo
# file, whose logits match transformers' dequantization exactly (tests/real).
@pytest.mark.parametrize("quant", ["Q8_0", "Q5_0", "Q4_0"])
def test_quantized_tensors_dequantize_to_gguf_reference(tmp_path, tiny, quant):
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    expected = write_gguf(tmp_path / "m.gguf", tiny, quant=qtype)
    loaded = load_gguf_model(tmp_path / "m.gguf").state_dict()
    for name, tensor in expected.items():
        assert torch.equal(loaded[name], tensor), name
    # and the quantization error itself is small: the file really holds these weights
    w = tiny.model.layers[0].mlp.up_proj.weight
    assert (loaded["model.layers.0.mlp.up_proj.weight"] - w).abs().max() < 0.1 * w.abs().max()


def test_untied_head_when_output_tensor_present(tmp_path):
    m = Qwen2ForCausalLM(dataclasses.replace(PRESETS["tiny-mha-untied"], vocab_size=256))
    m.init_weights(seed=1)
    write_gguf(tmp_path / "m.gguf", m)
    loaded = load_gguf_model(tmp_path / "m.gguf")
    assert not loaded.config.tie_word_embeddings
    assert torch.equal(loaded.lm_head.weight, m.lm_head.weight)


def test_name_table():
    assert hf_name("blk.3.attn_output.weight") == "model.layers.3.self_attn.o_proj.weight"
    assert hf_name("blk.0.attn_q.bias") == "model.layers.0.self_attn.q_proj.bias"
    assert hf_name("output_norm.weight") == "model.norm.weight"
    assert hf_name("blk.0.ffn_gate_exps.weight") is None


def test_missing_tensor_is_named(tmp_path, tiny):
    write_gguf(tmp_path / "m.gguf", tiny, skip={"model.layers.1.self_attn.v_proj.bias"})
    with pytest.raises(CheckpointError, match="model.layers.1.self_attn.v_proj.bias"):
        load_gguf_model(tmp_path / "m.gguf")


def test_wrong_architecture_is_refused(tmp_path, tiny):
    write_gguf(tmp_path / "m.gguf", tiny, arch="llama")
    with pytest.raises(CheckpointError, match="architecture is 'llama'"):
        GGUFFile(tmp_path / "m.gguf")


@pytest.mark.parametrize("cut", [10, 200, -100])
def test_truncated_or_garbage_files_get_one_clear_error(tmp_path, tiny, cut):
    write_gguf(tmp_path / "m.gguf", tiny)
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "bad.gguf").write_bytes(data[:cut])
    with pytest.raises(CheckpointError, match="bad.gguf"):
        load_gguf_model(tmp_path / "bad.gguf")


def test_not_a_gguf_and_missing_file(tmp_path):
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + b"\x00" * 100)
    with pytest.raises(CheckpointError, match="not a valid GGUF"):
        GGUFFile(tmp_path / "x.gguf")
    with pytest.raises(CheckpointError, match="not found"):
        GGUFFile(tmp_path / "nope.gguf")


def test_fuzzed_headers_never_escape_as_other_errors(tmp_path, tiny):
    write_gguf(tmp_path / "m.gguf", tiny)
    data = bytearray((tmp_path / "m.gguf").read_bytes())
    rng = np.random.default_rng(0)
    for trial in range(40):
        mutated = bytearray(data)
        for pos in rng.integers(4, 600, size=4):
            mutated[pos] = int(rng.integers(0, 256))
        path = tmp_path / f"f{trial}.gguf"
        path.write_bytes(bytes(mutated))
        try:
            load_gguf_model(path)
        except CheckpointError:
            pass  # the only acceptable failure


def _header(*kv_bytes: bytes, num_tensors: int = 0) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", 3, num_tensors, len(kv_bytes)) + b"".join(kv_bytes)


def _kv_string(key: str, value: str) -> bytes:
    import struct

    k, v = key.encode(), value.encode()
    return struct.pack("<Q", len(k)) + k + struct.pack("<I", 8) + struct.pack("<Q", len(v)) + v


@pytest.mark.parametrize("payload,message", [
    # an array claiming 2^60 uint32 elements: refused before any loop or allocation
    (lambda s: _header(_kv_string("general.architecture", "qwen2"),
                       struct_pack("<Q", 3) + b"arr" + struct_pack("<IIQ", 9, 4, 1 << 60)), "file ends inside"),
    # a string claiming 2^62 bytes
    (lambda s: _header(struct_pack("<Q", 1 << 62) + b"k"), "file ends inside"),
    # a tensor whose data lies past the end of the file
    (lambda s: _header(_kv_string("general.architecture", "qwen2"), num_tensors=1) + struct_pack("<Q", 17)
     + b"token_embd.weight" + struct_pack("<IQQIQ", 2, 64, 1 << 20, 0, 0), "beyond the end of the file"),
    # an unknown tensor type
    (lambda s: _header(_kv_string("general.architecture", "qwen2"), num_tensors=1) + struct_pack("<Q", 1)
     + b"x" + struct_pack("<IQI Q", 1, 32, 999, 0), "unknown type 999"),
    (lambda s: b"GGUF" + b"\x01\x00\x00\x00", "version 1"),
])
def test_hostile_headers_fail_fast_with_a_named_error(tmp_path, payload, message):
    # The message shows the check fired on the header itself, before any loop over the claimed count.
    path = tmp_path / "evil.gguf"
    path.write_bytes(payload(None))
    with pytest.raises(CheckpointError, match=message):
        GGUFFile(path)


def struct_pack(fmt: str, *values) -> bytes:
    import struct

    return struct.pack(fmt.replace(" ", ""), *values)
