"""PNG figures: a run's loss curve and comparison plots (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

from . import store


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _last_per_step(records: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) for ``key``, keeping the latest record of each step (a resumed run re-logs some)."""
    by_step = {r["step"]: r[key] for r in records if r.get(key) is not None}
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def plot_run(run_dir: Path, out: Path | None = None) -> Path:
    """Write ``loss.png`` (train and validation loss, nats/byte, against step) for a run directory."""
    plt = _pyplot()
    records = store.read_metrics(run_dir)
    out = Path(out or Path(run_dir) / "loss.png")
    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    for key, label in (("train_loss", "train (at eval steps)"), ("val_loss", "validation")):
        s, v = _last_per_step(records, key)
        if s:
            ax.plot(s, v, marker="o", ms=3, label=label)
    fused = [r for r in records if r.get("val_loss_fused") is not None]
    if fused:
        r = fused[-1]
        ax.scatter([r["step"]], [r["val_loss_fused"]], color="crimson", zorder=5, label=f"validation after fuse (gap {r['fuse_gap']:+.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/byte)")
    ax.set_title(Path(run_dir).name)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)
    return out
