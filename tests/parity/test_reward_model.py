"""The reward model is transformers' Qwen2ForSequenceClassification (one label): same rewards, and
each side loads the other's saved directory."""

import dataclasses

import pytest
import torch

from qwen2.config import PRESETS
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.reward import Qwen2RewardModel

transformers = pytest.importorskip("transformers")

ATOL = 1e-5
PAD = 0


def our_reward_model(preset: str = "tiny") -> Qwen2RewardModel:
    config = dataclasses.replace(PRESETS[preset])
    lm = Qwen2ForCausalLM(config)
    lm.init_weights(seed=0)
    return Qwen2RewardModel.from_causal_lm(lm, pad_token_id=PAD, seed=3).eval()


def right_padded_batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, vocab, (3, 17), generator=g)
    mask = torch.ones_like(ids)
    for row, length in enumerate((17, 9, 4)):
        ids[row, length:] = PAD
        mask[row, length:] = 0
    return ids, mask


@pytest.mark.parametrize("preset", ["tiny", "tiny-mha-untied"])
def test_rewards_match_transformers_through_a_saved_directory(tmp_path, preset):
    from qwen2.checkpoint.safetensors import load_hf_model, save_hf_model

    ours = our_reward_model(preset)
    save_hf_model(ours, tmp_path, dtype=torch.float32)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert type(theirs).__name__ == "Qwen2ForSequenceClassification" and theirs.config.num_labels == 1
    ids, mask = right_padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        expected = theirs(input_ids=ids, attention_mask=mask).logits.squeeze(-1)
        torch.testing.assert_close(ours(ids, attention_mask_BS=mask), expected, atol=ATOL, rtol=0)
        # each row alone, unpadded: the same reward as in the padded batch
        for row, length in enumerate((17, 9, 4)):
            alone = ours(ids[row:row + 1, :length])
            torch.testing.assert_close(alone, expected[row:row + 1], atol=ATOL, rtol=0)
        loaded = load_hf_model(tmp_path, dtype=torch.float32)
        assert isinstance(loaded, Qwen2RewardModel)
        torch.testing.assert_close(loaded(ids, attention_mask_BS=mask), expected, atol=ATOL, rtol=0)


def test_a_transformers_reward_model_loads_here(tmp_path):
    from qwen2.checkpoint.safetensors import load_hf_model

    config = transformers.Qwen2Config(**{**PRESETS["tiny"].to_dict(), "num_labels": 1, "pad_token_id": PAD})
    torch.manual_seed(0)
    theirs = transformers.Qwen2ForSequenceClassification(config).eval()
    theirs.save_pretrained(tmp_path)
    ours = load_hf_model(tmp_path, dtype=torch.float32)
    ids, mask = right_padded_batch(ours.config.vocab_size)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids, attention_mask_BS=mask),
                                   theirs(input_ids=ids, attention_mask=mask).logits.squeeze(-1), atol=ATOL, rtol=0)


def test_left_padding_reads_the_same_last_token():
    ours = our_reward_model()
    ids, mask = right_padded_batch(ours.config.vocab_size)
    left_ids, left_mask = torch.full_like(ids, PAD), torch.zeros_like(mask)
    for row in range(3):
        n = int(mask[row].sum())
        left_ids[row, -n:], left_mask[row, -n:] = ids[row, :n], 1
    with torch.no_grad():
        torch.testing.assert_close(ours(left_ids, attention_mask_BS=left_mask), ours(ids, attention_mask_BS=mask),
                                   atol=ATOL, rtol=0)


def test_a_multi_label_config_is_refused():
    config = dataclasses.replace(PRESETS["tiny"], extra={"id2label": {"0": "a", "1": "b"}},
                                 architectures=["Qwen2ForSequenceClassification"])
    with pytest.raises(ValueError, match="one label"):
        Qwen2RewardModel(config)
