"""The overlay picture: heat colours, labelled fill and outlines land on the right cells."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from conftest import grid_patches, make_patient, solid
from idcmap.loader import load_slide
from idcmap.render import (CAPTION, HEAT_ALPHA, HEADER, LABELLED_ALPHA, LABELLED_COLOUR, MARGIN, MIN_PANEL_HEIGHT,
                           PANEL_MAX_SIZE, PREDICTED_COLOUR, _dashed, _heat_colours, overlay_png)

GREY = 128


def _overlay(tmp_path, labelled_cell=None, layout="class"):
    """A 4 x 6 slide of flat grey patches, scored 0 except cell (1, 4) at 1 (predicted IDC)."""
    patches = grid_patches(4, 6, label_of=lambda r, c: None if layout == "flat" else int((r, c) == labelled_cell),
                           pixels_of=lambda r, c: solid((GREY, GREY, GREY)))
    slide = load_slide(make_patient(tmp_path, "P", patches, layout=layout))
    hot = np.array([tuple(cell) == (1, 4) for cell in slide.cells])
    picture = Image.open(io.BytesIO(overlay_png(slide, slide.mosaic(), hot.astype(float), hot, "Patient P", "test")))
    return slide, np.asarray(picture.convert("RGB")).astype(int)


def _cell_centre(slide, row, col, panel=0):
    """(y, x) in the picture of the centre of grid cell (row, col) in a panel."""
    height, width = slide.mosaic().shape[:2]
    scale = min(PANEL_MAX_SIZE[0] / width, PANEL_MAX_SIZE[1] / height)
    panel_width = round(width * scale)
    left = MARGIN + panel * (panel_width + MARGIN + 18 + 70 + MARGIN)
    return HEADER + CAPTION + int((row + 0.5) * 50 * scale), left + int((col + 0.5) * 50 * scale)


def _blend(colour, alpha):
    return np.asarray(colour) * alpha + GREY * (1 - alpha)


def test_heat_colours_sit_on_their_cells(tmp_path):
    slide, picture = _overlay(tmp_path)
    cold, hot = _heat_colours()[0], _heat_colours()[255]
    np.testing.assert_allclose(picture[_cell_centre(slide, 1, 4)], _blend(hot, HEAT_ALPHA), atol=3)
    for row, col in [(0, 0), (1, 3), (3, 5), (2, 4)]:
        np.testing.assert_allclose(picture[_cell_centre(slide, row, col)], _blend(cold, HEAT_ALPHA), atol=3)


def _panel_pixel(slide, picture, row: float, col: float) -> np.ndarray:
    """The first panel's colour at grid position (row, col), in cells from the mosaic's top left
    (fractions allowed), wherever the panel sits (letterboxed or not)."""
    height, width = slide.mosaic().shape[:2]
    scale = min(PANEL_MAX_SIZE[0] / width, PANEL_MAX_SIZE[1] / height)
    offset = (max(round(height * scale), MIN_PANEL_HEIGHT) - round(height * scale)) // 2
    return picture[HEADER + CAPTION + offset + int(row * 50 * scale), MARGIN + int(col * 50 * scale)]


def test_heat_colours_stay_on_their_cells_when_edge_patches_end_the_slide(tmp_path):
    """The last column and row are 20 px edge patches: the heat layer ends inside their cells
    (cropped), it is not squeezed onto the shorter slide."""
    patches = {(c * 50 + 1, r * 50 + 1): (None, solid((GREY,) * 3, height=20 if r == 3 else 50,
                                                         width=20 if c == 5 else 50))
               for r in range(4) for c in range(6)}
    slide = load_slide(make_patient(tmp_path, "P", patches, layout="flat"))
    hot = np.array([tuple(cell) == (1, 3) for cell in slide.cells])
    picture = np.asarray(Image.open(io.BytesIO(overlay_png(slide, slide.mosaic(), hot.astype(float), hot & False, "P", "")))
                         .convert("RGB")).astype(int)
    cold_colour, hot_colour = _heat_colours()[0], _heat_colours()[255]
    np.testing.assert_allclose(_panel_pixel(slide, picture, 1.5, 3.85), _blend(hot_colour, HEAT_ALPHA), atol=3)
    np.testing.assert_allclose(_panel_pixel(slide, picture, 1.5, 4.15), _blend(cold_colour, HEAT_ALPHA), atol=3)
    np.testing.assert_allclose(_panel_pixel(slide, picture, 3.2, 5.2), _blend(cold_colour, HEAT_ALPHA), atol=3)


def test_cells_without_a_patch_get_no_heat(tmp_path):
    patches = grid_patches(4, 6, label_of=lambda r, c: None, pixels_of=lambda r, c: solid((GREY,) * 3), skip={(2, 2)})
    slide = load_slide(make_patient(tmp_path, "P", patches, layout="flat"))
    cold = np.zeros(len(slide))
    picture = np.asarray(Image.open(io.BytesIO(overlay_png(slide, slide.mosaic(), cold, cold > 0, "P", "")))
                         .convert("RGB")).astype(int)
    np.testing.assert_allclose(_panel_pixel(slide, picture, 2.5, 2.5), [255, 255, 255], atol=3)  # the white gap
    np.testing.assert_allclose(_panel_pixel(slide, picture, 2.5, 3.5), _blend(_heat_colours()[0], HEAT_ALPHA), atol=3)


def test_predicted_region_is_outlined(tmp_path):
    slide, picture = _overlay(tmp_path)
    y, x = _cell_centre(slide, 1, 4)
    _, right = _cell_centre(slide, 1, 5)
    reach = int(0.6 * (right - x))
    row = picture[y, x - reach : x + reach]  # across the cell's left and right edges, not beyond the next
    cyan = np.all(np.abs(row - np.asarray(PREDICTED_COLOUR)) <= 3, axis=1)
    assert cyan.sum() >= 2  # both vertical edges of the outline cross this row



def test_outlines_reach_the_slides_right_and_bottom_edges(tmp_path):
    """A slide all IDC, its last column 20 px wide and last row 20 px high (edge patches): the
    outline runs along the panel's last pixel column and row, not past the tissue, off the panel."""
    patches = {}
    for r in range(4):
        for c in range(6):
            patches[(c * 50 + 1, r * 50 + 1)] = (None, solid((GREY,) * 3, height=20 if r == 3 else 50,
                                                                width=20 if c == 5 else 50))
    slide = load_slide(make_patient(tmp_path, "P", patches, layout="flat"))
    everywhere = np.ones(len(slide), bool)
    picture = Image.open(io.BytesIO(overlay_png(slide, slide.mosaic(), everywhere.astype(float), everywhere, "P", "")))
    cyan = np.all(np.abs(np.asarray(picture.convert("RGB")).astype(int) - PREDICTED_COLOUR) <= 3, axis=2)
    height, width = slide.mosaic().shape[:2]
    assert (height, width) == (170, 270)
    scale = min(PANEL_MAX_SIZE[0] / width, PANEL_MAX_SIZE[1] / height)
    top, left = HEADER + CAPTION + (max(round(height * scale), MIN_PANEL_HEIGHT) - round(height * scale)) // 2, MARGIN
    bottom, right = top + round(height * scale) - 1, left + round(width * scale) - 1
    rows, cols = slice(top, bottom + 1), slice(left, right + 1)
    for edge in (cyan[rows, left:left + 2].any(axis=1), cyan[rows, right - 1:right + 1].any(axis=1),
                 cyan[top:top + 2, cols].any(axis=0), cyan[bottom - 1:bottom + 1, cols].any(axis=0)):
        assert edge.mean() > 0.95  # each side of the rectangle drawn, within the panel's 2 edge pixels
    assert not cyan[top + 5:bottom - 5, left + 5:right - 5].any()  # one region, no inner lines


def test_labelled_panel_fills_labelled_cells_only(tmp_path):
    slide, picture = _overlay(tmp_path, labelled_cell=(2, 1))
    np.testing.assert_allclose(picture[_cell_centre(slide, 2, 1, panel=1)], _blend(LABELLED_COLOUR, LABELLED_ALPHA),
                               atol=3)
    np.testing.assert_allclose(picture[_cell_centre(slide, 0, 0, panel=1)], [GREY] * 3, atol=3)


def test_unlabelled_slide_has_one_panel(tmp_path):
    one_slide, one = _overlay(tmp_path / "a", layout="flat")
    two_slide, two = _overlay(tmp_path / "b", labelled_cell=(0, 0))
    assert not one_slide.has_labels and two_slide.has_labels
    assert one.shape[0] == two.shape[0] and one.shape[1] < two.shape[1]


@pytest.mark.parametrize("start", [0.0, 3.0])
def test_dashed_line_alternates(start):
    image = Image.new("RGB", (120, 10), "white")
    _dashed(ImageDraw.Draw(image), [(start, 5.0), (60.0, 5.0), (110.0, 5.0)], (0, 0, 0), width=1)
    inked = np.asarray(image)[5, :, 0] < 128
    runs = np.flatnonzero(np.diff(inked.astype(int)))  # switches between ink and gap
    assert inked[int(start) + 1] and len(runs) >= 15  # ~110 px of 6 on / 4 off: ~11 dashes


def test_narrow_slide_keeps_its_title_whole(tmp_path):
    patches = grid_patches(12, 1, pixels_of=lambda r, c: solid((GREY, GREY, GREY)))  # one tall column
    slide = load_slide(make_patient(tmp_path, "P", patches))
    subtitle = "a long subtitle " * 8
    picture = Image.open(io.BytesIO(overlay_png(slide, slide.mosaic(), np.zeros(len(slide)), np.zeros(len(slide), bool),
                                                "Patient P", subtitle)))
    ink = np.flatnonzero((np.asarray(picture.convert("L"))[30:50] < 128).any(axis=0))  # the subtitle's row
    assert ink.min() > 0 and ink.max() < picture.width - 1


def test_very_wide_slide_is_letterboxed_not_squashed(tmp_path):
    patches = grid_patches(1, 60, pixels_of=lambda r, c: solid((GREY, GREY, GREY)))  # one long row
    slide = load_slide(make_patient(tmp_path, "P", patches))
    picture = Image.open(io.BytesIO(overlay_png(slide, slide.mosaic(), np.zeros(len(slide)), np.zeros(len(slide), bool),
                                                "Patient P", "wide")))
    assert picture.height >= HEADER + CAPTION + MIN_PANEL_HEIGHT


def test_overlay_without_freetype_uses_the_bitmap_font(tmp_path, monkeypatch):
    from PIL import ImageFont

    from idcmap import render

    plain = ImageFont.load_default

    def no_freetype(size=None):
        if size is not None:
            raise ImportError("The _imagingft C module is not installed")
        return plain()

    monkeypatch.setattr(ImageFont, "load_default", no_freetype)
    render._font.cache_clear()
    try:
        slide, picture = _overlay(tmp_path)
        assert (picture[:HEADER] < 128).any()  # the title is drawn
        np.testing.assert_allclose(picture[_cell_centre(slide, 1, 4)], _blend(_heat_colours()[255], HEAT_ALPHA), atol=3)
    finally:
        render._font.cache_clear()
