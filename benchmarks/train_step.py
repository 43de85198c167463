"""ms/step and peak RSS of E1TM32 (each rule) vs fp32 AdamW on CPU, side by side in one run.

Step time: one process per preset builds all four models and runs their steps interleaved
(fp32, average, carry, flip, fp32, ...; the order rotates every round), each on the same batch, so
that every E1TM step is timed next to an fp32 step taken within a fraction of a second of it. This
VM's speed drifts by +-20 % over seconds to minutes; timed in separate blocks or processes, that
drift, not the scheme, decided the ratio. ``x fp32`` is the median over steps of the ratio of a
configuration's step to the fp32 step of the same round; the spread column gives its quartiles.

Peak RSS: each configuration in its own subprocess (so the figure is its own), a few steps.

The E1TM models run steps 300.. of the default 1000-step schedule (flip's stochastic votes at a
mid-run gain, not in the warmup nor past the horizon, where no trit votes).

    python benchmarks/train_step.py [--presets tiny small] [--steps 40] [--threads 2]
"""

import argparse
import multiprocessing as mp
import resource
import statistics
import time

CONFIGS = (("fp32", None), ("E1TM32", "average"), ("E1TM32", "carry"), ("E1TM32", "flip"))


def _setup(threads):
    import torch

    from arbs import data as D

    torch.set_num_threads(threads)
    return D.default_corpus()


def model_step(preset, fmt, rule, corpus):
    from arbs import nn as anx
    from arbs.training.build import build
    from arbs.training.config import TrainConfig, run_meta

    cfg = TrainConfig(format=fmt, rule=rule, preset=preset)  # the default --steps 1000 sets the schedule
    model, h = build(run_meta(cfg, corpus.info))
    opt = h.get("optimizer")
    if opt is None:
        anx.model_clock(model).step_counter = 300

    def step(x, y):
        t0 = time.perf_counter()
        _, loss = model(x, y)
        loss.backward()
        if opt:
            opt.step()
            opt.zero_grad(set_to_none=True)
        else:
            anx.step(model)
        return time.perf_counter() - t0

    return step, cfg.batch_size, cfg.model_config().context


def _times(preset, steps, threads, q):
    from arbs import data as D

    corpus = _setup(threads)
    made = [model_step(preset, *c, corpus) for c in CONFIGS]
    bs, ctx = made[0][1], made[0][2]
    times = [[] for _ in CONFIGS]
    for s in range(steps + 3):  # the first 3 rounds compile kernels and warm caches
        x, y = D.get_batch(corpus.train, batch_size=bs, context=ctx, seed=0, step=s)
        order = [(i + s) % len(CONFIGS) for i in range(len(CONFIGS))]
        for i in order:
            t = made[i][0](x, y)
            if s >= 3:
                times[i].append(t)
    q.put(times)


def _rss(preset, fmt, rule, threads, q):
    from arbs import data as D

    corpus = _setup(threads)
    step, bs, ctx = model_step(preset, fmt, rule, corpus)
    for s in range(4):
        step(*D.get_batch(corpus.train, batch_size=bs, context=ctx, seed=0, step=s))
    q.put(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def _sub(ctx, fn, *args):
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(*args, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--presets", nargs="+", default=["tiny", "small"])
    ap.add_argument("--steps", type=int, default=40, help="timed rounds (one step of every configuration each)")
    ap.add_argument("--threads", type=int, default=2)
    a = ap.parse_args()
    ctx = mp.get_context("spawn")
    print(f"| preset | scheme | ms/step (median of {a.steps}) | x fp32 (median of per-round ratios) | "
          f"quartiles of x fp32 | peak RSS MiB | x fp32 |")
    print("|---|---|---|---|---|---|---|")
    for preset in a.presets:
        times = _sub(ctx, _times, preset, a.steps, a.threads)
        rss = [_sub(ctx, _rss, preset, *c, a.threads) for c in CONFIGS]
        for i, c in enumerate(CONFIGS):
            ratios = [t / b for t, b in zip(times[i], times[0])]
            q1, q2, q3 = statistics.quantiles(ratios, n=4)
            name = c[0] + (f":{c[1]}" if c[1] else " AdamW")
            print(f"| {preset} | {name} | {statistics.median(times[i]) * 1e3:.1f} | {statistics.median(ratios):.2f}x | "
                  f"{q1:.2f}–{q3:.2f} | {rss[i]:.0f} | {rss[i] / rss[0]:.2f}x |", flush=True)


if __name__ == "__main__":
    main()
