"""Does the built-in model keep its learning with Llama's SwiGLU MLP instead of GELU? (issue 15, item 1)

Trains the tiny preset with each MLP (gelu: the model before; swiglu: the new default, 3 matrices of
hidden 2/3 * 4d rounded up to 32) as fp32 AdamW and E1TM32 flip, seeds 0..2, the default 1000 steps on the
default corpus, and prints val loss per run plus each cell's mean and spread (max - min over seeds).

    python experiments/mlp_swiglu.py [--seeds 0 1 2] [--steps 1000] [--jobs 12] [--out /tmp/mlp_swiglu]

Each run uses one torch thread; --jobs runs that many at once (a many-core machine does all 12 together).
"""

import argparse
import dataclasses
import json
import statistics
from concurrent.futures import ProcessPoolExecutor

from arbs.models import config as model_config
from arbs.training import TrainConfig, train


def one(mlp: str, fmt: str, seed: int, steps: int, out: str) -> dict:
    model_config.PRESETS["tiny"] = dataclasses.replace(model_config.PRESETS["tiny"], mlp=mlp)
    r = train(TrainConfig(format=fmt, seed=seed, steps=steps, threads=1, out=f"{out}/{mlp}-{fmt}-{seed}"))
    rec = {"mlp": mlp, "format": fmt, "seed": seed, "val_loss": r.val_loss, "val_loss_fused": r.val_loss_fused,
           "ms_per_step": r.ms_per_step}
    print(json.dumps(rec), flush=True)
    return rec


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--out", default="/tmp/mlp_swiglu")
    ap.add_argument("--jobs", type=int, default=1)
    a = ap.parse_args()
    runs = [(mlp, fmt, seed) for mlp in ("gelu", "swiglu") for fmt in ("fp32", "E1TM32") for seed in a.seeds]
    with ProcessPoolExecutor(a.jobs) as pool:
        recs = list(pool.map(one, *zip(*runs), [a.steps] * len(runs), [a.out] * len(runs)))
    results = {}
    for r in recs:
        v = r["val_loss_fused"] if r["val_loss_fused"] is not None else r["val_loss"]
        results.setdefault((r["mlp"], r["format"]), []).append(v)
    print("| mlp | format | val loss per seed (fused for E1TM) | mean | spread |")
    print("|---|---|---|---:|---:|")
    for (mlp, fmt), vs in results.items():
        print(f"| {mlp} | {fmt} | {' '.join(f'{v:.4f}' for v in vs)} | {statistics.mean(vs):.4f} | {max(vs) - min(vs):.4f} |")


if __name__ == "__main__":
    main()
