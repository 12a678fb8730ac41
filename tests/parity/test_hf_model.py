"""Parity with transformers' Qwen2 on tiny random configs (fp32, CPU, seeded)."""

import dataclasses

import pytest
import torch

from qwen2.config import PRESETS
from qwen2.model import KVCache, Qwen2ForCausalLM

transformers = pytest.importorskip("transformers")

ATOL = 1e-4  # fp32 logits, absolute; the bound


def make_pair(preset: str, **overrides):
    config = dataclasses.replace(PRESETS[preset], **overrides)
    ours = Qwen2ForCausalLM(config)
    ours.init_weights(seed=0)
    ours.eval()
    hf_config = transformers.Qwen2Config(**config.to_dict())
    hf_config._attn_implementation = "eager"  # the plainest reference path
    theirs = transformers.Qwen2ForCausalLM(hf_config).eval()
    missing, unexpected = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    return ours, theirs


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha-untied", "tiny-swa"])
def test_logits_match_transformers(preset):
    ours, theirs = make_pair(preset)
    ids = torch.randint(0, ours.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha-untied", "tiny-swa"])
def test_left_padded_batch_matches_transformers(preset):
    ours, theirs = make_pair(preset)
    ids = torch.randint(2, ours.config.vocab_size, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :5] = 0
    mask[2, :13] = 0
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours_logits = ours(ids, attention_mask_BS=mask, positions_BT=positions)
        theirs_logits = theirs(ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    torch.testing.assert_close(ours_logits[real], theirs_logits[real], atol=ATOL, rtol=0)
    assert torch.isfinite(ours_logits).all()


def test_yarn_rope_matches_transformers():
    rope_scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    ours, theirs = make_pair("tiny", rope_scaling=rope_scaling, max_position_embeddings=256)
    ids = torch.randint(0, 512, (1, 100), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), theirs(ids).logits, atol=ATOL, rtol=0)


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa"])
def test_cached_decoding_equals_full_forward(preset):
    ours, _ = make_pair(preset)
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(4))
    cache = KVCache.allocate(ours.config, batch_size=2, max_seq_len=32)
    with torch.no_grad():
        full = ours(ids)
        steps = [ours(ids[:, :17], kv_cache=cache)]  # prefill, then a chunk, then single tokens
        steps.append(ours(ids[:, 17:22], kv_cache=cache))
        steps += [ours(ids[:, t:t + 1], kv_cache=cache) for t in range(22, 30)]
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=0)
    assert cache.length == 30


def test_padded_cached_decoding_equals_unpadded_rows():
    ours, _ = make_pair("tiny")
    gen = torch.Generator().manual_seed(5)
    short, long = torch.randint(2, 512, (1, 6), generator=gen), torch.randint(2, 512, (1, 10), generator=gen)
    pad = torch.zeros(1, 4, dtype=torch.long)
    ids = torch.cat([torch.cat([pad, short], 1), long])
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[0, :4] = 0
    nxt = torch.randint(2, 512, (2, 3), generator=gen)
    cache = KVCache.allocate(ours.config, batch_size=2, max_seq_len=16)
    with torch.no_grad():
        out = [ours(ids, attention_mask_BS=mask, kv_cache=cache, logits_to_keep=1)]
        for t in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            out.append(ours(nxt[:, t:t + 1], attention_mask_BS=mask, kv_cache=cache))
        ref_short = ours(torch.cat([short, nxt[:1]], 1))[:, 5:]
        ref_long = ours(torch.cat([long, nxt[1:]], 1))[:, 9:]
    got = torch.cat(out, 1)
    torch.testing.assert_close(got[0:1], ref_short, atol=1e-5, rtol=0)
    torch.testing.assert_close(got[1:2], ref_long, atol=1e-5, rtol=0)


def test_bfloat16_logits_track_transformers():
    ours, theirs = make_pair("tiny")
    ours, theirs = ours.to(torch.bfloat16), theirs.to(torch.bfloat16)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        a, b = ours(ids).float(), theirs(ids).logits.float()
    # bf16 keeps ~3 significant digits; both round at the same points, so they agree to bf16 precision.
    torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_int8_kv_cache_decoding_stays_close_to_full_forward():
    ours, _ = make_pair("tiny")
    ids = torch.randint(0, 512, (2, 30), generator=torch.Generator().manual_seed(7))
    cache = KVCache.allocate(ours.config, batch_size=2, max_seq_len=32, kv_cache_dtype="int8")
    with torch.no_grad():
        full = ours(ids)
        steps = [ours(ids[:, :20], kv_cache=cache)] + [ours(ids[:, t:t + 1], kv_cache=cache) for t in range(20, 30)]
    got = torch.cat(steps, dim=1)
    # the prefill's own keys are quantized too, so every position carries int8 rounding
    assert ((got - full).norm() / full.norm()) < 0.01
    assert not torch.equal(got, full)  # it really is the quantized path
    assert cache.k_LBKSC.dtype == torch.int8


def test_int8_kv_cache_halves_the_bytes_per_token():
    config = PRESETS["qwen2.5-0.5b"]
    bf16 = KVCache.allocate(config, batch_size=1, max_seq_len=1, dtype=torch.bfloat16)
    int8 = KVCache.allocate(config, batch_size=1, max_seq_len=1, dtype=torch.bfloat16, kv_cache_dtype="int8")
    assert bf16.bytes_per_token() == 2 * 24 * 2 * 64 * 2 == 12288  # the report's 12 KiB per token
    # int8 keys and values, plus a bf16 scale per 16 value channels (key scales are per channel, not per token)
    assert int8.bytes_per_token() == 24 * 2 * (2 * 64 + 4 * 2)
