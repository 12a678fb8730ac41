"""Perplexity against a direct computation, and its edge cases."""

import math

import pytest
import torch
import torch.nn.functional as F

from qwen2.config import PRESETS
from qwen2.eval.perplexity import greedy_agreement, perplexity
from qwen2.model import Qwen2ForCausalLM


@pytest.fixture(scope="module")
def model():
    m = Qwen2ForCausalLM(PRESETS["tiny"])
    m.init_weights(seed=0)
    return m.eval()


def test_matches_a_direct_cross_entropy(model):
    ids = torch.randint(0, 512, (50,), generator=torch.Generator().manual_seed(0)).tolist()
    result = perplexity(model, ids, seq_len=20)  # windows of 20, 20, 10 tokens
    with torch.no_grad():
        nll = sum(F.cross_entropy(model(torch.tensor([w]))[0, :-1], torch.tensor(w[1:]), reduction="sum").item()
                  for w in (ids[0:20], ids[20:40], ids[40:50]))
    assert result.num_tokens == 19 + 19 + 9
    assert result.perplexity == pytest.approx(math.exp(nll / 47), rel=1e-5)
    assert greedy_agreement(result, result) == 1.0


def test_uniform_model_has_perplexity_equal_to_vocab_size(model):
    class Uniform(torch.nn.Module):
        device = torch.device("cpu")

        def forward(self, ids):
            return torch.zeros(*ids.shape, 512)

    assert perplexity(Uniform(), list(range(100)), seq_len=32).perplexity == pytest.approx(512, rel=1e-5)


def test_too_short_inputs(model):
    with pytest.raises(ValueError, match="at least 2 tokens"):
        perplexity(model, [5])
    with pytest.raises(ValueError, match="seq_len"):
        perplexity(model, [1, 2, 3], seq_len=1)


def test_cached_evaluation_equals_plain_forward(model):
    ids = torch.randint(0, 512, (100,), generator=torch.Generator().manual_seed(1)).tolist()
    plain = perplexity(model, ids, seq_len=50)
    cached = perplexity(model, ids, seq_len=50, kv_cache_dtype="auto", chunk=16)
    assert cached.perplexity == pytest.approx(plain.perplexity, rel=1e-5)
    int8 = perplexity(model, ids, seq_len=50, kv_cache_dtype="int8", chunk=16)
    assert int8.perplexity == pytest.approx(plain.perplexity, rel=0.01)
