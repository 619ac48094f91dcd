"""Pictures a person looks at: the heatmap overlay beside the labelled region, and the overview
page (summary.html) that lists a run's patients with their figures and overlays.

Drawn with pillow on numpy arrays rather than through a matplotlib figure: the same picture in
~40 ms instead of ~300-900 ms per patient, which had been the largest fixed cost of `render`.
"""
from __future__ import annotations

import html
import os
from functools import lru_cache
from pathlib import Path
from urllib.parse import quote

import numpy as np
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from .export import encode_png
from .loader import PATCH_SIZE, Slide
from .regions import region_outlines

HEATMAP = "viridis"  # perceptually uniform
HEAT_ALPHA = 0.55
LABELLED_ALPHA = 0.4
PREDICTED_COLOUR = (0, 229, 255)
LABELLED_COLOUR = (255, 45, 45)
PANEL_MAX_SIZE = (760, 900)  # (width, height) in px that a slide panel is scaled to fit
MARGIN = 14
COLORBAR = (18, 70)  # bar width, space for its tick labels and title
HEADER, CAPTION = 56, 22  # px above the panels: title and subtitle, then the panel titles
MIN_PANEL_HEIGHT = 160


@lru_cache(maxsize=None)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's own scalable font; its small bitmap font where pillow was built without FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _text(draw: ImageDraw.ImageDraw, x: float, y: float, text: str, size: int, align: str = "centre") -> None:
    """Draw `text` with its top at `y`, centred on `x` (or starting at `x` for align "left");
    placed by hand, since bitmap fonts take no anchors."""
    font = _font(size)
    left = x - font.getlength(text) / 2 if align == "centre" else x
    draw.text((left, y), text, fill=(0, 0, 0), font=font)


@lru_cache(maxsize=1)
def _heat_colours() -> np.ndarray:
    """(256, 3) uint8 colours of the heatmap's colour map."""
    return (colormaps[HEATMAP](np.linspace(0.0, 1.0, 256))[:, :3] * 255).round().astype(np.uint8)


def _cell_layer(slide: Slide, colours: np.ndarray, alpha: np.ndarray, size: tuple[int, int],
                scale: float) -> Image.Image:
    """RGBA panel layer: one flat colour (rows, cols, 3) and opacity (rows, cols) per grid cell."""
    rows, cols = slide.grid_shape
    cells = Image.fromarray(np.dstack([colours, (alpha * 255).round().astype(np.uint8)]), "RGBA")
    full = cells.resize((max(1, round(cols * PATCH_SIZE * scale)), max(1, round(rows * PATCH_SIZE * scale))),
                        Image.Resampling.NEAREST)
    return full.crop((0, 0, *size))  # edge patches are smaller than a cell: the slide ends inside it


def _polyline(points: np.ndarray, scale: float, size: tuple[int, int]) -> list[tuple[float, float]]:
    """Mosaic pixel (x, y) points on a panel of `size`, kept 1 px inside its edges, where a 2 px line
    drawn through them (it covers the pixel at a point and one beside it) stays on the panel:
    outlines along the slide's right and bottom edges show."""
    panel = np.clip(points * scale, 1, [max(1, size[0] - 2), max(1, size[1] - 2)])
    return [(float(x), float(y)) for x, y in panel]


def _dashed(draw: ImageDraw.ImageDraw, points: list[tuple[float, float]], colour: tuple[int, int, int],
            width: int, dash: float = 6.0, gap: float = 4.0) -> None:
    """Draw a polyline dashed: `dash` px on, `gap` px off, the pattern running on across vertices."""
    period, travelled = dash + gap, 0.0
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        length = float(np.hypot(x1 - x0, y1 - y0))
        at = 0.0
        while at < length:
            phase = (travelled + at) % period
            step = min((dash - phase) if phase < dash else (period - phase), length - at)
            if phase < dash:
                a, b = at / length, (at + step) / length
                draw.line([(x0 + a * (x1 - x0), y0 + a * (y1 - y0)), (x0 + b * (x1 - x0), y0 + b * (y1 - y0))],
                          fill=colour, width=width)
            at += max(step, 1e-3)
        travelled += length


def _colorbar(canvas: Image.Image, left: int, top: int, height: int) -> None:
    """Vertical heatmap scale from 0 (bottom) to 1 (top), ticks every 0.2, with its title."""
    draw = ImageDraw.Draw(canvas)
    ramp = _heat_colours()[np.linspace(255, 0, height).round().astype(int)]
    bar = (ramp.astype(np.float64) * HEAT_ALPHA + 255 * (1 - HEAT_ALPHA)).round().astype(np.uint8)
    canvas.paste(Image.fromarray(np.repeat(bar[:, None, :], COLORBAR[0], axis=1)), (left, top))
    draw.rectangle((left, top, left + COLORBAR[0], top + height - 1), outline=(0, 0, 0))
    for tick in np.linspace(0.0, 1.0, 6):
        y = top + round((1 - tick) * (height - 1))
        draw.line([(left + COLORBAR[0], y), (left + COLORBAR[0] + 4, y)], fill=(0, 0, 0))
        _text(draw, left + COLORBAR[0] + 7, y - 7, f"{tick:.1f}", 12, align="left")
    label = Image.new("RGB", (height, 18), "white")
    _text(ImageDraw.Draw(label), height / 2, 2, "IDC probability", 12)
    canvas.paste(label.rotate(90, expand=True), (left + COLORBAR[0] + 40, top))


def overlay_png(slide: Slide, mosaic: np.ndarray, probability: np.ndarray, predicted: np.ndarray,
                title: str, subtitle: str) -> bytes:
    """PNG bytes: the mosaic with the probability heatmap and predicted contours, and, when the
    file names carry labels, a second panel with the labelled IDC region for comparison."""
    height, width = mosaic.shape[:2]
    scale = min(PANEL_MAX_SIZE[0] / width, PANEL_MAX_SIZE[1] / height)
    size = (max(1, round(width * scale)), max(1, round(height * scale)))
    factor = max(1, int(1 / scale))
    image = Image.fromarray(mosaic)
    base = (image.reduce(factor) if factor > 1 else image).resize(size, Image.Resampling.BILINEAR).convert("RGBA")

    heat = slide.grid_values(probability)
    present = np.isfinite(heat)
    colours = _heat_colours()[(np.nan_to_num(heat).clip(0, 1) * 255).round().astype(int)]
    prediction = Image.alpha_composite(base, _cell_layer(slide, colours, present * HEAT_ALPHA, size, scale))
    draw = ImageDraw.Draw(prediction)
    predicted_lines = [_polyline(line, scale, size) for line in region_outlines(slide, predicted)]
    for line in predicted_lines:
        draw.line(line, fill=PREDICTED_COLOUR, width=2)
    panels = [(prediction, "Predicted IDC probability, regions outlined")]

    if slide.has_labels:
        labelled = slide.labels == 1
        truth = slide.grid_values(labelled.astype(float), fill=0.0) > 0.5
        red = np.broadcast_to(np.array(LABELLED_COLOUR, dtype=np.uint8), (*truth.shape, 3))
        comparison = Image.alpha_composite(base, _cell_layer(slide, red, truth * LABELLED_ALPHA, size, scale))
        draw = ImageDraw.Draw(comparison)
        for line in region_outlines(slide, labelled):
            draw.line(_polyline(line, scale, size), fill=LABELLED_COLOUR, width=2)
        for line in predicted_lines:
            _dashed(draw, line, PREDICTED_COLOUR, width=2)
        panels.append((comparison, "Labelled IDC (file names, red) vs predicted (cyan, dashed)"))

    colorbar_space = MARGIN + sum(COLORBAR)
    panel_height = max(size[1], MIN_PANEL_HEIGHT)  # a very wide slide is letterboxed, not squashed
    offset = (panel_height - size[1]) // 2
    content_width = size[0] + colorbar_space + (MARGIN + size[0]) * (len(panels) - 1)
    text_width = max(_font(16).getlength(title), _font(14).getlength(subtitle))
    canvas_width = max(content_width, int(text_width)) + 2 * MARGIN  # a narrow slide keeps its titles whole
    canvas = Image.new("RGB", (canvas_width, HEADER + CAPTION + panel_height + MARGIN), "white")
    draw = ImageDraw.Draw(canvas)
    _text(draw, canvas_width / 2, 8, title, 16)
    _text(draw, canvas_width / 2, 30, subtitle, 14)
    top = HEADER + CAPTION
    first = (canvas_width - content_width) // 2
    for i, (panel, panel_title) in enumerate(panels):
        left = first + i * (size[0] + colorbar_space + MARGIN)
        canvas.paste(panel.convert("RGB"), (left, top + offset))
        draw.rectangle((left - 1, top + offset - 1, left + size[0], top + offset + size[1]), outline=(0, 0, 0))
        _text(draw, left + size[0] / 2, HEADER + 2, panel_title, 13)
    _colorbar(canvas, first + size[0] + MARGIN, top, panel_height)
    return encode_png(np.asarray(canvas))


OVERVIEW_STYLE = ("body{font-family:sans-serif;margin:1.5em}table{border-collapse:collapse}"
                  "th,td{padding:4px 8px;border-bottom:1px solid #ddd;text-align:left;vertical-align:top}"
                  "td.number{text-align:right}tr.failed td{color:#a00}img{width:480px}")
OVERVIEW_COLUMNS = ("patient", "folder", "patches", "predicted IDC area", "labelled IDC area", "Dice", "threshold",
                    "overlay")


def _figure(value: float | int | None, form: str) -> str:
    """`value` formatted by `form`, or a dash where the summary has none (a field missing or empty)."""
    return "–" if value is None else format(value, form)


def _overlay_link(overlay: Path, page: Path) -> str:
    """The URL of `overlay` from `page`: relative, or an absolute file URL where no relative path
    exists (another drive on Windows)."""
    try:
        return quote(os.fsencode(Path(os.path.relpath(overlay, page.parent)).as_posix()))  # a name's bytes as on disk
    except ValueError:
        return overlay.resolve().as_uri()


def _overview_row(row: dict, out: Path, page: Path) -> str:
    """One patient's table row of the overview page `page`."""
    names = f"<td>{html.escape(str(row['patient']))}</td><td>{html.escape(str(row['folder']))}</td>"
    if row["status"] != "ok":
        error = html.escape(str(row.get("error")))
        return f'<tr class="failed">{names}<td colspan="{len(OVERVIEW_COLUMNS) - 2}">failed: {error}</td></tr>'
    figures = [_figure(row.get("patches"), "d"), _figure(row.get("predicted_idc_area_fraction"), ".1%"),
               _figure(row.get("labelled_idc_area_fraction"), ".1%"), _figure(row.get("dice"), ".2f"),
               _figure(row.get("threshold"), ".2f")]
    link = _overlay_link(out / row["folder"] / "overlay.png", page)
    alt = html.escape(f"overlay of patient {row['patient']}", quote=True)
    return (f"<tr>{names}" + "".join(f'<td class="number">{f}</td>' for f in figures)
            + f'<td><a href="{link}"><img src="{link}" alt="{alt}" loading="lazy"></a></td></tr>')


def overview_html(rows: list[dict], out: Path, page: Path) -> str:
    """The overview page `page` of the patients rendered into `out` (summary rows, in their order):
    each patient's figures beside its overlay, failed patients with their error. Links are relative,
    so the page works wherever `out` is moved or served from."""
    failed = sum(row["status"] != "ok" for row in rows)
    models = sorted({str(row["model"]) for row in rows if row.get("model")})
    title = f"idcmap: {len(rows)} patient{'s' * (len(rows) != 1)}" + (f", {failed} failed" if failed else "")
    header = "".join(f"<th>{html.escape(c)}</th>" for c in OVERVIEW_COLUMNS)
    body = "\n".join(_overview_row(row, out, page) for row in rows)
    return (f'<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n<title>{html.escape(title)}</title>\n'
            f"<style>{OVERVIEW_STYLE}</style>\n</head>\n<body>\n<h1>{html.escape(title)}</h1>\n"
            f"<p>Model: {html.escape(', '.join(models) or 'none')}. IDC areas are fractions of the tissue area "
            "(pixel-weighted); the labelled area and Dice come from the labels in the file names. "
            "Click an overlay to see it at full size; the same figures are in the summary CSV.</p>\n"
            f"<table>\n<thead><tr>{header}</tr></thead>\n<tbody>\n{body}\n</tbody>\n</table>\n</body>\n</html>\n")
