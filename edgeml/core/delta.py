"""Deltas between artifacts: zstd ``--patch-from`` on the unpacked archives.

A compressed artifact does not delta (a change anywhere reshuffles the compressed bytes), so the
patch is made between the unpacked ZIPs, with the old one as a raw-content dictionary and long
distance matching, the way ``zstd --patch-from`` does. The device rebuilds the new ZIP from the
ZIP it holds and then checks it exactly as a full download: content hash, signature, version.
"""
from __future__ import annotations

import zstandard

LEVEL = 19


def _window_log(*sizes: int) -> int:
    # the whole base and target must fit the window for matches to reach back into the base
    return min(max(10, sum(sizes).bit_length()), zstandard.WINDOWLOG_MAX)


def make_patch(base: bytes, target: bytes, level: int = LEVEL) -> bytes:
    """A patch that turns ``base`` into ``target``."""
    params = zstandard.ZstdCompressionParameters.from_level(
        level, source_size=len(target), window_log=_window_log(len(base), len(target)), enable_ldm=True)
    dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
    return zstandard.ZstdCompressor(dict_data=dictionary, compression_params=params).compress(target)


def apply_patch(base: bytes, patch: bytes, max_size: int) -> bytes:
    """``target`` from ``base`` and ``patch``; ValueError for a patch that does not apply or would
    unpack beyond ``max_size``."""
    try:
        size = zstandard.frame_content_size(patch)
        if size < 0 or size > max_size:
            raise ValueError(f"the patch states {size} bytes (at most {max_size})")
        dictionary = zstandard.ZstdCompressionDict(base, dict_type=zstandard.DICT_TYPE_RAWCONTENT)
        decompressor = zstandard.ZstdDecompressor(dict_data=dictionary,
                                                  max_window_size=1 << _window_log(len(base), size))
        return decompressor.decompress(patch, max_output_size=size)
    except zstandard.ZstdError as exc:
        raise ValueError(f"the patch does not apply: {exc}") from exc
