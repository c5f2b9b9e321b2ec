"""CRC-32C (Castagnoli) with numpy, for TensorBoard's event records.

Without TensorFlow, TensorBoard's record writer checksums every record with a pure-Python byte loop (~0.1 s per MB),
in its writer thread, holding the GIL: for the demo's images (a few MB of PNG per epoch) that is a large part of the
epoch-end pause. Here a record is cut into lanes of :data:`LANE` bytes whose CRCs are computed side by side (one
numpy step per byte position), then merged pairwise, level by level (CRC is linear: a lane's CRC is carried past the
bytes after it by a linear map, a lookup in four 256-entry tables). Short records keep the pure-Python loop.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import lru_cache

import numpy as np

#: bytes per lane (records of at most ``LANE * 64`` bytes are left to the pure-Python loop)
LANE = 64
_POLY = 0x82F63B78  # CRC-32C, bit-reversed


def _byte_table() -> np.ndarray:
    t = np.arange(256, dtype=np.uint32)
    for _ in range(8):
        t = np.where(t & 1, (t >> 1) ^ np.uint32(_POLY), t >> 1).astype(np.uint32)
    return t


_TABLE = _byte_table()
_BITS = np.uint32(1) << np.arange(32, dtype=np.uint32)


def _apply(tables: np.ndarray, x: np.ndarray) -> np.ndarray:
    """The linear map given by ``tables`` (``[4, 256]``: the images of each byte of the state) applied to ``x``."""
    return tables[0][x & 0xFF] ^ tables[1][(x >> 8) & 0xFF] ^ tables[2][(x >> 16) & 0xFF] ^ tables[3][x >> 24]


def _tables(columns: np.ndarray) -> np.ndarray:
    """``[4, 256]`` lookup tables of the linear map whose image of bit ``i`` is ``columns[i]``."""
    byte_bits = (np.arange(256)[:, None] >> np.arange(8)) & 1  # [256, 8]
    return np.stack(
        [np.bitwise_xor.reduce(np.where(byte_bits, columns[8 * b : 8 * b + 8], 0), axis=1) for b in range(4)]
    ).astype(np.uint32)


@lru_cache(maxsize=32)
def _shift_tables(level: int) -> np.ndarray:
    """Tables of the map that carries a CRC state past ``LANE * 2**level`` zero bytes."""
    if level == 0:
        columns = _BITS.copy()
        for _ in range(LANE):
            columns = _TABLE[columns & 0xFF] ^ (columns >> 8)
    else:
        columns = _apply(_shift_tables(level - 1), _apply(_shift_tables(level - 1), _BITS))
    return _tables(columns)


def crc32c(data: bytes) -> int:
    """CRC-32C of ``data`` (at least 4 bytes)."""
    n = len(data)
    lanes = -(-n // LANE)
    levels = max(0, (lanes - 1).bit_length())
    buf = np.zeros((1 << levels) * LANE, np.uint8)  # zeros in front: no effect on a CRC whose state is still 0
    buf[len(buf) - n :] = np.frombuffer(data, np.uint8)
    buf[len(buf) - n : len(buf) - n + 4] ^= 0xFF  # the initial state 0xFFFFFFFF, folded into the first 4 bytes
    block = buf.reshape(-1, LANE)
    crc = np.zeros(len(block), np.uint32)
    for j in range(LANE):
        crc = _TABLE[(crc ^ block[:, j]) & 0xFF] ^ (crc >> 8)
    for level in range(levels):  # merge neighbours: the left one carried past the right one's bytes
        crc = _apply(_shift_tables(level), crc[0::2]) ^ crc[1::2]
    return int(crc[0]) ^ 0xFFFFFFFF


def masked(fallback: Callable[[bytes], int]) -> Callable[[bytes], int]:
    """TensorBoard's ``masked_crc32c``: :func:`crc32c` rotated and offset as TFRecord does, ``fallback`` (the
    pure-Python one) for records of at most ``LANE * 64`` bytes."""

    def masked_crc32c(data: bytes) -> int:
        if len(data) <= LANE * 64:
            return fallback(data)
        x = crc32c(data)
        return (((x >> 15) | (x << 17)) + 0xA282EAD8) & 0xFFFFFFFF

    return masked_crc32c
