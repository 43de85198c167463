"""Fuzz of ``store.open_checkpoint``: whatever happens to a run directory, opening it either raises a typed
``ArbsError`` or returns a checkpoint whose arrays are exactly the saved ones; never another exception,
a hang or a wrong array.

A pristine run directory (``step_3`` and ``step_7``, two carry checkpoints with different contents,
tensors of 2-D, 1-D and empty shapes) is copied for each example and damaged 1..3 times:

- ``json``: a value of COMMIT or of a zarr.json (root, group or array level) replaced (huge, negative,
  null, NaN, nested, strings, ...), deleted or added, or the whole file made deeply nested
- ``latest``: LATEST rewritten (names of missing or other checkpoints, paths, garbage, empty, long)
- ``flip`` (1..3 bytes XORed), ``truncate``, ``delete`` (a file or a whole directory), ``extra`` (a
  file or directory added, random or copied from elsewhere in the run)
- ``symlink`` (a file or directory replaced by a link to another entry, itself, a missing path,
  /dev/null, and with ``devices`` /dev/zero), ``fifo`` (a file replaced by a FIFO)

The damage is drawn through a :class:`Chooser`, so the same code runs under hypothesis here (shrinking
to a minimal damage) and from a seeded ``random.Random`` in ``benchmarks/fuzz_store.py``, which runs the
same property for a given time or number of examples and counts the outcomes.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import tempfile
import threading
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arbs import store
from arbs.errors import ArbsError
from arbs.testing.states import assert_same, assert_same_checkpoint, random_checkpoint

pytestmark = pytest.mark.filterwarnings("ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning")

DEADLINE_S = 30  # one open of the small pristine run takes ~20 ms; more than this is a hang


# ------------------------------------------------------------------------------------- choosers


class Chooser:
    """Where the damage draws its choices: ``integer(lo, hi)`` (inclusive), ``choice(seq)``, ``binary(n)``."""

    def integer(self, lo: int, hi: int) -> int:
        raise NotImplementedError

    def choice(self, seq):
        return seq[self.integer(0, len(seq) - 1)]

    def binary(self, max_size: int) -> bytes:
        return bytes(self.integer(0, 255) for _ in range(self.integer(0, max_size)))


class HypothesisChooser(Chooser):
    def __init__(self, data):
        self.data = data

    def integer(self, lo, hi):
        return self.data.draw(st.integers(lo, hi))

    def binary(self, max_size):
        return self.data.draw(st.binary(max_size=max_size))


class RandomChooser(Chooser):
    def __init__(self, rng: random.Random):
        self.rng = rng

    def integer(self, lo, hi):
        return self.rng.randint(lo, hi)

    def binary(self, max_size):
        return self.rng.randbytes(self.rng.randint(0, max_size))


# ----------------------------------------------------------------------------------- the pristine run


def build_pristine(root: Path) -> tuple[Path, dict]:
    """A run directory under ``root`` with step_3 and step_7; returns (run, {step dir name: Checkpoint})."""
    run = root / "run"
    saved = {}
    for step, seed in ((3, 1), (7, 2)):
        ck = random_checkpoint([(6, 40), (9,), (0, 5)], rule="carry", step=step, seed=seed)
        saved[store.save_checkpoint(run, ck).name] = ck
    return run, saved


# ------------------------------------------------------------------------------------------ damage


def _nested(depth: int, kind: str):
    v = 0
    for _ in range(depth):
        v = [v] if kind == "list" else {"a": v}
    return v


VALUES = [
    2**64, 10**30, 2**63, 2**63 - 1, -(2**63), -(2**63) - 1, 2**62, -1, 0, 1, 7, None, True, False, 1.5, 1e308,
    float("nan"), float("inf"), "", "x", "step_7", "E1TM32", "carry", "average", "int64", "float32", "big", "gzip",
    [], {}, [None], [2**64, 2**64], [0], [1, 1], [6, 40], _nested(40, "list"), _nested(40, "dict"),
    {"name": "x", "shape": [1]}, {"name": "zstd", "configuration": {"level": 0}}, "0" * 64,
]
LATEST_TEXTS = ["step_3\n", "step_7\n", "step_99\n", "", "../run\n", "step_7", "\udcff", "x" * 5000, "step_3\nstep_7\n",
                "/etc/passwd\n", "step_007\n", "COMMIT\n", ".\n"]
EXTRA_NAMES = ["extra", "zarr.json", "c", "COMMIT", "step_counter", "W", ".hidden", "0", "step_5", "LATEST"]


def _entries(run: Path) -> list[Path]:
    """Every entry under ``run`` (files, directories, links), sorted, never following links."""
    out = []
    for dirpath, dirnames, filenames in os.walk(run):
        out += [Path(dirpath) / n for n in dirnames + filenames]
    return sorted(out)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p)
    else:
        p.unlink()


def _special_files(directory, names) -> list[str]:
    """copytree's ignore: FIFOs and other special files (copying one would block or fail)."""
    return [n for n in names if not os.path.islink(os.path.join(directory, n))
            and not os.path.isdir(os.path.join(directory, n)) and not os.path.isfile(os.path.join(directory, n))]


def _json_slots(doc, out, parent=None, key=None):
    """(container, key) of every value in ``doc``; (None, None) is the document itself."""
    out.append((parent, key))
    if isinstance(doc, dict):
        for k, v in doc.items():
            _json_slots(v, out, doc, k)
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            _json_slots(v, out, doc, i)
    return out


def damage_json(c: Chooser, run: Path, devices: bool) -> str:
    files = [p for p in _entries(run) if p.name in ("COMMIT", "zarr.json") and p.is_file() and not p.is_symlink()]
    if not files:
        return "json: no file"
    f = c.choice(files)
    rel = f.relative_to(run)
    if c.integer(0, 9) == 0:
        f.write_text("[" * 50_000 + "]" * 50_000)
        return f"json: {rel} deeply nested"
    try:
        doc = json.loads(f.read_text())
    except (ValueError, RecursionError):  # not JSON (any more), or made deeply nested by an earlier damage
        return f"json: {rel} unparsable, left"
    slots = _json_slots(doc, [])
    parent, key = c.choice(slots)
    op = c.integer(0, 5)
    if parent is None:
        doc = c.choice(VALUES)
        what = f"document := {str(doc)[:40]}"
    elif op == 0 and isinstance(parent, dict):
        del parent[key]
        what = f"del [{key!r}]"
    elif op == 0 and isinstance(parent, list):
        parent.pop(key)
        what = f"pop [{key}]"
    elif op == 1 and isinstance(parent, dict):
        parent[c.choice(["x", "shape", "step", "name", "arrays"])] = v = c.choice(VALUES)
        what = f"add a key := {str(v)[:40]}"
    else:
        parent[key] = v = c.choice(VALUES)
        what = f"[{key!r}] := {str(v)[:40]}"
    f.write_text(json.dumps(doc))
    return f"json: {rel} {what}"


def damage_latest(c: Chooser, run: Path, devices: bool) -> str:
    text = c.choice(LATEST_TEXTS)
    latest = run / "LATEST"
    if os.path.lexists(latest):
        _remove(latest)  # never write through a link or into a FIFO an earlier damage left there
    latest.write_bytes(text.encode("utf-8", "surrogateescape"))
    return f"latest: {text[:20]!r}"


def damage_flip(c: Chooser, run: Path, devices: bool) -> str:
    files = [p for p in _entries(run) if p.is_file() and not p.is_symlink() and p.stat().st_size]
    f = c.choice(files)
    raw = bytearray(f.read_bytes())
    spots = []
    for _ in range(c.integer(1, 3)):
        i = c.integer(0, len(raw) - 1)
        raw[i] ^= c.integer(1, 255)
        spots.append(i)
    f.write_bytes(bytes(raw))
    return f"flip: {f.relative_to(run)} at {spots}"


def damage_truncate(c: Chooser, run: Path, devices: bool) -> str:
    files = [p for p in _entries(run) if p.is_file() and not p.is_symlink() and p.stat().st_size]
    f = c.choice(files)
    n = c.integer(0, f.stat().st_size - 1)
    with open(f, "r+b") as fh:
        fh.truncate(n)
    return f"truncate: {f.relative_to(run)} to {n}"


def damage_delete(c: Chooser, run: Path, devices: bool) -> str:
    p = c.choice(_entries(run))
    _remove(p)
    return f"delete: {p.relative_to(run)}"


def damage_extra(c: Chooser, run: Path, devices: bool) -> str:
    entries = _entries(run)
    dirs = [run] + [p for p in entries if p.is_dir() and not p.is_symlink()]
    where = c.choice(dirs)
    target = where / c.choice(EXTRA_NAMES)
    if os.path.lexists(target):
        return f"extra: {target.relative_to(run)} exists, left"
    src = c.choice(entries)
    kind = c.integer(0, 2)
    if kind == 0 or src.is_symlink() or not (src.is_dir() or src.is_file()):
        target.write_bytes(c.binary(64))
        what = "random bytes"
    elif src.is_dir():
        if where == src or src in where.parents:  # a directory copied into itself would never end
            return f"extra: {target.relative_to(run)} inside {src.relative_to(run)}, left"
        shutil.copytree(src, target, symlinks=True, ignore=_special_files)
        what = f"copy of {src.relative_to(run)}/"
    else:
        shutil.copyfile(src, target)
        what = f"copy of {src.relative_to(run)}"
    return f"extra: {target.relative_to(run)} = {what}"


def damage_symlink(c: Chooser, run: Path, devices: bool) -> str:
    entries = _entries(run)
    p = c.choice(entries)
    targets = [str(c.choice(entries)), "/dev/null", str(run / "nonexistent"), str(p), str(p.parent)]
    if devices:
        targets.append("/dev/zero")
    t = c.choice(targets)
    _remove(p)
    os.symlink(t, p)
    return f"symlink: {p.relative_to(run)} -> {t}"


def damage_fifo(c: Chooser, run: Path, devices: bool) -> str:
    files = [p for p in _entries(run) if p.is_file() and not p.is_symlink()]
    f = c.choice(files)
    f.unlink()
    os.mkfifo(f)
    return f"fifo: {f.relative_to(run)}"


DAMAGES = {
    "json": damage_json, "latest": damage_latest, "flip": damage_flip, "truncate": damage_truncate,
    "delete": damage_delete, "extra": damage_extra, "symlink": damage_symlink, "fifo": damage_fifo,
}
# JSON files are the brief's focus: drawn about twice as often as each other kind
_KINDS = ["json", "json", "latest", "flip", "truncate", "delete", "extra", "symlink"] + (["fifo"] if hasattr(os, "mkfifo") else [])


def damage(c: Chooser, run: Path, *, devices: bool = False) -> list[str]:
    """Apply 1..3 damages drawn from ``c`` to the run directory ``run``; returns what was done."""
    return [DAMAGES[c.choice(_KINDS)](c, run, devices) for _ in range(c.integer(1, 3))]


# ------------------------------------------------------------------------------------ the property


class Hang(BaseException):
    """Raised by the deadline alarm (a BaseException, so no ``except Exception`` in the reader hides it)."""


@contextlib.contextmanager
def deadline(seconds: float):
    """Raise Hang in the main thread after ``seconds`` (no-op where SIGALRM is unavailable). Interrupts a
    blocking open of a FIFO; a read that never blocks (/dev/zero) is bounded by the caller's memory limit."""
    if not hasattr(signal, "SIGALRM") or threading.current_thread() is not threading.main_thread():
        yield
        return

    def fire(signum, frame):
        raise Hang(f"open_checkpoint still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def open_outcome(target: Path, saved: dict, verify: bool) -> str:
    """Open ``target``: the name of the ArbsError raised, or "opened" after checking that the checkpoint
    equals the saved one of its step directory (every field and array with ``verify``; the arrays without,
    since unverified attributes such as ``meta`` may have been edited). Anything else raises."""
    try:
        with deadline(DEADLINE_S):
            got = store.open_checkpoint(target, verify=verify)
    except ArbsError as e:
        return type(e).__name__
    want = saved.get(got.path.name)
    assert want is not None, f"opened {got.path}, which is not one of the saved checkpoints"
    if verify:
        assert_same_checkpoint(got, want, str(got.path))
    else:
        assert list(got.tensors) == list(want.tensors) and got.step_counter == want.step_counter
        for name, t in want.tensors.items():
            assert list(got.tensors[name].arrays) == list(t.arrays)
            for k, a in t.arrays.items():
                assert_same(got.tensors[name].arrays[k], a, f"{got.path} {name}/{k}")
    return "opened"


def fuzz_once(c: Chooser, pristine: Path, saved: dict, workdir: Path, *, devices: bool = False) -> tuple[str, list[str]]:
    """Copy ``pristine`` into ``workdir``, damage it, open it: (outcome, damage log)."""
    run = workdir / "run"
    shutil.copytree(pristine, run, symlinks=True)
    log: list[str] = []
    try:
        log += damage(c, run, devices=devices)
        target = c.choice([run, run / "step_7", run / "step_3"])
        verify = c.choice([True, True, False])
        log.append(f"open {target.relative_to(workdir)} verify={verify}")
        return open_outcome(target, saved, verify), log
    except BaseException as e:  # a property violation: say what was done to the run
        e.add_note("damage: " + "; ".join(log))
        raise
    finally:
        shutil.rmtree(run, ignore_errors=True)


# ------------------------------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("fuzz")
    run, saved = build_pristine(root)
    for name, ck in saved.items():
        assert_same_checkpoint(store.open_checkpoint(run / name), ck)
    return run, saved


# derandomize: CI sees the same examples every run (benchmarks/fuzz_store.py explores new ones)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow], database=None, derandomize=True)
@given(data=st.data())
def test_any_damage_is_a_typed_error_or_the_saved_checkpoint(pristine, data):
    run, saved = pristine
    with tempfile.TemporaryDirectory(dir=run.parent) as work:
        fuzz_once(HypothesisChooser(data), run, saved, Path(work))


def test_random_chooser_runs_the_same_property(pristine, tmp_path):
    """The benchmark's path: a seeded RandomChooser, 20 examples, outcomes counted."""
    run, saved = pristine
    rng = random.Random(13)
    counts: dict[str, int] = {}
    for i in range(20):
        outcome, _ = fuzz_once(RandomChooser(rng), run, saved, tmp_path)
        counts[outcome] = counts.get(outcome, 0) + 1
    assert sum(counts.values()) == 20
    assert set(counts) <= {"opened", "CorruptStoreError", "StoreNotFoundError", "FormatVersionError", "ConfigError"}, counts


def test_undamaged_copy_opens(pristine, tmp_path):
    run, saved = pristine
    shutil.copytree(run, tmp_path / "run")
    for target in ("run", "run/step_7", "run/step_3"):
        assert open_outcome(tmp_path / target, saved, True) == "opened"
    assert np.array_equal(store.open_checkpoint(tmp_path / "run").tensors["blocks.0.attn.qkv.weight"].arrays["E"],
                          saved["step_7"].tensors["blocks.0.attn.qkv.weight"].arrays["E"])
