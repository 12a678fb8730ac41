"""The Online Merging Optimizer (Lu et al., 2024, "Online Merging Optimizers for Boosting Rewards and
Mitigating Tax in Alignment"; the Qwen2 report uses it in online preference training).

RLHF pulls the policy away from what SFT taught (the "alignment tax"). Model merging trades the
two off after training; the online merging optimizer does it at every step: the AdamW update
delta of the preference loss is sparsified like a task vector and merged with the reference task
vector tau_ref = theta_SFT - theta_base (what SFT added to the pre-trained model), so every step
moves along the reward gradient and back toward SFT's direction:

    OnDARE: theta += alpha * tau_ref' + (1 - alpha) * DARE(delta)
            tau_ref' = clamp(DARE(tau_ref)), once; DARE(x) keeps each entry with probability p and
            divides the kept ones by p; optionally the sparsified delta is rescaled to its L1 norm
            before dropping.
    OnTIES: both vectors keep their top-p share of entries by magnitude (TIES trimming), each
            entry keeps only the vectors whose sign agrees with the sign of their sum (the elected
            sign), then theta += alpha * tau_ref' + (1 - alpha) * delta'.

then decoupled weight decay. With p = 1 and alpha = 0 OnDARE is exactly AdamW (tested); OnTIES
then still drops the entries of delta whose sign loses the election against tau_ref (with
tau_ref = 0 it too is AdamW, tested). The
reference implementation adds the Adam bias corrections into the step size and epsilon to the
uncorrected root; this one computes the update as torch.optim.AdamW does.
"""

from __future__ import annotations

from typing import Iterable

import torch

MODES = ("dare", "ties")


def dare_(x: torch.Tensor, keep: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Drop-And-REscale in place: each entry survives with probability `keep`, survivors / keep."""
    if keep >= 1:
        return x
    mask = torch.rand(x.shape, generator=generator, device=x.device) < keep
    return x.mul_(mask).div_(keep)


def trim_(x: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES trimming in place: keep the top `density` share of entries by magnitude (optionally
    rescaled to the original L1 norm)."""
    if density >= 1:
        return x
    k = int(density * x.numel())
    if k < 1:
        return x.zero_()
    before = x.abs().sum()
    threshold = x.abs().flatten().kthvalue(x.numel() - k + 1).values
    x.mul_(x.abs() >= threshold)
    if rescale and before > 1e-8:
        x.mul_(before / x.abs().sum().clamp_min(1e-12))
    return x


class OnlineMergingAdamW(torch.optim.Optimizer):
    """AdamW whose updates are merged online with a reference task vector (see the module docstring).

    `reference_delta` maps each trainable parameter (by identity) to theta_SFT - theta_base; call
    with the parameters in the same order as `params` lists them."""

    def __init__(self, params: Iterable, reference_delta: dict[torch.Tensor, torch.Tensor], *, mode: str = "dare",
                 reserve_p: float = 0.1, alpha: float = 0.01, rescale: bool = False, clip: float = 1.0,
                 lr: float = 1e-5, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 0.0, seed: int = 0) -> None:
        if mode not in MODES:
            raise ValueError(f"online merging mode must be one of {MODES} (got {mode!r})")
        if not 0 < reserve_p <= 1:
            raise ValueError(f"reserve_p must be in (0, 1] (got {reserve_p})")
        if not 0 <= alpha < 1:
            raise ValueError(f"alpha must be in [0, 1) (got {alpha})")
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.mode, self.reserve_p, self.alpha, self.rescale, self.clip = mode, reserve_p, alpha, rescale, clip
        self.generator = torch.Generator().manual_seed(seed)
        for group in self.param_groups:
            for p in group["params"]:
                if p not in reference_delta:
                    raise ValueError("reference_delta lacks a trainable parameter (of shape "
                                     f"{tuple(p.shape)}); it needs theta_SFT - theta_base for every one")
                tau = reference_delta[p].detach().to(device=p.device, dtype=torch.float32).clone()
                if tau.shape != p.shape:
                    raise ValueError(f"reference delta of shape {tuple(tau.shape)} for a parameter of shape {tuple(p.shape)}")
                if mode == "dare":
                    dare_(tau, reserve_p, self.generator).clamp_(-clip, clip)
                else:
                    trim_(tau, reserve_p, rescale)
                self.state[p]["tau_ref"] = tau

    @torch.no_grad()
    def step(self, closure=None):
        loss = closure() if closure is not None else None
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "step" not in state:
                    state["step"] = 0
                    state["exp_avg"] = torch.zeros_like(p, dtype=torch.float32)
                    state["exp_avg_sq"] = torch.zeros_like(p, dtype=torch.float32)
                state["step"] += 1
                grad = p.grad.float()
                state["exp_avg"].mul_(beta1).add_(grad, alpha=1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                t = state["step"]
                denom = (state["exp_avg_sq"] / (1 - beta2 ** t)).sqrt_().add_(group["eps"])
                delta = state["exp_avg"].div(1 - beta1 ** t).div_(denom).mul_(-group["lr"])
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])  # decoupled, as AdamW (before the update)
                p.add_(self._merge(delta, state["tau_ref"]).to(p.dtype))
        return loss

    def _merge(self, delta: torch.Tensor, tau: torch.Tensor) -> torch.Tensor:
        if self.mode == "dare":
            before = delta.abs().sum()
            dare_(delta, self.reserve_p, self.generator)
            if self.rescale and before > 1e-8:
                delta.mul_(before / delta.abs().sum().clamp_min(1e-12)).clamp_(-self.clip, self.clip)
            return tau * self.alpha + delta * (1 - self.alpha)
        trim_(delta, self.reserve_p, self.rescale)
        elected = torch.where(tau + delta >= 0, 1.0, -1.0)
        agree_tau, agree_delta = (torch.sign(tau) == elected), (torch.sign(delta) == elected)
        return tau * agree_tau * self.alpha + delta * agree_delta * (1 - self.alpha)


def reference_task_vector(params: dict[str, torch.nn.Parameter], base: torch.nn.Module
                          ) -> dict[torch.Tensor, torch.Tensor]:
    """theta_SFT - theta_base for each named trainable parameter of the SFT model (`params`, names
    as in its state dict) against the pre-trained `base` it was fine-tuned from."""
    base_state = base.state_dict()
    delta = {}
    for name, p in params.items():
        if name not in base_state or base_state[name].shape != p.shape:
            raise ValueError(f"the base model has no parameter {name!r} of shape {tuple(p.shape)}: is it the model "
                             "the SFT model was fine-tuned from?")
        delta[p] = p.detach().float() - base_state[name].detach().float()
    return delta
