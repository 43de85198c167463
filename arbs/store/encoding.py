"""Plain JSON and checksums for what a checkpoint records (attributes, COMMIT, metrics lines), and the
zstd frame header a reader checks before it lets a chunk be decompressed."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Mapping, NamedTuple

import numpy as np

from ..errors import ConfigError


def is_int(x) -> bool:
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def sha256_hex(a: np.ndarray) -> str:
    """sha256 of the little-endian C-order bytes of ``a``."""
    a = np.ascontiguousarray(a, dtype=a.dtype.newbyteorder("<"))
    return hashlib.sha256(a.reshape(-1).view(np.uint8)).hexdigest()


def canonical_json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False).encode()


def reject_json_constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


def plain_json(x, where: str):
    """``x`` with numpy scalars and tuples converted to plain JSON values; ConfigError on anything else."""
    if x is None or isinstance(x, (bool, str)):
        return x
    if isinstance(x, np.bool_):
        return bool(x)
    if is_int(x):
        return int(x)
    if isinstance(x, (float, np.floating)):
        if not math.isfinite(float(x)):
            raise ConfigError(f"{where} is {float(x)}; JSON holds finite numbers only (store it as null or a string)")
        return float(x)
    if isinstance(x, Mapping):
        out = {}
        for k, v in x.items():
            if not isinstance(k, str):
                raise ConfigError(f"{where} has key {k!r} of type {type(k).__name__}; JSON keys must be str")
            out[k] = plain_json(v, f"{where}[{k!r}]")
        return out
    if isinstance(x, (list, tuple)):
        return [plain_json(v, f"{where}[{i}]") for i, v in enumerate(x)]
    raise ConfigError(
        f"{where} is a {type(x).__name__} ({str(x)[:60]}); only JSON values can be stored "
        "(dict with str keys, list, str, int, finite float, bool, None); convert it first"
    )


# ------------------------------------------------------------------------------ zstd frame header

ZSTD_MAGIC = 0xFD2FB528
ZSTD_BLOCK_MAX = 128 << 10  # Block_Maximum_Size: no block decompresses to more than 128 KiB
ZSTD_MAX_HEADER = 18  # magic 4 + descriptor 1 + window 1 + dictionary id 4 + content size 8


class ZstdFrameHeader(NamedTuple):
    """The fields of a zstd frame header (RFC 8878, section 3.1.1) that bound its decompressed size."""

    content_size: int | None  # Frame_Content_Size; None when the frame does not declare it
    header_size: int  # bytes from the magic number to the end of the header
    dictionary_id: int  # 0: no dictionary
    single_segment: bool
    window_size: int | None  # None with Single_Segment_Flag (the window is the content size)


def zstd_frame_header(data: bytes) -> ZstdFrameHeader:
    """Parse the frame header at the start of ``data`` without decompressing anything (RFC 8878 3.1.1).

    A zstd frame starts with the little-endian magic number 0xFD2FB528, then the Frame_Header_Descriptor
    byte: bits 7-6 Frame_Content_Size_Flag, bit 5 Single_Segment_Flag, bit 4 unused, bit 3 reserved
    (must be 0), bit 2 Content_Checksum_Flag, bits 1-0 Dictionary_ID_Flag. Then, in order: the
    Window_Descriptor byte (absent with Single_Segment_Flag), the Dictionary_ID (0, 1, 2 or 4 bytes
    for flag 0..3) and Frame_Content_Size (0 or 1 byte for flag 0, without or with Single_Segment_Flag;
    2, 4 or 8 bytes for flag 1..3; little-endian; the 2-byte form has 256 added). A frame without the
    field does not say how large it decompresses.

    ValueError when ``data`` does not start with a zstd frame header (other magic, e.g. a skippable
    frame; reserved bit set; too short).
    """
    if len(data) < 5:
        raise ValueError(f"{len(data)} bytes cannot hold a zstd frame header")
    magic = int.from_bytes(data[:4], "little")
    if magic != ZSTD_MAGIC:
        raise ValueError(f"starts with 0x{magic:08X}, not the zstd frame magic number 0x{ZSTD_MAGIC:08X}")
    fhd = data[4]
    if fhd & 0x08:
        raise ValueError("has the reserved bit of its zstd frame header descriptor set")
    fcs_flag, single = fhd >> 6, bool(fhd & 0x20)
    did_size = (0, 1, 2, 4)[fhd & 0x03]
    fcs_size = (1 if single else 0, 2, 4, 8)[fcs_flag]
    pos = 5
    window = None
    if not single:
        if len(data) < pos + 1:
            raise ValueError("ends inside its zstd frame header")
        wd = data[pos]
        exponent, mantissa = wd >> 3, wd & 0x07
        base = 1 << (10 + exponent)
        window = base + (base >> 3) * mantissa
        pos += 1
    end = pos + did_size + fcs_size
    if len(data) < end:
        raise ValueError("ends inside its zstd frame header")
    did = int.from_bytes(data[pos:pos + did_size], "little")
    pos += did_size
    content = None
    if fcs_size:
        content = int.from_bytes(data[pos:end], "little") + (256 if fcs_size == 2 else 0)
    return ZstdFrameHeader(content, end, did, single, window)


def zstd_size_bounds(content_size: int) -> tuple[int, int]:
    """(least, most) bytes of a zstd frame that decompresses to ``content_size`` bytes and declares it.

    Least: a 6-byte header (magic, descriptor, 1-byte content size) plus, per 128 KiB of content, a
    block of at least 4 bytes (3-byte block header + the one byte of an RLE block), or one empty 3-byte
    block for no content. A smaller frame cannot hold what it claims. Most: zstd's compress bound
    (content + content/256 + 64), rounded generously up (content/128 + 1 KiB) and the largest header.
    """
    least = 6 + (4 * -(-content_size // ZSTD_BLOCK_MAX) if content_size else 3)
    most = content_size + (content_size >> 7) + 1024 + ZSTD_MAX_HEADER
    return least, most
