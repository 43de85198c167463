"""Fuzz ``store.open_checkpoint`` for a given time or number of examples and count the outcomes.

    python benchmarks/fuzz_store.py [--seconds 60] [--examples N] [--seed 0] [--no-devices] [--mem-gib 4]

Runs the property of ``tests/test_store_fuzz.py`` (loaded from this checkout; needs hypothesis, the test
extra): copy a pristine run directory (step_3 and step_7), damage it 1..3 times (JSON value substitutions
in COMMIT and every zarr.json, LATEST rewrites, byte flips, truncations, deleted and extra files and
directories, symlinks, FIFOs), open it, and require either a typed ``ArbsError`` or a checkpoint whose
arrays equal the saved ones. Choices come from ``random.Random(seed)``, so a run is reproducible from its
seed and the example number. Unlike the test, links to /dev/zero are drawn too (``--no-devices`` leaves
them out): this process caps its own address space (``--mem-gib``, Linux) so a reader regression fails
with MemoryError instead of exhausting the machine, and each open has a 30 s alarm.

Prints the count of each outcome (``opened`` or the error type) and of each damage kind, then exits
0; on a property violation it prints the example's seed, number and damage log, and exits 1.
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import logging
import random
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if __name__ == "__main__" and __package__ in (None, ""):
    sys.path.insert(0, str(ROOT))  # run from a checkout


def load_property():
    """The fuzz property module ``tests/test_store_fuzz.py`` of this checkout."""
    path = ROOT / "tests" / "test_store_fuzz.py"
    spec = importlib.util.spec_from_file_location("arbs_store_fuzz", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def cap_memory(gib: float) -> None:
    try:
        import resource
    except ImportError:
        return
    limit = int(gib * (1 << 30))
    try:
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ValueError, OSError) as e:
        print(f"(could not cap the address space at {gib} GiB: {e})", file=sys.stderr)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=60.0, help="stop after this many seconds (default 60)")
    ap.add_argument("--examples", type=int, default=None, help="stop after this many examples (default: no limit)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-devices", action="store_true", help="do not draw symlinks to /dev/zero")
    ap.add_argument("--mem-gib", type=float, default=4.0, help="address-space cap of this process (Linux; 0: none)")
    args = ap.parse_args(argv)
    if args.mem_gib > 0:
        cap_memory(args.mem_gib)
    logging.getLogger("arbs").setLevel(logging.ERROR)  # the readers' warnings (skipped checkpoints, LATEST)
    fz = load_property()
    rng = random.Random(args.seed)
    outcomes: collections.Counter = collections.Counter()
    kinds: collections.Counter = collections.Counter()
    start = time.perf_counter()
    n = 0
    with tempfile.TemporaryDirectory(prefix="arbs-fuzz-") as tmp:
        pristine, saved = fz.build_pristine(Path(tmp))
        work = Path(tmp) / "work"
        work.mkdir()
        while time.perf_counter() - start < args.seconds and (args.examples is None or n < args.examples):
            try:
                outcome, log = fz.fuzz_once(fz.RandomChooser(rng), pristine, saved, work, devices=not args.no_devices)
            except BaseException as e:  # noqa: BLE001 - a property violation, reported with its damage log
                if isinstance(e, KeyboardInterrupt):
                    break
                print(f"PROPERTY VIOLATED at example {n} (seed {args.seed}):", file=sys.stderr)
                traceback.print_exception(e, file=sys.stderr)
                return 1
            outcomes[outcome] += 1
            kinds.update(entry.split(":")[0] for entry in log[:-1])
            n += 1
    elapsed = time.perf_counter() - start
    print(f"{n} examples in {elapsed:.1f} s ({n / max(elapsed, 1e-9):.0f}/s), seed {args.seed}: no property violation")
    print("outcome               count")
    for k, v in outcomes.most_common():
        print(f"{k:<20} {v:>6}")
    print("damage kind           count")
    for k, v in kinds.most_common():
        print(f"{k:<20} {v:>6}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
