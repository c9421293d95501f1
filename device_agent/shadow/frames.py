"""Frames between the agent and the shadow's process: a 4-byte big-endian length, then a pickle
(both ends are this package, on one device)."""
from __future__ import annotations

import pickle
import struct

HEADER = struct.Struct(">I")


def read_frame(stream):
    head = stream.read(HEADER.size)
    if len(head) < HEADER.size:
        return None
    (size,) = HEADER.unpack(head)
    return pickle.loads(stream.read(size))


def write_frame(stream, message) -> None:
    body = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    stream.write(HEADER.pack(len(body)) + body)
    stream.flush()
