"""Chunked cross-entropy equals the naive one (value and gradients); DPO matches its formula."""

import math

import pytest
import torch
import torch.nn.functional as F

from qwen2.model.loss import IGNORE_INDEX, chunked_cross_entropy, naive_cross_entropy
from qwen2.train.losses import dpo_loss, sequence_logps


def inputs(n=300, d=32, v=1000, seed=0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen, dtype=torch.float64).requires_grad_()
    w = (torch.randn(v, d, generator=gen, dtype=torch.float64) * 0.3).requires_grad_()
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[::7] = IGNORE_INDEX
    return h, w, labels


@pytest.mark.parametrize("chunk", [1, 64, 1000])
def test_chunked_equals_naive_in_value_and_gradients(chunk):
    h, w, labels = inputs()
    naive = naive_cross_entropy(h, w, labels)
    gh, gw = torch.autograd.grad(naive * 0.7, (h, w))
    ours = chunked_cross_entropy(h, w, labels, chunk=chunk)
    oh, ow = torch.autograd.grad(ours * 0.7, (h, w))  # the incoming gradient scales both
    # float32 softmax in both: agreement to float32 rounding
    torch.testing.assert_close(ours.double(), naive.double(), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(oh, gh, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(ow, gw, rtol=1e-5, atol=1e-6)


def test_bf16_autocast_and_no_grad_paths():
    h, w, labels = inputs(n=64, d=64, v=512)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = chunked_cross_entropy(h.float(), w.float(), labels, chunk=16)
    reference = naive_cross_entropy(h.detach(), w.detach(), labels).float()
    assert loss.dtype == torch.float32 and abs(loss.item() - reference.item()) / reference.item() < 2e-2
    with torch.no_grad():
        assert torch.allclose(chunked_cross_entropy(h, w, labels), naive_cross_entropy(h, w, labels).float())
    all_ignored = torch.full_like(labels, IGNORE_INDEX)
    assert chunked_cross_entropy(h, w, all_ignored).item() == 0.0


def test_sequence_logps_sum_label_log_probs():
    logits = torch.randn(2, 5, 11)
    labels = torch.tensor([[1, 2, IGNORE_INDEX, 4, 5], [IGNORE_INDEX] * 4 + [3]])
    lp = F.log_softmax(logits, -1)
    expected = torch.stack([lp[0, 0, 1] + lp[0, 1, 2] + lp[0, 3, 4] + lp[0, 4, 5], lp[1, 4, 3]])
    torch.testing.assert_close(sequence_logps(logits, labels), expected)


def test_dpo_matches_the_formula_by_hand():
    pc, pr, rc, rr = map(torch.tensor, ([-10.0, -20.0], [-12.0, -18.0], [-11.0, -19.0], [-11.5, -19.5]))
    beta, eps = 0.5, 0.1
    losses, m = dpo_loss(pc, pr, rc, rr, beta=beta, label_smoothing=eps)
    for i in range(2):
        h = (pc[i] - rc[i]).item() - (pr[i] - rr[i]).item()
        sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
        expected = -(1 - eps) * math.log(sig(beta * h)) - eps * math.log(sig(-beta * h))
        assert losses[i].item() == pytest.approx(expected, rel=1e-6)
    # pair 0: chosen up 1.0, rejected down 0.5 -> reward margin beta * 1.5; pair 1: chosen down, rejected up
    assert m["rewards/chosen"].item() == pytest.approx(beta * (1.0 + -1.0) / 2)
    assert m["rewards/margin"].item() == pytest.approx(beta * (1.5 + -2.5) / 2)
    assert m["rewards/accuracy"].item() == 0.5
    ipo, _ = dpo_loss(pc, pr, rc, rr, beta=beta, loss_type="ipo")
    assert ipo[0].item() == pytest.approx((1.5 - 1 / (2 * beta)) ** 2)
    with pytest.raises(ValueError, match="loss_type"):
        dpo_loss(pc, pr, rc, rr, loss_type="hinge2")
