"""Sparse (vertical-and-slash) prefill: the planted lines are found, the block computation equals a
full-mask reference of the same pattern, full budgets give dense attention, and the model uses it
only where it should (long causal prefills, never training, padding or decoding); inside Dual Chunk
Attention each key range is scored with its own query rotation."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from qwen2.config import PRESETS, ConfigError
from qwen2.model import KVCache, Qwen2ForCausalLM
from qwen2.model.dca import DCAConfig, dca_attention, rotate_keys, rotate_queries
from qwen2.model.sparse import (SparseConfig, SparsePrefill, block_key_mask, estimate_pattern, sparse_attention,
                                sparse_reference)

H, K, C = 4, 2, 16


def _qkv(T, S, seed=0, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(H, T, C, generator=gen).to(dtype), torch.randn(K, S, C, generator=gen).to(dtype),
            torch.randn(K, S, C, generator=gen).to(dtype))


def _dense(q, k, v):
    T, S = q.shape[1], k.shape[1]
    mask = torch.ones(T, S, dtype=torch.bool).tril(S - T)  # the new queries are the last T positions
    return F.scaled_dot_product_attention(q[None].float(), k[None].float(), v[None].float(), attn_mask=mask,
                                          enable_gqa=True)[0]


def test_planted_vertical_and_slash_lines_are_found():
    # One-hot queries and keys: in head 0 every query looks at key 7 (a vertical line), in head 2
    # query i looks at key i - 50 (a slash at distance 50). Heads 1 and 3 are uniform.
    S, width = 200, 256
    eye = torch.eye(width) * 30.0
    q = torch.zeros(H, S, width)
    q[0] = eye[7]
    q[2] = eye[(torch.arange(S) - 50) % width]
    k = eye[torch.arange(S)][None].expand(K, S, width).clone()
    config = SparseConfig(last_q=16, vertical_size=64, slash_size=64, coverage=0.9, sink_tokens=2, local_size=4)
    columns, distances = estimate_pattern(q, k, config)
    assert columns[0].tolist() == [0, 1, 7]          # the line, plus the always-kept sink
    assert distances[2].tolist() == [0, 1, 2, 3, 50]  # the line, plus the always-kept local distances
    assert len(columns[1]) >= 64 and len(distances[3]) >= 64  # uniform heads spend their whole budget


def test_block_key_mask_rounds_diagonals_out_to_the_query_block():
    # queries at 100..109 (one block): distance 30 reaches keys 70..79, distance 95 keys 5..14;
    # column 3 and column 120 (after the block: never) ; distance 5 falls inside the block (own keys)
    mask = block_key_mask(torch.tensor([3, 120]), torch.tensor([5, 30, 95]), torch.tensor([100]),
                          torch.tensor([110]), 130)
    expected = torch.zeros(130, dtype=torch.bool)
    expected[3] = True
    expected[70:80] = True
    expected[5:15] = True
    expected[95:100] = True  # distance 5 from queries 100..104 reaches 95..99
    assert torch.equal(mask[0], expected)


@pytest.mark.parametrize("T,S,block", [(300, 500, 64), (77, 77, 32), (129, 1000, 128)])
def test_block_computation_equals_a_full_mask_of_the_same_pattern(T, S, block):
    q, k, v = _qkv(T, S, seed=T)
    config = SparseConfig(last_q=32, vertical_size=20, slash_size=10, coverage=0.9, sink_tokens=4, local_size=8)
    columns, distances = estimate_pattern(q, k, config)
    out, read = sparse_attention(q, k, v, columns, distances, block)
    torch.testing.assert_close(out, sparse_reference(q, k, v, columns, distances, block), atol=1e-5, rtol=1e-5)
    assert read < H * (T * (S - T) + T * (T + 1) // 2) or S == T  # it did skip keys
    assert (out - _dense(q, k, v)).abs().max() > 1e-3  # and is not dense attention in disguise


def test_full_budgets_give_dense_attention_in_float32_and_close_in_bf16():
    T, S = 200, 450
    q, k, v = _qkv(T, S, seed=3)
    everything = [torch.arange(S)] * H
    out, read = sparse_attention(q, k, v, everything, [torch.tensor([0])] * H, 64)
    torch.testing.assert_close(out, _dense(q, k, v), atol=1e-5, rtol=1e-5)
    assert read == H * (T * (S - T) + T * (T + 1) // 2)
    q, k, v = (x.bfloat16() for x in (q, k, v))
    out, _ = sparse_attention(q, k, v, everything, [torch.tensor([0])] * H, 64)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), _dense(q, k, v), atol=2e-2, rtol=2e-2)


def _tiny(sparse=None, seed=0):
    config = dataclasses.replace(PRESETS["tiny"], max_position_embeddings=512, sparse_prefill_config=sparse)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=seed)
    return model.eval()


FULL = {"threshold": 64, "vertical_size": 100_000, "slash_size": 1, "coverage": 1.0, "block_size": 32}


def test_the_model_runs_sparse_only_for_long_causal_prefills():
    ids = torch.randint(0, 256, (2, 300), generator=torch.Generator().manual_seed(1))
    dense = _tiny()
    small = _tiny({"threshold": 128, "vertical_size": 8, "slash_size": 8, "coverage": 0.5, "block_size": 32,
                   "sink_tokens": 4, "local_size": 8})
    with torch.no_grad():
        assert torch.equal(small(ids[:, :127]), dense(ids[:, :127]))  # below the threshold: the dense kernel
        assert small.model.sparse.stats.calls == 0
        sparse_logits = small(ids)
        assert small.model.sparse.stats.calls == 2 * small.config.num_hidden_layers  # row by row, every layer
        assert small.model.sparse.stats.density < 0.8  # short rows: the diagonal blocks are much of it
        assert (sparse_logits - dense(ids)).abs().max() > 1e-4  # it did change something...
        full = _tiny(FULL)(ids)  # ...and with every key kept it is dense attention again
        torch.testing.assert_close(full, dense(ids), atol=1e-4, rtol=1e-4)
        padded = torch.ones(2, 300, dtype=torch.long)
        padded[0, :5] = 0
        small.model.sparse.stats.calls = 0
        assert torch.equal(small(ids, attention_mask_BS=padded), dense(ids, attention_mask_BS=padded))
        assert small.model.sparse.stats.calls == 0  # padding: dense
    small.train()
    assert torch.equal(small(ids), dense.train()(ids))  # training: dense


def test_chunked_prefill_and_decode_through_the_cache():
    ids = torch.randint(0, 256, (1, 260), generator=torch.Generator().manual_seed(2))
    model, dense = _tiny(FULL), _tiny()
    with torch.no_grad():
        cache = KVCache.allocate(model.config, batch_size=1, max_seq_len=260)
        chunks = [model(ids[:, a:b], kv_cache=cache) for a, b in ((0, 50), (50, 150), (150, 250))]
        steps = [model(ids[:, t:t + 1], kv_cache=cache) for t in range(250, 260)]
        torch.testing.assert_close(torch.cat(chunks + steps, 1), dense(ids), atol=1e-4, rtol=1e-4)
    assert model.model.sparse.stats.calls == 2 * model.config.num_hidden_layers  # the two chunks past 64 keys


def test_bad_settings_are_named():
    with pytest.raises(ConfigError, match="sparse_prefill_config.*coverage"):
        _tiny({"coverage": 0})
    with pytest.raises(ConfigError, match="sparse_prefill_config.*unknown keys.*vertical"):
        _tiny({"verticals": 10})
    with pytest.raises(ConfigError, match="sparse_prefill_config.*block_size"):
        _tiny({"block_size": -1})


# --- inside Dual Chunk Attention ---------------------------------------------------------------

DCA = DCAConfig(chunk_size=64, local_size=16)  # chunk_len 48


def _dca_piece(start, end, seed=0):
    """Queries at start .. end - 1 (one DCA chunk) rotated the three DCA ways, keys 0 .. end - 1 as
    the cache holds them, and the piece's regions (inter, successive, intra)."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, H, end - start, C, generator=gen)
    k, v = torch.randn(1, K, end, C, generator=gen), torch.randn(1, K, end, C, generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, C, 2).float() / C))
    queries = rotate_queries(q, start, DCA, inv_freq)
    keys = rotate_keys(k, 0, DCA, inv_freq)
    chunk_start = start // DCA.chunk_len * DCA.chunk_len
    regions = [(0, queries.inter[0]), (chunk_start - DCA.chunk_len, queries.successive[0]),
               (chunk_start, queries.intra[0])]
    return queries, keys, v, chunk_start, regions


def test_sparse_dca_piece_equals_a_full_mask_reference_scoring_each_key_range_its_own_way():
    queries, k, v, chunk_start, regions = _dca_piece(150, 190)  # chunk 3: keys 0-95 inter, 96-143 successive
    config = SparseConfig(last_q=16, vertical_size=20, slash_size=10, coverage=0.9, sink_tokens=4, local_size=8)
    scale = C ** -0.5 * 1.3
    columns, distances = estimate_pattern(queries.intra[0], k[0], config, scale=scale, regions=regions)
    out, read = sparse_attention(queries.intra[0], k[0], v[0], columns, distances, 16, scale=scale, regions=regions)
    expected = sparse_reference(queries.intra[0], k[0], v[0], columns, distances, 16, scale=scale, regions=regions)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert read < H * (40 * 150 + 40 * 41 // 2)  # it did skip keys
    plain = sparse_reference(queries.intra[0], k[0], v[0], columns, distances, 16, scale=scale)
    assert (plain - expected).abs().max() > 1e-2  # the rotations of the far ranges matter


def test_the_estimate_is_the_dca_attention_of_the_last_queries():
    # Head 0's inter-chunk rotation of the last queries points at key 7 (inter range); its intra and
    # successive rotations are zero (uniform attention). A pattern estimated from the intra rotation
    # alone would not see the line; the DCA estimate does.
    queries, k, v, chunk_start, regions = _dca_piece(150, 190, seed=1)
    k = k.clone()
    k[0, 0] = 0
    k[0, 0, 7, 0] = 1.0
    inter = regions[0][1].clone()
    inter[0] = 0
    inter[0, :, 0] = 200.0
    intra = regions[2][1].clone()
    intra[0] = 0
    succ = regions[1][1].clone()
    succ[0] = 0
    regions = [(0, inter), (regions[1][0], succ), (chunk_start, intra)]
    config = SparseConfig(last_q=8, vertical_size=1, slash_size=1, coverage=0.5, sink_tokens=0, local_size=0)
    columns, _ = estimate_pattern(intra, k[0], config, regions=regions)
    assert columns[0].tolist() == [7]
    columns, _ = estimate_pattern(intra, k[0], config)
    assert columns[0].tolist() != [7]


def test_sparse_dca_with_every_key_kept_is_dca():
    T = 190  # four DCA chunks: every piece meets intra, successive and (from the third) inter keys
    gen = torch.Generator().manual_seed(4)
    q, k, v = torch.randn(2, H, T, C, generator=gen), torch.randn(2, K, T, C, generator=gen), torch.randn(2, K, T, C, generator=gen)
    inv_freq = 1.0 / (10000 ** (torch.arange(0, C, 2).float() / C))
    queries, keys = rotate_queries(q, 0, DCA, inv_freq), rotate_keys(k, 0, DCA, inv_freq)
    full = SparsePrefill(SparseConfig(**{key: value for key, value in FULL.items() if key != "threshold"}))
    torch.testing.assert_close(dca_attention(queries, keys, v, DCA, sparse=full), dca_attention(queries, keys, v, DCA),
                               atol=1e-5, rtol=1e-5)
    assert full.stats.calls == 2 * 4  # each row, each piece
    assert full.stats.density == 1.0


def _tiny_dca(sparse=None):
    config = dataclasses.replace(PRESETS["tiny"], max_position_embeddings=512, sparse_prefill_config=sparse,
                                 dual_chunk_attention_config={"chunk_size": 64, "local_size": 16,
                                                              "original_max_position_embeddings": 64})
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=0)
    return model.eval()


def test_a_dca_model_prefills_sparsely_through_the_cache():
    ids = torch.randint(0, 256, (1, 300), generator=torch.Generator().manual_seed(5))
    dense = _tiny_dca()
    small = _tiny_dca({"threshold": 128, "vertical_size": 8, "slash_size": 8, "coverage": 0.5, "block_size": 32,
                       "sink_tokens": 4, "local_size": 8})
    full = _tiny_dca(FULL)
    with torch.no_grad():
        assert torch.equal(small(ids[:, :127]), dense(ids[:, :127]))  # below the threshold: dense DCA
        assert (small(ids) - dense(ids)).abs().max() > 1e-4
        assert small.model.sparse.stats.density < 0.9
        cache = KVCache.allocate(full.config, batch_size=1, max_seq_len=300)
        chunks = [full(ids[:, a:b], kv_cache=cache) for a, b in ((0, 100), (100, 230), (230, 290))]
        steps = [full(ids[:, t:t + 1], kv_cache=cache) for t in range(290, 300)]  # decoding: dense
        assert full.model.sparse.stats.calls > 0
        # Every key kept: DCA again (a prefill's temperature is its own length: compare chunk ends)
        got = torch.cat(chunks + steps, 1)
        for t in (99, 229, 289, 299):
            torch.testing.assert_close(got[:, t], dense(ids[:, :t + 1], logits_to_keep=1)[:, -1], atol=1e-4, rtol=1e-4)
