"""Dependency-free PNG output: :func:`write_png` (RGB uint8), :func:`image_grid`,
:func:`plot_curves` (a small line chart of loss curves drawn with numpy) and :func:`draw_text`
(a 5 x 7 pixel font: upper-case letters, digits and a little punctuation)."""

from __future__ import annotations

import os
import struct
import zlib
from typing import Dict, Optional, Sequence

import numpy as np

__all__ = ["write_png", "read_png", "image_grid", "plot_curves", "draw_text", "text_width", "GLYPH_W", "GLYPH_H"]


def write_png(path: str, img: np.ndarray) -> None:
    """Write ``[H, W, 3]`` uint8 as an RGB PNG (atomically: temp file + rename)."""
    img = np.ascontiguousarray(img, dtype=np.uint8)
    if img.ndim != 3 or img.shape[2] != 3:
        raise ValueError(f"write_png: argument 'img' must be [H, W, 3] uint8, got {list(img.shape)}")
    H, W, _ = img.shape
    raw = b"".join(b"\x00" + img[y].tobytes() for y in range(H))

    def chunk(tag, data):
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    png = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", struct.pack(">IIBBBBB", W, H, 8, 2, 0, 0, 0))
        + chunk(b"IDAT", zlib.compress(raw, 9))
        + chunk(b"IEND", b"")
    )
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "wb") as f:
        f.write(png)
    os.replace(tmp, path)


def image_grid(images: np.ndarray, cols: int, scale: int = 4, pad: int = 2, bg: int = 255) -> np.ndarray:
    """``[N, h, w, 3]`` uint8 -> one grid image, each tile upscaled ``scale``x (nearest)."""
    images = np.asarray(images, dtype=np.uint8)
    N, h, w, _ = images.shape
    rows = (N + cols - 1) // cols
    th, tw = h * scale, w * scale
    out = np.full((rows * (th + pad) + pad, cols * (tw + pad) + pad, 3), bg, dtype=np.uint8)
    for i, im in enumerate(images):
        r, c = divmod(i, cols)
        big = im.repeat(scale, 0).repeat(scale, 1)
        out[pad + r * (th + pad) : pad + r * (th + pad) + th, pad + c * (tw + pad) : pad + c * (tw + pad) + tw] = big
    return out


# 5 x 7 glyphs: 7 rows of 5 pixels ("#" = ink), rows separated by "/"; lower case is drawn as upper case
_FONT_ROWS = {
    "A": ".###./#...#/#...#/#####/#...#/#...#/#...#",
    "B": "####./#...#/#...#/####./#...#/#...#/####.",
    "C": ".###./#...#/#..../#..../#..../#...#/.###.",
    "D": "####./#...#/#...#/#...#/#...#/#...#/####.",
    "E": "#####/#..../#..../####./#..../#..../#####",
    "F": "#####/#..../#..../####./#..../#..../#....",
    "G": ".###./#...#/#..../#.###/#...#/#...#/.####",
    "H": "#...#/#...#/#...#/#####/#...#/#...#/#...#",
    "I": ".###./..#../..#../..#../..#../..#../.###.",
    "J": "..###/...#./...#./...#./...#./#..#./.##..",
    "K": "#...#/#..#./#.#../##.../#.#../#..#./#...#",
    "L": "#..../#..../#..../#..../#..../#..../#####",
    "M": "#...#/##.##/#.#.#/#.#.#/#...#/#...#/#...#",
    "N": "#...#/#...#/##..#/#.#.#/#..##/#...#/#...#",
    "O": ".###./#...#/#...#/#...#/#...#/#...#/.###.",
    "P": "####./#...#/#...#/####./#..../#..../#....",
    "Q": ".###./#...#/#...#/#...#/#.#.#/#..#./.##.#",
    "R": "####./#...#/#...#/####./#.#../#..#./#...#",
    "S": ".####/#..../#..../.###./....#/....#/####.",
    "T": "#####/..#../..#../..#../..#../..#../..#..",
    "U": "#...#/#...#/#...#/#...#/#...#/#...#/.###.",
    "V": "#...#/#...#/#...#/#...#/#...#/.#.#./..#..",
    "W": "#...#/#...#/#...#/#.#.#/#.#.#/#.#.#/.#.#.",
    "X": "#...#/#...#/.#.#./..#../.#.#./#...#/#...#",
    "Y": "#...#/#...#/#...#/.#.#./..#../..#../..#..",
    "Z": "#####/....#/...#./..#../.#.../#..../#####",
    "0": ".###./#...#/#..##/#.#.#/##..#/#...#/.###.",
    "1": "..#../.##../..#../..#../..#../..#../.###.",
    "2": ".###./#...#/....#/...#./..#../.#.../#####",
    "3": "#####/...#./..#../...#./....#/#...#/.###.",
    "4": "...#./..##./.#.#./#..#./#####/...#./...#.",
    "5": "#####/#..../####./....#/....#/#...#/.###.",
    "6": "..##./.#.../#..../####./#...#/#...#/.###.",
    "7": "#####/....#/...#./..#../.#.../.#.../.#...",
    "8": ".###./#...#/#...#/.###./#...#/#...#/.###.",
    "9": ".###./#...#/#...#/.####/....#/...#./.##..",
    " ": "...../...../...../...../...../...../.....",
    ".": "...../...../...../...../...../.##../.##..",
    ",": "...../...../...../...../.##../..#../.#...",
    ":": "...../.##../.##../...../.##../.##../.....",
    "-": "...../...../...../#####/...../...../.....",
    "+": "...../..#../..#../#####/..#../..#../.....",
    "=": "...../...../#####/...../#####/...../.....",
    "/": "....#/...#./...#./..#../.#.../.#.../#....",
    "%": "##.../##..#/...#./..#../.#.../#..##/...##",
    "(": "...#./..#../.#.../.#.../.#.../..#../...#.",
    ")": ".#.../..#../...#./...#./...#./..#../.#...",
    "?": ".###./#...#/....#/...#./..#../...../..#..",
    "!": "..#../..#../..#../..#../..#../...../..#..",
    "'": "..#../..#../.#.../...../...../...../.....",
    "_": "...../...../...../...../...../...../#####",
    "|": "..#../..#../..#../..#../..#../..#../..#..",
    "<": "...#./..#../.#.../#..../.#.../..#../...#.",
    ">": ".#.../..#../...#./....#/...#./..#../.#...",
}
GLYPH_W, GLYPH_H = 5, 7
_GLYPHS = {c: np.array([[ch == "#" for ch in row] for row in rows.split("/")]) for c, rows in _FONT_ROWS.items()}


def text_width(text: str, scale: int = 1) -> int:
    """Width in pixels of ``text`` drawn by :func:`draw_text` (glyph + one pixel of spacing each)."""
    return len(text) * (GLYPH_W + 1) * scale


def draw_text(img: np.ndarray, x: int, y: int, text: str, color=(0, 0, 0), scale: int = 1) -> int:
    """Draw ``text`` into ``img [H, W, 3]`` uint8 with its top-left corner at (x, y), clipped at the
    image border; characters without a glyph are drawn as "?". Returns the x after the text."""
    H, W, _ = img.shape
    for ch in text.upper():
        g = _GLYPHS.get(ch, _GLYPHS["?"])
        if scale > 1:
            g = g.repeat(scale, 0).repeat(scale, 1)
        h, w = g.shape
        y0, x0 = max(y, 0), max(x, 0)
        y1, x1 = min(y + h, H), min(x + w, W)
        if y1 > y0 and x1 > x0:
            img[y0:y1, x0:x1][g[y0 - y : y1 - y, x0 - x : x1 - x]] = color
        x += (GLYPH_W + 1) * scale
    return x


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def plot_curves(
    path: str,
    curves: Dict[str, Sequence[float]],
    width: int = 640,
    height: int = 360,
    log_y: bool = True,
    x: Optional[Sequence[float]] = None,
    x_label: str = "step",
) -> None:
    """Line chart of named series against ``x`` (default: their index), one colour each, on a white
    canvas with a frame, horizontal grid lines at powers of ten (log scale) or quarters (linear)
    with their values, the x range, and a legend of the series names."""
    img = np.full((height, width, 3), 255, dtype=np.uint8)
    m = 20
    ml = 44  # left margin: the y tick labels
    series = {k: np.asarray(v, dtype=np.float64) for k, v in curves.items() if len(v)}
    vals = np.concatenate([v[np.isfinite(v) & ((v > 0) if log_y else True)] for v in series.values()]) if series else []
    if len(vals) == 0:
        write_png(path, img)
        return
    f = (lambda v: np.log10(np.maximum(v, 1e-12))) if log_y else (lambda v: v)
    lo, hi = f(vals.min()), f(vals.max())
    if hi - lo < 1e-9:
        lo, hi = lo - 1, hi + 1
    n = max(len(v) for v in series.values())
    X = lambda i: ml + (width - ml - m) * (i / max(n - 1, 1))  # noqa: E731
    Y = lambda v: height - m - (height - 2 * m) * (f(v) - lo) / (hi - lo)  # noqa: E731
    img[m, ml : width - m] = img[height - m, ml : width - m] = 0
    img[m : height - m, ml] = img[m : height - m, width - m] = 0
    ticks = np.arange(np.floor(lo), np.ceil(hi) + 1) if log_y else np.linspace(lo, hi, 5)
    for t in ticks:
        y = int(round(height - m - (height - 2 * m) * (t - lo) / (hi - lo)))
        if m < y < height - m:
            img[y, ml : width - m : 3] = 200
        if m <= y <= height - m:
            label = f"{10.0**t:g}" if log_y else f"{t:.3g}"
            draw_text(img, ml - 4 - text_width(label), y - GLYPH_H // 2, label, (90, 90, 90))
    xs_ = list(x) if x is not None and len(x) else [0, n - 1]
    draw_text(img, ml, height - m + 4, f"{xs_[0]:g}", (90, 90, 90))
    last = f"{xs_[-1]:g} {x_label}"
    draw_text(img, width - m - text_width(last), height - m + 4, last, (90, 90, 90))
    for ci, v in enumerate(series.values()):
        col = _COLORS[ci % len(_COLORS)]
        pts = [(X(i), Y(x)) for i, x in enumerate(v) if np.isfinite(x) and (x > 0 or not log_y)]
        for (x0, y0), (x1, y1) in zip(pts, pts[1:]):
            k = int(max(abs(x1 - x0), abs(y1 - y0))) + 1
            xs = np.rint(np.linspace(x0, x1, k + 1)).astype(int).clip(0, width - 1)
            ys = np.rint(np.linspace(y0, y1, k + 1)).astype(int).clip(0, height - 1)
            img[ys, xs] = col
    lx = ml
    for ci, name in enumerate(series):  # legend: swatch + name, in series order
        col = _COLORS[ci % len(_COLORS)]
        img[6:12, lx : lx + 14] = col
        lx = draw_text(img, lx + 18, 5, name, col) + 14
    write_png(path, img)


def read_png(path: str) -> np.ndarray:
    """Read an 8-bit RGB / RGBA / gray, non-interlaced PNG as ``[H, W, 3]`` uint8 (alpha dropped)."""
    with open(path, "rb") as f:
        data = f.read()
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        raise ValueError(f"read_png: {path!r} is not a PNG file")
    pos, idat, hdr = 8, [], None
    while pos < len(data):
        n = struct.unpack(">I", data[pos : pos + 4])[0]
        tag = data[pos + 4 : pos + 8]
        body = data[pos + 8 : pos + 8 + n]
        if tag == b"IHDR":
            hdr = struct.unpack(">IIBBBBB", body)
        elif tag == b"IDAT":
            idat.append(body)
        pos += 12 + n
    if hdr is None:
        raise ValueError(f"read_png: {path!r} has no IHDR chunk")
    W, H, depth, ctype, _, _, interlace = hdr
    chans = {0: 1, 2: 3, 4: 2, 6: 4}.get(ctype)
    if depth != 8 or chans is None or interlace:
        raise ValueError(
            f"read_png: {path!r}: only 8-bit gray/RGB/RGBA non-interlaced PNGs are supported "
            f"(bit depth {depth}, colour type {ctype}, interlace {interlace})"
        )
    raw = zlib.decompress(b"".join(idat))
    stride = W * chans
    out = np.zeros((H, stride), dtype=np.int32)
    prev = np.zeros(stride, dtype=np.int32)
    for y in range(H):
        ft = raw[y * (stride + 1)]
        line = np.frombuffer(raw, dtype=np.uint8, count=stride, offset=y * (stride + 1) + 1).astype(np.int32)
        cur = np.zeros(stride, dtype=np.int32)
        if ft in (0, 2):
            cur = (line + (prev if ft == 2 else 0)) & 255
        else:
            for i in range(stride):
                a = cur[i - chans] if i >= chans else 0
                b = prev[i]
                c = prev[i - chans] if i >= chans else 0
                if ft == 1:
                    p = a
                elif ft == 3:
                    p = (a + b) // 2
                else:  # Paeth
                    pa, pb, pc = abs(b - c), abs(a - c), abs(a + b - 2 * c)
                    p = a if pa <= pb and pa <= pc else (b if pb <= pc else c)
                cur[i] = (line[i] + p) & 255
        out[y] = cur
        prev = cur
    img = out.reshape(H, W, chans).astype(np.uint8)
    if chans == 1 or chans == 2:
        img = np.repeat(img[..., :1], 3, axis=2)
    return np.ascontiguousarray(img[..., :3])
