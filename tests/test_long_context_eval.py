"""Long-context evaluation helpers on a tiny model: chunked scoring equals one plain forward, the
switches set what they say, and bad command lines are named."""

import dataclasses
import math

import pytest
import torch
import torch.nn.functional as F

from qwen2.cli import main
from qwen2.config import PRESETS
from qwen2.eval.long_context import configure_long_context, long_perplexity, sequence_nll, token_nll
from qwen2.model import Qwen2ForCausalLM


def _tiny():
    model = Qwen2ForCausalLM(dataclasses.replace(PRESETS["tiny"], max_position_embeddings=64))
    model.init_weights(seed=0)
    return model.eval()


def test_chunked_scoring_equals_one_forward():
    model = _tiny()
    ids = torch.randint(0, 256, (60,), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model(ids[None])[0, :-1]
    expected = F.cross_entropy(logits, ids[1:], reduction="none")
    per_token = token_nll(model, ids, chunk=7, head_rows=5)  # chunk and head boundaries misaligned
    torch.testing.assert_close(per_token, expected, rtol=1e-5, atol=1e-5)
    total, count = sequence_nll(model, ids, chunk=7)
    expected = expected.sum().item()
    assert count == 59 and total == pytest.approx(expected, rel=1e-5)
    (result,) = long_perplexity(model, ids.tolist(), [30], windows=2)
    assert result.windows == 2 and result.tokens == 58 and result.perplexity > 1 and math.isfinite(result.perplexity)


def test_configure_long_context_sets_yarn_and_dca():
    model = _tiny()
    settings = configure_long_context(model, yarn=4.0)
    assert model.config.rope_scaling == {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    assert settings["max_position_embeddings"] == model.config.max_position_embeddings == 256
    model = _tiny()
    configure_long_context(model, yarn=4.0, dca=True)
    assert model.config.rope_scaling is None  # plain RoPE under DCA; YaRN's temperature only
    assert model.config.dual_chunk_attention_config == {"chunk_size": 64, "local_size": 4,
                                                        "original_max_position_embeddings": 64}
    assert model.model.dca is not None and model.model.dca.temperature(256) == pytest.approx(0.1 * math.log(4) + 1)


@pytest.mark.parametrize("argv,fragment", [
    (["eval", "needle", "--lengths", "4k"], "--lengths takes comma-separated integers"),
    (["eval", "needle", "--depths", "0,1.5"], "--depths takes numbers in [0, 1]"),
    (["eval", "ppl", "--file", "/nonexistent.txt", "--lengths", "512"], "nonexistent.txt"),
])
def test_bad_eval_arguments_are_named(argv, fragment, capsys):
    assert main(argv) == 2
    assert fragment in capsys.readouterr().err
