"""arbs.store: round trips, on-disk layout, LATEST/step resolution, retention, save-side validation, metrics.

Concurrency, the writer lock and crash windows of the run directory: tests/test_store_run.py.
"""

import json
import os
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from arbs import formats
from arbs import store
from arbs.errors import ArbsError, ConfigError, CorruptStoreError, StoreNotFoundError
from arbs.store import Checkpoint, TensorState

from arbs.testing.states import assert_same, assert_same_checkpoint, pack_trits, random_checkpoint


def zarr_jsons(path: Path):
    for dirpath, _, files in os.walk(path):
        if "zarr.json" in files:
            p = Path(dirpath) / "zarr.json"
            yield p, json.loads(p.read_text())


def float_checkpoint(step=3) -> Checkpoint:
    rng = np.random.default_rng(5)
    w = rng.standard_normal((4, 6)).astype(np.float32)
    tensors = {
        "fc.weight": TensorState(name="fc.weight", shape=(4, 6), arrays={
            "weight": w, "exp_avg": rng.standard_normal((4, 6)), "exp_avg_sq": rng.random((4, 6)).astype(">f4"),
            "mask": rng.random((4, 6)) > 0.5, "count": np.arange(3, dtype=np.int64),
        }),
        "fc.bias": TensorState(name="fc.bias", shape=(4,), arrays={"weight": np.zeros(4, np.float16)}),
    }
    return Checkpoint(kind="float", format=None, gs=None, rule=None, rule_params={}, fused=False,
                      step_counter=step, tensors=tensors, meta={"lr": np.float32(0.5), "n": np.int64(3)})


# ------------------------------------------------------------------------------------ round trips

CASES = [
    dict(rule="average", fused=False, format="E1TM32", shapes=[(64, 100), (30,)], step=5),
    dict(rule="carry", fused=False, format="E1TM6", shapes=[(8, 3, 3, 3), (5, 7)], step=0),
    dict(rule="flip", fused=False, format="E1TM96", shapes=[(3, 200), (1,)], step=123456789012),
    dict(rule="carry", fused=True, format="E1TM4", shapes=[(16,), (4, 9)], step=None),
    dict(rule="flip", fused=False, format="E1TM16", shapes=[(0, 10), (4, 0), (2, 2, 0)], step=1),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c['format']}-{'fused' if c['fused'] else c['rule']}")
def test_round_trip_bit_identical(tmp_path, case):
    ck = random_checkpoint(case["shapes"], format=case["format"], rule=case["rule"], fused=case["fused"],
                    step=case["step"] or 0, meta={"model": {"d": 64, "names": ["a", "b"]}, "hash": "abc"})
    if case["fused"]:
        path = store.save_checkpoint(tmp_path, ck, step=17)
        assert path.name == "step_17"
    else:
        path = store.save_checkpoint(tmp_path, ck)
        assert path.name == f"step_{case['step']}"
    assert (tmp_path / "LATEST").read_text() == f"{path.name}\n"
    for opened in (store.open_checkpoint(tmp_path), store.open_checkpoint(path), store.open_checkpoint(path, verify=False)):
        assert_same_checkpoint(opened, ck)
        assert opened.path == path
    assert store.list_checkpoints(tmp_path) == [path]


def test_round_trip_with_real_packer(tmp_path):
    ops = pytest.importorskip("arbs.ops")
    rng = np.random.default_rng(3)
    T = rng.integers(-1, 2, (9, 53), dtype=np.int8)  # 53: not a multiple of gs nor of 5
    try:
        packed = ops.pack(T, 32)
    except (AttributeError, ImportError) as e:  # arbs.ops is written concurrently; its own tests own it
        pytest.skip(f"arbs.ops.pack unavailable: {e}")
    assert_same(packed, pack_trits(T, 32), "ops.pack vs the test packer")
    ck = random_checkpoint([(9, 53)], rule="carry")
    ck.tensors["blocks.0.attn.qkv.weight"].arrays["T_packed"][...] = packed
    store.save_checkpoint(tmp_path, ck)
    got = store.open_checkpoint(tmp_path).tensors["blocks.0.attn.qkv.weight"].arrays["T_packed"]
    assert_same(ops.unpack(got, 53), T, "T after a round trip")


def test_float_kind_round_trip(tmp_path):
    ck = float_checkpoint()
    store.save_checkpoint(tmp_path, ck)
    got = store.open_checkpoint(tmp_path, kind="float")
    assert got.kind == "float" and got.step_counter == 3 and got.meta == {"lr": 0.5, "n": 3}
    want = ck.tensors["fc.weight"].arrays
    for k, a in got.tensors["fc.weight"].arrays.items():
        assert a.dtype == want[k].dtype.newbyteorder("=") and np.array_equal(a, want[k]), k
    assert got.tensors["fc.bias"].arrays["weight"].dtype == np.float16


def test_float_checkpoint_is_never_taken_for_e1tm(tmp_path):
    store.save_checkpoint(tmp_path, float_checkpoint())
    with pytest.raises(ConfigError, match="float.*E1TM checkpoint is required"):
        store.open_checkpoint(tmp_path, kind="e1tm")
    store.save_checkpoint(tmp_path / "e", random_checkpoint([(4, 8)]))
    with pytest.raises(ConfigError, match="E1TM checkpoint, but a float"):
        store.open_checkpoint(tmp_path / "e", kind="float")


@pytest.mark.parametrize("rule,fused", [("average", False), ("carry", False), ("flip", False), (None, True)])
def test_e1tm_store_holds_no_float_array(tmp_path, rule, fused):
    ck = random_checkpoint([(8, 40), (13,)], rule=rule or "carry", fused=fused, step=3)
    path = store.save_checkpoint(tmp_path, ck, step=3 if fused else None)
    arrays = {p.parent.name: m for p, m in zarr_jsons(path) if m["node_type"] == "array"}
    want = set(formats.tensor_arrays(rule, fused)) | ({formats.STEP_COUNTER} if not fused else set())
    assert set(arrays) == want
    for name, m in arrays.items():
        want_dtype = formats.STEP_COUNTER_DTYPE if name == formats.STEP_COUNTER else formats.ARRAYS[name].dtype
        assert m["data_type"] == want_dtype.name, name
        codecs = [c["name"] for c in m["codecs"]]
        assert codecs[-1] == "crc32c", (name, codecs)
        assert ("zstd" in codecs) == (name in ("E", "corr_accum", "flip_accum")), (name, codecs)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    fmt=st.sampled_from(sorted(formats.VARIANTS)),
    rule=st.sampled_from(["average", "carry", "flip", None]),
    shape=st.lists(st.integers(0, 40), min_size=1, max_size=3).map(tuple),
    seed=st.integers(0, 2**32 - 1),
)
def test_round_trip_property(tmp_path_factory, fmt, rule, shape, seed):
    ck = random_checkpoint([shape], format=fmt, rule=rule or "carry", fused=rule is None, step=seed % 1000, seed=seed)
    path = store.write_checkpoint(tmp_path_factory.mktemp("p") / "ck", ck)
    got = store.open_checkpoint(path)
    assert_same_checkpoint(got, ck)
    assert all(a.dtype.kind in "ui" for t in got.tensors.values() for a in t.arrays.values())


def test_tensor_names_are_escaped_reversibly(tmp_path):
    names = ["step_counter", "COMMIT", "zarr.json", "_private", ".hidden", "..", "a/b", "dir%2Fx", "ü.w", "x y", "plain.name-1"]
    ck0 = random_checkpoint([(2, 5)] * len(names))
    tensors = {n: TensorState(name=n, shape=t.shape, arrays=t.arrays) for n, t in zip(names, ck0.tensors.values())}
    ck = Checkpoint(**{**ck0.__dict__, "tensors": tensors})
    path = store.save_checkpoint(tmp_path, ck)
    keys = {p.name for p in path.iterdir() if p.is_dir()} - {formats.STEP_COUNTER}
    assert keys == {store.node_key(n) for n in names}
    assert store.node_key("blocks.0.attn.qkv.weight") == "blocks.0.attn.qkv.weight"
    assert all(unquote(store.node_key(n)) == n for n in names)
    assert_same_checkpoint(store.open_checkpoint(tmp_path), ck)


def test_large_arrays_are_chunked_by_rows(tmp_path, monkeypatch):
    monkeypatch.setattr(store.checkpoint, "CHUNK_BYTES", 1000)
    ck = random_checkpoint([(50, 640)], rule="flip")  # flip_accum: 50 rows x 640 bytes -> 1 row per chunk
    path = store.save_checkpoint(tmp_path, ck)
    chunks = list((path / "blocks.0.attn.qkv.weight" / "flip_accum" / "c").rglob("*"))
    assert sum(p.is_file() for p in chunks) == 50
    assert_same_checkpoint(store.open_checkpoint(tmp_path), ck)


def test_sizes(tmp_path):
    ck = random_checkpoint([(8, 40)], rule="carry")
    path = store.save_checkpoint(tmp_path, ck)
    # cols_p = 64: T_packed 8 x 13 bytes + E 8 x 2 + corr_accum 8 x 2 x 8 + step_counter 8
    assert store.array_nbytes(ck) == 104 + 16 + 128 + 8
    assert store.bytes_on_disk(path) == sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    assert store.bytes_on_disk(path) > 0
    with pytest.raises(StoreNotFoundError):
        store.bytes_on_disk(tmp_path / "nope")


# ------------------------------------------------------------------------- resolution and retention


def test_latest_and_step_resolution(tmp_path):
    # The newest committed step is the run's checkpoint; saving an older step leaves LATEST on the newest.
    for s in (9, 10, 2):
        store.save_checkpoint(tmp_path, random_checkpoint([(4, 8)], step=s, seed=s))
    assert [p.name for p in store.list_checkpoints(tmp_path)] == ["step_2", "step_9", "step_10"]
    assert (tmp_path / "LATEST").read_text() == "step_10\n"
    assert store.resolve_checkpoint(tmp_path) == tmp_path / "step_10"
    assert store.open_checkpoint(tmp_path).step_counter == 10
    assert store.open_checkpoint(tmp_path / "step_2").step_counter == 2
    assert store.open_checkpoint(tmp_path / "step_10").step_counter == 10
    assert store.resolve_checkpoint(tmp_path / "step_9") == tmp_path / "step_9"


def test_missing_latest_falls_back_to_newest(tmp_path):
    for s in (1, 3):
        store.save_checkpoint(tmp_path, random_checkpoint([(4, 8)], step=s))
    (tmp_path / "LATEST").unlink()
    assert store.open_checkpoint(tmp_path).step_counter == 3


def test_not_found_errors(tmp_path):
    with pytest.raises(StoreNotFoundError, match="does not exist"):
        store.open_checkpoint(tmp_path / "missing")
    with pytest.raises(StoreNotFoundError, match="no committed checkpoint"):
        store.open_checkpoint(tmp_path)
    (tmp_path / "f").write_text("x")
    with pytest.raises(StoreNotFoundError, match="is a file"):
        store.open_checkpoint(tmp_path / "f")
    with pytest.raises(StoreNotFoundError):
        store.list_checkpoints(tmp_path / "missing")


def test_retention_keeps_newest(tmp_path):
    for s in range(1, 6):
        store.save_checkpoint(tmp_path, random_checkpoint([(4, 8)], step=s), keep=2)
    assert [p.name for p in store.list_checkpoints(tmp_path)] == ["step_4", "step_5"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]
    # Saving an older step: the one just saved survives retention, but the run's checkpoint stays the newest.
    store.save_checkpoint(tmp_path, random_checkpoint([(4, 8)], step=2), keep=1)
    assert [p.name for p in store.list_checkpoints(tmp_path)] == ["step_2", "step_5"]
    assert store.open_checkpoint(tmp_path).step_counter == 5
    assert (tmp_path / "LATEST").read_text() == "step_5\n"
    with pytest.raises(ConfigError, match="keep"):
        store.save_checkpoint(tmp_path, random_checkpoint([(4, 8)], step=9), keep=0)


def test_other_files_are_left_alone(tmp_path):
    (tmp_path / "metrics.jsonl").write_text("{}\n")
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "step_x").mkdir()
    for s in range(3):
        store.save_checkpoint(tmp_path, random_checkpoint([(4, 8)], step=s), keep=1)
    assert (tmp_path / "config.json").exists() and (tmp_path / "step_x").exists()
    assert (tmp_path / "metrics.jsonl").read_text() == "{}\n"


def test_refuses_to_overwrite(tmp_path):
    path = store.save_checkpoint(tmp_path, random_checkpoint([(4, 8)], step=3, seed=1))
    before = (path / "COMMIT").read_text()
    with pytest.raises(ArbsError, match="already exists"):
        store.save_checkpoint(tmp_path, random_checkpoint([(4, 8)], step=3, seed=2))
    assert (path / "COMMIT").read_text() == before
    (tmp_path / "empty").mkdir()
    with pytest.raises(ArbsError, match="already exists"):
        store.write_checkpoint(tmp_path / "empty", random_checkpoint([(4, 8)]))
    assert not any((tmp_path / "empty").iterdir())
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_leftover_temp_dirs_ignored_by_readers_removed_by_the_writer(tmp_path):
    store.save_checkpoint(tmp_path, random_checkpoint([(4, 8)], step=1))
    dead = tmp_path / ".tmp-step_2-999999999-abcd"  # a pid that exists nowhere: still not the reader's to judge
    (dead / "x").mkdir(parents=True)
    (dead / "zarr.json").write_text("garbage")
    other = tmp_path / f".tmp-step_3-{os.getpid()}-beef"
    other.mkdir()
    uncommitted = tmp_path / "step_5"  # a rename target without COMMIT: not a checkpoint
    uncommitted.mkdir()
    assert [p.name for p in store.list_checkpoints(tmp_path)] == ["step_1"]
    assert store.open_checkpoint(tmp_path).step_counter == 1
    assert dead.exists() and other.exists()  # readers never delete
    store.save_checkpoint(tmp_path, random_checkpoint([(4, 8)], step=2))  # the writer lock's holder cleans up
    assert not dead.exists() and not other.exists()
    assert uncommitted.exists()


def test_fused_save_needs_a_step(tmp_path):
    ck = random_checkpoint([(4, 8)], fused=True)
    with pytest.raises(ConfigError, match="step="):
        store.save_checkpoint(tmp_path, ck)
    path = store.write_checkpoint(tmp_path / "model.fused", ck)
    assert store.open_checkpoint(path).step_counter is None
    assert json.loads((path / "COMMIT").read_text())["step"] is None


# ------------------------------------------------------------------------------ save-side validation


def _replace_array(ck, name, value):
    t = next(iter(ck.tensors.values()))
    t.arrays[name] = value
    return ck


def _bad_states():
    def ck(**kw):
        return random_checkpoint([(4, 40)], **kw)

    def arr(c, name):
        return next(iter(c.tensors.values())).arrays[name]

    c = ck()
    yield "float array", _replace_array(c, "E", arr(c, "E").astype(np.float32)), "float"
    c = ck()
    yield "wrong dtype", _replace_array(c, "corr_accum", arr(c, "corr_accum").astype(np.int32)), "int32"
    c = ck()
    yield "wrong shape", _replace_array(c, "E", np.zeros((4, 3), np.int8)), r"shape \(4, 3\)"
    c = ck()
    tp = arr(c, "T_packed")
    tp[2, 5] = 250
    yield "bad byte", c, "byte 250 at row 2, column 5"
    c = ck()
    del next(iter(c.tensors.values())).arrays["E"]
    yield "missing array", c, "lacks array 'E'"
    c = ck()
    yield "extra array", _replace_array(c, "W", np.zeros(3, np.float32)), "'W'"
    c = ck(rule="carry")
    arr(c, "corr_accum")[0, 0] = 16 * 32
    yield "corr carry", c, r"K\*gs = 512"
    c = ck(rule="average", step=2)
    arr(c, "corr_accum")[1, 0] = -65
    yield "corr average", c, "64"
    c = ck(rule="flip")
    arr(c, "flip_accum")[0, 3] = formats.PARAMS["theta"].default + 1
    yield "flip theta", c, f"theta = {formats.PARAMS['theta'].default}"
    c = random_checkpoint([(4, 42)])  # cols_p = 64 -> 13 bytes; trits 42..64 are padding
    arr(c, "T_packed")[1, -1] = 2 * 3  # byte 12 = trits 60..64: digits (0, 2, 0, 0, 0) -> nonzero padding
    yield "padding", c, "padding trit at row 1"
    yield "fused with rule", Checkpoint(**{**ck(fused=True).__dict__, "rule": "carry"}), "fused"
    yield "gs mismatch", Checkpoint(**{**ck().__dict__, "gs": 16}), "gs=32"
    yield "unknown format", Checkpoint(**{**ck().__dict__, "format": "E1TM33"}), "E1TM32"
    yield "bad param", Checkpoint(**{**ck().__dict__, "rule_params": {"K": 0}}), "K=0"
    yield "missing param", Checkpoint(**{**ck(rule="flip").__dict__, "rule_params": {"K": 16}}), "theta"
    yield "no step", Checkpoint(**{**ck().__dict__, "step_counter": None}), "step_counter"
    yield "meta nan", Checkpoint(**{**ck().__dict__, "meta": {"loss": float("nan")}}), "finite"
    yield "meta object", Checkpoint(**{**ck().__dict__, "meta": {"p": Path("x")}}), "PosixPath|WindowsPath"
    yield "float kind with gs", Checkpoint(**{**float_checkpoint().__dict__, "gs": 32}), "kind 'float'"
    yield "float kind object", Checkpoint(**{**float_checkpoint().__dict__, "tensors": {"x": TensorState(
        name="x", shape=(1,), arrays={"o": np.array([None])})}}), "dtype object"


@pytest.mark.parametrize("label,ck,pattern", list(_bad_states()), ids=lambda v: v if isinstance(v, str) else "")
def test_save_refuses_invalid_state(tmp_path, label, ck, pattern):
    with pytest.raises(ConfigError, match=pattern) as exc:
        store.save_checkpoint(tmp_path, ck, step=1 if ck.step_counter is None else None)
    assert "Nothing was written" in str(exc.value) or label.startswith("meta")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("step_", ".tmp-", "LATEST"))]


# ------------------------------------------------------------------------------------------ metrics


def test_metrics_append_and_read(tmp_path):
    run = tmp_path / "run"
    assert not run.exists()
    store.append_metrics(run, {"step": np.int64(1), "loss": np.float32(2.5), "ok": np.bool_(True)})
    store.append_metrics(run, {"step": 2, "loss": 2.25, "tags": ("a", "b")})
    assert store.read_metrics(run) == [
        {"step": 1, "loss": 2.5, "ok": True}, {"step": 2, "loss": 2.25, "tags": ["a", "b"]},
    ]
    assert (run / "metrics.jsonl").read_text().count("\n") == 2
    with pytest.raises(ConfigError, match="finite"):
        store.append_metrics(run, {"loss": float("inf")})
    assert len(store.read_metrics(run)) == 2


def test_metrics_truncated_last_line_is_skipped_bad_middle_line_raises(tmp_path):
    store.append_metrics(tmp_path, {"step": 1})
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 2, "lo')
    assert store.read_metrics(tmp_path) == [{"step": 1}]
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('\n{"step": 3}\n')
    with pytest.raises(CorruptStoreError, match="line 2"):
        store.read_metrics(tmp_path)
    (tmp_path / "sub").mkdir()
    assert store.read_metrics(tmp_path / "sub") == []


def test_write_failures_are_typed_and_leave_nothing(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(ArbsError, match="cannot create run directory"):
        store.save_checkpoint(tmp_path / "afile", random_checkpoint([(4, 8)]))
    run = tmp_path / "run"
    store.save_checkpoint(run, random_checkpoint([(4, 8)], step=1))

    def disk_full(_):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(store.durable, "fsync_tree", disk_full)
    with pytest.raises(ArbsError, match="No space left.*Nothing was committed"):
        store.save_checkpoint(run, random_checkpoint([(4, 8)], step=2))
    assert sorted(p.name for p in run.iterdir() if not store.is_bookkeeping(p.name)) == ["LATEST", "step_1"]
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-")]
    assert store.open_checkpoint(run).step_counter == 1
