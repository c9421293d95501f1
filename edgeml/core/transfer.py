"""Transfer compression: an artifact travels and rests as one zstd frame around its ZIP.

Light on purpose (zstandard only): the device agent imports it. Model weights that are mostly
zeros (pruned) or int8 compress well, so the compressed size, not the raw one, is the cost of
shipping a model; the optimizer ranks candidates by it.
"""
from __future__ import annotations

import zstandard

MAGIC = b"\x28\xb5\x2f\xfd"
LEVEL = 19  # the slowest levels cost seconds on the build machine and save bytes on every download


def compress(data: bytes, level: int = LEVEL) -> bytes:
    """One frame with the content size and a checksum, so a reader can bound and check it."""
    return zstandard.ZstdCompressor(level=level, write_checksum=True, write_content_size=True).compress(data)


def compressed_size(data: bytes, level: int = LEVEL) -> int:
    return len(compress(data, level))


def is_compressed(data: bytes) -> bool:
    return data[:4] == MAGIC


def decompress(data: bytes, limit: int) -> bytes:
    """The content of a single frame of at most ``limit`` bytes; ValueError says why not."""
    try:
        size = zstandard.frame_content_size(data)
    except zstandard.ZstdError as exc:
        raise ValueError(f"its zstd frame header is damaged ({exc})") from exc
    if size < 0:
        raise ValueError("its zstd frame does not state its size")
    if size > limit:
        raise ValueError(f"it would unpack to {size} bytes, more than the {limit} allowed")
    try:
        out = zstandard.ZstdDecompressor().decompress(data, max_output_size=limit, allow_extra_data=False)
    except zstandard.ZstdError as exc:
        raise ValueError(f"its zstd data is damaged ({exc})") from exc
    if len(out) != size:
        raise ValueError(f"it unpacked to {len(out)} bytes where its header says {size}")
    return out
