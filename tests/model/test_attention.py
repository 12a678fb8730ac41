"""The single-query decode kernel equals SDPA (GQA grouping, padding and window masks)."""

import pytest
import torch
import torch.nn.functional as F

from qwen2.model.attention import decode_attention


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
