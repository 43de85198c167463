"""Data-parallel E1TM training on the CPU (gloo): bytes on the wire, step time, and what summing integer votes
does to learning (issue 16; docs/distributed.md).

1. Bytes all-reduced per step and rank, per rule, read from the tensors arbs.nn.step actually handed to
   torch.distributed (``Reducer.sent``) in a 2-rank step of the tiny preset, against a bf16 and an fp32 gradient
   all-reduce of the same model's weights.
2. CPU step time at equal global batch: 1 process (1 micro-batch; 2 micro-batches) vs 2 ranks x 1 micro-batch
   (one thread per process), from ``arbs.training.train``'s ms_per_step.
3. Learning at equal global batch (--batch-size, split into 2 micro-batches): the integer mean vote (the sum
   divided by the slot count, stochastically rounded), the plain integer sum, and one vote on the summed float
   gradient (``accumulate``), validation loss per seed; and 2 ranks x 1 == 1 rank x 2 for the first of --votes that
   is an integer rule (same final loss expected: the states are bit-identical).

    python benchmarks/distributed.py [--steps 300] [--seeds 0 1] [--time-steps 30] [--votes mean sum accumulate]
        [--parts bytes time learn] [--out /tmp/arbs_dp_bench]
"""

import argparse
import datetime
import json
import os
import socket
import statistics
import tempfile
from pathlib import Path

import torch
import torch.multiprocessing as mp

import arbs.nn as arbs_nn
from arbs import formats
from arbs.training import train
from arbs.training.config import TrainConfig


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init(rank: int, world: int, port: int) -> None:
    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=120))


def _bytes_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from arbs.models.config import get_preset
    from arbs.models.gpt import GPT

    _init(rank, world, port)
    rows = {}
    for rule in formats.RULES:
        torch.manual_seed(0)
        model = arbs_nn.ternarize_(GPT(get_preset("tiny")), "E1TM32", rule, seed=0)
        arbs_nn.data_parallel(model, check_every=0)
        red = arbs_nn.model_clock(model).reducer
        x = torch.randint(0, 256, (8, 129), generator=torch.Generator().manual_seed(rank))
        for _ in range(2):  # the first step also compares the ranks' state hashes (not a per-step cost)
            red.reset_sent()
            model(x[:, :-1], x[:, 1:])[1].backward()
            arbs_nn.step(model)
        weights = sum(m.shape[0] * m.shape[1] for m in arbs_nn.e1tm_modules(model).values())
        rows[rule] = {"sent": red.sent, "weights": weights}
    if rank == 0:
        Path(out).write_text(json.dumps(rows))
    dist.destroy_process_group()


def _train_worker(rank: int, world: int, port: int, cfg_json: str, out: str) -> None:
    import torch.distributed as dist

    _init(rank, world, port)
    res = train(TrainConfig(**json.loads(cfg_json)))
    if rank == 0:
        Path(out).write_text(json.dumps({"ms_per_step": res.ms_per_step, "val_loss": res.val_loss}))
    dist.destroy_process_group()


def _two_ranks(cfg: dict, tmp: Path) -> dict:
    out = tmp / f"res_{len(list(tmp.iterdir()))}.json"
    mp.start_processes(_train_worker, args=(2, _port(), json.dumps(cfg), str(out)), nprocs=2, join=True,
                       start_method="spawn")
    return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=300, help="training steps of the learning comparison")
    ap.add_argument("--time-steps", type=int, default=30, help="steps of each step-time run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--votes", nargs="+", default=["mean", "sum", "accumulate"],
                    choices=["mean", "sum", "accumulate"], help="--micro-batch-votes rules of the learning comparison")
    ap.add_argument("--parts", nargs="+", default=["bytes", "time", "learn"], choices=["bytes", "time", "learn"],
                    help="which measurements to run")
    ap.add_argument("--out", default=None, help="directory for the runs (default: a temporary one)")
    a = ap.parse_args()
    tmp = Path(a.out or tempfile.mkdtemp(prefix="arbs_dp_bench_"))
    tmp.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    print(f"torch {torch.__version__}, gloo, CPU, {os.cpu_count()} cores, one thread per process; tiny preset, "
          f"E1TM32; global batch {a.batch_size} x 128 bytes")

    if "bytes" in a.parts:
        _bytes(tmp)
    if "time" in a.parts:
        _time(a, tmp)
    if "learn" in a.parts:
        _learn(a, tmp)


def _bytes(tmp: Path) -> None:
    """1. bytes on the wire"""
    bout = tmp / "bytes.json"
    mp.start_processes(_bytes_worker, args=(2, _port(), str(bout)), nprocs=2, join=True, start_method="spawn")
    rows = json.loads(bout.read_text())
    print("\n## bytes all-reduced per step and rank (2 ranks x 1 micro-batch, tiny preset)")
    print("| rule | tensors sent (dtype: elements) | bytes/step | bytes/weight | fp32 grad bytes | bf16 grad bytes |")
    print("|---|---|---|---|---|---|")
    for rule, r in rows.items():
        sent, n = r["sent"], r["weights"]
        total = sum(s[3] for s in sent)
        what = "; ".join(f"{s[0]} ({s[1]}: {s[2]})" for s in sent)
        print(f"| {rule} | {what} | {total} | {total / n:.4f} | {4 * n} | {2 * n} |")


def _time(a, tmp: Path) -> None:
    """2. step time at equal global batch"""
    base = dict(format="E1TM32", batch_size=a.batch_size, eval_every=10**6, eval_batches=1, save_every=10**6,
                threads=1, steps=a.time_steps)
    print(f"\n## CPU step time, equal global batch {a.batch_size}, {a.time_steps} steps (first step left out)")
    print("| layout | rule | ms/step |")
    print("|---|---|---|")
    for rule in ("carry", "flip"):
        for label, micro, world in (("1 process, 1 micro-batch", 1, 1), ("1 process, 2 micro-batches", 2, 1),
                                    ("2 ranks x 1 micro-batch", 1, 2)):
            cfg = base | {"rule": rule, "micro_batches": micro, "out": str(tmp / f"time_{rule}_{micro}_{world}")}
            ms = _two_ranks(cfg, tmp)["ms_per_step"] if world == 2 else train(TrainConfig(**cfg)).ms_per_step
            print(f"| {label} | {rule} | {ms:.1f} |")


def _learn(a, tmp: Path) -> None:
    """3. learning at equal global batch"""
    names = {"mean": "integer mean vote", "sum": "integer-vote sum", "accumulate": "vote on summed gradient"}
    ints = [v for v in a.votes if v != "accumulate"]
    print(f"\n## validation loss (nats/byte) after {a.steps} steps, flip, global batch {a.batch_size} in 2 "
          "micro-batches")
    cols = [names[v] + f" ({v})" for v in a.votes] + ([f"2 ranks x 1 ({ints[0]})"] if ints else [])
    print("| seed | " + " | ".join(cols) + " |")
    print("|---" * (len(cols) + 1) + "|")
    learn = dict(format="E1TM32", rule="flip", batch_size=a.batch_size, eval_every=a.steps, eval_batches=16,
                 save_every=a.steps, threads=1, steps=a.steps, micro_batches=2)
    res = {v: [] for v in a.votes}
    for seed in a.seeds:
        row = {}
        for votes in a.votes:
            cfg = learn | {"seed": seed, "micro_batch_votes": votes, "out": str(tmp / f"learn_{votes}_{seed}")}
            row[votes] = train(TrainConfig(**cfg)).val_loss
            res[votes].append(row[votes])
        cells = [f"{row[v]:.4f}" for v in a.votes]
        if ints:
            two = "-"
            if seed == a.seeds[0]:
                cfg = learn | {"seed": seed, "micro_batches": 1, "micro_batch_votes": ints[0],
                               "out": str(tmp / f"learn_2ranks_{seed}")}
                two = f"{_two_ranks(cfg, tmp)['val_loss']:.4f}"
            cells.append(two)
        print(f"| {seed} | " + " | ".join(cells) + " |", flush=True)
    for votes, v in res.items():
        spread = f" (spread over seeds {max(v) - min(v):.4f})" if len(v) > 1 else ""
        print(f"mean {votes}: {statistics.mean(v):.4f}{spread}")


if __name__ == "__main__":
    main()
