"""The pure-Python PNG writer produces a valid image with the curves drawn in their colours."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

from proxim.train.plot import PALETTE, line_chart


def _read_png(path: Path) -> tuple[int, int, bytes]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, idat, width, height = 8, b"", 0, 0
    while pos < len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + length]
        (crc,) = struct.unpack(">I", data[pos + 8 + length : pos + 12 + length])
        assert crc == zlib.crc32(kind + body) & 0xFFFFFFFF
        if kind == b"IHDR":
            width, height, depth, color = struct.unpack(">IIBB", body[:10])
            assert (depth, color) == (8, 2)  # 8-bit RGB
        elif kind == b"IDAT":
            idat += body
        pos += 12 + length
    raw = zlib.decompress(idat)
    assert len(raw) == height * (1 + 3 * width)  # one filter byte per row
    return width, height, raw


def test_line_chart_is_a_valid_png_with_each_series_drawn(tmp_path: Path) -> None:
    path = tmp_path / "plot.png"
    line_chart(path, [("reward", {"mean": [(1, 0.1), (2, 0.5), (3, 0.4)], "accuracy": [(1, 0.0), (3, 0.9)]}), ("kl", {"ref": [(1, 0.0), (3, float("nan"))]}), ("empty", {})], width=300, panel_height=120)
    width, height, raw = _read_png(path)
    assert (width, height) == (300, 360)
    rows = [raw[y * (1 + 3 * width) + 1 : (y + 1) * (1 + 3 * width)] for y in range(height)]
    pixels = {bytes(r[3 * x : 3 * x + 3]) for r in rows for x in range(width)}
    assert bytes(PALETTE[0]) in pixels and bytes(PALETTE[1]) in pixels
