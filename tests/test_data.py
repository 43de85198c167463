"""Corpora (default stdlib corpus, files, directories, .npy) and deterministic batches."""

from __future__ import annotations

import json
import zlib

import numpy as np
import pytest
import torch

from arbs.data import (
    FILE_SEPARATOR,
    MIN_CORPUS_BYTES,
    Corpus,
    _default_corpus_files,
    default_corpus,
    eval_batches,
    get_batch,
    load_corpus,
)
from arbs.errors import ArbsError, ConfigError


@pytest.fixture(scope="module")
def corpus() -> Corpus:
    return default_corpus()


def _text(n: int, seed: int = 0) -> bytes:
    rng = np.random.default_rng(seed)
    return bytes(rng.integers(32, 127, size=n, dtype=np.uint8))


# ---------------------------------------------------------------------------------------------------------
# default corpus


def test_default_corpus_loads(corpus):
    assert corpus.train.dtype == np.uint8 and corpus.train.ndim == 1
    assert corpus.val.dtype == np.uint8 and corpus.val.ndim == 1
    assert len(corpus.train) > 1_000_000 and len(corpus.val) > 10_000
    info = corpus.info
    json.dumps(info, allow_nan=False)  # JSON-able as is
    for key in ("source", "n_files", "train_bytes", "val_bytes", "sha256", "python_version"):
        assert key in info
    assert info["train_bytes"] == len(corpus.train) and info["val_bytes"] == len(corpus.val)
    assert len(corpus.train) + len(corpus.val) <= info["max_bytes"] + len(FILE_SEPARATOR) * info["n_files"]
    assert b"def " in corpus.train[:100_000].tobytes()


def test_default_corpus_deterministic(corpus):
    again = default_corpus()
    assert again.info == corpus.info
    assert np.array_equal(again.train, corpus.train) and np.array_equal(again.val, corpus.val)


def test_default_corpus_excludes_tests_and_third_party():
    _, files = _default_corpus_files(2**40)
    for rel, _ in files:
        parts = rel.split("/")
        assert not {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"} & set(parts)
        assert rel.endswith(".py") and not parts[-1].startswith("_sysconfigdata")


def test_default_corpus_split_by_file_disjoint(corpus):
    _, files = _default_corpus_files(corpus.info["max_bytes"])
    rels = [r for r, _ in files]
    assert rels == sorted(rels) and len(set(rels)) == len(rels) == corpus.info["n_files"]
    val_rels = {r for r in rels if zlib.crc32(r.encode()) % 20 == 0}
    train_rels = set(rels) - val_rels
    assert val_rels and train_rels and not (val_rels & train_rels)
    assert len(val_rels) == corpus.info["n_val_files"] and len(train_rels) == corpus.info["n_train_files"]
    # the arrays are exactly the documented joins of those two file sets
    assert corpus.train.tobytes() == FILE_SEPARATOR.join(b for r, b in files if r in train_rels)
    assert corpus.val.tobytes() == FILE_SEPARATOR.join(b for r, b in files if r in val_rels)


def test_default_corpus_cap():
    small = default_corpus(max_bytes=200_000)
    _, files = _default_corpus_files(200_000)
    assert 0 < sum(len(b) for _, b in files) <= 200_000
    assert small.info["n_files"] == len(files) and small.info["max_bytes"] == 200_000
    assert len(small.train) > 0 and len(small.val) > 0
    if not any(zlib.crc32(r.encode()) % 20 == 0 for r, _ in files):  # too few files: tail split
        assert len(small.val) == (len(small.train) + len(small.val)) // 20 and "last" in small.info["split"]
    with pytest.raises(ConfigError, match="max_bytes"):
        default_corpus(max_bytes=10)


# ---------------------------------------------------------------------------------------------------------
# get_batch / eval_batches


def test_get_batch_reproducible_and_shifted(corpus):
    kw = dict(batch_size=8, context=64, seed=3)
    x1, y1 = get_batch(corpus.train, step=5, **kw)
    x2, y2 = get_batch(corpus.train, step=5, **kw)
    x3, _ = get_batch(corpus.train, step=6, **kw)
    x4, _ = get_batch(corpus.train, step=5, batch_size=8, context=64, seed=4)
    assert x1.dtype == y1.dtype == torch.int64 and x1.shape == y1.shape == (8, 64)
    assert torch.equal(x1, x2) and torch.equal(y1, y2)
    assert not torch.equal(x1, x3) and not torch.equal(x1, x4)
    assert torch.equal(x1[:, 1:], y1[:, :-1])


def test_get_batch_documented_rng():
    data = np.arange(1000, dtype=np.int64).astype(np.uint8)
    x, y = get_batch(data, batch_size=4, context=10, seed=7, step=11)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([7, 11])))
    starts = rng.integers(0, len(data) - 10, size=4, dtype=np.int64)
    for row, s in enumerate(starts):
        assert x[row].tolist() == data[s : s + 10].tolist()
        assert y[row].tolist() == data[s + 1 : s + 11].tolist()


def test_get_batch_smallest_data_uses_whole_array():
    data = np.arange(9, dtype=np.uint8)
    x, y = get_batch(data, batch_size=3, context=8, seed=0, step=0)
    assert x.tolist() == [list(range(8))] * 3 and y.tolist() == [list(range(1, 9))] * 3


def test_get_batch_context_too_long():
    data = np.zeros(100, dtype=np.uint8)
    with pytest.raises(ConfigError, match=r"100 bytes.*context 100.*needs 101.*lower --context"):
        get_batch(data, batch_size=2, context=100, seed=0, step=0)


@pytest.mark.parametrize(
    "kw",
    [
        dict(batch_size=0), dict(context=0), dict(seed=-1), dict(step=-1), dict(step=1.5), dict(batch_size=True),
    ],
)
def test_get_batch_bad_args(kw):
    args = dict(batch_size=2, context=4, seed=0, step=0) | kw
    with pytest.raises(ConfigError):
        get_batch(np.zeros(100, dtype=np.uint8), **args)


def test_get_batch_rejects_wrong_dtype():
    with pytest.raises(ConfigError, match="1-D uint8"):
        get_batch(np.zeros(100, dtype=np.int64), batch_size=2, context=4, seed=0, step=0)


def test_eval_batches_tile_whole_set():
    data = (np.arange(1001) % 251).astype(np.uint8)
    batches = eval_batches(data, batch_size=4, context=10, max_batches=None)
    xs = torch.cat([x for x, _ in batches])
    ys = torch.cat([y for _, y in batches])
    assert xs.shape == (100, 10) and [len(x) for x, _ in batches] == [4] * 25
    assert torch.equal(xs.flatten(), torch.from_numpy(data[:1000].astype(np.int64)))
    assert torch.equal(ys.flatten(), torch.from_numpy(data[1:1001].astype(np.int64)))
    again = eval_batches(data, batch_size=4, context=10, max_batches=None)
    assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(batches, again))


def test_eval_batches_capped_spans_set(corpus):
    batches = eval_batches(corpus.val, batch_size=16, context=128, max_batches=3)
    assert len(batches) == 3 and all(x.shape == (16, 128) for x, _ in batches)
    first, last = batches[0][0][0], batches[-1][0][-1]
    assert first.tolist() == corpus.val[:128].tolist()
    assert last.tolist() == corpus.val[-129:-1].tolist()  # last window ends at the last byte
    assert batches[-1][1][-1].tolist() == corpus.val[-128:].tolist()


def test_eval_batches_partial_last_batch():
    data = np.zeros(10 * 7 + 1, dtype=np.uint8)
    batches = eval_batches(data, batch_size=4, context=10, max_batches=10)
    assert [len(x) for x, _ in batches] == [4, 3]
    with pytest.raises(ConfigError, match="lower --context"):
        eval_batches(data, batch_size=4, context=71, max_batches=1)
    with pytest.raises(ConfigError, match="max_batches"):
        eval_batches(data, batch_size=4, context=10, max_batches=0)


# ---------------------------------------------------------------------------------------------------------
# load_corpus


def test_load_text_file(tmp_path):
    raw = _text(4000)
    p = tmp_path / "a.txt"
    p.write_bytes(raw)
    c = load_corpus(p)
    assert c.train.tobytes() + c.val.tobytes() == raw
    assert len(c.val) == 4000 // 20 and c.info["kind"] == "text" and c.info["n_files"] == 1
    assert c.info == load_corpus(str(p)).info
    json.dumps(c.info, allow_nan=False)


def test_load_npy(tmp_path):
    a = np.frombuffer(_text(3000), dtype=np.uint8)
    p = tmp_path / "a.npy"
    np.save(p, a)
    c = load_corpus(p)
    assert np.array_equal(np.concatenate([c.train, c.val]), a) and len(c.val) == 150
    assert c.info["kind"] == "npy"


def test_load_dir_split_by_file(tmp_path):
    contents = {}
    for i in range(60):
        rel = f"sub{i % 3}/f{i:02d}.txt"
        contents[rel] = _text(100, seed=i)
        (tmp_path / rel).parent.mkdir(exist_ok=True)
        (tmp_path / rel).write_bytes(contents[rel])
    (tmp_path / "blob.bin").write_bytes(b"\x00\x01" * 100)  # binary: skipped
    (tmp_path / "empty.txt").write_bytes(b"")  # empty: skipped
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_bytes(_text(100))  # hidden: skipped
    c = load_corpus(tmp_path)
    rels = sorted(contents)
    val = [r for r in rels if zlib.crc32(r.encode()) % 20 == 0]
    train = [r for r in rels if r not in val]
    assert val and train, "fixture should exercise both splits"
    assert c.train.tobytes() == FILE_SEPARATOR.join(contents[r] for r in train)
    assert c.val.tobytes() == FILE_SEPARATOR.join(contents[r] for r in val)
    assert c.info["n_files"] == 60 and c.info["kind"] == "directory"


def test_load_dir_falls_back_to_tail_split(tmp_path):
    # one file only: the by-file rule leaves one split empty, so the last 5% of bytes is validation
    raw = _text(2000)
    (tmp_path / "only.txt").write_bytes(raw)
    c = load_corpus(tmp_path)
    assert c.train.tobytes() + c.val.tobytes() == raw and len(c.val) == 100
    assert "last" in c.info["split"]


def test_load_missing(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_corpus(tmp_path / "nope.txt")


def test_load_empty_file(tmp_path):
    (tmp_path / "e.txt").write_bytes(b"")
    with pytest.raises(ConfigError, match="empty"):
        load_corpus(tmp_path / "e.txt")


def test_load_too_little(tmp_path):
    (tmp_path / "s.txt").write_bytes(b"hello")
    with pytest.raises(ConfigError, match=f"5 bytes.*{MIN_CORPUS_BYTES}"):
        load_corpus(tmp_path / "s.txt")


def test_load_empty_dir(tmp_path):
    (tmp_path / "bin.dat").write_bytes(b"\x00" * 50)
    with pytest.raises(ConfigError, match="no non-empty text files.*1 binary"):
        load_corpus(tmp_path)


@pytest.mark.parametrize(
    "arr, what",
    [(np.zeros(5000, dtype=np.int32), "int32"), (np.zeros((100, 50), dtype=np.uint8), r"\(100, 50\)")],
)
def test_load_npy_wrong_dtype_or_ndim(tmp_path, arr, what):
    np.save(tmp_path / "a.npy", arr)
    with pytest.raises(ConfigError, match=f"{what}.*1-D uint8"):
        load_corpus(tmp_path / "a.npy")


def test_load_npy_unparsable(tmp_path):
    (tmp_path / "a.npy").write_bytes(b"not an npy file at all" * 100)
    with pytest.raises(ArbsError, match="cannot read"):
        load_corpus(tmp_path / "a.npy")


def test_corpus_validates_arrays():
    with pytest.raises(ConfigError, match="uint8"):
        Corpus(np.zeros(3, dtype=np.int8), np.zeros(3, dtype=np.uint8), {})


def test_install_corpus_selection_and_record():
    """python:all takes the installation's .py/.md/.txt files in sorted name order under a cap, splits by
    file, and records what it took; the same call gives the same bytes."""
    import arbs.data as D

    c = D.install_corpus(max_bytes=300_000)
    info = c.info
    assert info["kind"] == "install" and info["source"] == D.INSTALL_CORPUS == "python:all"
    assert info["suffixes"] == [".py", ".md", ".txt"] and "stdlib" in info["roots"]
    assert info["train_bytes"] + info["val_bytes"] <= 300_000 + len(D.FILE_SEPARATOR) * info["n_files"]
    assert info["n_files"] == info["n_train_files"] + info["n_val_files"] and info["n_files"] > 10
    again = D.install_corpus(max_bytes=300_000)
    assert again.info["sha256"] == info["sha256"] and again.info["files_sha256"] == info["files_sha256"]
    assert D.install_corpus(max_bytes=200_000).info["files_sha256"] != info["files_sha256"]
    assert b"\x00" not in bytes(c.train[:100_000])


def test_install_corpus_bad_cap():
    import arbs.data as D

    with pytest.raises(ConfigError, match="max_bytes must be an int >= 1024"):
        D.install_corpus(max_bytes=10)


def test_load_corpus_names_the_install_corpus_when_missing(tmp_path):
    with pytest.raises(ConfigError, match="python:all"):
        load_corpus(tmp_path / "nope")
