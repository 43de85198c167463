"""Corruption catalogue: each kind of damage to a checkpoint raises its typed error naming path and array.

Tampering that should be caught by a value or structure check (not merely by the checksums) rewrites
COMMIT afterwards ("recommit"), so the test proves that check fires on its own.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import zarr
from zarr.codecs import Crc32cCodec

from arbs import store
from arbs.errors import ArbsError, CorruptStoreError, FormatVersionError, StoreNotFoundError
from arbs.testing.states import random_checkpoint

T0, T1 = "blocks.0.attn.qkv.weight", "blocks.1.attn.qkv.weight"


# ---------------------------------------------------------------------------------------- helpers


def sha_le(a: np.ndarray) -> str:
    """The COMMIT checksum as the spec defines it: sha256 of the little-endian C-order bytes."""
    return hashlib.sha256(np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<")).tobytes()).hexdigest()


def recommit(d: Path) -> None:
    """Rewrite COMMIT so that it matches whatever is on disk now (attributes and every listed array)."""
    commit = json.loads((d / "COMMIT").read_text())
    root = zarr.open_group(store=str(d), mode="r", zarr_format=3, use_consolidated=False)
    attrs = root.attrs.asdict()
    commit["attrs_sha256"] = hashlib.sha256(
        json.dumps(attrs, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()).hexdigest()
    for key in list(commit["arrays"]):
        try:
            z = root[key]
            commit["arrays"][key] = sha_le(np.asarray(z[()] if z.ndim == 0 else z[...]))
        except Exception:  # the array was removed or is unreadable: leave its checksum
            pass
    (d / "COMMIT").write_text(json.dumps(commit))


def put_array(d: Path, group: str, name: str, data: np.ndarray, *, recommit_after=True) -> None:
    """Replace (or add) array ``group/name`` with ``data``, written by zarr directly."""
    shutil.rmtree(d / group / name, ignore_errors=True)
    g = zarr.open_group(store=str(d / group) if group else str(d), mode="r+", zarr_format=3, use_consolidated=False)
    z = g.create_array(name, shape=data.shape, dtype=data.dtype, compressors=[Crc32cCodec()], fill_value=0,
                       config={"write_empty_chunks": True})
    z[...] = data
    if recommit_after:
        recommit(d)


def read_array(d: Path, key: str) -> np.ndarray:
    z = zarr.open_array(store=str(d), path=key, mode="r", zarr_format=3)
    return z[()] if z.ndim == 0 else z[...]


def edit_json(p: Path, fn) -> None:
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


def chunk(d: Path, key: str) -> Path:
    c = d / key / "c"  # a 0-d array's single chunk is the file "c" itself
    files = [c] if c.is_file() else sorted(p for p in c.rglob("*") if p.is_file())
    assert files, key
    return files[0]


def expect(exc_type, d, *patterns, verify=True, path=None):
    """open_checkpoint raises exc_type; the message names the checkpoint and matches every pattern."""
    with pytest.raises(exc_type) as info:
        store.open_checkpoint(path or d, verify=verify)
    msg = str(info.value)
    assert str(d) in msg, msg
    for pat in patterns:
        assert pat in msg, (pat, msg)
    return msg


@pytest.fixture
def saved(tmp_path):
    """(run dir, step dir) of a carry-rule E1TM32 checkpoint at step 7; tensor 1 has cols % gs != 0."""
    ck = random_checkpoint([(6, 40), (5, 37)], rule="carry", step=7)
    d = store.save_checkpoint(tmp_path / "run", ck)
    store.open_checkpoint(d)  # sanity: the untouched checkpoint opens
    return tmp_path / "run", d


# ------------------------------------------------------------------------------------ array damage


@pytest.mark.parametrize("array,dtype,expected", [
    ("E", np.int32, "int8"), ("corr_accum", np.int32, "int64"), ("T_packed", np.int8, "uint8"),
    ("corr_accum", np.float64, "int64"),
])
def test_wrong_dtype(saved, array, dtype, expected):
    run, d = saved
    put_array(d, T0, array, read_array(d, f"{T0}/{array}").astype(dtype))
    msg = expect(CorruptStoreError, d, f"array '{array}' of tensor '{T0}'", np.dtype(dtype).name, expected, path=run)
    if np.dtype(dtype).kind == "f":
        assert "no float arrays" in msg


def test_wrong_shape(saved):
    _, d = saved
    e = read_array(d, f"{T1}/E")
    put_array(d, T1, "E", np.concatenate([e, e[:, :1]], axis=1))
    expect(CorruptStoreError, d, f"array 'E' of tensor '{T1}'", "shape (5, 3)", "expected (5, 2)")


@pytest.mark.parametrize("verify", [True, False])
def test_invalid_packed_byte_names_row_and_column(saved, verify):
    _, d = saved
    tp = read_array(d, f"{T1}/T_packed").copy()
    tp[3, 4] = 250
    put_array(d, T1, "T_packed", tp)
    expect(CorruptStoreError, d, f"'T_packed' of tensor '{T1}'", "byte 250 at row 3, column 4", verify=verify)


def test_nonzero_padding_trit(saved):
    _, d = saved
    tp = read_array(d, f"{T1}/T_packed").copy()  # 37 cols -> cols_p 64: trits 37.. are padding
    tp[2, 7] = (tp[2, 7] % 27) + 27 * 2  # byte 7 = trits 35..39: trit 38 (digit 3) becomes +1
    put_array(d, T1, "T_packed", tp)
    expect(CorruptStoreError, d, f"'T_packed' of tensor '{T1}'", "padding trit at row 2, trit column 38")


def test_missing_array(saved):
    _, d = saved
    shutil.rmtree(d / T0 / "corr_accum")
    expect(CorruptStoreError, d, f"array 'corr_accum' of tensor '{T0}'", "missing")


def test_missing_tensor_and_step_counter(saved, tmp_path):
    _, d = saved
    d2 = tmp_path / "copy"
    shutil.copytree(d, d2)
    shutil.rmtree(d / T1)
    expect(CorruptStoreError, d, f"tensor '{T1}'", "missing")
    shutil.rmtree(d2 / "step_counter")
    expect(CorruptStoreError, d2, "step_counter", "missing")


@pytest.mark.parametrize("verify", [True, False])
def test_missing_chunk_file(saved, verify):
    _, d = saved
    chunk(d, f"{T0}/corr_accum").unlink()
    expect(CorruptStoreError, d, f"array 'corr_accum' of tensor '{T0}'", "0 of 1 chunk", verify=verify)


@pytest.mark.parametrize("verify", [True, False])
@pytest.mark.parametrize("array", ["T_packed", "corr_accum", "E", "step_counter"])
def test_flipped_bit_in_chunk(saved, array, verify):
    _, d = saved
    key = array if array == "step_counter" else f"{T0}/{array}"
    f = chunk(d, key)
    raw = bytearray(f.read_bytes())
    raw[len(raw) // 2] ^= 0x10
    f.write_bytes(bytes(raw))
    expect(CorruptStoreError, d, f"array '{array}'", verify=verify)


def test_truncated_chunk(saved):
    """A chunk file too short for its chunk is refused by its size, before zarr reads it."""
    _, d = saved
    f = chunk(d, f"{T1}/E")
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])
    expect(CorruptStoreError, d, f"array 'E' of tensor '{T1}'", "chunk file 'c/0/0' of", "bytes")


@pytest.mark.parametrize("where", [T0, ""])
def test_float_array_added(saved, where):
    _, d = saved
    put_array(d, where, "W", np.zeros((3, 3), np.float32), recommit_after=False)
    expect(CorruptStoreError, d, "float array of dtype float32 'W'", "no float arrays")


def test_unexpected_integer_array_and_tensor(saved, tmp_path):
    _, d = saved
    d2 = tmp_path / "copy"
    shutil.copytree(d, d2)
    put_array(d, T0, "extra", np.zeros(3, np.int8), recommit_after=False)
    expect(CorruptStoreError, d, f"tensor '{T0}'", "unexpected array of dtype int8 'extra'")
    shutil.copytree(d2 / T0, d2 / "blocks.9.weight")
    expect(CorruptStoreError, d2, "unexpected group 'blocks.9.weight'")


# --------------------------------------------------------------------------------- COMMIT / LATEST


def test_missing_commit_is_not_a_checkpoint(saved):
    run, d = saved
    (d / "COMMIT").unlink()
    expect(StoreNotFoundError, d, "no COMMIT")
    with pytest.raises(StoreNotFoundError, match="step_7"):  # LATEST now names an uncommitted directory
        store.open_checkpoint(run)


@pytest.mark.parametrize("content", [
    b"\xff\xfe\x00garbage", b"", b"[1, 2]", b'{"arbs_format_version": 1}', b'{"step": 7}',
    b'{"arbs_format_version": 1, "step": 7, "attrs_sha256": "00", "arrays": {}}',
    b'{"arbs_format_version": 1, "step": NaN, "attrs_sha256": "00", "arrays": {}}',
    b'{"arbs_format_version": 1, "step": -1, "attrs_sha256": "' + b"0" * 64 + b'", "arrays": {}}',
    b'{"arbs_format_version": 1, "step": 7, "attrs_sha256": "' + b"0" * 64 + b'", "arrays": []}',
])
def test_bad_commit(saved, content):
    _, d = saved
    (d / "COMMIT").write_bytes(content)
    expect(CorruptStoreError, d, "COMMIT")


def test_commit_with_wrong_sha(saved):
    _, d = saved
    edit_json(d / "COMMIT", lambda c: c["arrays"].__setitem__(f"{T1}/E", "0" * 64))
    expect(CorruptStoreError, d, f"array 'E' of tensor '{T1}'", "sha256")
    store.open_checkpoint(d, verify=False)  # only the checksum is wrong


def test_commit_listing_extra_array_or_missing_one(saved, tmp_path):
    _, d = saved
    d2 = tmp_path / "copy"
    shutil.copytree(d, d2)
    edit_json(d / "COMMIT", lambda c: c["arrays"].__setitem__("ghost/E", "0" * 64))
    expect(CorruptStoreError, d, "COMMIT", "ghost/E")
    edit_json(d2 / "COMMIT", lambda c: c["arrays"].pop(f"{T0}/E"))
    expect(CorruptStoreError, d2, f"{T0}/E", "no checksum")


def test_commit_step_disagrees_with_directory_name(saved):
    run, d = saved
    os.rename(d, run / "step_8")
    (run / "LATEST").write_text("step_8\n")
    expect(CorruptStoreError, run / "step_8", "records step 7", "'step_8'", path=run)


def test_a_dangling_or_garbage_latest_is_only_a_hint(saved, caplog):
    """LATEST is a hint: naming a missing checkpoint or holding garbage, it is ignored with a warning and
    the run opens at its newest committed checkpoint."""
    run, d = saved
    for bad in ("step_99\n", "../elsewhere\n", "", "\xff"):
        (run / "LATEST").write_text(bad, encoding="latin-1")
        caplog.clear()
        assert store.open_checkpoint(run).path == d
        assert "LATEST" in caplog.text


@pytest.mark.parametrize("where", ["COMMIT", "attrs"])
@pytest.mark.parametrize("version", [0, 2])
def test_unknown_format_version(saved, where, version):
    _, d = saved
    if where == "COMMIT":
        edit_json(d / "COMMIT", lambda c: c.__setitem__("arbs_format_version", version))
    else:
        edit_json(d / "zarr.json", lambda m: m["attributes"].__setitem__("arbs_format_version", version))
        recommit(d)
    msg = expect(FormatVersionError, d, f"version {version}")
    assert ("upgrade arbs" in msg) == (version == 2)


# ------------------------------------------------------------------------------------ value bounds


def test_corr_accum_out_of_bounds_average(tmp_path):
    ck = random_checkpoint([(4, 64)], rule="average", step=4)  # |corr_accum| <= 32*4 = 128
    d = store.save_checkpoint(tmp_path, ck)
    store.open_checkpoint(d)  # random_checkpoint plants +-128: the bound itself is valid
    corr = read_array(d, f"{T0}/corr_accum").copy()
    corr[2, 1] = -129
    put_array(d, T0, "corr_accum", corr)
    expect(CorruptStoreError, d, f"'corr_accum' of tensor '{T0}'", "-129 at row 2, group 1", "= 128")


def test_corr_accum_out_of_bounds_carry(saved):
    _, d = saved
    corr = read_array(d, f"{T1}/corr_accum").copy()
    corr[4, 0] = 16 * 32  # a full K*gs should have carried into E
    put_array(d, T1, "corr_accum", corr)
    expect(CorruptStoreError, d, f"'corr_accum' of tensor '{T1}'", "512 at row 4, group 0", "K*gs = 512")


def test_corr_accum_int64_extremes_do_not_wrap(saved):
    _, d = saved
    corr = read_array(d, f"{T1}/corr_accum").copy()
    corr[1, 1] = np.iinfo(np.int64).min  # abs() would wrap to a negative number and pass a naive check
    put_array(d, T1, "corr_accum", corr)
    expect(CorruptStoreError, d, "'corr_accum'", str(np.iinfo(np.int64).min))


def test_flip_accum_out_of_bounds(tmp_path):
    d = store.save_checkpoint(tmp_path, random_checkpoint([(3, 20)], rule="flip"))
    fa = read_array(d, f"{T0}/flip_accum").copy()
    fa[0, 5] = -17
    put_array(d, T0, "flip_accum", fa)
    expect(CorruptStoreError, d, "'flip_accum'", "-17 at row 0, column 5", "theta = 16")


def test_negative_step_counter(saved):
    _, d = saved
    put_array(d, "", "step_counter", np.array(-1, np.int64))
    edit_json(d / "COMMIT", lambda c: c.__setitem__("step", None))
    expect(CorruptStoreError, d, "step_counter", "-1")


# ------------------------------------------------------------------------------ edited metadata


def _attrs(fn):
    return lambda m: fn(m["attributes"])


METADATA_EDITS = {
    # (file, edit, recommit afterwards, words the message must hold)
    "gs, checksum": ("zarr.json", _attrs(lambda a: a.__setitem__("gs", 16)), False, "attrs_sha256"),
    "gs": ("zarr.json", _attrs(lambda a: a.__setitem__("gs", 16)), True, "gs=16"),
    "meta": ("zarr.json", _attrs(lambda a: a["meta"].__setitem__("model", "other")), False, "attrs_sha256"),
    "rule": ("zarr.json", _attrs(lambda a: a.__setitem__("rule", "carri")), True, "'carry'"),
    "K range": ("zarr.json", _attrs(lambda a: a["rule_params"].__setitem__("K", 0)), True, "K=0"),
    "kind": ("zarr.json", _attrs(lambda a: a.__setitem__("kind", "float")), True, "kind 'float'"),
    "fused": ("zarr.json", _attrs(lambda a: a.__setitem__("fused", True)), True, "fused"),
    "tensor shape": ("zarr.json", _attrs(lambda a: a["tensors"][0].__setitem__("shape", [6, 80])), True, "expected (6, 20)"),
    "tensors": ("zarr.json", _attrs(lambda a: a["tensors"].pop()), True, f"unexpected group '{T1}'"),
    "extra attr": ("zarr.json", _attrs(lambda a: a.__setitem__("x", 1)), True, "keys"),
    "data_type": (f"{T0}/corr_accum/zarr.json", lambda m: m.__setitem__("data_type", "uint64"), False, "uint64"),
    "shape": (f"{T0}/E/zarr.json", lambda m: m.__setitem__("shape", [6, 1]), False, "shape (6, 1)"),
    "endian": (f"{T0}/corr_accum/zarr.json", lambda m: m["codecs"][0].__setitem__("configuration", {"endian": "big"}),
               False, "corr_accum"),
    "no crc32c": (f"{T0}/T_packed/zarr.json", lambda m: m.__setitem__("codecs", m["codecs"][:-1]), False, "crc32c"),
    "chunk shape": (f"{T0}/E/zarr.json", lambda m: m["chunk_grid"]["configuration"].__setitem__("chunk_shape", [3, 1]),
                    False, "'E'"),
    "node type": (f"{T0}/E/zarr.json", lambda m: m.update(node_type="group"), False, "'E'"),
    "garbage": (f"{T1}/zarr.json", None, False, f"tensor '{T1}'"),
    "root garbage": ("zarr.json", None, False, "root"),
}


@pytest.mark.parametrize("label", list(METADATA_EDITS))
def test_edited_zarr_json(saved, label):
    _, d = saved
    rel, fn, again, words = METADATA_EDITS[label]
    if fn is None:
        (d / rel).write_bytes(b'{"zarr_format": 3, "node_type": ')
    else:
        edit_json(d / rel, fn)
    if again:
        recommit(d)
    expect(CorruptStoreError, d, words)


def test_fill_value_edit_plus_missing_chunk(saved):
    _, d = saved
    edit_json(d / T0 / "E" / "zarr.json", lambda m: m.__setitem__("fill_value", 3))
    store.open_checkpoint(d)  # a fill value alone changes nothing: every chunk is on disk
    chunk(d, f"{T0}/E").unlink()
    expect(CorruptStoreError, d, "'E'", "chunk")


# ------------------------------------------------------------------------- any damage is typed


def test_every_file_damaged_raises_a_typed_error(saved):
    """Truncating or scrambling any single file of a checkpoint raises an ArbsError naming the path."""
    _, d = saved
    files = sorted(p for p in d.rglob("*") if p.is_file())
    assert len(files) > 15
    rng = np.random.default_rng(0)
    for f in files:
        original = f.read_bytes()
        for damaged in (b"", original[: len(original) // 2], rng.integers(0, 256, max(8, len(original)), np.uint8).tobytes()):
            f.write_bytes(damaged)
            with pytest.raises(ArbsError) as info:
                store.open_checkpoint(d)
            assert str(d) in str(info.value), (f, str(info.value))
            assert isinstance(info.value, (CorruptStoreError, FormatVersionError)), (f, repr(info.value))
        f.write_bytes(original)
    store.open_checkpoint(d)


def test_flip_checkpoint_from_before_vote_max_reads_as_vote_max_1(tmp_path):
    """vote_max was added to the flip rule later: a checkpoint without it is the rule it was trained with
    (vote_max 1); a checkpoint missing a parameter that always existed is still corrupt."""
    d = store.save_checkpoint(tmp_path / "a", random_checkpoint([(3, 20)], rule="flip"))
    edit_json(d / "zarr.json", _attrs(lambda a: a["rule_params"].pop("vote_max")))
    recommit(d)
    assert store.open_checkpoint(d).rule_params["vote_max"] == 1
    d = store.save_checkpoint(tmp_path / "b", random_checkpoint([(3, 20)], rule="flip"))
    edit_json(d / "zarr.json", _attrs(lambda a: a["rule_params"].pop("theta")))
    recommit(d)
    expect(CorruptStoreError, d, "rule_params", "theta")
