"""Fixtures: a tiny random model behind a live server."""

from __future__ import annotations

import dataclasses

import pytest

from live_server import API_KEY, live_server
from qwen2.checkpoint.loader import Pretrained
from qwen2.config import PRESETS
from qwen2.inference.engine import EngineConfig
from qwen2.model import Qwen2ForCausalLM


@pytest.fixture(scope="session")
def tiny_pretrained(byte_tokenizer) -> Pretrained:
    config = dataclasses.replace(PRESETS["tiny"], eos_token_id=258, max_position_embeddings=256)
    model = Qwen2ForCausalLM(config)
    model.init_weights(seed=0)
    return Pretrained(model.eval(), byte_tokenizer, {}, source="tiny")


@pytest.fixture(scope="module")
def server(tiny_pretrained):
    with live_server(tiny_pretrained, EngineConfig(max_batch_size=4, block_size=8), api_key=API_KEY) as live:
        yield live
