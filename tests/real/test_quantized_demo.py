"""int8 / int4 weights on the real demo model: quality bounds, a real answer, and the quantize CLI."""

from pathlib import Path

import pytest
import torch

from qwen2.checkpoint import load_pretrained
from qwen2.eval.perplexity import perplexity
from qwen2.inference import SamplingParams, generate_text
from qwen2.model.quant import QuantConfig
from test_demo_model import IS_PRIME_CHECKS, chat_ids, extract_code, run_untrusted

HELD_OUT = Path("/usr/share/common-licenses/GPL-3")  # not used by any other test or by training


@pytest.fixture(scope="module")
def int8(demo_path):
    return load_pretrained(demo_path, quant=QuantConfig("int8"))


@pytest.fixture(scope="module")
def held_out_ids(demo):
    if not HELD_OUT.is_file():
        pytest.skip(f"{HELD_OUT} is not on this machine")
    return demo.tokenizer.encode(HELD_OUT.read_text(encoding="utf-8"))


def test_int8_perplexity_within_1_percent_of_bf16(demo, int8, held_out_ids):
    bf16 = perplexity(demo.model.to(torch.bfloat16), held_out_ids, seq_len=512, max_windows=12).perplexity
    demo.model.to(torch.float32)  # the session fixture goes back to fp32 (bf16 -> fp32 is exact for bf16 values)
    q8 = perplexity(int8.model, held_out_ids, seq_len=512, max_windows=12).perplexity
    assert q8 / bf16 - 1 < 0.01, (q8, bf16)


def test_int4_perplexity_regression_guard(demo_path, held_out_ids):
    # Round-to-nearest int4 is +15% on this model today (docs/BENCHMARKS.md); the target is 5%.
    # This guard catches a broken kernel or packing (which gives perplexities in the hundreds).
    q4 = load_pretrained(demo_path, quant=QuantConfig("int4")).model
    assert perplexity(q4, held_out_ids, seq_len=512, max_windows=12).perplexity < 10


def test_int8_model_writes_a_correct_is_prime(int8, tmp_path):
    prompt = chat_ids(int8.tokenizer, "Write a Python function is_prime(n) that checks whether n is prime")
    reply = generate_text(int8.model, int8.tokenizer, prompt, SamplingParams(max_new_tokens=400)).text
    script = tmp_path / "check.py"
    script.write_text(extract_code(reply) + "\n" + IS_PRIME_CHECKS)
    assert run_untrusted(script, tmp_path).stdout.strip().endswith("ALL-PASSED"), reply


def test_quantize_command_round_trip(demo_path, int8, tmp_path):
    from qwen2.cli import main

    assert main(["quantize", str(demo_path), str(tmp_path / "q8"), "--quantize", "int8"]) == 0
    size = sum(f.stat().st_size for f in (tmp_path / "q8").glob("*.safetensors"))
    bf16_size = 2 * int8.model.config.num_parameters()  # ~0.99 GB
    assert size < 0.8 * bf16_size  # int8 layers + head (the embedding stays bf16 for lookups)
    loaded = load_pretrained(tmp_path / "q8")
    ids = torch.tensor([chat_ids(int8.tokenizer, "Hello")])
    with torch.no_grad():
        assert torch.equal(loaded.model(ids), int8.model(ids))


def test_int8_kv_cache_perplexity_within_1_percent(demo, held_out_ids):
    model = demo.model.to(torch.bfloat16)
    try:
        ref = perplexity(model, held_out_ids, seq_len=512, max_windows=6, kv_cache_dtype="auto").perplexity
        int8 = perplexity(model, held_out_ids, seq_len=512, max_windows=6, kv_cache_dtype="int8").perplexity
    finally:
        demo.model.to(torch.float32)
    assert abs(int8 / ref - 1) < 0.01, (int8, ref)
