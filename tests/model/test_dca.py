"""Dual Chunk Attention: plain attention within the trained context, the paper's definition on
several chunks, and the same answer whether a sequence comes whole, in prefill chunks or token by
token through the cache."""

import pytest
import torch
import torch.nn.functional as F

from qwen2.model.dca import DCAConfig, dca_attention, dca_reference, rotate_keys, rotate_queries
from qwen2.model.rope import apply_rope, default_inv_freq, rope_cos_sin

B, H, K, C = 2, 4, 2, 32
INV_FREQ = default_inv_freq(C, 10000.0)


def _qkv(T, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(B, n, T, C, generator=gen).to(dtype) for n in (H, K, K)]


def _dca(q, k, v, dca, start=0):
    """DCA over a whole sequence of unrotated q/k (keys rotated as a cache would hold them)."""
    return dca_attention(rotate_queries(q, start, dca, INV_FREQ), rotate_keys(k, 0, dca, INV_FREQ), v, dca)


@pytest.mark.parametrize("T", [40, 48, 64])
def test_equals_plain_attention_within_the_trained_context(T):
    # chunk_len 48: T = 40 is one DCA chunk; 48 < T <= 64 = chunk_size spans two, still exact
    dca = DCAConfig(chunk_size=64, local_size=16, original_max_position_embeddings=64)
    q, k, v = _qkv(T)
    cos, sin = rope_cos_sin(torch.arange(T)[None], INV_FREQ, 1.0, torch.float32)
    expected = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True,
                                              enable_gqa=True)
    torch.testing.assert_close(_dca(q, k, v, dca), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("T,original", [(200, 0), (200, 64), (97, 64)])
def test_matches_the_paper_definition_over_many_chunks(T, original):
    dca = DCAConfig(chunk_size=64, local_size=16, original_max_position_embeddings=original)
    q, k, v = _qkv(T, seed=1)
    torch.testing.assert_close(_dca(q, k, v, dca), dca_reference(q, k, v, dca, INV_FREQ), atol=1e-5, rtol=1e-5)
    # and it is not plain attention any more (the test would not notice a no-op)
    cos, sin = rope_cos_sin(torch.arange(T)[None], INV_FREQ, 1.0, torch.float32)
    plain = F.scaled_dot_product_attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, is_causal=True,
                                           enable_gqa=True)
    assert (plain - _dca(q, k, v, dca)).abs().max() > 1e-2


def test_prefill_chunks_and_decode_steps_equal_one_prefill():
    dca = DCAConfig(chunk_size=64, local_size=16)  # no temperature: every prefix has the same scale
    T = 150
    q, k, v = _qkv(T, seed=2)
    whole = _dca(q, k, v, dca)
    keys = rotate_keys(k, 0, dca, INV_FREQ)  # what the cache holds
    for start, end in [(0, 37), (37, 96), (96, 97), (97, 150)]:  # uneven prefill chunks, then steps
        out = dca_attention(rotate_queries(q[:, :, start:end], start, dca, INV_FREQ), keys[:, :, :end],
                            v[:, :, :end], dca)
        torch.testing.assert_close(out, whole[:, :, start:end], atol=1e-5, rtol=1e-5)
    for t in range(100, T):  # decode: one query at a time against the cached keys
        out = dca_attention(rotate_queries(q[:, :, t:t + 1], t, dca, INV_FREQ), keys[:, :, :t + 1], v[:, :, :t + 1], dca)
        torch.testing.assert_close(out, whole[:, :, t:t + 1], atol=1e-5, rtol=1e-5)


def test_decode_with_temperature_equals_a_prefill_of_the_same_length():
    # YaRN's temperature follows the real length: a step at position t scores like a prefill of t + 1
    dca = DCAConfig(chunk_size=64, local_size=16, original_max_position_embeddings=32)
    q, k, v = _qkv(130, seed=3)
    keys = rotate_keys(k, 0, dca, INV_FREQ)
    for t in (40, 90, 129):
        step = dca_attention(rotate_queries(q[:, :, t:t + 1], t, dca, INV_FREQ), keys[:, :, :t + 1], v[:, :, :t + 1], dca)
        prefill = dca_reference(q[:, :, :t + 1], k[:, :, :t + 1], v[:, :, :t + 1], dca, INV_FREQ)[:, :, -1:]
        torch.testing.assert_close(step, prefill, atol=1e-5, rtol=1e-5)


def test_bf16_stays_close_to_the_float32_reference():
    dca = DCAConfig(chunk_size=64, local_size=16, original_max_position_embeddings=64)
    q, k, v = _qkv(180, seed=4)
    reference = dca_reference(q, k, v, dca, INV_FREQ)
    got = _dca(*(x.bfloat16() for x in (q, k, v)), dca)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), reference, atol=3e-2, rtol=3e-2)


def test_bad_configs_and_missing_keys_are_named():
    with pytest.raises(ValueError, match="local_size < chunk_size"):
        DCAConfig(chunk_size=64, local_size=64)
    dca = DCAConfig(chunk_size=64, local_size=16)
    q, k, v = _qkv(10)
    with pytest.raises(ValueError, match="keys of every position"):
        dca_attention(rotate_queries(q, 5, dca, INV_FREQ), rotate_keys(k, 0, dca, INV_FREQ), v, dca)


def _tiny(dca_config=None, seed=0):
    import dataclasses

    from qwen2.config import PRESETS
    from qwen2.model import Qwen2ForCausalLM

    config = dataclasses.replace(PRESETS["tiny"], max_position_embeddings=64, dual_chunk_attention_config=dca_config)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=seed)
    return model.eval()


def test_a_model_with_dca_is_the_plain_model_within_chunk_size():
    ids = torch.randint(0, 256, (2, 60), generator=torch.Generator().manual_seed(5))
    plain, with_dca = _tiny(), _tiny({"chunk_size": 64, "local_size": 16, "original_max_position_embeddings": 64})
    with torch.no_grad():
        torch.testing.assert_close(with_dca(ids), plain(ids), atol=1e-5, rtol=1e-5)


def test_model_decode_through_the_cache_equals_a_full_prefill_past_the_context():
    from qwen2.model import KVCache

    model = _tiny({"chunk_size": 32, "local_size": 8, "original_max_position_embeddings": 32})
    ids = torch.randint(0, 256, (2, 150), generator=torch.Generator().manual_seed(6))  # ~5x chunk_size
    with torch.no_grad():
        cache = KVCache.allocate(model.config, batch_size=2, max_seq_len=150)
        steps = [model(ids[:, :100], kv_cache=cache, logits_to_keep=1)]
        steps += [model(ids[:, t:t + 1], kv_cache=cache) for t in range(100, 150)]
        for t, logits in zip(range(99, 150), steps):
            full = model(ids[:, :t + 1], logits_to_keep=1)  # a prefill of the same length (same temperature)
            torch.testing.assert_close(logits[:, -1], full[:, -1], atol=1e-4, rtol=1e-4)


def test_padded_batches_give_each_row_its_own_logits():
    """Left padding (batched generation: prefill, then decode through the cache) and right padding
    (scoring), rows several DCA chunks long: every token's logits equal the row run alone."""
    from qwen2.model import KVCache

    model = _tiny({"chunk_size": 32, "local_size": 8, "original_max_position_embeddings": 32})
    gen = torch.Generator().manual_seed(7)
    rows = [torch.randint(0, 256, (n,), generator=gen) for n in (90, 61, 37)]
    longest, steps = 90, 12
    with torch.no_grad():
        ids = torch.zeros(3, longest, dtype=torch.long)
        mask = torch.zeros(3, longest + steps, dtype=torch.long)
        for b, row in enumerate(rows):
            ids[b, longest - len(row):] = row
            mask[b, longest - len(row):] = 1
        mask[:, longest:] = 1
        cache = KVCache.allocate(model.config, batch_size=3, max_seq_len=longest + steps)
        got = [model(ids, attention_mask_BS=mask[:, :longest], kv_cache=cache, logits_to_keep=1)[:, -1]]
        nxt = torch.randint(0, 256, (3, steps), generator=gen)
        for t in range(steps - 1):
            got.append(model(nxt[:, t:t + 1], attention_mask_BS=mask[:, :cache.length + 1], kv_cache=cache)[:, -1])
        for b, row in enumerate(rows):
            sequence = torch.cat([row, nxt[b, :steps - 1]])
            for i, logits in enumerate(got):  # a prefill of the same length (the same temperature)
                alone = model(sequence[None, :len(row) + i], logits_to_keep=1)[0, -1]
                torch.testing.assert_close(logits[b], alone, atol=1e-4, rtol=1e-4)

        right = torch.zeros(3, longest, dtype=torch.long)
        right_mask = torch.zeros(3, longest, dtype=torch.long)
        for b, row in enumerate(rows):
            right[b, :len(row)] = row
            right_mask[b, :len(row)] = 1
        scored = model(right, attention_mask_BS=right_mask)
        for b, row in enumerate(rows):
            torch.testing.assert_close(scored[b, :len(row)], model(row[None])[0], atol=1e-4, rtol=1e-4)


def test_dca_refuses_batches_it_cannot_run():
    model = _tiny({"chunk_size": 32, "local_size": 8})
    ids = torch.randint(0, 256, (2, 10))
    with pytest.raises(ValueError, match="row 0 of attention_mask has padding between its tokens"), torch.no_grad():
        model(ids, attention_mask_BS=torch.tensor([[1] * 3 + [0] * 2 + [1] * 5, [1] * 10]))
    with pytest.raises(ValueError, match="packed documents"), torch.no_grad():
        model(ids, document_ids_BT=torch.tensor([[0] * 4 + [1] * 6, [0] * 10]))
