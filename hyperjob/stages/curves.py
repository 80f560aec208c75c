"""Training curves beside the run: `train_curves.csv` (every logged step) and `train_curves.png` (loss and lr).

Written by rank 0 on every log event, so a long run can be looked at while it goes (`status` points to them).
The PNG is drawn here with the standard library (a canvas, lines, a 3x5 digit font, zlib): a plotting library
would be a heavy dependency for two polylines. Each panel is labelled with its name and its value range, the
x axis with the first and last step; the CSV carries the exact numbers.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import struct
import time
import zlib
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from hyperjob.fsutil import atomic_write_bytes, atomic_write_text

CURVES_CSV = "train_curves.csv"
CURVES_PNG = "train_curves.png"
COLUMNS = ("step", "loss", "learning_rate", "grad_norm")
REWRITE_EVERY_S = 10.0
MAX_SHARE = 0.02  # of training time spent rewriting the curves, at most
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

WIDTH, HEIGHT = 640, 400
LEFT, RIGHT, TOP, GAP, BOTTOM = 80, 16, 24, 40, 30  # margins (pixels): y labels left, step labels below
SCALE = 2  # font pixels per glyph pixel
RGB = tuple[int, int, int]
WHITE, GREY, BLACK = (255, 255, 255), (170, 170, 170), (40, 40, 40)
LOSS_COLOUR, LR_COLOUR = (31, 119, 180), (214, 110, 20)

# 3x5 glyphs, one string of 15 bits per character (rows top to bottom); enough for numbers and the panel names.
_FONT = {
    "0": "111101101101111", "1": "010110010010111", "2": "111001111100111", "3": "111001111001111",
    "4": "101101111001001", "5": "111100111001111", "6": "111100111101111", "7": "111001001010010",
    "8": "111101111101111", "9": "111101111001111", ".": "000000000000010", "-": "000000111000000",
    "+": "000010111010000", "e": "000111111100111", "l": "110010010010111", "o": "000111101101111",
    "s": "000111110011111", "r": "000111100100100", "t": "010111010010011", "p": "000111101111100",
}  # fmt: skip


def curve_rows(log_history: Iterable[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per training log entry (those with a loss, lr or grad norm); the run's final summary is not one."""
    rows = []
    for entry in log_history:
        if "step" in entry and any(k in entry for k in COLUMNS[1:]):
            rows.append({k: entry.get(k) for k in COLUMNS})
    return rows


def curves_csv(rows: Sequence[Mapping[str, Any]]) -> str:
    """CSV text; an absent value is an empty cell, floats are written exactly (repr)."""
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in rows:
        writer.writerow(["" if row[k] is None else repr(row[k]) for k in COLUMNS])
    return out.getvalue()


def _fmt(value: float) -> str:
    """Short enough for the left margin: 6.952, 0.003, 3.0e-05."""
    if value == 0 or 1e-2 <= abs(value) < 1e4:
        return f"{value:.4g}"
    return f"{value:.1e}".replace("e-0", "e-").replace("e+0", "e+")


class Canvas:
    """An RGB raster with just what a line plot needs."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.pixels = bytearray(b"\xff" * (width * height * 3))

    def dot(self, x: int, y: int, colour: RGB) -> None:
        if 0 <= x < self.width and 0 <= y < self.height:
            i = (y * self.width + x) * 3
            self.pixels[i : i + 3] = bytes(colour)

    def line(self, x0: int, y0: int, x1: int, y1: int, colour: RGB, thick: int = 1) -> None:
        """Bresenham; `thick` stacks the line downwards and rightwards."""
        dx, dy = abs(x1 - x0), -abs(y1 - y0)
        sx, sy = (1 if x0 < x1 else -1), (1 if y0 < y1 else -1)
        err = dx + dy
        while True:
            for t in range(thick):
                self.dot(x0 + (t if dx < -dy else 0), y0 + (0 if dx < -dy else t), colour)
            if x0 == x1 and y0 == y1:
                return
            e2 = 2 * err
            if e2 >= dy:
                err, x0 = err + dy, x0 + sx
            if e2 <= dx:
                err, y0 = err + dx, y0 + sy

    def text(self, x: int, y: int, s: str, colour: RGB) -> None:
        """Draw `s` with its top-left corner at (x, y); characters without a glyph leave a blank."""
        for n, ch in enumerate(s):
            bits = _FONT.get(ch, "0" * 15)
            for k, bit in enumerate(bits):
                if bit == "1":
                    px, py = x + n * 4 * SCALE + (k % 3) * SCALE, y + (k // 3) * SCALE
                    for a in range(SCALE):
                        for b in range(SCALE):
                            self.dot(px + a, py + b, colour)

    def png(self) -> bytes:
        """The canvas as a PNG file (8-bit RGB, no filter)."""
        stride = self.width * 3
        raw = b"".join(b"\x00" + self.pixels[y * stride : (y + 1) * stride] for y in range(self.height))

        def chunk(kind: bytes, data: bytes) -> bytes:
            return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

        header = struct.pack(">IIBBBBB", self.width, self.height, 8, 2, 0, 0, 0)
        body = chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b"")
        return PNG_SIGNATURE + body


def _panel(
    canvas: Canvas, box: tuple[int, int, int, int], name: str, points: list[tuple[float, float]], colour: RGB
) -> None:
    """One framed plot of `points` (step, value) in box (x0, y0, x1, y1), with its name and value range."""
    x0, y0, x1, y1 = box
    for a, b, c, d in ((x0, y0, x1, y0), (x0, y1, x1, y1), (x0, y0, x0, y1), (x1, y0, x1, y1)):
        canvas.line(a, b, c, d, GREY)
    canvas.text(x0, y0 - 5 * SCALE - 4, name, colour)  # above the frame: never over the data
    if not points:
        return
    lo, hi = min(v for _, v in points), max(v for _, v in points)
    canvas.text(4, y0, _fmt(hi), BLACK)
    canvas.text(4, y1 - 5 * SCALE, _fmt(lo), BLACK)
    first, last = points[0][0], points[-1][0]
    span, vspan = (last - first) or 1.0, (hi - lo) or 1.0
    # Many steps per pixel column: draw each column's range once, so the cost is bounded by the canvas, not the run.
    columns: dict[int, list[int]] = {}
    for step, value in points:
        x = x0 + 2 + round((step - first) / span * (x1 - x0 - 4))
        y = y1 - 2 - round((value - lo) / vspan * (y1 - y0 - 4)) if hi > lo else (y0 + y1) // 2
        col = columns.setdefault(x, [y, y, y, y])  # first, min, max, last
        col[1], col[2], col[3] = min(col[1], y), max(col[2], y), y
    previous: tuple[int, int] | None = None
    for x in sorted(columns):
        first_y, top, bottom, last_y = columns[x]
        if previous is not None:
            canvas.line(previous[0], previous[1], x, first_y, colour, thick=2)
        canvas.line(x, top, x, bottom, colour, thick=2)
        previous = (x, last_y)


def _series(rows: Sequence[Mapping[str, Any]], key: str) -> list[tuple[float, float]]:
    """(step, value) of the rows that have a finite `key`, in step order."""
    out = []
    for row in rows:
        value = row.get(key)
        if isinstance(value, (int, float)) and math.isfinite(value):
            out.append((float(row["step"]), float(value)))
    return sorted(out)


def panel_boxes() -> tuple[tuple[int, int, int, int], tuple[int, int, int, int]]:
    """The frames (x0, y0, x1, y1) of the loss panel and of the lr panel below it."""
    panel_h = (HEIGHT - TOP - GAP - BOTTOM) // 2
    x0, x1 = LEFT, WIDTH - RIGHT
    return (x0, TOP, x1, TOP + panel_h), (x0, TOP + panel_h + GAP, x1, TOP + 2 * panel_h + GAP)


def curves_png(rows: Sequence[Mapping[str, Any]]) -> bytes:
    """Loss above, learning rate below, sharing the step axis."""
    canvas = Canvas(WIDTH, HEIGHT)
    top, bottom = panel_boxes()
    x0, x1 = LEFT, WIDTH - RIGHT
    _panel(canvas, top, "loss", _series(rows, "loss"), LOSS_COLOUR)
    _panel(canvas, bottom, "lr", _series(rows, "learning_rate"), LR_COLOUR)
    steps = [int(row["step"]) for row in rows if isinstance(row.get("step"), (int, float))]
    if steps:
        label_y = bottom[3] + 8
        canvas.text(x0, label_y, f"step {min(steps)}", BLACK)
        last = f"{max(steps)}"
        canvas.text(x1 - len(last) * 4 * SCALE, label_y, last, BLACK)
    return canvas.png()


def write_curves(run_dir: Path, log_history: Iterable[Mapping[str, Any]]) -> tuple[Path, Path]:
    """Write `<run>/train_curves.csv` and `<run>/train_curves.png` from the Trainer's log history, atomically."""
    rows = curve_rows(log_history)
    csv_path, png_path = run_dir / CURVES_CSV, run_dir / CURVES_PNG
    atomic_write_text(csv_path, curves_csv(rows))
    atomic_write_bytes(png_path, curves_png(rows))
    return csv_path, png_path


def curves_callback(run_dir: Path, every_s: float = REWRITE_EVERY_S, max_share: float = MAX_SHARE) -> Any:
    """A TrainerCallback that rewrites the curves on log events (rank 0), so they exist as training goes.

    A rewrite reads the whole history, so rewrites are spaced: at least `every_s` apart, and far enough apart that
    they take at most `max_share` of the time (a 100k-step run logging every step would otherwise spend most of
    its time redrawing). The end of training
    always writes. A failed write (a full disk) is logged once and does not stop training: the curves are a view.
    """
    from transformers import TrainerCallback

    log = logging.getLogger("hyperjob.curves")

    class WriteCurves(TrainerCallback):
        def __init__(self) -> None:
            self.next_at, self.warned = 0.0, False

        def _write(self, state: Any, force: bool) -> None:
            started = time.monotonic()
            if not state.is_world_process_zero or (started < self.next_at and not force):
                return
            try:
                write_curves(run_dir, state.log_history)
            except OSError as e:
                if not self.warned:
                    self.warned = True
                    log.warning("could not write the training curves in %s: %s", run_dir, e)
            self.next_at = started + max(every_s, (time.monotonic() - started) / max_share)

        def on_log(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._write(state, force=False)

        def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
            self._write(state, force=True)

    return WriteCurves()
