"""Run several ``experiments/hf_flip_levers.py`` configurations, N at a time, and tabulate their curves.

configs file: one line per run, ``NAME | LEVER OPTIONS | ARBS TRAIN OPTIONS`` (``#`` starts a comment);
COMMON train options are appended to every line. Writes ``<out>/NAME/`` (the run), ``<out>/NAME.log`` and
prints ``NAME  val@100 val@200 val@300 fused flips`` per run, also into ``<out>/summary.json``.

    python experiments/hf_flip_sweep.py configs.txt --jobs 4 --out /tmp/sweep \\
        --common "--model runs/hfl_model --context 128 --steps 300 --eval-every 100"
"""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent


def run_one(name, lever, train, out: Path, python: str):
    cmd = [python, str(HERE / "hf_flip_levers.py"), *lever, "--", *train, "--out", str(out / name), "--json"]
    t0 = time.perf_counter()
    with open(out / f"{name}.log", "w") as log:
        log.write(" ".join(shlex.quote(c) for c in cmd) + "\n")
        log.flush()
        rc = subprocess.call(cmd, stdout=log, stderr=subprocess.STDOUT)
    rows = []
    mpath = out / name / "metrics.jsonl"
    if mpath.is_file():
        rows = [json.loads(x) for x in mpath.read_text().splitlines() if x.strip()]
    vals = {r["step"]: r["val_loss"] for r in rows if r.get("val_loss") is not None}
    fused = next((r["val_loss_fused"] for r in rows if "val_loss_fused" in r), None)
    flips = [r.get("flips") for r in rows if r.get("val_loss") is not None]
    rec = {"name": name, "rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "val": vals, "fused": fused,
           "flips": flips, "cmd": " ".join(cmd)}
    print(f"{name:<24} rc {rc}  " + "  ".join(f"{k}:{v:.4f}" for k, v in sorted(vals.items()))
          + (f"  fused {fused:.4f}" if fused is not None else "") + f"  flips {flips}  {rec['wall_s']} s", flush=True)
    return rec


def main(argv=None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("configs")
    ap.add_argument("--jobs", type=int, default=2)
    ap.add_argument("--out", required=True)
    ap.add_argument("--common", default="", help="arbs train options appended to every line")
    ap.add_argument("--lever-common", default="", help="hf_flip_levers.py options added to every line")
    ap.add_argument("--only", default=None, help="comma-separated names to run")
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    jobs = []
    for line in Path(a.configs).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, lever, train = (p.strip() for p in line.split("|"))
        if a.only and name not in a.only.split(","):
            continue
        jobs.append((name, shlex.split(a.lever_common) + shlex.split(lever), shlex.split(train) + shlex.split(a.common)))
    with ThreadPoolExecutor(a.jobs) as ex:
        recs = list(ex.map(lambda j: run_one(*j, out, sys.executable), jobs))
    (out / "summary.json").write_text(json.dumps(recs, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
