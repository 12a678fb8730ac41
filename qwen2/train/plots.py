"""PNG plots of a run's metrics.jsonl (matplotlib, if installed: training works without it)."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def plot_metrics(metrics_path: Path, out_dir: Path) -> list[Path]:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots (pip install matplotlib)", file=sys.stderr)
        return []
    records = [json.loads(line) for line in metrics_path.read_text(encoding="utf-8").splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    written = []
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot([r["step"] for r in train], [r["loss"] for r in train], label="train")
    if val:
        ax.plot([r["step"] for r in val], [r["val_loss"] for r in val], "o-", label="validation")
    for r, prev in zip(train[1:], train):
        if r.get("stage") != prev.get("stage"):
            ax.axvline(prev["step"], color="grey", lw=0.5)
            ax.text(prev["step"], ax.get_ylim()[1], f" {r.get('stage')}", va="top", fontsize=8)
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out_dir / "loss.png", dpi=100)
    written.append(out_dir / "loss.png")
    plt.close(fig)
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
    rate = next((k for k in (train[0] if train else {}) if k.endswith("_per_s")), "tokens_per_s")
    for ax, key in zip(axes, ("lr", "grad_norm", rate)):
        ax.plot([r["step"] for r in train], [r.get(key, float("nan")) for r in train])
        ax.set(xlabel="step", title=key)
    fig.tight_layout()
    fig.savefig(out_dir / "training.png", dpi=100)
    written.append(out_dir / "training.png")
    plt.close(fig)
    return written
