"""Training losses beyond the model's own cross-entropy (qwen2.model.loss): sequence log-probs, DPO, Bradley-Terry."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from qwen2.model.loss import IGNORE_INDEX


def sequence_logps(logits_BTV: torch.Tensor, labels_BT: torch.Tensor) -> torch.Tensor:
    """Sum of log p(label) over each row's loss positions (labels already shifted): (B,), float32."""
    logps = torch.log_softmax(logits_BTV.float(), dim=-1)
    valid = labels_BT != IGNORE_INDEX
    picked = logps.gather(-1, labels_BT.clamp(min=0)[..., None])[..., 0]
    return (picked * valid).sum(-1)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, reference_chosen: torch.Tensor,
             reference_rejected: torch.Tensor, *, beta: float = 0.1, label_smoothing: float = 0.0,
             loss_type: str = "sigmoid") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DPO (Rafailov et al. 2023) on sequence log-probs (B,): per-pair losses (B,) and the metrics.

    h = (pi_c - ref_c) - (pi_r - ref_r). "sigmoid": -(1 - eps) log sigmoid(beta h) - eps log sigmoid(-beta h)
    (eps = label_smoothing, the conservative DPO of noisy labels); "ipo": (h - 1 / (2 beta))^2.
    Rewards are beta * (pi - ref) for chosen and rejected; accuracy is the share with chosen > rejected."""
    chosen_ratio = policy_chosen - reference_chosen
    rejected_ratio = policy_rejected - reference_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        losses = -(1 - label_smoothing) * F.logsigmoid(beta * h) - label_smoothing * F.logsigmoid(-beta * h)
    elif loss_type == "ipo":
        losses = (h - 1 / (2 * beta)) ** 2
    else:
        raise ValueError(f"DPO loss_type must be 'sigmoid' or 'ipo' (got {loss_type!r})")
    chosen_reward, rejected_reward = beta * chosen_ratio.detach(), beta * rejected_ratio.detach()
    metrics = {"rewards/chosen": chosen_reward.mean(), "rewards/rejected": rejected_reward.mean(),
               "rewards/margin": (chosen_reward - rejected_reward).mean(),
               "rewards/accuracy": (chosen_reward > rejected_reward).float().mean()}
    return losses, metrics


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor, *,
                       margin: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Reward-model loss on scalar rewards (B,): -log sigmoid(r_c - r_r - m) per pair (m: an
    optional required margin, as in Llama 2's reward models; 0 without one), and the metrics."""
    difference = chosen.float() - rejected.float()
    losses = -F.logsigmoid(difference - (margin if margin is not None else 0.0))
    metrics = {"reward/accuracy": (difference > 0).float().mean(), "reward/margin": difference.detach().mean(),
               "reward/chosen": chosen.detach().float().mean(), "reward/rejected": rejected.detach().float().mean()}
    return losses, metrics
