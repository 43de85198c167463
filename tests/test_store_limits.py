"""Hostile checkpoints cannot hang the reader, flood its memory or slip integer overflows past validation.

Each case here hung, allocated gigabytes or was accepted before the reader's limits existed (issue 13).
The cases that did so are opened in a child process with a memory cap and a timeout, so that a
regression fails the test instead of the machine: ``open_isolated`` reports the error type and message
and the child's peak RSS.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import google_crc32c
import numcodecs.zstd
import numpy as np
import pytest
import zarr

from arbs import formats, ops, store
from arbs.errors import ArbsError, ConfigError, CorruptStoreError, IntegerRangeError
from arbs.store import encoding
from arbs.testing.states import assert_same_checkpoint, random_checkpoint, random_state

T0 = "blocks.0.attn.qkv.weight"
GiB = 1 << 30
needs_fifo = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="needs os.mkfifo")
needs_rlimit = pytest.mark.skipif(sys.platform != "linux", reason="needs RLIMIT_AS and /dev/zero (Linux)")


# ---------------------------------------------------------------------------------------- helpers


_CHILD = textwrap.dedent("""
    import json, resource, sys
    from arbs import store
    try:
        store.open_checkpoint(sys.argv[1])
        out = ["ok", ""]
    except BaseException as e:
        out = [type(e).__name__, str(e)]
    out.append(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    print(json.dumps(out))
""")


def open_isolated(path: Path, *, timeout: float = 60, mem: int = 3 * GiB) -> tuple[str, str, int]:
    """(exception type name or "ok", message, peak RSS in bytes) of ``store.open_checkpoint(path)`` run in a
    child limited to ``mem`` bytes of address space; a child still running after ``timeout`` s fails the test."""
    import resource

    def limit():
        resource.setrlimit(resource.RLIMIT_AS, (mem, mem))

    try:
        r = subprocess.run([sys.executable, "-c", _CHILD, str(path)], capture_output=True, text=True,
                           timeout=timeout, preexec_fn=limit, cwd=path.parent)
    except subprocess.TimeoutExpired:
        pytest.fail(f"opening '{path}' did not finish within {timeout} s (the reader hangs)")
    assert r.returncode == 0, r.stderr[-2000:]
    kind, msg, rss = json.loads(r.stdout.strip().splitlines()[-1])
    return kind, msg, rss


def expect_isolated(path: Path, *words: str, max_rss: int = GiB) -> str:
    kind, msg, rss = open_isolated(path)
    assert kind == "CorruptStoreError", (kind, msg)
    for w in words:
        assert w in msg, (w, msg)
    assert rss < max_rss, f"peak RSS {rss / GiB:.2f} GiB"
    return msg


def chunk(d: Path, key: str) -> Path:
    """The first chunk file of array ``key`` (a 0-d array's one chunk is the file ``c``)."""
    c = d / key / "c"
    return c if c.is_file() else sorted(p for p in c.rglob("*") if p.is_file())[0]


def with_crc(frame: bytes) -> bytes:
    """A chunk file as zarr's crc32c codec writes it: the bytes, then their crc32c (little-endian)."""
    return frame + struct.pack("<I", google_crc32c.value(frame))


def rle_frame(content: int, declared: int | None, *, blocks: int | None = None) -> bytes:
    """A zstd frame of RLE blocks that inflates to ``content`` zero bytes (RFC 8878: a 3-byte block header
    with Block_Type 1 = RLE and Block_Size = the repeat count, then the one byte to repeat), or only its
    first ``blocks`` blocks. The header declares ``declared`` (8-byte Frame_Content_Size, single segment) or,
    for None, no content size (a 128 KiB window instead): a decompressor then grows its output as it goes."""
    magic = encoding.ZSTD_MAGIC.to_bytes(4, "little")
    if declared is None:
        header = magic + bytes([0x00, 7 << 3])  # descriptor: no content size, no single segment; window 2**17
    else:
        header = magic + bytes([0xE0]) + declared.to_bytes(8, "little")  # content size flag 3, single segment
    out, left = [header], content
    while left > 0 or len(out) == 1:
        size = min(left, encoding.ZSTD_BLOCK_MAX)
        left -= size
        out.append(((size << 3) | (1 << 1) | int(left == 0)).to_bytes(3, "little") + b"\0")
        if blocks is not None and len(out) > blocks:
            break
    return b"".join(out)


def edit_json(p: Path, fn) -> None:
    m = json.loads(p.read_text())
    fn(m)
    p.write_text(json.dumps(m))


@pytest.fixture
def saved(tmp_path):
    """A carry-rule E1TM32 checkpoint (step 7) in a run directory: tensor 0 is (6, 40)."""
    ck = random_checkpoint([(6, 40), (5, 37)], rule="carry", step=7)
    d = store.save_checkpoint(tmp_path / "run", ck)
    assert_same_checkpoint(store.open_checkpoint(d), ck)
    return d


def test_rle_frame_helper_is_a_real_zstd_frame():
    """The crafted frames decompress with the codec zarr uses, so the bombs below are real ones."""
    for declared in (300_000, None):
        assert numcodecs.zstd.Zstd().decode(rle_frame(300_000, declared)) == bytes(300_000)
    h = encoding.zstd_frame_header(rle_frame(4 * GiB, 4 * GiB))
    assert (h.content_size, h.single_segment, h.header_size) == (4 * GiB, True, 13)
    assert encoding.zstd_frame_header(rle_frame(1, None)).content_size is None


# ------------------------------------------------------------------------- special files, huge files


@needs_rlimit
@pytest.mark.parametrize("rel", ["COMMIT", "zarr.json", f"{T0}/zarr.json", f"{T0}/E/zarr.json"])
def test_dev_zero_symlink(saved, rel):
    """COMMIT or a zarr.json made a link to /dev/zero: refused before anything reads it (it was read
    until memory ran out)."""
    (saved / rel).unlink()
    os.symlink("/dev/zero", saved / rel)
    expect_isolated(saved, str(saved), "COMMIT" if rel == "COMMIT" else rel)


@needs_fifo
@pytest.mark.parametrize("rel", ["COMMIT", f"{T0}/corr_accum/c/0/0", f"{T0}/zarr.json"])
def test_fifo_in_checkpoint(saved, rel):
    """A FIFO in place of COMMIT, a chunk or a zarr.json: refused without opening it (opening blocked forever)."""
    (saved / rel).unlink()
    os.mkfifo(saved / rel)
    msg = expect_isolated(saved, str(saved))
    assert "FIFO" in msg or "not a regular file" in msg, msg


def test_symlink_to_a_regular_file_is_refused(saved, tmp_path):
    """Even a link to a good copy of the same file: a checkpoint holds no links, so nothing outside it is read."""
    f = chunk(saved, f"{T0}/E")
    copy = tmp_path / "elsewhere"
    shutil.copy(f, copy)
    f.unlink()
    os.symlink(copy, f)
    with pytest.raises(CorruptStoreError, match="symbolic link"):
        store.open_checkpoint(saved)


@pytest.mark.parametrize("rel, cap", [
    ("COMMIT", store.checkpoint.COMMIT_MAX_BYTES),
    ("zarr.json", store.checkpoint.ROOT_JSON_MAX_BYTES),
    (f"{T0}/zarr.json", store.checkpoint.NODE_JSON_MAX_BYTES),
    (f"{T0}/E/zarr.json", store.checkpoint.NODE_JSON_MAX_BYTES),
])
def test_oversized_json_file(saved, rel, cap):
    """A JSON file past its cap (a sparse file: no disk used) is refused by its size, never read."""
    with open(saved / rel, "r+b") as f:
        f.truncate(cap + 1)
    with pytest.raises(CorruptStoreError, match=f"{cap}") as info:
        store.open_checkpoint(saved)
    assert str(saved) in str(info.value)


def test_writer_refuses_attributes_readers_would_refuse(tmp_path):
    ck = random_checkpoint([(2, 8)], meta={"blob": "x" * store.checkpoint.ROOT_JSON_MAX_BYTES})
    with pytest.raises(ConfigError, match="meta"):
        store.save_checkpoint(tmp_path, ck)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(("step_", ".tmp-step"))]


# ------------------------------------------------------------------------------------ zstd bombs


@needs_rlimit
def test_zstd_bomb_inflating_to_4_gib(saved):
    """131 KB of RLE blocks that inflate to 4 GiB, declared in the header, as the 96-byte chunk of a (6, 2)
    int64 array: refused by its size before decompression (it allocated 4 GiB, twice, before the typed error)."""
    bomb = rle_frame(4 * GiB, 4 * GiB)
    assert len(bomb) < 140_000
    chunk(saved, f"{T0}/corr_accum").write_bytes(with_crc(bomb))
    expect_isolated(saved, "'corr_accum'", "c/0/0", "a zstd chunk of 96 bytes", max_rss=GiB)  # inflating would take 4 GiB


@needs_rlimit
def test_zstd_frame_declaring_more_than_its_chunk(saved):
    """A small frame that declares 4 GiB: refused by its header, nothing allocated."""
    chunk(saved, f"{T0}/corr_accum").write_bytes(with_crc(rle_frame(4 * GiB, 4 * GiB, blocks=3)))
    expect_isolated(saved, "declares 4294967296 decompressed bytes", "96 bytes", max_rss=GiB)  # inflating would take 4 GiB


def test_zstd_frame_without_content_size(saved):
    """A frame that does not declare its size (which a decompressor inflates by streaming, without
    bound): refused by its header."""
    chunk(saved, f"{T0}/corr_accum").write_bytes(with_crc(rle_frame(250 * encoding.ZSTD_BLOCK_MAX, None)))
    with pytest.raises(CorruptStoreError, match="does not declare its decompressed size"):
        store.open_checkpoint(saved)


def test_64_mib_of_zeros_installed_as_a_small_chunk(tmp_path):
    """64 MiB of zeros compressed by zstd (2 KB) as the 16 KiB chunk of corr_accum (64, 32): its size is
    plausible, so the frame header refuses it, before it is inflated."""
    d = store.save_checkpoint(tmp_path, random_checkpoint([(64, 1024)], rule="carry", step=7))
    frame = numcodecs.zstd.Zstd().encode(np.zeros(64 << 20, np.uint8))
    chunk(d, f"{T0}/corr_accum").write_bytes(with_crc(bytes(frame)))
    with pytest.raises(CorruptStoreError, match="declares 67108864 decompressed bytes; the chunk is 16384 bytes"):
        store.open_checkpoint(d)


def test_uncompressed_chunk_of_the_wrong_size(saved):
    f = chunk(saved, f"{T0}/T_packed")
    data = f.read_bytes()
    f.write_bytes(with_crc(data[:-4] + bytes(1000)))
    with pytest.raises(CorruptStoreError, match=f"of {len(data) + 1000} bytes; an uncompressed chunk of {len(data) - 4} "
                       f"bytes plus its crc32c is {len(data)}"):
        store.open_checkpoint(saved)


@pytest.mark.parametrize("label, edit, words", [
    ("gzip", lambda m: m.__setitem__("codecs", [{"name": "bytes"}, {"name": "gzip", "configuration": {"level": 1}},
                                                {"name": "crc32c"}]), "GzipCodec"),
    ("chunk larger than the array", lambda m: m["chunk_grid"]["configuration"].__setitem__("chunk_shape", [600, 2]),
     "no larger than its shape"),
    ("v2 key encoding", lambda m: m.__setitem__("chunk_key_encoding", {"name": "v2", "configuration": {"separator": "."}}),
     "lacks chunk file '0.0'"),
])
def test_array_metadata_that_would_change_how_much_is_read(saved, label, edit, words):
    """Only the codec chain arbs writes is accepted (a gzip chunk could inflate without any header to
    check), and chunks are never larger than the array (their declared size bounds decompression)."""
    edit_json(saved / T0 / "E" / "zarr.json", edit)
    with pytest.raises(CorruptStoreError, match=words):
        store.open_checkpoint(saved)


def test_gzip_bomb_chunk(saved):
    """A gzip chunk under a gzip codec chain is refused by the chain before zarr decompresses anything."""
    import gzip

    edit_json(saved / T0 / "E" / "zarr.json",
              lambda m: m.__setitem__("codecs", [{"name": "bytes"}, {"name": "gzip", "configuration": {"level": 1}},
                                                 {"name": "crc32c"}]))
    chunk(saved, f"{T0}/E").write_bytes(with_crc(gzip.compress(bytes(64 << 20), 1)))
    with pytest.raises(CorruptStoreError, match="expected BytesCodec, \\[ZstdCodec,\\] Crc32cCodec"):
        store.open_checkpoint(saved)


# -------------------------------------------------------------------------------------- COMMIT step


def test_commit_step_null_with_a_step_counter(saved):
    edit_json(saved / "COMMIT", lambda c: c.__setitem__("step", None))
    with pytest.raises(CorruptStoreError, match="step null, but the checkpoint has step_counter 7"):
        store.open_checkpoint(saved)


def test_commit_step_null_for_a_fused_checkpoint_written_without_a_step(tmp_path):
    ck = random_checkpoint([(3, 20)], fused=True)
    d = store.write_checkpoint(tmp_path / "export", ck)
    assert json.loads((d / "COMMIT").read_text())["step"] is None
    assert_same_checkpoint(store.open_checkpoint(d), ck)


# ------------------------------------------------------------------------------ integer ranges


MAX_STEP_32 = (formats.AVERAGE_DEN_LIMIT - 1) // 32  # 2**56 - 1


def test_average_step_bound_on_save(tmp_path):
    """gs*step_counter < 2**61: the largest step saves and opens; one more is refused before writing."""
    ck = random_checkpoint([(2, 64)], rule="average", step=MAX_STEP_32)
    assert_same_checkpoint(store.open_checkpoint(store.save_checkpoint(tmp_path / "a", ck)), ck)
    with pytest.raises(ConfigError, match=r"gs\*step_counter < 2\*\*61"):
        store.save_checkpoint(tmp_path / "b", random_checkpoint([(2, 64)], rule="average", step=MAX_STEP_32 + 1))
    assert not (tmp_path / "b").exists() or not any((tmp_path / "b").glob("step_*"))


@pytest.mark.parametrize("step, corr", [(2**57, 2**62), (2**58, 2**62), (MAX_STEP_32 + 1, 0)])
def test_average_checkpoint_past_the_bound_is_refused_on_open(tmp_path, step, corr):
    """step_counter 2**57 with corr_accum 2**62 passed validation (|corr| <= gs*step), and fuse then
    wrapped 4*corr; at 2**58 fuse spun forever. Refused on open now, naming the bound."""
    d = store.write_checkpoint(tmp_path / "ck", random_checkpoint([(6, 64)], rule="average", step=7))
    zarr.open_array(store=str(d / "step_counter"), mode="r+")[...] = step
    zarr.open_array(store=str(d / T0 / "corr_accum"), mode="r+")[0, 0] = corr
    edit_json(d / "COMMIT", lambda c: c.__setitem__("step", step))
    with pytest.raises(CorruptStoreError, match=r"gs\*step_counter < 2\*\*61") as info:
        store.open_checkpoint(d, verify=False)
    assert str(MAX_STEP_32) in str(info.value)


def test_ops_refuse_int64_overflow_in_xi():
    """fuse/materialize through ops: the denominator gs*step and the numerator 4*corr must fit int64."""
    scheme = formats.make_scheme("E1TM32", "average")
    state = random_state(np.random.default_rng(0), scheme, (4, 64), 7)
    for step in (MAX_STEP_32 + 1, 1 << 57, 1 << 58, -1):
        with pytest.raises(IntegerRangeError, match=r"2\*\*61"):
            ops.fuse(state, (4, 64), scheme, step)
        with pytest.raises(IntegerRangeError, match=r"2\*\*61"):
            ops.materialize(state, (4, 64), scheme, step)
    state["corr_accum"][1, 1] = 1 << 62  # beyond the format's bound: 4*corr wraps
    for fn in (ops.fuse, ops.materialize):
        with pytest.raises(IntegerRangeError, match=str(formats.INT64_MAX // 4)):
            fn(state, (4, 64), scheme, 7)
    state["corr_accum"][1, 1] = -(1 << 63)  # abs() would wrap: the vote check uses max/min
    with pytest.raises(IntegerRangeError, match="int64 limit"):
        ops.vote(state, np.ones((4, 64), np.float32), (4, 64), scheme, step_counter=7)
    assert isinstance(IntegerRangeError("x"), ArbsError)


# ------------------------------------------------------------------- the writer checks what it commits


@pytest.mark.parametrize("when, victim", [
    ("writing", T0), ("writing", f"{T0}/E"),
    ("fsync", "step_counter/c"), ("fsync", "blocks.1.attn.qkv.weight/zarr.json"), ("fsync", "zarr.json"),
])
def test_temp_tree_changed_while_written_is_not_committed(tmp_path, monkeypatch, when, victim):
    """Another process deletes part of the temporary tree while it is written (zarr's LocalStore
    recreates the directories on the next write, so the loss is silent) or just before it is fsynced:
    nothing is committed, the temporary directory is removed, and the error says why."""
    from arbs.store import durable

    def vandalize(tmp):
        target = Path(tmp) / victim
        shutil.rmtree(target) if target.is_dir() else target.unlink()

    if when == "writing":
        real, calls = zarr.Group.create_array, []

        def create_array(group, name, **kw):
            calls.append(name)
            if len(calls) == 3:  # T0's T_packed and E are written; its corr_accum, tensor 1, step_counter follow
                vandalize(group.store.root)
            return real(group, name, **kw)

        monkeypatch.setattr(zarr.Group, "create_array", create_array)
    else:
        real_fsync = durable.fsync_tree

        def fsync_tree(root):
            vandalize(root)
            real_fsync(root)

        monkeypatch.setattr(durable, "fsync_tree", fsync_tree)

    run = tmp_path / "run"
    with pytest.raises(ArbsError, match="changed by another process while it was being written") as info:
        store.save_checkpoint(run, random_checkpoint([(6, 40), (5, 37)], rule="carry", step=7))
    assert "nothing was committed" in str(info.value)
    assert not (run / "step_7").exists()
    assert not [p for p in run.iterdir() if p.name.startswith(".tmp-step")], list(run.iterdir())
