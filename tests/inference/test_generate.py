"""The reference generator on a tiny random model: cached decoding, batching, stops, limits."""

import dataclasses

import pytest
import torch

from qwen2.config import PRESETS
from qwen2.inference import ContextLengthError, SamplingParams, generate_ids
from qwen2.model import Qwen2ForCausalLM


@pytest.fixture(scope="module")
def model():
    m = Qwen2ForCausalLM(dataclasses.replace(PRESETS["tiny"], max_position_embeddings=64))
    m.init_weights(seed=0)
    # Sharpen the random model so greedy choices are not near-ties.
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    return m.eval()


def run(model, prompts, params, **kw):
    rows = [[] for _ in prompts]
    for step in generate_ids(model, prompts, params, **kw):
        for row, token in enumerate(step):
            if token is not None:
                rows[row].append(token)
    return rows


def slow_greedy(model, prompt, n):
    """No cache, full forward every step: the obviously-correct reference."""
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    return ids[len(prompt):]


def test_cached_greedy_equals_full_forward_loop(model):
    prompt = [5, 17, 300, 42, 8]
    assert run(model, [prompt], SamplingParams(max_new_tokens=20)) == [slow_greedy(model, prompt, 20)]


def test_batched_prompts_of_different_lengths_match_single_runs(model):
    prompts = [[3, 4, 5], [10, 11, 12, 13, 14, 15, 16, 17], [200]]
    params = SamplingParams(max_new_tokens=12)
    assert run(model, prompts, params) == [run(model, [p], params)[0] for p in prompts]


def test_greedy_matches_transformers_generate(model):
    transformers = pytest.importorskip("transformers")
    hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**model.config.to_dict())).eval()
    hf.load_state_dict(model.state_dict(), strict=False)
    prompt = [7, 8, 9, 10]
    out = hf.generate(torch.tensor([prompt]), max_new_tokens=15, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert run(model, [prompt], SamplingParams(max_new_tokens=15)) == [out[0, len(prompt):].tolist()]


def test_stop_ids_end_a_row_and_are_yielded(model):
    prompt = [5, 17, 300, 42, 8]
    free = run(model, [prompt], SamplingParams(max_new_tokens=10))[0]
    stop = free[3]
    stopped = run(model, [prompt], SamplingParams(max_new_tokens=10), stop_ids={stop})[0]
    assert stopped == free[:free.index(stop) + 1]


def test_caller_can_end_a_row_early(model):
    done = [False, False]
    rows = [[], []]
    for step, tokens in enumerate(generate_ids(model, [[1, 2], [3, 4]], SamplingParams(max_new_tokens=8), done=done)):
        for r, t in enumerate(tokens):
            if t is not None:
                rows[r].append(t)
        if step == 2:
            done[0] = True
    assert len(rows[0]) == 3 and len(rows[1]) == 8


def test_seeded_sampling_is_reproducible(model):
    params = SamplingParams(temperature=1.0, top_p=0.9, max_new_tokens=10, seed=123)
    assert run(model, [[1, 2, 3]], params) == run(model, [[1, 2, 3]], params)


def test_context_limits(model):
    with pytest.raises(ContextLengthError, match="64 tokens"):
        run(model, [list(range(64))], SamplingParams(max_new_tokens=1))
    # A prompt that fits but leaves less room than asked stops at the context end.
    assert len(run(model, [list(range(60))], SamplingParams(max_new_tokens=10))[0]) == 4


def test_padding_rows_of_the_embedding_are_never_sampled(model):
    # Make the last 12 rows (padding rows in a real Qwen2 embedding) the most likely by far.
    with torch.no_grad():
        model.lm_head.weight[500:] += 5 * model.lm_head.weight[:12].abs().max()
    try:
        params = SamplingParams(temperature=1.5, max_new_tokens=20, seed=0)
        free = run(model, [[1, 2, 3]], params)[0]
        limited = run(model, [[1, 2, 3]], params, num_valid_tokens=500)[0]
    finally:
        with torch.no_grad():
            model.lm_head.weight[500:] -= 5 * model.lm_head.weight[:12].abs().max()
    assert any(t >= 500 for t in free)  # the test can fail: without the limit they are sampled
    assert all(t < 500 for t in limited)
