"""Long context on the real demo model (trained context 32K): the needle found with YaRN + Dual
Chunk Attention when DCA really cuts the prompt into chunks (chunk_size 2048 under a 4K prompt),
and a DCA model that equals the plain one when the prompt fits in a chunk. The 48K run is in
docs/LONG_CONTEXT.md (too slow for CI)."""

import pytest
import torch


@pytest.fixture(scope="module")
def int4_demo(demo_path):
    from qwen2.checkpoint import load_pretrained
    from qwen2.model.quant import QuantConfig

    return load_pretrained(demo_path, quant=QuantConfig("int4"))


def test_needle_at_4k_with_yarn_and_dca_over_several_chunks(int4_demo):
    from qwen2.eval.long_context import configure_long_context, needle_grid

    model = int4_demo.model
    saved = model.config
    try:
        configure_long_context(model, yarn=2.0, dca=True, dca_chunk_size=2048, dca_local_size=256)
        assert model.model.dca is not None and model.model.dca.chunk_len == 1792  # 4K = 3 chunks: intra/succ/inter
        results = needle_grid(model, int4_demo.tokenizer, [4096], [0.1, 0.9], seed=1)
    finally:
        model.config = model.model.config = saved
        model.model.set_rope(saved)
    assert all(r.found for r in results), [(r.depth, r.secret, r.answer) for r in results]


def test_dca_within_one_chunk_equals_the_plain_model(int4_demo):
    from qwen2.eval.long_context import configure_long_context, sequence_nll
    from qwen2.tokenizer import encode_chat

    model = int4_demo.model
    ids = torch.tensor(encode_chat(int4_demo.tokenizer, [{"role": "user", "content": "Write a haiku about tea."}],
                                   add_generation_prompt=True))
    plain = sequence_nll(model, ids, chunk=16)
    saved = model.config
    try:
        configure_long_context(model, dca=True)  # chunk_size 32768: the whole prompt is one chunk
        with_dca = sequence_nll(model, ids, chunk=16)
    finally:
        model.config = model.model.config = saved
        model.model.set_rope(saved)
    assert with_dca[1] == plain[1] and with_dca[0] == pytest.approx(plain[0], rel=1e-3)
