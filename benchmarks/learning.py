"""Learning benchmark (issue: training that learns): validation loss at equal steps on the tiny preset.

fp32 AdamW, and E1TM32 with each rule from scratch and from the fp32 run (--init), fused and unfused,
with the persistent training-state bits/weight. Prints the table and the targets:
flip from scratch within 0.15 nats/byte of fp32; carry@init within 0.08; fuse gap <= 0.02.

    python benchmarks/learning.py [--steps 1000] [--out runs/learning]

Pointed at an `arbs compare` output (--out runs/compare, same steps and seed) it reads back the entries
that compare already trained instead of training them again; it then rewrites that directory's
compare.md/compare.json/plots with its own entry list.
"""

import argparse

from arbs.compare import CompareConfig, compare, render_markdown

ENTRIES = ("fp32", "E1TM32:average", "E1TM32:carry", "E1TM32:flip",
           "E1TM32:average@init", "E1TM32:carry@init", "E1TM32:flip@init")


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=CompareConfig.steps)
    ap.add_argument("--preset", default="tiny")
    ap.add_argument("--out", default="runs/learning")
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args()
    cfg = CompareConfig(entries=ENTRIES, steps=a.steps, preset=a.preset, out=a.out, seed=a.seed)
    rows = compare(cfg, on_entry=lambda e, i, n: print(f"[{i + 1}/{n}] {e.label}", flush=True))
    print(render_markdown(cfg, rows))
    by = {r.label: r.val_loss for r in rows}
    fp32 = by["fp32"]
    checks = [
        ("flip from scratch - fp32 <= 0.15", by["E1TM32:flip"] - fp32, 0.15),
        ("carry@init - fp32 <= 0.08", by["E1TM32:carry@init"] - fp32, 0.08),
        ("fuse gap, flip (default rule) <= 0.02", by["E1TM32:flip fused"] - by["E1TM32:flip"], 0.02),
        ("fuse gap, flip@init (default rule with --init) <= 0.02", by["E1TM32:flip@init fused"] - by["E1TM32:flip@init"], 0.02),
        ("fuse gap, carry@init <= 0.02", by["E1TM32:carry@init fused"] - by["E1TM32:carry@init"], 0.02),
    ]
    for name, got, limit in checks:
        print(f"{'PASS' if got <= limit else 'MISS'}  {name}: {got:+.4f}")


if __name__ == "__main__":
    main()
