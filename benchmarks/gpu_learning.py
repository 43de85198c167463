"""Learning at scale on one GPU: the built-in model at 12 x 768 (base preset) on this Python installation's text.

Runs ``arbs train`` (the CLI, as a user would) for each entry, at equal tokens:

* ``dense``: fp32 master weights + AdamW under bf16 autocast, ``--steps N``, a checkpoint at N/2;
* ``bitnet``: BitNet-style absmean ternary STE + AdamW, N steps;
* ``flip``: E1TM32 flip from scratch, N steps;
* ``carry@init`` / ``flip@init``: E1TM32 from the dense run's step N/2 checkpoint (``--init``), N/2 steps, so
  they end at the same token count as the others.

Every ternary run reports its fused validation loss too. The corpus is ``--data python:all`` (every ``*.py``,
``*.md``, ``*.txt`` of the installation; ``arbs.data.install_corpus`` records the file rule and sha256).

    python benchmarks/gpu_learning.py --part dense   --steps N --out runs/gpu_learning   # dense, carry@init, flip@init
    python benchmarks/gpu_learning.py --part scratch --steps N --out runs/gpu_learning   # bitnet, flip
    python benchmarks/gpu_learning.py --part report  --out runs/gpu_learning            # table + curves PNG

Parts exist so each fits a 10-minute device call; ``--part all`` runs everything. ``--smoke`` uses the
tiny preset on the CPU with the default corpus, to check the script runs.
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

ENTRIES = {
    "dense": ("fp32", None, False),
    "bitnet": ("absmean", None, False),
    "flip": ("E1TM32", "flip", False),
    "carry@init": ("E1TM32", "carry", True),
    "flip@init": ("E1TM32", "flip", True),
}
PARTS = {"dense": ("dense", "carry@init", "flip@init"), "scratch": ("bitnet", "flip")}


def _run_dir(out: Path, name: str) -> Path:
    return out / name.replace("@", "-")


def train(name: str, a, out: Path) -> None:
    fmt, rule, from_dense = ENTRIES[name]
    steps = a.steps // 2 if from_dense else a.steps
    cmd = [sys.executable, "-m", "arbs_cli.main", "train", "--format", fmt, "--steps", str(steps),
           "--batch-size", str(a.batch_size), "--seed", str(a.seed), "--eval-every", str(max(1, steps // 10)),
           "--eval-batches", str(a.eval_batches), "--out", str(_run_dir(out, name)), "--json"]
    cmd += ["--preset", "tiny", "--device", "cpu"] if a.smoke else ["--preset", "base", "--device", "cuda",
                                                                     "--data", "python:all"]
    if rule:
        cmd += ["--rule", rule]
    if fmt in ("fp32", "absmean"):
        cmd += ["--lr", str(a.lr), "--warmup", str(a.warmup)]
    if name == "dense":
        cmd += ["--save-every", str(a.steps // 2), "--keep", "3"]
    if from_dense:
        cmd += ["--init", str(_run_dir(out, "dense") / f"step_{a.steps // 2}")]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def _metrics(run: Path) -> list[dict]:
    p = run / "metrics.jsonl"
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()] if p.exists() else []


def report(a, out: Path) -> str:
    tokens_per_step = a.batch_size * (128 if a.smoke else 512)
    rows, curves = [], {}
    for name, (fmt, rule, from_dense) in ENTRIES.items():
        recs = _metrics(_run_dir(out, name))
        evals = [r for r in recs if "val_loss" in r]
        if not evals:
            continue
        offset = a.steps // 2 if from_dense else 0
        curves[name] = ([(r["step"] + offset) * tokens_per_step for r in evals], [r["val_loss"] for r in evals])
        fused = next((r["val_loss_fused"] for r in reversed(recs) if "val_loss_fused" in r), None)
        ms = [r["ms_per_step"] for r in recs if r.get("ms_per_step")]
        rows.append((name, evals[-1]["val_loss"], fused, (evals[-1]["step"] + offset) * tokens_per_step,
                     ms[-1] if ms else math.nan))
    dense = next((r[1] for r in rows if r[0] == "dense"), math.nan)
    lines = ["| run | val loss (nats/byte) | fused | / dense | tokens | ms/step |", "|---|---:|---:|---:|---:|---:|"]
    for name, v, f, tok, ms in rows:
        best = f if f is not None else v
        lines.append(f"| {name} | {v:.4f} | {'' if f is None else f'{f:.4f}'} | {best / dense:.3f}x | "
                     f"{tok / 1e6:.1f}M | {ms:.1f} |")
    table = "\n".join(lines)
    (out / "table.md").write_text(table + "\n")
    if curves:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, (x, y) in curves.items():
            ax.plot([t / 1e6 for t in x], y, label=name, marker="." if len(x) < 30 else None)
        ax.set_xlabel("tokens (M)")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.set_title("base preset (85M), python:all corpus")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "curves.png", dpi=120)
    return table


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--part", choices=("dense", "scratch", "report", "all"), default="all")
    ap.add_argument("--steps", type=int, default=8000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--eval-batches", type=int, default=20)
    ap.add_argument("--lr", type=float, default=1e-3, help="dense and bitnet: AdamW peak learning rate")
    ap.add_argument("--warmup", type=int, default=200, help="dense and bitnet: warmup steps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/gpu_learning")
    ap.add_argument("--smoke", action="store_true", help="tiny preset on the CPU (checks the script runs)")
    a = ap.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    # "all": the most telling comparisons first, so a run cut short by a time limit still has them
    names = {"all": ("dense", "flip", "flip@init", "bitnet", "carry@init"), "report": ()}.get(a.part, PARTS.get(a.part, ()))
    for name in names:
        train(name, a, out)
    print(report(a, out))
    if os.environ.get("OUT"):
        print(f"(table and curves in {out})")


if __name__ == "__main__":
    main()
