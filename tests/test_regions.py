"""idcmap.regions: thresholding, specks and holes on the slide grid, area-weighted measures, polygons."""
from __future__ import annotations

import csv

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import Point, box
from shapely.ops import unary_union

from conftest import DATA_ROOT, grid_patches, real_patient_folder, solid
from idcmap.loader import load_slide
from idcmap.models import Calibration
from idcmap.regions import (dice, idc_area_fraction, predicted_mask, region_outlines, region_polygons,
                            SlideThreshold, slide_threshold)


def _grid_slide(patient_factory, rows, cols, skip=(), name="P"):
    return load_slide(patient_factory(name, grid_patches(rows, cols, skip=skip,
                                                         pixels_of=lambda r, c: solid((r, c, 0)))))


def _probability(slide, positive_cells):
    """1.0 at the given (row, col) cells, 0.0 elsewhere, in the slide's patch order."""
    cells = [tuple(rc) for rc in slide.cells.tolist()]
    return np.array([1.0 if rc in positive_cells else 0.0 for rc in cells])


def _cells_of(slide, mask):
    return {tuple(rc) for rc, m in zip(slide.cells.tolist(), mask) if m}


# ----------------------------------------------------------------------------------------------
# predicted_mask


def test_threshold_only(patient_factory):
    slide = _grid_slide(patient_factory, 1, 5)
    probability = np.array([0.1, 0.49, 0.5, 0.51, 0.9])
    mask = predicted_mask(slide, probability, Calibration(threshold=0.5))
    assert mask.dtype == bool
    assert mask.tolist() == [False, False, True, True, True]  # >= threshold
    assert predicted_mask(slide, probability, Calibration(threshold=0.95)).tolist() == [False] * 5
    assert predicted_mask(slide, probability, Calibration(threshold=0.0)).tolist() == [True] * 5
    # a threshold the caller computed already is used as given
    assert predicted_mask(slide, probability, Calibration(threshold=0.5),
                          SlideThreshold(0.8, "fixed")).tolist() == [False] * 4 + [True]


def test_otsu_rule_follows_a_slide_scored_low(patient_factory):
    """A whole slide whose IDC probabilities all sit below the fixed threshold: the otsu rule splits
    it between its two groups (Otsu's threshold, area-weighted), the fixed rule finds nothing."""
    slide = _grid_slide(patient_factory, 4, 5)
    assert slide.is_whole
    probability = np.where(slide.cells[:, 1] < 2, 0.45, 0.15)  # columns 0-1 "IDC", scored low
    fixed = Calibration(threshold=0.5)
    otsu = Calibration(threshold=0.5, threshold_rule="otsu")
    assert slide_threshold(slide, probability, fixed) == (0.5, "fixed")
    assert not predicted_mask(slide, probability, fixed).any()
    threshold, source = slide_threshold(slide, probability, otsu)
    assert 0.15 < threshold <= 0.45 and source == "otsu"
    np.testing.assert_array_equal(predicted_mask(slide, probability, otsu), slide.cells[:, 1] < 2)


def test_otsu_threshold_weighs_patches_by_their_area(patient_factory):
    """Edge patches (a 2 px last column and row) scored 0.9 are 11 of 36 patches but 1.6% of the
    tissue: by area the slide is two groups, 0.1 and 0.5, and Otsu splits between them (unweighted,
    it would split between 0.5 and 0.9)."""
    patches = {(c * 50 + 1, r * 50 + 1): (0, solid((r, c, 0), height=2 if r == 5 else 50, width=2 if c == 5 else 50))
               for r in range(6) for c in range(6)}
    slide = load_slide(patient_factory("P", patches))
    assert slide.is_whole and (slide.areas < 2500).sum() == 11
    edge = (slide.cells[:, 0] == 5) | (slide.cells[:, 1] == 5)
    probability = np.where(edge, 0.9, np.where((slide.cells[:, 0] == 0) & ~edge, 0.1, 0.5))
    threshold, source = slide_threshold(slide, probability, Calibration(threshold=0.4, threshold_rule="otsu"))
    assert 0.1 < threshold <= 0.5 and source == "otsu"


def test_otsu_rule_keeps_the_fixed_threshold_where_it_cannot_split(patient_factory):
    whole = _grid_slide(patient_factory, 3, 3, name="W")
    otsu = Calibration(threshold=0.4, threshold_rule="otsu")
    assert slide_threshold(whole, np.full(len(whole), 0.7), otsu) == (0.4, "fixed")  # one value: nothing to split
    scattered = _grid_slide(patient_factory, 3, 3, skip={(0, 1), (1, 0), (1, 2), (2, 1)}, name="S")
    assert not scattered.is_whole
    assert slide_threshold(scattered, np.array([0.1, 0.2, 0.3, 0.35, 0.9]), otsu) == (0.4, "fixed")  # scattered


def test_scattered_samples_take_their_own_threshold_where_the_calibration_has_one(patient_factory):
    scattered = _grid_slide(patient_factory, 3, 3, skip={(0, 1), (1, 0), (1, 2), (2, 1)}, name="S")
    whole = _grid_slide(patient_factory, 3, 3, name="W")
    calibration = Calibration(threshold=0.4, threshold_rule="otsu", scattered_threshold=0.3)
    probability = np.array([0.1, 0.2, 0.3, 0.35, 0.9])
    assert slide_threshold(scattered, probability, calibration) == (0.3, "scattered")
    np.testing.assert_array_equal(predicted_mask(scattered, probability, calibration), probability >= 0.3)
    assert slide_threshold(whole, np.full(len(whole), 0.7), calibration) == (0.4, "fixed")  # whole: never
    assert "scattered threshold 1.5 lies outside [0, 1]" in Calibration(scattered_threshold=1.5).problem()
    assert Calibration(scattered_threshold=None).problem() is None


def test_otsu_rule_never_cuts_below_half_the_fixed_threshold(patient_factory):
    """A benign slide (probabilities spread over 0.001-0.02): Otsu alone would call half of it IDC."""
    slide = _grid_slide(patient_factory, 4, 5)
    probability = np.linspace(0.001, 0.02, len(slide))
    otsu = Calibration(threshold=0.4, threshold_rule="otsu")
    threshold, source = slide_threshold(slide, probability, otsu)
    assert threshold == pytest.approx(0.2) and source == "otsu floor"
    assert not predicted_mask(slide, probability, otsu).any()


def test_otsu_ties_split_in_the_middle_of_the_gap(patient_factory):
    slide = _grid_slide(patient_factory, 4, 5)
    probability = np.where(slide.cells[:, 1] < 2, 0.90, 0.10)  # every split between the two is as good
    threshold = slide_threshold(slide, probability, Calibration(threshold=0.2, threshold_rule="otsu")).value
    assert 0.45 < threshold < 0.55


def test_unknown_threshold_rule_is_unusable():
    assert "threshold rule 'median'" in Calibration(threshold_rule="median").problem()
    assert Calibration(threshold_rule="otsu").problem() is None


def test_min_region_cells_removes_specks_8_connected(patient_factory):
    slide = _grid_slide(patient_factory, 6, 6)
    block = {(r, c) for r in range(3) for c in range(3)}  # 9 cells
    diagonal_pair = {(4, 4), (5, 5)}  # one 8-connected region of 2
    lone = {(0, 5)}
    probability = _probability(slide, block | diagonal_pair | lone)
    assert _cells_of(slide, predicted_mask(slide, probability, Calibration(min_region_cells=0))) == \
        block | diagonal_pair | lone
    assert _cells_of(slide, predicted_mask(slide, probability, Calibration(min_region_cells=2))) == \
        block | diagonal_pair
    assert _cells_of(slide, predicted_mask(slide, probability, Calibration(min_region_cells=3))) == block
    assert _cells_of(slide, predicted_mask(slide, probability, Calibration(min_region_cells=9))) == block
    assert _cells_of(slide, predicted_mask(slide, probability, Calibration(min_region_cells=10))) == set()


def test_isolated_positive_patches_are_no_specks(patient_factory):
    # scattered samples: (0,0) alone, (0,4)+(1,5) a diagonal pair with no other tissue, (4,0) next to negative tissue
    cells = [(0, 0), (0, 4), (1, 5), (4, 0), (4, 1)]
    skip = {(r, c) for r in range(6) for c in range(6)} - set(cells)
    slide = _grid_slide(patient_factory, 6, 6, skip=skip)
    probability = _probability(slide, {(0, 0), (0, 4), (1, 5), (4, 0)})
    kept = _cells_of(slide, predicted_mask(slide, probability, Calibration(min_region_cells=3)))
    assert kept == {(0, 0), (0, 4), (1, 5)}  # (4, 0) touches the negative (4, 1): a speck


def test_max_hole_cells_fills_enclosed_holes(patient_factory):
    slide = _grid_slide(patient_factory, 6, 6)
    everything = {(r, c) for r in range(6) for c in range(6)}
    one_hole = {(2, 2)}
    two_hole = {(2, 4), (3, 4)}
    probability = _probability(slide, everything - one_hole - two_hole)
    unchanged = predicted_mask(slide, probability, Calibration(max_hole_cells=0))
    assert _cells_of(slide, unchanged) == everything - one_hole - two_hole
    assert _cells_of(slide, predicted_mask(slide, probability, Calibration(max_hole_cells=1))) == everything - two_hole
    # "at most this many" (the CLI's --max-hole): a 2-cell hole is filled with max_hole_cells=2
    assert _cells_of(slide, predicted_mask(slide, probability, Calibration(max_hole_cells=2))) == everything


def test_holes_are_filled_only_where_patches_exist(patient_factory):
    # a ring of 8 positive patches around a gap (no patch): nothing is predicted on bare glass
    slide = _grid_slide(patient_factory, 3, 3, skip={(1, 1)})
    assert len(slide) == 8
    probability = np.ones(8)
    mask = predicted_mask(slide, probability, Calibration(max_hole_cells=4, min_region_cells=2))
    assert mask.shape == (8,) and mask.all()
    polygons = region_polygons(slide, mask)
    assert len(polygons) == 1
    assert polygons[0].area == 8 * 2500
    assert len(polygons[0].interiors) == 1  # the gap stays a hole
    assert not polygons[0].contains(Point(76, 76))
    # a gap plus a negative patch inside the ring make a 2-cell hole: filled at 2, kept at 1
    slide = _grid_slide(patient_factory, 4, 3, skip={(1, 1)}, name="Q")
    probability = _probability(slide, {(r, c) for r in range(4) for c in range(3)} - {(2, 1)})
    assert not predicted_mask(slide, probability, Calibration(max_hole_cells=1))[
        [tuple(rc) for rc in slide.cells.tolist()].index((2, 1))]
    assert predicted_mask(slide, probability, Calibration(max_hole_cells=2)).all()


def test_negative_cells_at_grid_border_are_not_holes(patient_factory):
    slide = _grid_slide(patient_factory, 3, 3)
    everything = {(r, c) for r in range(3) for c in range(3)}
    for negative in [(0, 0), (0, 1)]:  # a corner, an edge cell
        probability = _probability(slide, everything - {negative})
        mask = predicted_mask(slide, probability, Calibration(max_hole_cells=1))
        assert _cells_of(slide, mask) == everything - {negative}, negative


# ----------------------------------------------------------------------------------------------
# areas


def _edge_slide(patient_factory):
    """Two full patches labelled 0 and an edge patch 20 wide x 50 high labelled 1."""
    patches = {
        (1, 1): (0, solid((1, 1, 1))),
        (51, 1): (0, solid((2, 2, 2))),
        (101, 1): (1, solid((3, 3, 3), height=50, width=20)),
    }
    return load_slide(patient_factory("P", patches))


def test_idc_area_fraction_weights_by_pixel_area(patient_factory):
    slide = _edge_slide(patient_factory)
    assert slide.areas.tolist() == [2500, 2500, 1000]
    labelled = slide.labels == 1
    assert idc_area_fraction(slide, labelled) == pytest.approx(1000 / 6000, abs=1e-15)
    assert idc_area_fraction(slide, ~labelled) == pytest.approx(5000 / 6000, abs=1e-15)
    assert idc_area_fraction(slide, np.zeros(3, bool)) == 0.0
    assert idc_area_fraction(slide, np.ones(3, bool)) == 1.0


def test_dice_hand_values(patient_factory):
    slide = _edge_slide(patient_factory)
    predicted = np.array([True, False, True])
    labelled = np.array([True, True, False])
    assert dice(slide, predicted, labelled) == pytest.approx(2 * 2500 / (3500 + 5000), abs=1e-15)
    assert dice(slide, predicted, predicted) == 1.0
    assert dice(slide, predicted, ~predicted) == 0.0
    assert dice(slide, np.zeros(3, bool), np.zeros(3, bool)) == 1.0
    assert dice(slide, np.zeros(3, bool), np.array([False, False, True])) == 0.0
    assert dice(slide, np.array([False, False, True]), np.ones(3, bool)) == pytest.approx(2000 / 7000, abs=1e-15)


def test_real_labelled_area_fraction_matches_files():
    folder = real_patient_folder("9124")
    area = {0: 0, 1: 0}
    count = {0: 0, 1: 0}
    for path in folder.glob("[01]/*.png"):
        with Image.open(path) as image:
            w, h = image.size
        area[int(path.parent.name)] += w * h
        count[int(path.parent.name)] += 1
    slide = load_slide(folder)
    labelled = slide.labels == 1
    assert int(labelled.sum()) == count[1]
    assert int(slide.areas.sum()) == area[0] + area[1]
    assert idc_area_fraction(slide, labelled) == pytest.approx(area[1] / (area[0] + area[1]), rel=1e-12)
    catalog = DATA_ROOT / "catalog.csv"
    if catalog.is_file():
        rows = {row["patient"]: row for row in csv.DictReader(catalog.open())}
        assert int(rows["9124"]["patches"]) == len(slide)
        assert int(rows["9124"]["idc_patches"]) == count[1]


# ----------------------------------------------------------------------------------------------
# polygons and contours


def _check_polygons_cover_mask(slide, mask):
    polygons = region_polygons(slide, mask)
    assert all(p.is_valid and p.geom_type == "Polygon" for p in polygons)
    assert sum(p.area for p in polygons) == pytest.approx(float(slide.areas[mask].sum()), abs=1e-9)
    union = unary_union(polygons) if polygons else None
    for (x, y), (h, w), inside in zip(slide.xy.tolist(), slide.sizes.tolist(), mask.tolist()):
        cell = box(x, y, x + w, y + h)
        if inside:
            assert union.intersection(cell).area == pytest.approx(w * h)
        elif union is not None:
            assert union.intersection(cell).area == pytest.approx(0.0, abs=1e-9)
    # regions do not overlap each other
    for i in range(len(polygons)):
        for j in range(i + 1, len(polygons)):
            assert polygons[i].intersection(polygons[j]).area == pytest.approx(0.0, abs=1e-9)
    return polygons


def test_region_polygons_cover_predicted_area(patient_factory):
    patches = grid_patches(4, 5, label_of=lambda r, c: 0, pixels_of=lambda r, c: solid((r, c, 1)))
    patches[(251, 1)] = (0, solid((9, 9, 9), height=50, width=34))  # an edge patch at the right
    slide = load_slide(patient_factory("P", patches))
    cells = [tuple(rc) for rc in slide.cells.tolist()]
    # a ring with a negative centre, a region touching it only at a corner, and the edge patch
    positive = {(0, 0), (0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1), (2, 2), (3, 3), (0, 5), (0, 4)}
    mask = np.array([rc in positive for rc in cells])
    polygons = _check_polygons_cover_mask(slide, mask)
    assert len(polygons) == 3
    ring = [p for p in polygons if p.bounds == (1, 1, 151, 151)]
    assert len(ring) == 1 and len(ring[0].interiors) == 1 and ring[0].area == 8 * 2500
    edge = [p for p in polygons if p.bounds == (201, 1, 285, 51)]
    assert len(edge) == 1 and edge[0].area == 2500 + 34 * 50
    # GeoJSON's right-hand rule (RFC 7946): outer rings counter-clockwise, holes clockwise
    assert all(p.exterior.is_ccw and not any(hole.is_ccw for hole in p.interiors) for p in polygons)
    # sorted by top, then left
    keys = [(p.bounds[1], p.bounds[0]) for p in polygons]
    assert keys == sorted(keys)


def test_region_polygons_random_masks_are_exact(patient_factory):
    slide = load_slide(patient_factory("P", grid_patches(6, 7, skip={(2, 3), (5, 0)},
                                                        pixels_of=lambda r, c: solid((r, c, 2)))))
    rng = np.random.default_rng(1)
    for _ in range(5):
        _check_polygons_cover_mask(slide, rng.random(len(slide)) < 0.5)


def test_region_polygons_keep_only_the_corners_of_their_outline(patient_factory):
    slide = _grid_slide(patient_factory, 3, 4)
    cells = [tuple(rc) for rc in slide.cells.tolist()]
    # a 2 x 3 block and, below it, one more cell: an L with 6 corners, however many cells run along an edge
    mask = np.array([rc in {(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2), (2, 0)} for rc in cells])
    (polygon,) = _check_polygons_cover_mask(slide, mask)
    assert len(polygon.exterior.coords) == 7  # 6 corners, the first repeated to close the ring
    assert polygon.area == 7 * 2500 and polygon.is_valid


def test_region_polygons_empty(patient_factory):
    slide = _edge_slide(patient_factory)
    assert region_polygons(slide, np.zeros(3, bool)) == []


def test_region_outlines_follow_cell_edges(patient_factory):
    slide = _grid_slide(patient_factory, 3, 4)
    cells = [tuple(rc) for rc in slide.cells.tolist()]
    mask = np.array([rc == (1, 2) for rc in cells])
    outlines = region_outlines(slide, mask)
    assert len(outlines) == 1
    xs, ys = outlines[0][:, 0], outlines[0][:, 1]  # mosaic pixels: the slide's (1, 1) is the mosaic's (0, 0)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (100, 150, 50, 100)
    assert region_outlines(slide, np.zeros(len(slide), bool)) == []


def test_region_outlines_take_edge_patches_at_their_size_and_include_holes(patient_factory):
    edge = _edge_slide(patient_factory)  # the IDC patch at x 100..120 of the mosaic
    (outline,) = region_outlines(edge, edge.labels == 1)
    assert (outline[:, 0].min(), outline[:, 0].max(), outline[:, 1].max()) == (100, 120, 50)
    ring = _grid_slide(patient_factory, 3, 3, name="R")
    centre = np.array([tuple(rc) != (1, 1) for rc in ring.cells.tolist()])
    outer, hole = region_outlines(ring, centre)
    assert (outer.min(axis=0).tolist(), outer.max(axis=0).tolist()) == ([0, 0], [150, 150])
    assert (hole.min(axis=0).tolist(), hole.max(axis=0).tolist()) == ([50, 50], [100, 100])


def test_a_speck_touching_negative_tissue_only_diagonally_is_a_speck(patient_factory):
    """G3 (touch by 4-neighbourhood): the negative patch at (1, 1) touches (0, 0) at a corner."""
    slide = load_slide(patient_factory("P", grid_patches(6, 6, skip={(r, c) for r in range(6) for c in range(6)}
                                                       - {(0, 0), (1, 1), (5, 5)})))
    cells = [tuple(rc) for rc in slide.cells.tolist()]
    probability = np.array([1.0 if rc in {(0, 0), (5, 5)} else 0.0 for rc in cells])
    mask = predicted_mask(slide, probability, Calibration(min_region_cells=2))
    assert {rc for rc, m in zip(cells, mask) if m} == {(5, 5)}  # (5, 5): alone on glass, no speck
