"""Paged KV cache: block bookkeeping, and a batch of ragged sequences through blocks equals each
sequence run alone through the static cache (fp32, tight tolerance)."""

import dataclasses

import pytest
import torch

from qwen2.config import PRESETS
from qwen2.model import KVCache, Qwen2ForCausalLM
from qwen2.model.paged_kv_cache import NULL_BLOCK, BlockPool, PagedKVCache


def _model(preset: str = "tiny", **overrides) -> Qwen2ForCausalLM:
    config = dataclasses.replace(PRESETS[preset], **overrides)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=0)
    return model.eval()


def _reference_logits(model, chunks: list[list[int]], kv_cache_dtype: str = "auto") -> torch.Tensor:
    """Logits of every position, feeding the chunks one after another through the static cache."""
    total = sum(len(c) for c in chunks)
    cache = KVCache.allocate(model.config, batch_size=1, max_seq_len=total, kv_cache_dtype=kv_cache_dtype)
    return torch.cat([model(torch.tensor([chunk]), kv_cache=cache)[0] for chunk in chunks])


class _Sequences:
    """Drives PagedKVCache the way the engine does: blocks allocated as sequences grow."""

    def __init__(self, cache: PagedKVCache, prompts: list[list[int]]) -> None:
        self.cache, self.prompts = cache, prompts
        self.tables: list[list[int]] = [[] for _ in prompts]
        self.lengths = [0] * len(prompts)
        L, K, C = cache.config.num_hidden_layers, cache.config.num_key_value_heads, cache.config.dim_per_head
        self.key_scales = [torch.zeros(L, K, C) for _ in prompts]

    def batch(self, rows: list[int], num_new: int):
        for row in rows:
            while len(self.tables[row]) * self.cache.block_size < self.lengths[row] + num_new:
                self.tables[row].append(self.cache.blocks.allocate())
        batch = self.cache.batch([self.tables[r] for r in rows], [self.lengths[r] for r in rows], num_new,
                                 [self.key_scales[r] for r in rows] if self.cache.quantized else None)
        for row in rows:
            self.lengths[row] += num_new
        return batch


@pytest.mark.parametrize("kv_cache_dtype", ["auto", "int8"])
@pytest.mark.parametrize("preset", ["tiny", "tiny-swa"])
def test_ragged_paged_batch_equals_each_sequence_alone(preset, kv_cache_dtype):
    model = _model(preset)
    gen = torch.Generator().manual_seed(0)
    lengths = [37, 5, 22]  # ragged, not multiples of the block size, one shorter than a block
    prompts = [torch.randint(0, model.config.vocab_size, (n,), generator=gen).tolist() for n in lengths]
    steps = 9
    conts = [torch.randint(0, model.config.vocab_size, (steps,), generator=gen).tolist() for _ in prompts]
    cache = PagedKVCache(model.config, num_blocks=40, block_size=8, kv_cache_dtype=kv_cache_dtype)
    seqs = _Sequences(cache, prompts)
    got: list[list[torch.Tensor]] = [[] for _ in prompts]
    with torch.inference_mode():
        for row, prompt in enumerate(prompts):  # prefill one sequence at a time, in two chunks
            cut = len(prompt) // 2 + 1
            for chunk in (prompt[:cut], prompt[cut:]):
                got[row].append(model(torch.tensor([chunk]), kv_cache=seqs.batch([row], len(chunk)))[0])
        for step in range(steps):  # decode every sequence together
            ids = torch.tensor([[c[step]] for c in conts])
            logits = model(ids, kv_cache=seqs.batch([0, 1, 2], 1))
            for row in range(3):
                got[row].append(logits[row])
        for row, prompt in enumerate(prompts):
            cut = len(prompt) // 2 + 1
            chunks = [prompt[:cut], prompt[cut:]] + [[t] for t in conts[row]]
            # same writes in the same order: the int8 reference quantizes with the same key scales
            ref = _reference_logits(model, chunks, kv_cache_dtype)
            torch.testing.assert_close(torch.cat(got[row]), ref, atol=2e-5, rtol=1e-4)
            if kv_cache_dtype == "auto":
                plain = model(torch.tensor([prompt + conts[row]]))[0]
                torch.testing.assert_close(torch.cat(got[row]), plain, atol=2e-5, rtol=1e-4)


def test_int8_paged_cache_stays_close_to_float():
    model = _model()
    ids = torch.randint(0, model.config.vocab_size, (50,), generator=torch.Generator().manual_seed(3)).tolist()
    cache = PagedKVCache(model.config, num_blocks=10, block_size=16, kv_cache_dtype="int8")
    seqs = _Sequences(cache, [ids])
    with torch.inference_mode():
        out = [model(torch.tensor([ids[:20]]), kv_cache=seqs.batch([0], 20))[0]]
        out += [model(torch.tensor([[t]]), kv_cache=seqs.batch([0], 1))[0] for t in ids[20:]]
        plain = model(torch.tensor([ids]))[0]
    got = torch.cat(out)
    assert (got - plain).abs().max() < 0.05 * plain.abs().max()
    assert torch.equal(got.argmax(-1), plain.argmax(-1))


def test_block_pool_reuses_named_prefixes_and_evicts_lru():
    pool = BlockPool(num_blocks=5, block_size=2)
    tokens = [1, 2, 3, 4, 5]
    a = [pool.allocate(), pool.allocate()]
    assert NULL_BLOCK not in a
    parent = None
    for i, block in enumerate(a):
        parent = BlockPool.block_hash(parent, tokens[2 * i:2 * i + 2])
        pool.register(block, parent)
    assert pool.match_prefix(tokens, max_blocks=2) == a  # shared while the first owner still holds them
    assert pool.match_prefix([1, 2, 9, 9], max_blocks=2) == a[:1]
    assert pool.match_prefix([7, 7, 3, 4], max_blocks=2) == []  # hashes chain: same block, other prefix
    for table in (a, a, a[:1]):
        pool.release(table)
    assert pool.num_used == 0 and pool.num_cached == 2 and pool.num_available == 4
    fresh = [pool.allocate() for _ in range(3)]  # 2 free blocks, then the least recently used cached one:
    assert a[1] in fresh and a[0] not in fresh  # a table's tail is evicted first, so its head stays usable
    assert pool.match_prefix(tokens, max_blocks=2) == a[:1]
    with pytest.raises(MemoryError, match="no free block"):
        pool.allocate(), pool.allocate()


def test_memory_follows_tokens_and_is_returned():
    config = dataclasses.replace(PRESETS["tiny"])
    cache = PagedKVCache(config, num_blocks=64, block_size=16)
    per_block = cache.bytes_per_token() * 16
    assert cache.bytes_per_token() == 2 * config.num_hidden_layers * config.num_key_value_heads * config.dim_per_head * 4
    blocks = [cache.blocks.allocate() for _ in range(8)]
    cache.k_LNKPC[:, blocks] = 1.0
    cache.blocks.release(blocks)
    returned = cache.return_memory()
    if per_block // (2 * config.num_hidden_layers) % 4096 == 0:
        assert returned == 8
        assert cache.k_LNKPC[:, blocks].abs().sum() == 0  # released pages read back as zeros
