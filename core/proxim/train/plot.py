"""Line charts as PNG files, in pure Python (zlib only): no plotting library is needed.

`line_chart` stacks one panel per entry, each with its title, its series in distinct colours, a legend,
and min/max labels on both axes, drawn with a 3x5 pixel font scaled 2x. It is meant for metric curves
(reward, KL, clip fractions against step) in run folders, not for publication; use ``metrics.jsonl``
with any plotting tool for that.
"""

from __future__ import annotations

import itertools
import math
import os
import struct
import zlib
from collections.abc import Mapping, Sequence

Series = Sequence[tuple[float, float]]

_FONT_ROWS = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001001001",
    "8": "111101111101111", "9": "111101111001111", "A": "010101111101101", "B": "110101110101110",
    "C": "011100100100011", "D": "110101101101110", "E": "111100110100111", "F": "111100110100100",
    "G": "011100101101011", "H": "101101111101101", "I": "111010010010111", "J": "001001001101010",
    "K": "101101110101101", "L": "100100100100111", "M": "101111111101101", "N": "110101101101101",
    "O": "010101101101010", "P": "110101110100100", "Q": "010101101110011", "R": "110101110101101",
    "S": "011100010001110", "T": "111010010010010", "U": "101101101101111", "V": "101101101101010",
    "W": "101101111111101", "X": "101101010101101", "Y": "101101010010010", "Z": "111001010100111",
    ".": "000000000000010", "-": "000000111000000", "/": "001001010100100", "_": "000000000000111",
    ":": "000010000010000", "+": "000010111010000", "%": "101001010100101", "(": "010100100100010",
    ")": "010001001001010", "=": "000111000111000", ",": "000000000010100", " ": "000000000000000",
}
_SCALE = 2
CHAR_W, CHAR_H = 4 * _SCALE, 5 * _SCALE

PALETTE = [(31, 119, 180), (214, 39, 40), (44, 160, 44), (255, 127, 14), (148, 103, 189), (140, 86, 75), (227, 119, 194), (23, 190, 207)]


class Canvas:
    """An RGB image in a bytearray, with the few drawing operations charts need."""

    def __init__(self, width: int, height: int, background: tuple[int, int, int] = (255, 255, 255)):
        self.width, self.height = width, height
        self.pixels = bytearray(bytes(background) * (width * height))

    def set(self, x: int, y: int, color: tuple[int, int, int]) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = 3 * (y * self.width + x)
            self.pixels[i : i + 3] = bytes(color)

    def rect(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], fill: bool = False) -> None:
        if fill:
            for y in range(y0, y1 + 1):
                for x in range(x0, x1 + 1):
                    self.set(x, y, color)
            return
        for x in range(x0, x1 + 1):
            self.set(x, y0, color)
            self.set(x, y1, color)
        for y in range(y0, y1 + 1):
            self.set(x0, y, color)
            self.set(x1, y, color)

    def line(self, x0: int, y0: int, x1: int, y1: int, color: tuple[int, int, int], width: int = 2) -> None:
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for ox in range(width):
                for oy in range(width):
                    self.set(x0 + ox, y0 + oy, color)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err += dy
                x0 += sx
            if e2 <= dx:
                err += dx
                y0 += sy

    def text(self, x: int, y: int, text: str, color: tuple[int, int, int] = (0, 0, 0)) -> None:
        for k, ch in enumerate(text.upper()):
            rows = _FONT_ROWS.get(ch, _FONT_ROWS["."])
            for r in range(5):
                for c in range(3):
                    if rows[3 * r + c] == "1":
                        for a in range(_SCALE):
                            for b in range(_SCALE):
                                self.set(x + k * CHAR_W + c * _SCALE + a, y + r * _SCALE + b, color)

    def png(self) -> bytes:
        raw = b"".join(b"\x00" + bytes(self.pixels[3 * self.width * y : 3 * self.width * (y + 1)]) for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}".replace("e-0", "e-").replace("e+0", "e")
    return f"{v:.3g}"


def line_chart(path: str | os.PathLike[str], panels: Sequence[tuple[str, Mapping[str, Series]]], width: int = 900, panel_height: int = 230, x_label: str = "step") -> None:
    """Write a PNG with one panel per ``(title, {label: [(x, y), ...]})``; non-finite points are skipped."""
    canvas = Canvas(width, max(1, len(panels)) * panel_height)
    left, right, top, bottom = 70, 20, 26, 30
    for p, (title, series) in enumerate(panels):
        y_off = p * panel_height
        x0, x1 = left, width - right
        y0, y1 = y_off + top, y_off + panel_height - bottom
        canvas.text(x0, y_off + 6, title)
        canvas.rect(x0, y0, x1, y1, (120, 120, 120))
        points = {k: [(float(x), float(y)) for x, y in v if math.isfinite(x) and math.isfinite(y)] for k, v in series.items()}
        xs = [x for v in points.values() for x, _ in v]
        ys = [y for v in points.values() for _, y in v]
        if not xs:
            canvas.text(x0 + 10, y0 + 10, "NO DATA", (120, 120, 120))
            continue
        xmin, xmax = min(xs), max(xs)
        ymin, ymax = min(ys), max(ys)
        if xmax == xmin:
            xmax = xmin + 1
        if ymax == ymin:
            ymin, ymax = ymin - 1, ymax + 1
        pad = 0.05 * (ymax - ymin)
        ymin, ymax = ymin - pad, ymax + pad

        def px(x: float, x0: int = x0, x1: int = x1, lo: float = xmin, hi: float = xmax) -> int:
            return round(x0 + 2 + (x - lo) / (hi - lo) * (x1 - x0 - 4))

        def py(y: float, y0: int = y0, y1: int = y1, lo: float = ymin, hi: float = ymax) -> int:
            return round(y1 - 2 - (y - lo) / (hi - lo) * (y1 - y0 - 4))

        if ymin < 0 < ymax:
            for x in range(x0, x1, 6):
                canvas.line(x, py(0.0), x + 2, py(0.0), (200, 200, 200), 1)
        for label, y in ((_fmt(ymax), y0), (_fmt(ymin), y1 - CHAR_H)):
            canvas.text(x0 - 6 - CHAR_W * len(label), y, label, (60, 60, 60))
        canvas.text(x0, y1 + 8, _fmt(xmin), (60, 60, 60))
        canvas.text((x0 + x1) // 2 - 2 * CHAR_W, y1 + 8, x_label, (60, 60, 60))
        right_label = _fmt(xmax)
        canvas.text(x1 - CHAR_W * len(right_label), y1 + 8, right_label, (60, 60, 60))
        legend_x = x0 + CHAR_W * (len(title) + 3)
        for k, (label, pts) in enumerate(points.items()):
            color = PALETTE[k % len(PALETTE)]
            canvas.rect(legend_x, y_off + 7, legend_x + 10, y_off + 7 + CHAR_H - 2, color, fill=True)
            canvas.text(legend_x + 14, y_off + 6, label, color)
            legend_x += 14 + CHAR_W * (len(label) + 2)
            for (xa, ya), (xb, yb) in itertools.pairwise(pts):
                canvas.line(px(xa), py(ya), px(xb), py(yb), color)
            if len(pts) == 1:
                canvas.rect(px(pts[0][0]) - 1, py(pts[0][1]) - 1, px(pts[0][0]) + 1, py(pts[0][1]) + 1, color, fill=True)
    tmp = f"{os.fspath(path)}.tmp"
    with open(tmp, "wb") as fh:
        fh.write(canvas.png())
    os.replace(tmp, path)
