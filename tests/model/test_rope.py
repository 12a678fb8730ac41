"""YaRN: the frequencies and attention factor of transformers' (a version without the known
traps) for the Qwen2 configs, and the length-adaptive mode: plain RoPE below the original context,
the needed scale above it, fixed for a whole cached sequence."""

import dataclasses
import math

import pytest
import torch

from qwen2.config import PRESETS
from qwen2.model import KVCache, Qwen2ForCausalLM
from qwen2.model.rope import rope_parameters

QWEN_YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}  # the model cards' recipe


def _transformers_yarn(config):
    from transformers import Qwen2Config as HFConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    hf = HFConfig(**{k: v for k, v in config.to_dict().items() if k in (
        "hidden_size", "num_attention_heads", "num_key_value_heads", "max_position_embeddings", "rope_theta",
        "rope_scaling", "intermediate_size", "num_hidden_layers", "vocab_size")})
    return ROPE_INIT_FUNCTIONS["yarn"](hf, "cpu")


@pytest.mark.parametrize("preset", ["qwen2-0.5b", "qwen2-7b", "qwen2-72b", "qwen2.5-7b"])
@pytest.mark.parametrize("max_positions", [32768, 131072], ids=["instruct-config", "base-config"])
def test_yarn_equals_transformers_for_qwen2_configs(preset, max_positions):
    config = dataclasses.replace(PRESETS[preset], rope_scaling=dict(QWEN_YARN), max_position_embeddings=max_positions)
    inv_freq, attention_factor = rope_parameters(config)
    theirs, their_factor = _transformers_yarn(config)
    if abs(their_factor - (0.1 * math.log(4.0) + 1)) > 1e-9:
        pytest.skip("this transformers overwrites rope_scaling.factor (transformers#38224): not a reference")
    assert attention_factor == pytest.approx(their_factor, abs=1e-12) == pytest.approx(1.1386294361, abs=1e-9)
    torch.testing.assert_close(inv_freq, theirs.float(), atol=0, rtol=1e-6)
    # The correction range comes from original_max_position_embeddings, not max_position_embeddings
    # (the early-transformers trap): a base config with 131072 positions gives the same frequencies.
    same, _ = rope_parameters(dataclasses.replace(config, max_position_embeddings=32768))
    assert torch.equal(inv_freq, same)
    # d = 64: frequencies 0-10 kept, from 20 on divided by 4 (facts sheet: low = 11, high = 20)
    plain, _ = rope_parameters(dataclasses.replace(config, rope_scaling=None))
    C = config.dim_per_head
    low, high = (11, 20) if C == 64 else (23, 40)
    assert torch.equal(inv_freq[:low], plain[:low])
    torch.testing.assert_close(inv_freq[high:], plain[high:] / 4, atol=0, rtol=1e-6)


def _tiny(rope_scaling, seed=0):
    config = dataclasses.replace(PRESETS["tiny"], max_position_embeddings=512, rope_scaling=rope_scaling)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=seed)
    return model.eval()


ADAPTIVE = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64, "length_adaptive": True}


def test_length_adaptive_yarn_is_plain_rope_within_the_original_context():
    adaptive, plain = _tiny(ADAPTIVE), _tiny(None)
    ids = torch.randint(0, 256, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(adaptive(ids), plain(ids))
        cache = KVCache.allocate(adaptive.config, batch_size=2, max_seq_len=64)
        assert torch.equal(adaptive(ids[:, :40], kv_cache=cache), plain(ids[:, :40]))


@pytest.mark.parametrize("length,scale", [(200, 200 / 64), (400, 4.0)])
def test_length_adaptive_yarn_takes_the_scale_the_length_needs(length, scale):
    adaptive = _tiny(ADAPTIVE)
    static = _tiny({"rope_type": "yarn", "factor": scale, "original_max_position_embeddings": 64})  # same weights
    ids = torch.randint(0, 256, (1, length), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(adaptive(ids), static(ids), atol=1e-5, rtol=0)
        # with a cache the scale comes from the planned length, for the prefill and every step after it
        cache = KVCache.allocate(adaptive.config, batch_size=1, max_seq_len=length)
        steps = [adaptive(ids[:, :50], kv_cache=cache)] + [adaptive(ids[:, t:t + 1], kv_cache=cache)
                                                            for t in range(50, 60)]
        torch.testing.assert_close(torch.cat(steps, 1), static(ids[:, :60]), atol=1e-5, rtol=0)


def test_length_adaptive_is_validated():
    from qwen2.config import ConfigError

    with pytest.raises(ConfigError, match="length_adaptive"):
        _tiny({"rope_type": "linear", "factor": 2.0, "length_adaptive": True})
    with pytest.raises(ConfigError, match="length_adaptive"):
        _tiny(dict(ADAPTIVE, length_adaptive="yes"))
