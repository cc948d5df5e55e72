"""Thumbnail tasks, with the standard library only: images are binary PPM files (P6),
scaled down by averaging the source pixels that fall in each thumbnail pixel.

    hostqueue run --tasks examples/thumbnails/thumbs.py
    hostqueue submit thumbs.thumbnail '{"src": "cat.ppm", "dst": "cat.thumb.ppm"}' --wait
"""

from __future__ import annotations

import os
from typing import Any

import hostqueue


def read_ppm(path: str) -> tuple[int, int, bytes]:
    """(width, height, RGB bytes) of a binary PPM (P6, maxval 255)."""
    with open(path, "rb") as f:
        data = f.read()
    fields: list[bytes] = []
    pos = 0
    while len(fields) < 4:  # magic, width, height, maxval; '#' starts a comment
        while data[pos:pos + 1].isspace():
            pos += 1
        if data[pos:pos + 1] == b"#":
            pos = data.index(b"\n", pos) + 1
            continue
        end = pos
        while not data[end:end + 1].isspace():
            end += 1
        fields.append(data[pos:end])
        pos = end
    magic, width, height, maxval = fields[0], int(fields[1]), int(fields[2]), int(fields[3])
    if magic != b"P6" or maxval != 255:
        raise hostqueue.Permanent(f"{path}: not a binary PPM with maxval 255")
    pixels = data[pos + 1 : pos + 1 + width * height * 3]
    if len(pixels) != width * height * 3:
        raise hostqueue.Permanent(f"{path}: truncated image")
    return width, height, pixels


def write_ppm(path: str, width: int, height: int, pixels: bytes) -> None:
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        f.write(b"P6\n%d %d\n255\n" % (width, height))
        f.write(pixels)
    os.replace(tmp, path)  # readers never see half an image


def make_sample(path: str, width: int, height: int, seed: int = 0) -> None:
    """A colourful test image: gradients and stripes that depend on ``seed``."""
    rows = []
    for y in range(height):
        row = bytearray(width * 3)
        for x in range(width):
            row[3 * x] = (x * 255 // max(1, width - 1) + seed * 40) % 256
            row[3 * x + 1] = (y * 255 // max(1, height - 1)) % 256
            row[3 * x + 2] = 255 if ((x + y + seed) // 16) % 2 else 40
        rows.append(bytes(row))
    write_ppm(path, width, height, b"".join(rows))


@hostqueue.task(retries=2, timeout=120)
def thumbnail(ctx: hostqueue.JobContext, src: str, dst: str, width: int = 64) -> dict[str, Any]:
    """Scale ``src`` down to ``width`` pixels wide (aspect kept) into ``dst``."""
    if width < 1:
        raise hostqueue.Permanent(f"width must be >= 1, got {width}")
    try:
        sw, sh, pixels = read_ppm(src)
    except FileNotFoundError:
        raise hostqueue.Permanent(f"no such image: {src}") from None
    tw = min(width, sw)
    th = max(1, round(sh * tw / sw))
    out = bytearray(tw * th * 3)
    # Source columns of each thumbnail column, once.
    cols = [(x * sw // tw, max(x * sw // tw + 1, (x + 1) * sw // tw)) for x in range(tw)]
    for ty in range(th):
        y0, y1 = ty * sh // th, max(ty * sh // th + 1, (ty + 1) * sh // th)
        sums = [0] * (sw * 3)  # per source column and channel, summed over rows y0..y1
        for y in range(y0, y1):
            row = pixels[y * sw * 3 : (y + 1) * sw * 3]
            for i, v in enumerate(row):
                sums[i] += v
        for tx, (x0, x1) in enumerate(cols):
            n = (x1 - x0) * (y1 - y0)
            for c in range(3):
                out[(ty * tw + tx) * 3 + c] = sum(sums[3 * x + c] for x in range(x0, x1)) // n
        ctx.progress((ty + 1) / th, f"row {ty + 1}/{th}")
        if ctx.aborted:
            raise hostqueue.Aborted(f"stopped at row {ty + 1} of {th}")
    write_ppm(dst, tw, th, bytes(out))
    return {"src": src, "dst": dst, "width": tw, "height": th, "source": [sw, sh]}
