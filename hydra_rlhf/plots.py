"""PNG plots of a run: reward and KL over iterations, memory per stage. Headless (Agg)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_training(history: list[dict], path: str | Path) -> Path:
    """Reward-head score and KL to the reference, per iteration."""
    plt = _pyplot()
    steps = range(1, len(history) + 1)
    fig, (reward_ax, kl_ax) = plt.subplots(1, 2, figsize=(10, 3.5))
    reward_ax.plot(steps, [m["objective/reward"] for m in history], marker="o")
    reward_ax.set(title="reward head score (mean)", xlabel="iteration")
    kl_ax.plot(steps, [m["objective/kl"] for m in history], marker="o", color="tab:red")
    kl_ax.set(title="KL to reference (nats / sequence)", xlabel="iteration")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)


def plot_memory(columns: dict[str, dict[str, dict]], path: str | Path, title: str = "Peak memory per PPO stage") -> Path:
    """Grouped bars: one group per stage, one bar per column (a mode, or a run), in MiB."""
    plt = _pyplot()
    stages = []
    for summary in columns.values():
        stages += [s for s in summary if s not in stages]
    width = 0.8 / max(len(columns), 1)
    fig, ax = plt.subplots(figsize=(max(6, 1.4 * len(stages)), 4))
    for i, (name, summary) in enumerate(columns.items()):
        peaks = [summary.get(s, {}).get("peak_bytes", 0) / 2**20 for s in stages]
        ax.bar([x + i * width for x in range(len(stages))], peaks, width, label=name)
    ax.set_xticks([x + width * (len(columns) - 1) / 2 for x in range(len(stages))], stages)
    ax.set(ylabel="peak MiB", title=title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return Path(path)
