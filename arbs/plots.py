"""PNG figures: a run's loss curve and comparison plots (matplotlib, headless Agg backend)."""

from __future__ import annotations

from pathlib import Path

from . import store
from .errors import ArbsError


def _pyplot():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, out: Path) -> None:
    """Write ``fig`` as PNG to ``out``; ArbsError naming the file and the cause if the file system refuses."""
    plt = _pyplot()
    try:
        fig.savefig(out)
    except OSError as e:
        raise ArbsError(f"could not write '{out}': {e.strerror or e}") from e
    finally:
        plt.close(fig)


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
    _save(fig, out)
    return out


def plot_compare(rows, out_dir: Path) -> tuple[Path, Path]:
    """``val_curves.png`` (validation loss against step, one line per scheme) and ``final_loss.png`` (bars)."""
    plt = _pyplot()
    out_dir = Path(out_dir)
    curves = out_dir / "val_curves.png"
    fig, ax = plt.subplots(figsize=(8, 4.8), dpi=110)
    for r in rows:
        if r.curve:
            s, v = zip(*r.curve)
            ax.plot(s, v, marker="o", ms=2.5, label=r.label, ls="--" if r.format in ("fp32",) else "-")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/byte)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    _save(fig, curves)

    bars = out_dir / "final_loss.png"
    fig, ax = plt.subplots(figsize=(8, 0.35 * len(rows) + 1.2), dpi=110)
    labels = [r.label for r in rows][::-1]
    vals = [r.val_loss for r in rows][::-1]
    colors = ["tab:gray" if not r.rule else ("tab:orange" if r.fused else "tab:blue") for r in rows][::-1]
    ax.barh(labels, vals, color=colors)
    for y, v in enumerate(vals):
        ax.text(v, y, f" {v:.3f}", va="center", fontsize=8)
    ax.set_xlabel("final validation loss (nats/byte; grey: float latents, blue: E1TM, orange: E1TM fused)")
    ax.set_xlim(0, max(vals) * 1.15)
    fig.tight_layout()
    _save(fig, bars)
    return curves, bars
