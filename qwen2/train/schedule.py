"""Learning-rate schedules as pure functions of the step (so resuming needs only the step)."""

from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "constant")


def learning_rate(step: int, *, total_steps: int, peak: float, warmup_steps: int, schedule: str = "cosine",
                  min_ratio: float = 0.1, decay_fraction: float = 0.2) -> float:
    """The learning rate for optimizer step `step` (0-based).

    All schedules warm up linearly from peak / warmup_steps to peak over `warmup_steps`. Then
    "cosine" decays to min_ratio * peak at the last step; "wsd" (warmup-stable-decay) holds the
    peak and decays linearly to min_ratio * peak over the last `decay_fraction` of the steps;
    "constant" holds the peak."""
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES} (got {schedule!r})")
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    floor = peak * min_ratio
    if schedule == "constant":
        return peak
    if schedule == "cosine":
        span = max(1, total_steps - warmup_steps - 1)
        progress = min(1.0, (step - warmup_steps) / span)
        return floor + (peak - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    decay_steps = max(1, round(total_steps * decay_fraction))
    decay_start = total_steps - decay_steps
    if step < decay_start:
        return peak
    progress = min(1.0, (step - decay_start + 1) / decay_steps)
    return peak + (floor - peak) * progress
