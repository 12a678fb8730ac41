"""Packed training sequences: documents attend only within themselves and restart their positions,
so a packed row computes exactly what each document computes alone; the loss path equals the naive one."""

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from qwen2.config import PRESETS
from qwen2.model import Qwen2ForCausalLM
from qwen2.model.transformer import document_positions


@pytest.mark.parametrize("preset", ["tiny", "tiny-swa"])
def test_packed_row_equals_documents_alone(preset):
    config = PRESETS[preset]
    if preset == "tiny-swa":
        config = dataclasses.replace(config, sliding_window=4)  # shorter than the documents
    model = Qwen2ForCausalLM(config).eval()
    model.init_weights(seed=0)
    gen = torch.Generator().manual_seed(1)
    docs = [torch.randint(0, config.vocab_size, (1, n), generator=gen) for n in (5, 9, 3)]
    packed = torch.cat(docs, dim=1)
    document_ids = torch.cat([torch.full((1, d.shape[1]), i) for i, d in enumerate(docs)], dim=1)
    with torch.no_grad():
        together = model(packed, document_ids_BT=document_ids)
        start = 0
        for d in docs:
            alone = model(d)
            torch.testing.assert_close(together[:, start:start + d.shape[1]], alone, atol=1e-5, rtol=1e-5)
            start += d.shape[1]
        # without document ids the later documents see the earlier ones: different logits
        assert not torch.allclose(model(packed)[:, 5:], together[:, 5:], atol=1e-3)


def test_document_positions_restart():
    ids = torch.tensor([[0, 0, 0, 1, 1, 2, 2, 2, 2], [5, 5, 5, 5, 5, 5, 5, 5, 6]])
    assert document_positions(ids).tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 1, 2, 3, 4, 5, 6, 7, 0]]


def test_labels_give_the_summed_cross_entropy():
    model = Qwen2ForCausalLM(PRESETS["tiny"])
    model.init_weights(seed=0)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    loss = model(ids, labels_BT=labels, loss_chunk=5)
    reference = F.cross_entropy(model(ids).flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum")
    torch.testing.assert_close(loss, reference, atol=1e-4, rtol=1e-5)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    reference.backward()
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, atol=1e-5, rtol=1e-4, msg=name)


def test_activation_checkpointing_gives_the_same_loss_and_gradients():
    model = Qwen2ForCausalLM(PRESETS["tiny"])
    model.init_weights(seed=0)
    ids = torch.randint(0, 512, (2, 12), generator=torch.Generator().manual_seed(0))
    documents = torch.tensor([[0] * 5 + [1] * 7, [0] * 12])
    grads = []
    for checkpointing in (False, True):
        model.model.gradient_checkpointing = checkpointing
        model.zero_grad()
        loss = model(ids, labels_BT=ids.roll(-1, 1), document_ids_BT=documents)
        loss.backward()
        grads.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    assert torch.equal(grads[0][0], grads[1][0])
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], atol=1e-6, rtol=1e-5, msg=name)
