"""Sampling warpers against their definitions, and against transformers' logits processors."""

import math

import pytest
import torch

from qwen2.inference.sampling import SamplingParams, apply_repetition_penalty, filter_logits, sample_next_token

transformers = pytest.importorskip("transformers")


def test_greedy_is_argmax():
    logits = torch.randn(3, 50, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sample_next_token(logits, SamplingParams()), logits.argmax(-1))


@pytest.mark.parametrize("kwargs,processor", [
    ({"top_k": 5}, lambda: transformers.TopKLogitsWarper(5)),
    ({"top_p": 0.7}, lambda: transformers.TopPLogitsWarper(0.7)),
    ({"min_p": 0.1}, lambda: transformers.MinPLogitsWarper(0.1)),
])
def test_filters_keep_the_same_tokens_as_transformers(kwargs, processor):
    logits = torch.randn(4, 100, generator=torch.Generator().manual_seed(1)) * 3
    ours = filter_logits(logits, **kwargs)
    theirs = processor()(torch.zeros(4, 1, dtype=torch.long), logits.clone())
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))


def test_repetition_penalty_matches_transformers():
    logits = torch.randn(2, 30, generator=torch.Generator().manual_seed(2))
    prev = torch.tensor([[1, 5, 5, 7], [2, 3, 29, 0]])
    seen = torch.zeros(2, 30, dtype=torch.bool).scatter_(1, prev, True)
    theirs = transformers.RepetitionPenaltyLogitsProcessor(1.3)(prev, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits, seen, 1.3), theirs)


def test_seeded_sampling_is_reproducible_and_follows_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2, 0.0]]))
    params = SamplingParams(temperature=1.0)
    draws = [int(sample_next_token(logits, params, generator=torch.Generator().manual_seed(s))) for s in range(2000)]
    again = [int(sample_next_token(logits, params, generator=torch.Generator().manual_seed(s))) for s in range(2000)]
    assert draws == again
    assert 3 not in draws  # zero probability is never drawn
    assert abs(draws.count(0) / 2000 - 0.5) < 0.05


def test_top_p_always_keeps_the_best_token():
    logits = torch.tensor([[10.0, 0.0, 0.0]])
    assert not math.isinf(filter_logits(logits, top_p=0.01)[0, 0])


def test_generation_config_defaults_and_overrides():
    gc = {"do_sample": True, "temperature": 0.7, "top_p": 0.8, "top_k": 20, "repetition_penalty": 1.05}
    params = SamplingParams.from_generation_config(gc, temperature=None, seed=3)
    assert (params.temperature, params.top_p, params.top_k, params.repetition_penalty, params.seed) == (0.7, 0.8, 20, 1.05, 3)
    assert SamplingParams.from_generation_config({"do_sample": False, "temperature": 0.7}).greedy
    assert SamplingParams.from_generation_config(gc, temperature=0.0).greedy
    # transformers' default top_k (50) applies when a sampling config does not name one
    assert SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.7}).top_k == 50


@pytest.mark.parametrize("gc,field", [({"do_sample": "false"}, "do_sample"),
                                      ({"do_sample": True, "top_p": "0.8"}, "top_p"),
                                      ({"repetition_penalty": "x"}, "repetition_penalty")])
def test_malformed_generation_config_is_named(gc, field):
    with pytest.raises(ValueError, match=f"generation_config.*{field}"):
        SamplingParams.from_generation_config(gc)


@pytest.mark.parametrize("kwargs", [{"temperature": -1}, {"top_p": 0}, {"top_p": 1.5}, {"top_k": -2},
                                    {"min_p": 1.0}, {"max_new_tokens": -1}, {"repetition_penalty": 0},
                                    {"stop": ("",)}])
def test_invalid_parameters_are_named(kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        SamplingParams(**kwargs)


@pytest.mark.parametrize("kwargs", [
    dict(top_k=20), dict(top_k=20, top_p=0.8), dict(top_k=20, top_p=0.8, min_p=0.05), dict(top_p=0.9),
    dict(top_p=0.5, min_p=0.1), dict(min_p=0.2), dict(top_k=5000, top_p=0.95),
])
def test_candidate_distribution_equals_the_full_vocabulary_filters(kwargs):
    from qwen2.inference.sampling import candidate_distribution

    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5000, generator=gen) * 4  # peaked enough for the nucleus to fit in the candidates
    params = SamplingParams(temperature=0.7, **kwargs)
    probs, ids = candidate_distribution(logits, params)
    dense = torch.zeros_like(logits).scatter(-1, ids, probs)
    expected = filter_logits(logits / 0.7, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p).softmax(-1)
    torch.testing.assert_close(dense, expected, atol=1e-6, rtol=1e-5)


def test_flat_distributions_fall_back_to_the_full_sort():
    from qwen2.inference.sampling import candidate_distribution

    flat = torch.zeros(1, 5000)  # the nucleus of top_p=0.9 is 4500 tokens: more than the candidates
    assert candidate_distribution(flat, SamplingParams(temperature=1.0, top_p=0.9)) is None
    token = sample_next_token(flat, SamplingParams(temperature=1.0, top_p=0.9), generator=torch.Generator().manual_seed(0))
    assert 0 <= int(token) < 5000
