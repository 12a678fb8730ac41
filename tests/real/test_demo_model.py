"""The real demo model: parity with transformers, greedy agreement, conversion round trip, and a
real coding answer that passes real assertions."""

import copy
import re
import shutil
import subprocess
import sys
import textwrap

import pytest
import torch

from qwen2.inference import SamplingParams, generate_ids, generate_text
from qwen2.tokenizer import encode_chat

PROMPTS = [
    "Write a Python function is_prime(n) that checks whether n is prime.",
    "用 Python 写一个快速排序。",
    "Explain the difference between a list and a tuple.",
]
# Both sides dequantize the same GGUF blocks to float32 and run the same float32 math; the
# observed difference is 0 on this machine, the bound leaves room for kernel-order differences.
LOGITS_ATOL = 1e-3


def chat_ids(tokenizer, prompt):
    return encode_chat(tokenizer, [{"role": "user", "content": prompt}], add_generation_prompt=True)


def test_demo_file_is_the_published_one(demo_path):
    from qwen2.demo import DEMO_SHA256, _sha256

    assert _sha256(demo_path) == DEMO_SHA256


def test_weights_equal_transformers_dequantization(demo, hf_demo):
    theirs = hf_demo.state_dict()
    for name, tensor in demo.model.state_dict().items():
        assert torch.equal(tensor, theirs[name]), name


@pytest.mark.parametrize("prompt", PROMPTS)
def test_last_position_logits_match_transformers(demo, hf_demo, prompt):
    ids = torch.tensor([chat_ids(demo.tokenizer, prompt)])
    with torch.no_grad():
        ours = demo.model(ids, logits_to_keep=1)[0, -1]
        theirs = hf_demo(ids).logits[0, -1]
    torch.testing.assert_close(ours, theirs, atol=LOGITS_ATOL, rtol=0)
    assert int(ours.argmax()) == int(theirs.argmax())


def test_64_greedy_tokens_identical_to_transformers(demo, hf_demo):
    prompt = chat_ids(demo.tokenizer, PROMPTS[0])
    ours = [t for (t,) in generate_ids(demo.model, [prompt], SamplingParams(max_new_tokens=64))]
    with torch.no_grad():
        out = hf_demo.generate(torch.tensor([prompt]), max_new_tokens=64, do_sample=False, eos_token_id=None,
                               pad_token_id=demo.tokenizer.pad_token_id)
    assert ours == out[0, len(prompt):].tolist()


def extract_code(reply: str) -> str:
    blocks = re.findall(r"```(?:python|py)?\n(.*?)```", reply, flags=re.S)
    return max(blocks, key=len) if blocks else reply


IS_PRIME_CHECKS = textwrap.dedent("""
    assert is_prime(2)
    assert is_prime(3)
    assert is_prime(5)
    assert is_prime(13)
    assert is_prime(97)
    assert is_prime(7919)
    assert not is_prime(0)
    assert not is_prime(1)
    assert not is_prime(4)
    assert not is_prime(9)
    assert not is_prime(25)
    assert not is_prime(7917)
    assert not is_prime(-7)
    assert [n for n in range(30) if is_prime(n)] == [2, 3, 5, 7, 11, 13, 17, 19, 23, 29]
    print("ALL-PASSED")
""")


def _limit_resources() -> None:
    """In the child, before exec: CPU seconds, address space, file size, open files; no core dumps."""
    import resource

    for limit, value in [(resource.RLIMIT_CPU, 20), (resource.RLIMIT_AS, 1 << 30), (resource.RLIMIT_FSIZE, 1 << 20),
                         (resource.RLIMIT_NOFILE, 64), (resource.RLIMIT_CORE, 0)]:
        resource.setrlimit(limit, (value, value))


def run_untrusted(script, cwd) -> subprocess.CompletedProcess:
    """Model-written code: a fresh isolated interpreter with no environment, resource limits, a
    timeout, and, where the kernel allows it, its own PID and network namespaces (no network, no
    way to signal our processes). The full sandbox is the synthesis issue's; this is the floor."""
    command = [sys.executable, "-I", "-S", str(script)]
    if shutil.which("unshare") and subprocess.run(["unshare", "-pfn", "--mount-proc", "true"],
                                                   capture_output=True).returncode == 0:
        command = ["unshare", "-pfn", "--mount-proc", *command]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL, cwd=cwd,
                          env={}, preexec_fn=_limit_resources)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bfloat16 is what `make demo` runs
def test_demo_model_writes_a_correct_is_prime(demo, tmp_path, dtype):
    model = demo.model if dtype == torch.float32 else copy.deepcopy(demo.model).to(dtype)
    prompt = chat_ids(demo.tokenizer, "Write a Python function is_prime(n) that checks whether n is prime")
    reply = generate_text(model, demo.tokenizer, prompt, SamplingParams(max_new_tokens=400)).text
    code = extract_code(reply)
    assert "def is_prime" in code, reply
    script = tmp_path / "check.py"
    script.write_text(code + "\n" + IS_PRIME_CHECKS)
    result = run_untrusted(script, tmp_path)
    assert result.stdout.strip().endswith("ALL-PASSED"), (reply, result.stderr)


def test_convert_round_trip_loads_in_transformers(demo, tmp_path):
    transformers = pytest.importorskip("transformers")
    from qwen2.cli import main

    assert main(["convert", str(demo.source), str(tmp_path / "hf")]) == 0
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf", dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    text = PROMPTS[1]
    assert hf_tok(text)["input_ids"] == demo.tokenizer.encode(text)
    ids = torch.tensor([chat_ids(demo.tokenizer, PROMPTS[0])])
    with torch.no_grad():
        assert torch.equal(demo.model(ids), hf(ids).logits)
    gc = transformers.GenerationConfig.from_pretrained(tmp_path / "hf")
    assert 151645 in gc.eos_token_id and 151643 in gc.eos_token_id
