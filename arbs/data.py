"""Byte corpora, token corpora and batches.

A corpus is two 1-D uint8 arrays (train, val) plus a JSON-able ``info`` dict that says where the bytes came
from and how they were split, with a sha256 so a run can record exactly which data it saw. A token corpus
(:func:`tokenize_corpus`, for a model with its own tokenizer) is the same with uint16 or uint32 token ids.

Sources
-------
``default_corpus()``
    The Python standard library's own ``*.py`` sources: every install has them, so arbs trains out of the box
    with no download. See :func:`default_corpus` for the exact selection, cap, separator and split rule.
``load_corpus(path)``
    A text file, a directory of text files, or a 1-D uint8 ``.npy`` array.
``tokenize_corpus(corpus, encode, ...)``
    A byte corpus as token ids, split as the bytes were, cached as ``.npy`` keyed by the sha256 of the bytes
    and of the tokenizer.

Batches
-------
``get_batch`` draws random windows from a generator seeded with ``(seed, step)`` only, so batch ``step`` of a
run is the same whether the run went straight through or was stopped and resumed: a checkpoint needs no RNG
state. ``eval_batches`` gives fixed, evenly spaced windows so the validation loss is comparable across steps.
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import sysconfig
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .errors import ArbsError, ConfigError

log = logging.getLogger(__name__)

# Files are joined with a blank line so the end of one file and the start of the next read like two
# separate blocks of source, as they would in any editor, instead of fusing two lines together.
FILE_SEPARATOR = b"\n\n"

# Split by file: a file goes to validation when crc32 of its relative POSIX path (UTF-8) mod VAL_MODULUS
# is 0, i.e. about 1 file in 20 (5%). The rule depends only on the path, so adding or removing a file
# never moves another file between the splits. crc32 rather than hash(): str hashes are salted per process.
VAL_MODULUS = 20
# Single files and arrays: the last VAL_FRACTION_DENOM-th of the bytes (5%) is validation.
VAL_FRACTION_DENOM = 20

# Default-corpus cap: files are taken in sorted path order while the running total stays <= 8 MiB. The
# stdlib (tests excluded) holds ~12 MB of .py on CPython 3.11; 8 MiB loads in well under a second and is far
# more text than a CPU run of a few thousand steps at batch 16 x 128 can see (~0.5 epoch per 2k steps).
DEFAULT_CORPUS_MAX_BYTES = 8 * 2**20

# Directories never walked for the default corpus: third-party packages (differ per install), the stdlib's
# own test suites (not always installed, e.g. Debian's python3-test split), and bytecode caches.
_DEFAULT_EXCLUDED_DIRS = frozenset(
    {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
)
# Files that describe the machine Python was built on rather than Python itself (compiler flags, paths):
# they would make the corpus differ between two installs of the same Python version.
_DEFAULT_EXCLUDED_FILE_PREFIXES = ("_sysconfigdata",)
_DEFAULT_EXCLUDED_DIR_PREFIXES = ("config-",)  # lib/python3.X/config-3.X-<platform>/ (python-config.py)

# A directory file is treated as binary (and skipped) when its first BINARY_SNIFF_BYTES hold a NUL byte.
BINARY_SNIFF_BYTES = 8 * 1024

# Smallest corpus accepted: 1 KiB leaves >= 51 validation bytes under the 5% rule. Whether a context fits is
# checked later by get_batch/eval_batches, which name the context and the split lengths.
MIN_CORPUS_BYTES = 1024

# Element types of a corpus: bytes (uint8), or token ids (uint16 for vocabularies up to 65536, else uint32).
TOKEN_DTYPES = (np.dtype(np.uint8), np.dtype(np.uint16), np.dtype(np.uint32))


@dataclass(frozen=True)
class Corpus:
    """A byte (or token) corpus split into train and validation.

    Attributes
    ----------
    train : np.ndarray
        uint8 bytes (uint16/uint32 token ids: :func:`tokenize_corpus`), shape (n_train,).
    val : np.ndarray
        the same dtype, shape (n_val,).
    info : dict
        JSON-able description: at least ``source``, ``kind``, ``n_files``, ``train_bytes``, ``val_bytes``,
        ``sha256`` (of the train bytes followed by the val bytes), ``split`` (the rule, in words).
    """

    train: np.ndarray
    val: np.ndarray
    info: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in ("train", "val"):
            a = getattr(self, name)
            if not isinstance(a, np.ndarray) or a.dtype not in TOKEN_DTYPES or a.ndim != 1:
                got = f"{a.dtype} array of shape {a.shape}" if isinstance(a, np.ndarray) else type(a).__name__
                raise ConfigError(f"Corpus.{name} must be a 1-D uint8 (bytes), uint16 or uint32 (token ids) numpy "
                                  f"array; got {got}")
        if self.train.dtype != self.val.dtype:
            raise ConfigError(f"Corpus.train is {self.train.dtype} but Corpus.val is {self.val.dtype}; both must "
                              "have one dtype")
        if not isinstance(self.info, dict):
            raise ConfigError(f"Corpus.info must be a dict; got {type(self.info).__name__}")


# --------------------------------------------------------------------------------------------------------
# helpers


def _as_array(buf: bytes | bytearray) -> np.ndarray:
    # bytearray -> writable array: torch.from_numpy warns on read-only arrays, and pytest turns warnings
    # into errors.
    return np.frombuffer(bytearray(buf), dtype=np.uint8)


def _sha256(train: np.ndarray, val: np.ndarray) -> str:
    h = hashlib.sha256()
    h.update(memoryview(train))
    h.update(memoryview(val))
    return h.hexdigest()


def _is_val_file(relpath: str) -> bool:
    return zlib.crc32(relpath.encode("utf-8")) % VAL_MODULUS == 0


def _split_tail(data: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) views; a memory-mapped corpus stays mapped (batches copy only their windows)."""
    n_val = len(data) // VAL_FRACTION_DENOM
    return data[: len(data) - n_val], data[len(data) - n_val :]


_TAIL_RULE = f"last 1/{VAL_FRACTION_DENOM} (5%) of the bytes is validation"
_FILE_RULE = (
    f"by file: crc32(relative POSIX path, UTF-8) % {VAL_MODULUS} == 0 -> validation (~5%), else train; "
    f"files joined with {FILE_SEPARATOR!r} within each split"
)

_TAIL_FALLBACK_RULE = (
    f"files joined with {FILE_SEPARATOR!r} in path order; {_TAIL_RULE} "
    f"(the by-file rule left a split empty)"
)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise ArbsError(
            f"cannot read corpus file '{path}': {e.strerror or e}; check that it exists and is readable"
        ) from e


MAP_MIN_BYTES = 1 << 20  # larger single files are memory-mapped, not read into memory


def _map_bytes(path: Path) -> np.ndarray:
    """The bytes of a regular file as a read-only uint8 array: memory-mapped when large, so a corpus
    of any size costs address space, not memory."""
    if path.stat().st_size < MAP_MIN_BYTES:
        return _as_array(_read_bytes(path))
    try:
        return np.memmap(path, dtype=np.uint8, mode="r")
    except (OSError, ValueError) as e:
        raise ArbsError(f"cannot map corpus file '{path}': {e}; check that it is readable") from e


def _check_size(n: int, where: str) -> None:
    if n == 0:
        raise ConfigError(f"corpus '{where}' is empty (0 bytes); give a file or directory with text in it")
    if n < MIN_CORPUS_BYTES:
        raise ConfigError(
            f"corpus '{where}' holds {n} bytes; at least {MIN_CORPUS_BYTES} are needed to split off a "
            f"validation set; give more data"
        )


def _join_split(files: list[tuple[str, bytes]]) -> tuple[np.ndarray, np.ndarray, int, int]:
    """Split (relpath, bytes) pairs by the crc rule; return train, val, n_train_files, n_val_files."""
    train = [b for rel, b in files if not _is_val_file(rel)]
    val = [b for rel, b in files if _is_val_file(rel)]
    return _as_array(FILE_SEPARATOR.join(train)), _as_array(FILE_SEPARATOR.join(val)), len(train), len(val)


# --------------------------------------------------------------------------------------------------------
# default corpus


def _default_corpus_files(max_bytes: int) -> tuple[Path, list[tuple[str, bytes]]]:
    """(stdlib root, [(relpath, bytes)]) selected by steps 1-3 of :func:`default_corpus`."""
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise ArbsError(
            f"the Python standard library directory '{root}' (sysconfig stdlib path) does not exist; "
            f"pass a corpus path instead"
        )
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = [
            d for d in dirnames
            if d not in _DEFAULT_EXCLUDED_DIRS and not d.startswith(_DEFAULT_EXCLUDED_DIR_PREFIXES)
        ]
        rel_dir = Path(dirpath).relative_to(root)
        for f in filenames:
            if f.endswith(".py") and not f.startswith(_DEFAULT_EXCLUDED_FILE_PREFIXES):
                rels.append((rel_dir / f).as_posix())
    rels.sort()

    files: list[tuple[str, bytes]] = []
    total = 0
    for rel in rels:
        b = _read_bytes(root / rel)
        if not b:  # empty __init__.py files would add only separators
            continue
        if total + len(b) > max_bytes:
            break
        files.append((rel, b))
        total += len(b)
    return root, files


def default_corpus(max_bytes: int = DEFAULT_CORPUS_MAX_BYTES) -> Corpus:
    """The built-in corpus: this Python's standard library ``*.py`` sources.

    Selection (deterministic for a given Python build):

    1. Walk ``sysconfig.get_paths()["stdlib"]``, not following directory symlinks, skipping directories
       named ``site-packages``, ``dist-packages``, ``test``, ``tests``, ``idle_test``, ``__pycache__`` or
       starting with ``config-``, and files starting with ``_sysconfigdata`` (build-machine details).
    2. Sort the ``*.py`` files by relative POSIX path (code-point order); skip empty files.
    3. Take files in that order while the running byte total stays <= ``max_bytes`` (default 8 MiB); the
       first file that would cross the cap ends the selection.
    4. Split by file: crc32(relpath) % 20 == 0 -> validation (~5%), else train. Within each split the files'
       bytes are joined with ``b"\\n\\n"``. (If a small ``max_bytes`` leaves a split empty, all files are
       joined and the last 5% of the bytes is validation, as in :func:`load_corpus`; ``info["split"]`` says.)

    The bytes, and so ``info["sha256"]``, differ between Python versions (the stdlib changes), which is why
    ``info["python_version"]`` is recorded.

    Parameters
    ----------
    max_bytes : int
        Cap on the summed file sizes (separators not counted). Must be >= MIN_CORPUS_BYTES.

    Returns
    -------
    Corpus
        ``info`` holds source, kind="stdlib", n_files, n_train_files, n_val_files, train_bytes, val_bytes,
        sha256, python_version, max_bytes, split.
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < MIN_CORPUS_BYTES:
        raise ConfigError(f"default_corpus max_bytes must be an int >= {MIN_CORPUS_BYTES}; got {max_bytes!r}")
    root, files = _default_corpus_files(max_bytes)
    total = sum(len(b) for _, b in files)
    _check_size(total, str(root))

    train, val, n_train, n_val = _join_split(files)
    split = _FILE_RULE
    if len(train) == 0 or len(val) == 0:  # only with a small max_bytes: same fallback as load_corpus(dir)
        train, val = _split_tail(_as_array(FILE_SEPARATOR.join(b for _, b in files)))
        n_train, n_val = len(files), 0
        split = _TAIL_FALLBACK_RULE
    info = {
        "source": root.as_posix(),
        "kind": "stdlib",
        "n_files": len(files),
        "n_train_files": n_train,
        "n_val_files": n_val,
        "train_bytes": int(len(train)),
        "val_bytes": int(len(val)),
        "sha256": _sha256(train, val),
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "max_bytes": int(max_bytes),
        "split": split,
    }
    log.debug("default corpus: %s", info)
    return Corpus(train, val, info)


# The installation corpus ("python:all"): every text file of these kinds that this Python holds.
INSTALL_CORPUS = "python:all"
INSTALL_CORPUS_SUFFIXES = (".py", ".md", ".txt")
INSTALL_CORPUS_MAX_BYTES = 4 * 2**30


def _install_roots() -> list[tuple[str, Path]]:
    """(label, directory) of this Python's stdlib and its site-packages directories, each once."""
    paths = sysconfig.get_paths()
    roots, seen = [], set()
    for label, key in (("stdlib", "stdlib"), ("purelib", "purelib"), ("platlib", "platlib")):
        d = Path(paths[key])
        if d.is_dir() and d.resolve() not in seen:
            seen.add(d.resolve())
            roots.append((label, d))
    return roots


def install_corpus(max_bytes: int = INSTALL_CORPUS_MAX_BYTES) -> Corpus:
    """``--data python:all``: every ``*.py``, ``*.md`` and ``*.txt`` file of this Python installation,
    site-packages included: a corpus of hundreds of MB where large packages are installed (torch, triton).

    Selection (deterministic for a given installation; ``info["files_sha256"]`` identifies the file list):

    1. Roots, in this order, each once: ``sysconfig`` paths ``stdlib``, ``purelib``, ``platlib``. Each file is
       named ``<root label>/<path relative to the root>`` (labels ``stdlib``, ``purelib``, ``platlib``).
    2. Walk each root without following directory symlinks, skipping ``__pycache__`` and names starting
       with "."; under ``stdlib`` also ``site-packages``/``dist-packages`` (walked as their own roots) and
       files starting with ``_sysconfigdata``. Tests are kept: they are text like any other.
    3. Keep files with those suffixes that are non-empty and have no NUL byte in their first 8 KiB; sort by
       name; take them while the running total stays <= ``max_bytes`` (default 4 GiB).
    4. Split by file as :func:`default_corpus` does (crc32(name) % 20 == 0 -> validation).
    """
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, (int, np.integer)) or max_bytes < MIN_CORPUS_BYTES:
        raise ConfigError(f"install_corpus max_bytes must be an int >= {MIN_CORPUS_BYTES}; got {max_bytes!r}")
    names: list[tuple[str, Path]] = []
    for label, root in _install_roots():
        for dirpath, dirnames, filenames in os.walk(root):
            skip = {"site-packages", "dist-packages"} if label == "stdlib" else set()
            dirnames[:] = [d for d in dirnames if d not in skip and d != "__pycache__" and not d.startswith(".")]
            rel_dir = Path(dirpath).relative_to(root)
            for f in filenames:
                if f.endswith(INSTALL_CORPUS_SUFFIXES) and not f.startswith(".") and not (
                        label == "stdlib" and f.startswith(_DEFAULT_EXCLUDED_FILE_PREFIXES)):
                    names.append((f"{label}/{(rel_dir / f).as_posix()}", Path(dirpath) / f))
    names.sort(key=lambda t: t[0])
    files: list[tuple[str, bytes]] = []
    listing = hashlib.sha256()
    total = 0
    for name, path in names:
        if not path.is_file():
            continue
        b = _read_bytes(path)
        if not b or b"\x00" in b[:BINARY_SNIFF_BYTES]:
            continue
        if total + len(b) > max_bytes:
            break
        files.append((name, b))
        listing.update(f"{name}\t{len(b)}\n".encode())
        total += len(b)
    _check_size(total, INSTALL_CORPUS)
    train, val, n_train, n_val = _join_split(files)
    info = {
        "source": INSTALL_CORPUS,
        "kind": "install",
        "roots": {label: root.as_posix() for label, root in _install_roots()},
        "suffixes": list(INSTALL_CORPUS_SUFFIXES),
        "n_files": len(files),
        "n_train_files": n_train,
        "n_val_files": n_val,
        "train_bytes": int(len(train)),
        "val_bytes": int(len(val)),
        "sha256": _sha256(train, val),
        "files_sha256": listing.hexdigest(),
        "python_version": ".".join(map(str, sys.version_info[:3])),
        "max_bytes": int(max_bytes),
        "split": _FILE_RULE,
    }
    log.debug("install corpus: %s", {k: v for k, v in info.items() if k != "roots"})
    return Corpus(train, val, info)


# --------------------------------------------------------------------------------------------------------
# user corpora


def load_corpus(path: str | os.PathLike) -> Corpus:
    """Load a corpus from a text file, a directory of text files, or a uint8 ``.npy`` array; the name
    ``python:all`` is :func:`install_corpus`.

    * ``*.npy``: must hold a 1-D uint8 array (loaded without pickle); the last 5% of bytes is validation.
    * any other file: its raw bytes (any encoding: the model is byte-level); the last 5% is validation.
    * directory: every regular file below it, recursively, in sorted relative-POSIX-path order, skipping
      names that start with "." (e.g. ``.git``), ``__pycache__`` directories, empty files, and files with a
      NUL byte in their first 8 KiB (binary). Split by file as :func:`default_corpus` does
      (crc32(relpath) % 20 == 0 -> validation). If that leaves either split empty (few files), all files are
      joined in order and the last 5% of the bytes is validation instead; ``info["split"]`` says which rule
      was used.

    Raises
    ------
    ConfigError
        path missing, empty data, fewer than MIN_CORPUS_BYTES bytes, ``.npy`` not 1-D uint8.
    ArbsError
        a file cannot be read or a ``.npy`` cannot be parsed.
    """
    if str(path) == INSTALL_CORPUS:
        return install_corpus()
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"corpus path '{p}' does not exist; give a text file, a directory, a uint8 .npy "
                          f"or {INSTALL_CORPUS}")
    if p.is_dir():
        return _load_dir(p)
    if not p.is_file():  # a FIFO or a device (/dev/zero) would hang or never end
        raise ConfigError(f"corpus path '{p}' is not a regular file or a directory; give a text file, "
                          "a directory or a uint8 .npy")
    if p.suffix.lower() == ".npy":
        return _load_npy(p)
    _check_size(p.stat().st_size, str(p))
    data = _map_bytes(p)
    train, val = _split_tail(data)
    return Corpus(train, val, _info(p, "text", 1, train, val, _TAIL_RULE))


def _info(p: Path, kind: str, n_files: int, train: np.ndarray, val: np.ndarray, split: str) -> dict:
    return {
        "source": p.resolve().as_posix(),
        "kind": kind,
        "n_files": n_files,
        "train_bytes": int(len(train)),
        "val_bytes": int(len(val)),
        "sha256": _sha256(train, val),
        "split": split,
    }


def _load_npy(p: Path) -> Corpus:
    try:
        a = np.load(p, allow_pickle=False, mmap_mode="r")  # mapped: a large corpus costs no memory
    except (OSError, ValueError, EOFError) as e:
        raise ArbsError(f"cannot read '{p}' as a .npy array: {e}; save it with np.save(path, bytes_array)") from e
    if not isinstance(a, np.ndarray):  # np.load returns NpzFile for .npz content
        raise ConfigError(f"'{p}' is not a single .npy array; save one 1-D uint8 array with np.save")
    if a.dtype != np.uint8 or a.ndim != 1:
        raise ConfigError(
            f"'{p}' holds a {a.dtype} array of shape {a.shape}; a corpus .npy must be 1-D uint8 "
            f"(convert with np.asarray(x, dtype=np.uint8).ravel() only if the values are bytes)"
        )
    _check_size(len(a), str(p))
    train, val = _split_tail(a)
    return Corpus(train, val, _info(p, "npy", 1, train, val, _TAIL_RULE))


def _load_dir(p: Path) -> Corpus:
    rels: list[str] = []
    for dirpath, dirnames, filenames in os.walk(p):
        dirnames[:] = [d for d in dirnames if not d.startswith(".") and d != "__pycache__"]
        rel_dir = Path(dirpath).relative_to(p)
        rels.extend((rel_dir / f).as_posix() for f in filenames if not f.startswith("."))
    rels.sort()

    files: list[tuple[str, bytes]] = []
    n_binary = 0
    for rel in rels:
        fp = p / rel
        if not fp.is_file():  # broken symlink, fifo, socket
            continue
        b = _read_bytes(fp)
        if not b:
            continue
        if b"\x00" in b[:BINARY_SNIFF_BYTES]:
            n_binary += 1
            continue
        files.append((rel, b))
    if n_binary:
        log.info("corpus '%s': skipped %d binary files (NUL byte in the first %d bytes)", p, n_binary,
                 BINARY_SNIFF_BYTES)
    if not files:
        raise ConfigError(
            f"corpus directory '{p}' holds no non-empty text files"
            + (f" ({n_binary} binary files skipped)" if n_binary else "")
            + "; give a directory with text files in it"
        )
    total = sum(len(b) for _, b in files) + len(FILE_SEPARATOR) * (len(files) - 1)
    _check_size(total, str(p))

    train, val, _, _ = _join_split(files)
    split = _FILE_RULE
    if len(train) == 0 or len(val) == 0:
        train, val = _split_tail(_as_array(FILE_SEPARATOR.join(b for _, b in files)))
        split = _TAIL_FALLBACK_RULE
    return Corpus(train, val, _info(p, "directory", len(files), train, val, split))


# --------------------------------------------------------------------------------------------------------
# token corpora

TOKENIZE_CHUNK_CHARS = 1 << 16  # text is encoded in pieces of whole lines up to this many characters
TOKEN_CACHE_VERSION = 1  # part of the cache key: bump when the tokenization rule changes
_TOKENIZE_RULE = (
    "each split's bytes decoded as UTF-8 (invalid bytes -> U+FFFD), cut after the last newline within every "
    f"{TOKENIZE_CHUNK_CHARS} characters (a longer line is cut there), pieces encoded without special tokens "
    "and concatenated"
)


def token_dtype(vocab_size: int) -> np.dtype:
    """uint16 for vocabularies of up to 65536 ids, else uint32."""
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or not 1 <= vocab_size <= 1 << 32:
        raise ConfigError(f"vocab_size must be an int 1 .. 2**32; got {vocab_size!r}")
    return np.dtype(np.uint16) if vocab_size <= 1 << 16 else np.dtype(np.uint32)


def _text_pieces(text: str, limit: int = TOKENIZE_CHUNK_CHARS) -> list[str]:
    out, i, n = [], 0, len(text)
    while i < n:
        j = min(i + limit, n)
        if j < n:
            k = text.rfind("\n", i, j)
            if k >= i:
                j = k + 1
        out.append(text[i:j])
        i = j
    return out


def _encode(data: np.ndarray, encode, dtype: np.dtype, vocab_size: int, what: str) -> np.ndarray:
    text = bytes(memoryview(np.ascontiguousarray(data))).decode("utf-8", errors="replace")
    ids = [np.asarray(e, dtype=np.int64) for e in encode(_text_pieces(text))]
    a = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    if a.size and (a.min() < 0 or a.max() >= vocab_size):
        raise ConfigError(f"the tokenizer gave token id {int(a.max())} for the {what} split; the model has "
                          f"{vocab_size} embedding rows")
    return a.astype(dtype)


def _load_cached(path: Path, dtype: np.dtype) -> np.ndarray | None:
    try:
        a = np.load(path, allow_pickle=False, mmap_mode="r")
    except (OSError, ValueError, EOFError):
        return None
    if not isinstance(a, np.ndarray) or a.dtype != dtype or a.ndim != 1:
        return None
    return a


def _save_cached(path: Path, a: np.ndarray) -> None:
    """Write ``a`` as ``path`` atomically (a temporary ``.tmp-`` file renamed); a failure only logs."""
    tmp = path.with_name(f".tmp-{path.name}.{os.getpid()}")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(tmp, "wb") as f:
            np.save(f, a, allow_pickle=False)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        log.warning("token cache '%s' not written: %s (the corpus is tokenized again next time)", path, e)
        try:
            tmp.unlink()
        except OSError:
            pass


def tokenize_corpus(corpus: Corpus, encode, *, tokenizer_sha256: str, vocab_size: int,
                    cache_dir: str | os.PathLike | None = None) -> Corpus:
    """The token ids of a byte corpus, split as its bytes were (train bytes -> train tokens, val -> val).

    ``encode(pieces: list[str]) -> list[list[int]]`` is the tokenizer (no special tokens added); the rule
    (:data:`_TOKENIZE_RULE`) cuts each split's text after a newline every TOKENIZE_CHUNK_CHARS characters,
    so the ids are a function of the bytes and the tokenizer alone. Ids are uint16 (``vocab_size`` <= 65536)
    or uint32. With ``cache_dir`` the ids are kept there as ``tokens-<key>.train.npy`` / ``.val.npy``,
    ``key`` the sha256 of the bytes' sha256, the split, the tokenizer's sha256 and the rule's version, and
    read back (memory-mapped) instead of tokenizing again; a cache file that does not read as the right
    array is rebuilt. ``info`` is the byte corpus's plus ``tokenizer_sha256``, ``train_tokens``,
    ``val_tokens``, ``token_dtype``, ``tokens_sha256`` (train ids then val ids, little-endian) and
    ``tokenization``; ``unit`` is "token".
    """
    if corpus.train.dtype != np.uint8:
        raise ConfigError(f"tokenize_corpus needs a byte corpus; this one holds {corpus.train.dtype} ids already")
    dtype = token_dtype(vocab_size).newbyteorder("<")
    key_src = f"{TOKEN_CACHE_VERSION}:{corpus.info.get('sha256')}:{len(corpus.train)}:{tokenizer_sha256}:{dtype.str}"
    key = hashlib.sha256(key_src.encode()).hexdigest()[:24]
    arrays = {}
    for name in ("train", "val"):
        path = Path(cache_dir) / f"tokens-{key}.{name}.npy" if cache_dir is not None else None
        a = _load_cached(path, dtype) if path is not None and path.is_file() else None
        if a is None:
            a = _encode(getattr(corpus, name), encode, dtype, vocab_size, name)
            if path is not None:
                _save_cached(path, a)
        arrays[name] = a
    train, val = arrays["train"], arrays["val"]
    info = dict(corpus.info) | {
        "unit": "token",
        "tokenizer_sha256": tokenizer_sha256,
        "train_tokens": int(len(train)),
        "val_tokens": int(len(val)),
        "token_dtype": dtype.name,
        "tokens_sha256": _sha256(train, val),
        "tokenization": _TOKENIZE_RULE,
    }
    return Corpus(train, val, info)


# --------------------------------------------------------------------------------------------------------
# batches


def _check_int(name: str, v, minimum: int) -> int:
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum:
        raise ConfigError(f"{name} must be an int >= {minimum}; got {v!r}")
    return int(v)


def _check_data(data, context: int, what: str) -> None:
    if not isinstance(data, np.ndarray) or data.dtype not in TOKEN_DTYPES or data.ndim != 1:
        got = f"{data.dtype} array of shape {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise ConfigError(f"{what}: data must be a 1-D uint8 numpy array (bytes), or uint16/uint32 (token ids); "
                          f"got {got}")
    if len(data) < context + 1:
        unit = "bytes" if data.dtype == np.uint8 else "tokens"
        raise ConfigError(
            f"{what}: data holds {len(data)} {unit} but a window of context {context} needs {context + 1} "
            f"(context + 1 for the shifted targets); lower --context or use a larger corpus"
        )


def _windows(data: np.ndarray, starts: np.ndarray, context: int) -> tuple[torch.Tensor, torch.Tensor]:
    idx = starts[:, None] + np.arange(context + 1, dtype=np.int64)  # (B, T+1)
    w = data[idx].astype(np.int64)  # (B, T+1)
    x = torch.from_numpy(np.ascontiguousarray(w[:, :-1]))  # (B, T)
    y = torch.from_numpy(np.ascontiguousarray(w[:, 1:]))  # (B, T)
    return x, y


def get_batch(
    data: np.ndarray, *, batch_size: int, context: int, seed: int, step: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """A random training batch that depends only on ``(seed, step)``.

    Window starts are drawn uniformly from ``[0, len(data) - context - 1]`` by
    ``np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step])))``; no RNG state is carried
    between calls, so resuming at ``step`` reproduces the batches of an uninterrupted run exactly.

    Parameters
    ----------
    data : np.ndarray
        uint8 bytes or uint16/uint32 token ids, shape (n,), n >= context + 1. Not modified.
    batch_size, context : int
        >= 1.
    seed, step : int
        >= 0.

    Returns
    -------
    x, y : torch.Tensor
        int64, shape (batch_size, context), on CPU; ``y[:, t] == x[:, t + 1]`` (y is x shifted by one).
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    context = _check_int("context", context, 1)
    seed = _check_int("seed", seed, 0)
    step = _check_int("step", step, 0)
    _check_data(data, context, "get_batch")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, step])))
    starts = rng.integers(0, len(data) - context, size=batch_size, dtype=np.int64)  # (B,), high exclusive
    return _windows(data, starts, context)


def eval_batches(
    data: np.ndarray, *, batch_size: int, context: int, max_batches: int | None
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Fixed validation batches: the same windows on every call, for a loss comparable across steps.

    The val set holds ``n_tile = (len(data) - 1) // context`` non-overlapping windows (start ``i * context``)
    that predict every byte after the first exactly once (up to a tail shorter than ``context``). If those fit
    in ``max_batches * batch_size`` rows they are used as is; otherwise that many windows are placed evenly
    from the first start 0 to the last possible start ``len(data) - context - 1`` (integer spacing), so a
    capped evaluation still samples the whole val set rather than only its beginning.

    Parameters
    ----------
    data : np.ndarray
        uint8 bytes or uint16/uint32 token ids, shape (n,), n >= context + 1.
    batch_size, context : int
        >= 1.
    max_batches : int or None
        >= 1, or None for every tiled window.

    Returns
    -------
    list of (x, y)
        int64 tensors of shape (b, context) with b == batch_size except possibly in the last batch, which may
        be shorter: weight per-batch losses by rows when averaging.
    """
    batch_size = _check_int("batch_size", batch_size, 1)
    context = _check_int("context", context, 1)
    if max_batches is not None:
        max_batches = _check_int("max_batches", max_batches, 1)
    _check_data(data, context, "eval_batches")
    n_tile = (len(data) - 1) // context
    cap = n_tile if max_batches is None else min(n_tile, max_batches * batch_size)
    if cap == n_tile:
        starts = np.arange(n_tile, dtype=np.int64) * context  # (n,)
    else:
        last = len(data) - context - 1
        starts = (np.arange(cap, dtype=np.int64) * last) // max(cap - 1, 1)  # (n,), evenly spaced
    return [_windows(data, starts[i : i + batch_size], context) for i in range(0, len(starts), batch_size)]
