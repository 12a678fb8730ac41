"""The batching engine against the reference generator: same tokens per request whatever the batch,
per-request sampling/stops/seeds, preemption, prefix reuse, cancellation and a bounded queue."""

import asyncio
import dataclasses

import pytest
import torch

from qwen2.config import PRESETS
from qwen2.inference import SamplingParams, generate_ids
from qwen2.inference.engine import Engine, EngineConfig, QueueFullError
from qwen2.inference.generate import ContextLengthError
from qwen2.model import Qwen2ForCausalLM

STOP_ID = 258  # <|im_end|> in the byte tokenizer


@pytest.fixture(scope="module")
def model() -> Qwen2ForCausalLM:
    config = dataclasses.replace(PRESETS["tiny"], eos_token_id=STOP_ID)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=0)
    return model.eval()


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return [torch.randint(0, 256, (int(torch.randint(3, 40, (1,), generator=gen)),), generator=gen).tolist()
            for _ in range(n)]


def _reference(model, prompt: list[int], params: SamplingParams) -> list[int]:
    out = []
    for (token,) in generate_ids(model, [prompt], params, stop_ids={STOP_ID}, num_valid_tokens=259):
        if token is None or token == STOP_ID:
            break
        out.append(token)
    return out


def _drain(engine: Engine) -> None:
    while engine._running or engine._waiting:
        engine.step()


@pytest.mark.parametrize("config", [EngineConfig(max_batch_size=4, block_size=8, prefill_chunk=16),
                                    EngineConfig(max_batch_size=3, block_size=4, kv_cache_tokens=64,
                                                 prefill_chunk=7)],  # small pool: forces preemption
                         ids=["roomy", "preempting"])
def test_concurrent_greedy_requests_match_the_reference(model, byte_tokenizer, config):
    prompts = _prompts(7)
    params = SamplingParams(max_new_tokens=12)
    engine = Engine(model, byte_tokenizer, config)
    handles = [engine.submit(p, params) for p in prompts]
    _drain(engine)
    for prompt, handle in zip(prompts, handles):
        text, ids, last = handle.result()
        assert ids == _reference(model, prompt, params) and ids
        assert last.prompt_tokens == len(prompt) and last.completion_tokens == len(ids)
        assert last.finish_reason in ("stop", "length")
        assert text == byte_tokenizer.decode(ids, skip_special=True)
    assert engine.pool.num_used == 0  # every block came back
    assert (engine.preemptions > 0) == (config.kv_cache_tokens < 100)


def test_seeded_sampling_is_independent_of_the_batch(model, byte_tokenizer):
    params = SamplingParams(temperature=0.9, top_p=0.9, top_k=40, max_new_tokens=10, seed=1234)
    prompt = _prompts(1, seed=5)[0]
    alone = Engine(model, byte_tokenizer, EngineConfig(block_size=8))
    handle = alone.submit(prompt, params)
    _drain(alone)
    crowd = Engine(model, byte_tokenizer, EngineConfig(block_size=8))
    others = [crowd.submit(p, dataclasses.replace(params, seed=i)) for i, p in enumerate(_prompts(4, seed=9))]
    in_batch = crowd.submit(prompt, params)
    _drain(crowd)
    assert in_batch.result()[1] == handle.result()[1]
    assert len({tuple(h.result()[1]) for h in others}) > 1


def test_stop_strings_stop_ids_and_lengths(model, byte_tokenizer):
    engine = Engine(model, byte_tokenizer, EngineConfig(block_size=8))
    prompt = _prompts(1, seed=2)[0]
    free = engine.submit(prompt, SamplingParams(max_new_tokens=20))
    _drain(engine)
    free_text, free_ids, last = free.result()
    assert last.finish_reason == "length" and len(free_ids) == 20
    stop = free_text[5:7]
    cut = engine.submit(prompt, SamplingParams(max_new_tokens=20, stop=(stop,)))
    _drain(engine)
    text, ids, last = cut.result()
    assert last.finish_reason == "stop" and text == free_text[:free_text.index(stop)]
    assert len(ids) < 20  # generation stopped at the match, not at max_new_tokens


def test_prefix_blocks_are_reused_and_give_the_same_tokens(model, byte_tokenizer):
    engine = Engine(model, byte_tokenizer, EngineConfig(block_size=4))
    system = list(range(40, 80))
    params = SamplingParams(max_new_tokens=6)
    first = engine.submit(system + [1, 2, 3], params)
    _drain(engine)
    assert engine.pool.num_cached >= 10  # the 40-token system prompt = 10 full blocks stay cached
    second = engine.submit(system + [9, 9], params)
    request = engine._waiting[0]
    engine._admit()
    assert request.num_computed == 40  # only the new suffix is prefilled
    _drain(engine)
    assert second.result()[1] == _reference(model, system + [9, 9], params)
    assert first.result()[1] == _reference(model, system + [1, 2, 3], params)


def test_cancel_frees_blocks_at_once(model, byte_tokenizer):
    engine = Engine(model, byte_tokenizer, EngineConfig(block_size=4, prefix_caching=False))
    handle = engine.submit(_prompts(1)[0], SamplingParams(max_new_tokens=1000))
    for _ in range(5):
        engine.step()
    assert engine.pool.num_used > 0
    handle.cancel()
    engine.step()
    assert engine.pool.num_used == 0 and not engine._running
    assert handle.result()[2].finish_reason == "cancelled"


def test_bounded_queue_and_bad_prompts(model, byte_tokenizer):
    engine = Engine(model, byte_tokenizer, EngineConfig(max_queue=2))
    engine.submit([1, 2], SamplingParams())
    engine.submit([1, 2], SamplingParams())
    with pytest.raises(QueueFullError):
        engine.submit([1, 2], SamplingParams())
    with pytest.raises(ContextLengthError, match="context"):
        engine.submit([1] * model.config.max_position_embeddings, SamplingParams())
    with pytest.raises(ValueError, match="empty"):
        engine.submit([], SamplingParams())
    with pytest.raises(ValueError, match="token ids"):
        engine.submit([model.config.vocab_size], SamplingParams())


def test_int8_kv_engine_stays_close_to_float(model, byte_tokenizer):
    prompts = _prompts(4, seed=3)
    params = SamplingParams(max_new_tokens=8)
    engine = Engine(model, byte_tokenizer, EngineConfig(block_size=8, kv_cache_dtype="int8"))
    handles = [engine.submit(p, params) for p in prompts]
    _drain(engine)
    agree = [h.result()[1] == _reference(model, p, params) for p, h in zip(prompts, handles)]
    assert sum(agree) >= 3  # int8 keys/values may flip a near-tie, not the whole output


def test_background_thread_with_async_consumers(model, byte_tokenizer):
    params = SamplingParams(max_new_tokens=8)
    prompts = _prompts(5, seed=7)

    async def consume(engine, prompt):
        ids = []
        async for out in engine.submit(prompt, params, loop=asyncio.get_running_loop()):
            ids += out.token_ids
        return ids

    async def main(engine):
        return await asyncio.gather(*(consume(engine, p) for p in prompts))

    with Engine(model, byte_tokenizer, EngineConfig(block_size=8)) as engine:
        results = asyncio.run(main(engine))
    assert results == [_reference(model, p, params) for p in prompts]


def test_a_request_longer_than_the_pool_ends_with_length(model, byte_tokenizer):
    engine = Engine(model, byte_tokenizer, EngineConfig(block_size=8, kv_cache_tokens=32))
    handle = engine.submit(_prompts(1)[0][:10], SamplingParams(max_new_tokens=100))
    for _ in range(200):  # bounded: it must not preempt itself forever
        if not (engine._running or engine._waiting):
            break
        engine.step()
    else:
        pytest.fail("the request never finished (it kept preempting itself)")
    _, ids, last = handle.result()
    assert last.finish_reason in ("length", "stop") and 10 + len(ids) <= 32


def test_dual_chunk_attention_in_the_paged_engine(byte_tokenizer):
    # Rows at different lengths in one batch, each past several DCA chunks: the engine's answers
    # equal the static-cache generator's, token for token.
    config = dataclasses.replace(PRESETS["tiny"], eos_token_id=STOP_ID, max_position_embeddings=512,
                                 dual_chunk_attention_config={"chunk_size": 32, "local_size": 8})
    dca_model = Qwen2ForCausalLM(config)
    dca_model.init_weights(seed=0)
    dca_model.eval()
    prompts = _prompts(5, seed=3)
    params = SamplingParams(max_new_tokens=30)
    engine = Engine(dca_model, byte_tokenizer, EngineConfig(max_batch_size=4, block_size=8, prefill_chunk=16))
    handles = [engine.submit(p, params) for p in prompts]
    _drain(engine)
    for prompt, handle in zip(prompts, handles):
        assert handle.result()[1] == _reference(dca_model, prompt, params)


def test_length_adaptive_yarn_in_the_paged_engine(byte_tokenizer):
    # Each sequence's RoPE scale follows its own planned length (prompt + max_new_tokens): rows of
    # different scales in one batch, and one prompt asked twice with different budgets, so prefix
    # blocks rotated at one scale must not be reused at another. Answers equal the static-cache
    # generator's (which plans the same length), token for token.
    config = dataclasses.replace(PRESETS["tiny"], eos_token_id=STOP_ID, max_position_embeddings=256,
                                 rope_scaling={"rope_type": "yarn", "factor": 4.0,
                                               "original_max_position_embeddings": 64, "length_adaptive": True})
    yarn_model = Qwen2ForCausalLM(config)
    yarn_model.init_weights(seed=0)
    yarn_model.eval()
    shared = _prompts(1, seed=5)[0] * 2  # long enough to fill whole blocks
    jobs = [(shared, 10), (shared, 150), (_prompts(1, seed=6)[0], 40), (_prompts(1, seed=7)[0], 120)]
    engine = Engine(yarn_model, byte_tokenizer, EngineConfig(max_batch_size=4, block_size=8, prefill_chunk=16))
    first = engine.submit(jobs[0][0], SamplingParams(max_new_tokens=jobs[0][1]))
    _drain(engine)  # its blocks are cached (at scale 1) before the longer request with the same prompt
    again = engine.submit(shared, SamplingParams(max_new_tokens=jobs[0][1]))
    _drain(engine)
    assert engine.prefix_tokens_reused > 0  # the same plan reuses the prefix...
    reused = engine.prefix_tokens_reused
    handles = [first] + [engine.submit(p, SamplingParams(max_new_tokens=n)) for p, n in jobs[1:]]
    _drain(engine)
    assert engine.prefix_tokens_reused == reused  # ...another scale does not
    answers = [handle.result()[1] for handle in [again] + handles]  # (a handle's result is read once)
    assert answers[0] == answers[1]
    for (prompt, n), answer in zip(jobs, answers[1:]):
        assert answer == _reference(yarn_model, prompt, SamplingParams(max_new_tokens=n))
