"""ms/step and peak RSS of E1TM32 (each rule) vs fp32 AdamW on CPU, side by side in one run.

Each configuration runs in its own subprocess (so peak RSS is its own) on the same batches. The E1TM
models run steps 300.. of the default 1000-step schedule (flip's stochastic votes at a mid-run gain, not
in the warmup nor past the horizon, where no trit votes).

    python benchmarks/train_step.py [--presets tiny small] [--steps 20] [--rounds 3] [--threads 2]

x fp32 is the median over rounds of each round's ratio to that round's fp32 run.
"""

import argparse
import multiprocessing as mp
import resource
import statistics
import time


def _measure(preset, fmt, rule, steps, threads, q):
    import torch

    from arbs import data as D
    from arbs import nn as anx
    from arbs.train import TrainConfig, _meta, build

    torch.set_num_threads(threads)
    cfg = TrainConfig(format=fmt, rule=rule, preset=preset)  # the default --steps 1000 sets the schedule
    corpus = D.default_corpus()
    model, h = build(_meta(cfg, corpus.info))
    opt = h.get("optimizer")
    if opt is None:
        anx.model_clock(model).step_counter = 300
    ctx = cfg.model_config().context
    times = []
    for s in range(steps + 3):
        x, y = D.get_batch(corpus.train, batch_size=cfg.batch_size, context=ctx, seed=0, step=s)
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            anx.step(model)
        times.append(time.perf_counter() - t0)
    times = sorted(times[3:])  # the first steps compile kernels and warm caches
    q.put((times[len(times) // 2] * 1e3, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


CONFIGS = (("fp32", None), ("E1TM32", "average"), ("E1TM32", "carry"), ("E1TM32", "flip"))


def _run(ctx, preset, fmt, rule, steps, threads) -> tuple[float, float]:
    q = ctx.Queue()
    p = ctx.Process(target=_measure, args=(preset, fmt, rule, steps, threads, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3, help="rounds of all configurations, interleaved")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    print(f"| preset | scheme | ms/step (median of {a.rounds} rounds x {a.steps} steps) | x fp32 | "
          f"each round's x fp32 | peak RSS MiB | x fp32 |")
    print("|---|---|---|---|---|---|---|")
    for preset in a.presets:
        # rounds interleave the configurations (fp32, average, carry, flip, fp32, ...) so that a drift of
        # this host's speed over minutes does not land on one configuration; ratios are taken per round
        runs = {c: [] for c in CONFIGS}
        for _ in range(a.rounds):
            for c in CONFIGS:
                runs[c].append(_run(ctx, preset, *c, a.steps, a.threads))
        base = runs[CONFIGS[0]]
        for c in CONFIGS:
            ms = statistics.median(r[0] for r in runs[c])
            rss = max(r[1] for r in runs[c])
            per_round = [r[0] / b[0] for r, b in zip(runs[c], base)]
            name = c[0] + (f":{c[1]}" if c[1] else " AdamW")
            print(f"| {preset} | {name} | {ms:.1f} | {statistics.median(per_round):.2f}x | "
                  f"{' '.join(f'{x:.2f}' for x in per_round)} | {rss:.0f} | {rss / max(r[1] for r in base):.2f}x |",
                  flush=True)


if __name__ == "__main__":
    main()
