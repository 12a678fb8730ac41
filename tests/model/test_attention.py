"""The single-query decode kernel equals SDPA (GQA grouping, padding and window masks), reading the
cache in whole buckets."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from qwen2.config import PRESETS
from qwen2.inference import SamplingParams, generate_ids
from qwen2.inference.engine import Engine, EngineConfig
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.attention import decode_attention
from qwen2.model.kv_cache import KEY_BUCKET


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("masked", [False, True])
def test_decode_attention_equals_sdpa(dtype, tol, masked):
    gen = torch.Generator().manual_seed(0)
    B, H, K, S, C = 3, 14, 2, 37, 64
    q = torch.randn(B, H, 1, C, generator=gen).to(dtype)
    k = torch.randn(B, K, S, C, generator=gen).to(dtype)
    v = torch.randn(B, K, S, C, generator=gen).to(dtype)
    mask = None
    if masked:  # rows of different lengths, like a paged batch; one row also loses its oldest keys
        mask = torch.arange(S)[None, None, None, :] < torch.tensor([37, 20, 5])[:, None, None, None]
        mask[0, ..., :10] = False
    expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
    torch.testing.assert_close(decode_attention(q, k, v, mask).float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-6), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("S", [37, 128, 250])
def test_decode_attention_reads_whole_buckets_of_a_cache_exactly(dtype, tol, S):
    # Keys are views into a larger cache buffer whose other slots hold unrelated finite values:
    # decode_attention may read on to the next multiple of KEY_BUCKET, but those slots never count.
    gen = torch.Generator().manual_seed(1)
    B, H, K, C, capacity = 2, 14, 2, 64, 384
    q = torch.randn(B, H, 1, C, generator=gen).to(dtype)
    k_buf = torch.randn(B, K, capacity, C, generator=gen)
    v_buf = torch.randn(B, K, capacity, C, generator=gen)
    for buf in (k_buf, v_buf):  # slots past S: large values that would show if they leaked in
        buf[:, :, S:] *= 1000
    k_buf, v_buf = k_buf.to(dtype), v_buf.to(dtype)
    k, v = k_buf[:, :, :S], v_buf[:, :, :S]
    for mask in (None, torch.arange(S)[None, None, None, :] < torch.tensor([S, S // 2])[:, None, None, None]):
        expected = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask, enable_gqa=True)
        torch.testing.assert_close(decode_attention(q, k, v, mask).float(), expected, atol=tol, rtol=tol)
    # at the very end of its storage a view cannot be widened: exact length, same result
    k_end, v_end = (k_buf[:, :, capacity - S:] / 1000).to(dtype), (v_buf[:, :, capacity - S:] / 1000).to(dtype)
    k_end, v_end = k_buf[:, :, capacity - S:].copy_(k_end), v_buf[:, :, capacity - S:].copy_(v_end)
    expected = F.scaled_dot_product_attention(q.float(), k_end.float(), v_end.float(), enable_gqa=True)
    torch.testing.assert_close(decode_attention(q, k_end, v_end, None).float(), expected, atol=tol, rtol=tol)


class _KeyLengths(TorchDispatchMode):
    """Key lengths S of the bf16 batched matmuls of single-query attention: (.., G, C) @ (.., C, S)
    and (.., G, S) @ (.., S, C)."""

    def __init__(self, head_dim: int) -> None:
        super().__init__()
        self.head_dim = head_dim
        self.lengths: set[int] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.bmm.default, torch.ops.aten.matmul.default) and args[1].dim() >= 3:
            a, b = args[0], args[1]
            if a.dtype == torch.bfloat16:
                self.lengths.add(b.shape[-1] if a.shape[-1] == self.head_dim else a.shape[-1])
        return func(*args, **(kwargs or {}))


def test_decode_matmul_shapes_repeat_per_bucket(byte_tokenizer):
    # PyTorch's bf16 CPU matmul keeps a compiled kernel per shape (~0.7 MB each): one key length per
    # decode step made a 128-token reply grow the process by 145 MB. Decoding 300 tokens must use
    # key lengths from whole buckets only, with the static cache and with the paged engine.
    config = dataclasses.replace(PRESETS["tiny"], max_position_embeddings=1024)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=0)
    model = model.to(torch.bfloat16).eval()
    with _KeyLengths(config.dim_per_head) as seen:
        steps = sum(1 for _ in generate_ids(model, [[1, 2, 3, 4, 5]], SamplingParams(max_new_tokens=300)))
    assert steps == 300
    assert seen.lengths and all(n % KEY_BUCKET == 0 for n in seen.lengths), sorted(seen.lengths)
    assert len(seen.lengths) <= 3  # 305 positions: buckets of 128, 256, 384

    engine = Engine(model, byte_tokenizer, EngineConfig(max_batch_size=3, block_size=16))
    with _KeyLengths(config.dim_per_head) as seen:
        handles = [engine.submit(list(range(1, n)), SamplingParams(max_new_tokens=150)) for n in (5, 40, 90)]
        while engine._running or engine._waiting:
            engine.step()
    assert all(len(h.result()[1]) > 0 for h in handles)
    assert seen.lengths and all(n % KEY_BUCKET == 0 for n in seen.lengths), sorted(seen.lengths)
