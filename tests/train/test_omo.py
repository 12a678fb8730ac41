"""The Online Merging Optimizer: exactly AdamW at reserve 1 / alpha 0; DARE and TIES as defined."""

import pytest
import torch

from qwen2.train.omo import OnlineMergingAdamW, dare_, reference_task_vector, trim_


def quadratic_run(make_optimizer, steps=5):
    torch.manual_seed(0)
    w = torch.nn.Parameter(torch.randn(8, 4))
    target = torch.randn(8, 4)
    optimizer = make_optimizer([w])
    for _ in range(steps):
        optimizer.zero_grad()
        ((w - target) ** 2).sum().backward()
        optimizer.step()
    return w.detach().clone()


@pytest.mark.parametrize("mode", ["dare", "ties"])
def test_keep_all_and_alpha_zero_is_adamw(mode):
    expected = quadratic_run(lambda ps: torch.optim.AdamW(ps, lr=0.05, weight_decay=0.1))
    got = quadratic_run(lambda ps: OnlineMergingAdamW(ps, {ps[0]: torch.randn(8, 4)}, mode=mode, reserve_p=1.0,
                                                      alpha=0.0, lr=0.05, weight_decay=0.1))
    if mode == "ties":  # the sign election still zeroes delta entries that disagree with tau + delta
        assert not torch.equal(expected, got)
        got = quadratic_run(lambda ps: OnlineMergingAdamW(ps, {ps[0]: torch.zeros(8, 4)}, mode=mode, reserve_p=1.0,
                                                          alpha=0.0, lr=0.05, weight_decay=0.1))
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_dare_keeps_a_share_and_preserves_the_sum_in_expectation():
    x = torch.ones(200_000)
    dare_(x, 0.1, torch.Generator().manual_seed(0))
    kept = (x != 0).float().mean().item()
    assert abs(kept - 0.1) < 0.005 and set(x.unique().tolist()) == {0.0, 10.0}
    assert abs(x.mean().item() - 1.0) < 0.05


def test_trim_keeps_the_largest_magnitudes():
    x = torch.tensor([0.1, -5.0, 0.3, 2.0, -0.2, 0.0, 4.0, -1.0])
    trim_(x, 0.25)
    assert x.tolist() == [0, -5.0, 0, 0, 0, 0, 4.0, 0]
    y = torch.tensor([1.0, -3.0, 0.5, 0.5])
    trim_(y, 0.5, rescale=True)
    assert y.abs().sum().item() == pytest.approx(5.0) and (y[2:] == 0).all()


def test_ties_merge_elects_a_sign_and_weights_by_alpha():
    w = torch.nn.Parameter(torch.zeros(4))
    tau = torch.tensor([1.0, -1.0, 2.0, -0.1])
    optimizer = OnlineMergingAdamW([w], {w: tau}, mode="ties", reserve_p=1.0, alpha=0.25, lr=0.1)
    w.grad = torch.tensor([-1.0, -1.0, 1.0, -1.0])  # Adam's first step moves each entry by -lr * sign(grad)
    optimizer.step()
    # delta = [+0.1, +0.1, -0.1, +0.1]; elected sign of tau + delta: [+, -, +, +]
    expected = torch.tensor([0.25 * 1.0 + 0.75 * 0.1, 0.25 * -1.0, 0.25 * 2.0, 0.75 * 0.1])
    torch.testing.assert_close(w.detach(), expected, atol=1e-6, rtol=0)


def test_dare_merge_adds_the_reference_vector_each_step():
    w = torch.nn.Parameter(torch.zeros(3))
    tau = torch.tensor([0.5, -0.5, 2.0])
    optimizer = OnlineMergingAdamW([w], {w: tau}, mode="dare", reserve_p=1.0, alpha=0.5, lr=0.1, clip=1.0)
    w.grad = torch.tensor([1.0, -1.0, 1.0])
    optimizer.step()
    # tau clamped to [-1, 1] once; delta = -0.1 * sign(grad)
    torch.testing.assert_close(w.detach(), torch.tensor([0.5 * 0.5 - 0.05, -0.25 + 0.05, 0.5 - 0.05]),
                               atol=1e-6, rtol=0)


def test_reference_task_vector_and_bad_settings():
    sft, base = torch.nn.Linear(3, 2), torch.nn.Linear(3, 2)
    delta = reference_task_vector(dict(sft.named_parameters()), base)
    torch.testing.assert_close(delta[sft.weight], sft.weight.detach() - base.weight.detach())
    with pytest.raises(ValueError, match="base model has no parameter"):
        reference_task_vector(dict(sft.named_parameters()), torch.nn.Linear(4, 2))
    with pytest.raises(ValueError, match="reserve_p"):
        OnlineMergingAdamW(sft.parameters(), delta, reserve_p=0)
    with pytest.raises(ValueError, match="lacks a trainable parameter"):
        OnlineMergingAdamW([torch.nn.Parameter(torch.zeros(2))], delta)
