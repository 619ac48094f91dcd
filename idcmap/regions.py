"""From probabilities to IDC regions: threshold, post-process on the slide grid, measure areas."""
from __future__ import annotations

from typing import NamedTuple

import numpy as np
from shapely.geometry import MultiPolygon, Polygon, box
from shapely.geometry.polygon import orient
from shapely.ops import unary_union
from scipy import ndimage
from skimage import measure, morphology

from .loader import Slide
from .models import Calibration


OTSU_FLOOR = 0.5
"""The otsu rule's threshold is never below this fraction of the calibration's fixed threshold."""


class SlideThreshold(NamedTuple):
    """A slide's IDC probability threshold and where it came from: "fixed" (the calibration's),
    "scattered" (the calibration's for scattered samples), "otsu" (the slide's own) or "otsu
    floor" (the slide's own, raised to `OTSU_FLOOR` times the calibration's threshold)."""
    value: float
    source: str


def slide_threshold(slide: Slide, probability: np.ndarray, calibration: Calibration) -> SlideThreshold:
    """The IDC probability threshold for `slide`: for scattered samples (not `slide.is_whole`) the
    calibration's `scattered_threshold` where it has one; else the calibration's threshold, or
    with its `otsu` rule and a whole slide, Otsu's threshold of the slide's own probabilities
    (patches weighted by their real area), which follows a slide whose probabilities sit higher or
    lower than the validation slides'. Otsu always splits a slide in two, so on a slide with little
    or no IDC it would cut through the non-IDC probabilities: it is kept at or above `OTSU_FLOOR`
    times the calibration's threshold. The calibration's threshold ("fixed") also serves a slide
    whose probabilities fall in one of 256 bins."""
    fixed = SlideThreshold(calibration.threshold, "fixed")
    if not slide.is_whole:
        return fixed if calibration.scattered_threshold is None else SlideThreshold(calibration.scattered_threshold,
                                                                                     "scattered")
    if calibration.threshold_rule != "otsu":
        return fixed
    counts, edges = np.histogram(probability, bins=256, range=(0.0, 1.0), weights=slide.areas.astype(np.float64))
    centres = (edges[:-1] + edges[1:]) / 2
    below = np.cumsum(counts)[:-1]  # area of bins 0..i, for a split between bins i and i + 1
    above = counts.sum() - below
    mass = np.cumsum(counts * centres)[:-1]
    usable = (below > 0) & (above > 0)
    if not usable.any():
        return fixed
    with np.errstate(divide="ignore", invalid="ignore"):
        between = below * above * (mass / below - (mass[-1] + counts[-1] * centres[-1] - mass) / above) ** 2
    between = np.where(usable, between, -1.0)
    tied = np.flatnonzero(between >= between.max() * (1 - 1e-9))  # equal splits (empty bins between): the middle
    otsu, floor = float(edges[1:-1][tied[len(tied) // 2]]), OTSU_FLOOR * calibration.threshold
    return SlideThreshold(otsu, "otsu") if otsu >= floor else SlideThreshold(floor, "otsu floor")


def predicted_mask(slide: Slide, probability: np.ndarray, calibration: Calibration,
                   threshold: SlideThreshold | None = None) -> np.ndarray:
    """(N,) bool: patches in predicted IDC regions, after dropping specks and filling holes.
    `threshold`: the slide's (`slide_threshold`), where the caller has it already.

    Specks: 8-connected positive regions of fewer than `min_region_cells` patches that touch
    negative tissue (a patch with no tissue around it, as in scattered samples, is no speck:
    nothing around it says it is noise).
    Holes: negative regions of at most `max_hole_cells` cells enclosed by positive ones
    (filled only where a patch exists: no IDC is predicted on bare glass).
    """
    positive = probability >= (threshold or slide_threshold(slide, probability, calibration)).value
    if calibration.min_region_cells <= 1 and calibration.max_hole_cells <= 0:
        return positive
    grid = slide.grid_values(positive.astype(np.float64), fill=0.0) > 0.5
    if calibration.min_region_cells > 1:
        grid = _remove_specks(grid, slide.grid_values(~positive, fill=0.0) > 0.5, calibration.min_region_cells)
    if calibration.max_hole_cells > 0:
        # padded so that negative cells on the grid's edge, which border bare glass, are no holes
        padded = morphology.remove_small_holes(np.pad(grid, 1), max_size=calibration.max_hole_cells, connectivity=1)
        grid = padded[1:-1, 1:-1]
    rc = slide.cells
    return grid[rc[:, 0], rc[:, 1]]


def _remove_specks(positive: np.ndarray, negative: np.ndarray, min_cells: int) -> np.ndarray:
    """`positive` without its 8-connected regions of fewer than `min_cells` cells that touch a
    `negative` cell (8-neighbourhood)."""
    labels = measure.label(positive, connectivity=2)
    sizes = np.bincount(labels.ravel())
    touches = np.zeros(len(sizes), dtype=bool)
    touches[np.unique(labels[ndimage.binary_dilation(negative, np.ones((3, 3), bool)) & positive])] = True
    drop = (sizes < min_cells) & touches
    drop[0] = False
    return positive & ~drop[labels]


def idc_area_fraction(slide: Slide, mask: np.ndarray) -> float:
    """Share of the slide's tissue area (pixels, edge patches at their real size) inside `mask`."""
    areas = slide.areas
    return float(areas[mask].sum() / areas.sum())


def dice(slide: Slide, predicted: np.ndarray, labelled: np.ndarray) -> float:
    """Area-weighted Dice between two patch masks of one slide; 1.0 when both are empty."""
    areas = slide.areas
    denominator = areas[predicted].sum() + areas[labelled].sum()
    if denominator == 0:
        return 1.0
    return float(2 * areas[predicted & labelled].sum() / denominator)


def region_outlines(slide: Slide, mask: np.ndarray) -> list[np.ndarray]:
    """Outlines of the masked regions (outer rings and holes of `region_polygons`, each patch at its
    real size) as (M, 2) arrays of mosaic pixel (x, y), for drawing."""
    origin = np.array(slide.origin_xy, dtype=np.float64)
    return [np.asarray(ring.coords) - origin
            for polygon in region_polygons(slide, mask) for ring in (polygon.exterior, *polygon.interiors)]


def region_polygons(slide: Slide, mask: np.ndarray) -> list[Polygon]:
    """Predicted regions as valid polygons in slide pixel coordinates, each patch at its real size.

    Cells are unioned exactly, so holes and edge patches are kept; one polygon per region, without
    the vertices that lie midway along a straight edge (a cell corner on a run of cells), its rings
    wound by GeoJSON's right-hand rule.
    """
    cells = [
        box(x, y, x + w, y + h)
        for (x, y), (h, w), inside in zip(slide.xy.tolist(), slide.sizes.tolist(), mask.tolist())
        if inside
    ]
    if not cells:
        return []
    union = unary_union(cells)
    polygons = list(union.geoms) if isinstance(union, MultiPolygon) else [union]
    # tolerance 0: the outline itself is unchanged; rings wound as RFC 7946 (GeoJSON) asks: outer
    # ones counter-clockwise, holes clockwise (in x/y as written, y taken upwards as validators do)
    polygons = [orient(polygon.simplify(0), 1.0) for polygon in polygons]
    return sorted(polygons, key=lambda p: (p.bounds[1], p.bounds[0]))
