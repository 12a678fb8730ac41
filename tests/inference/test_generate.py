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


def test_batched_generation_with_dca_matches_single_runs():
    """Left-padded rows with Dual Chunk Attention, prompt and answer over several DCA chunks: each
    row gets the tokens of the row generated alone, and of the obviously-correct loop."""
    config = dataclasses.replace(PRESETS["tiny"], max_position_embeddings=256, dual_chunk_attention_config={
        "chunk_size": 24, "local_size": 8, "original_max_position_embeddings": 24})
    m = Qwen2ForCausalLM(config)
    m.init_weights(seed=1)
    with torch.no_grad():
        m.lm_head.weight.mul_(20)
    m.eval()
    gen = torch.Generator().manual_seed(3)
    prompts = [torch.randint(0, 256, (n,), generator=gen).tolist() for n in (70, 33, 5)]
    params = SamplingParams(max_new_tokens=20)
    batched = run(m, prompts, params)
    assert batched == [run(m, [p], params)[0] for p in prompts]
    assert batched[1] == slow_greedy(m, prompts[1], 20)


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


# ---- TextStream: text, UTF-8 boundaries, stop strings, finish reasons (scripted model) ----

from stand_ins import ScriptedModel  # noqa: E402

from qwen2.inference import TextStream  # noqa: E402

IM_END = 258


def stream_of(tokenizer, text: str, params: SamplingParams, *, tail=(IM_END,), **model_kw) -> tuple[TextStream, list[str]]:
    script = list(text.encode("utf-8")) + list(tail)
    stream = TextStream(ScriptedModel(script, **model_kw), tokenizer, [1, 2, 3], params)
    return stream, list(stream)


def test_stream_stops_at_the_end_token_and_hides_it(byte_tokenizer):
    stream, chunks = stream_of(byte_tokenizer, "Hello world", SamplingParams(max_new_tokens=50))
    assert "".join(chunks) == stream.text == "Hello world"
    assert stream.finish_reason == "stop"
    assert stream.completion_ids == list(b"Hello world")


def test_stream_never_emits_half_a_character(byte_tokenizer):
    text = "你好, 世界 🙂!"
    stream, chunks = stream_of(byte_tokenizer, text, SamplingParams(max_new_tokens=80))
    assert "".join(chunks) == text
    assert all("\ufffd" not in c for c in chunks)
    assert len(chunks) > 5  # really streamed, one piece per complete character


def test_stop_string_across_tokens_is_never_emitted(byte_tokenizer):
    stream, chunks = stream_of(byte_tokenizer, "abc STOP def", SamplingParams(max_new_tokens=80, stop=("STOP",)))
    assert "".join(chunks) == stream.text == "abc "
    assert stream.finish_reason == "stop"
    assert not any("S" in c for c in chunks)


def test_earliest_of_several_stop_strings_wins(byte_tokenizer):
    stream, _ = stream_of(byte_tokenizer, "one\n\ntwo###", SamplingParams(max_new_tokens=80, stop=("###", "\n\n")))
    assert stream.text == "one"


def test_length_limit(byte_tokenizer):
    stream, chunks = stream_of(byte_tokenizer, "abcdefgh", SamplingParams(max_new_tokens=5))
    assert stream.text == "abcde" and stream.finish_reason == "length"


def test_config_eos_also_stops(byte_tokenizer):
    # A fine-tune whose config names its own eos id (here the byte "!" = 33) stops there too.
    stream, _ = stream_of(byte_tokenizer, "wow!more", SamplingParams(max_new_tokens=50), tail=(), eos_token_id=33)
    assert stream.text == "wow" and stream.finish_reason == "stop"


def test_a_stream_is_single_use(byte_tokenizer):
    stream, _ = stream_of(byte_tokenizer, "hi", SamplingParams(max_new_tokens=5))
    with pytest.raises(RuntimeError, match="only once"):
        list(stream)


def test_empty_prompts_are_refused(model):
    with pytest.raises(ValueError, match="no prompts"):
        next(generate_ids(model, [], SamplingParams()))
    with pytest.raises(ValueError, match="empty"):
        next(generate_ids(model, [[1, 2], []], SamplingParams()))


def test_repetition_penalty_counts_prompt_tokens_equal_to_the_pad_id():
    # The model prefers token 42 (logit 10, others 1). Row 0's prompt contains 42 and is left-padded
    # with pad_id=42: padding must not unmark it, so the penalty (10 -> 1e-5) must steer away.
    params = SamplingParams(max_new_tokens=1, repetition_penalty=1e6)
    rows = run(ScriptedModel([42], baseline=1.0), [[42, 9], [5, 6, 8, 9]], params, pad_id=42)
    assert rows[0][0] != 42 and rows[1][0] == 42


def test_int8_kv_cache_generation_follows_the_float_cache(model):
    prompt = [5, 17, 300, 42, 8]
    params = SamplingParams(max_new_tokens=10)
    assert run(model, [prompt], params, kv_cache_dtype="int8") == run(model, [prompt], params)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        run(model, [prompt], params, kv_cache_dtype="fp4")
