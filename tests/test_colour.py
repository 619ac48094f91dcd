"""idcmap.colour: per-slide colour normalisation, and models that score through it."""
from __future__ import annotations

from dataclasses import replace

import json
import re

import numpy as np
import pytest
import torch

from conftest import MODEL_NAME, grid_patches, make_patient, real_patient_folder, textured, write_tiny_weights
from idcmap.colour import (ColourReference, colour_reference, matched_pixels, normalise_slide,
                           normalised_pixels, real_pixel_mask, slide_colour_statistics, tissue_histograms)
from idcmap.errors import WeightsError
from idcmap.loader import BACKGROUND, load_slide
from idcmap.models import load_model, read_weights, save_checkpoint
from idcmap.pipeline import RenderOptions, render_folder
from idcmap.scoring import Scorer, to_input

REFERENCE = ColourReference((190.0, 130.0, 170.0), (30.0, 32.0, 25.0))


def _tinted(seed: int, height: int = 50, width: int = 50) -> np.ndarray:
    """A tissue-like patch: noise around a pink, well below near-white."""
    patch = textured(seed, height, width, base=150, spread=60).astype(int)
    return np.clip(patch + [30, -20, 10], 0, 255).astype(np.uint8)


@pytest.fixture
def slide(tmp_path):
    patches = grid_patches(3, 4, pixels_of=lambda r, c: _tinted(r * 4 + c))
    patches[(4 * 50 + 1, 1)] = (0, _tinted(99, height=50, width=20))  # an edge patch: 20 px wide
    return load_slide(make_patient(tmp_path, "P", patches))


def _tissue_statistics(pixels: np.ndarray, slide) -> tuple[np.ndarray, np.ndarray]:
    return slide_colour_statistics(replace(slide, pixels=pixels))


def test_normalised_tissue_takes_the_reference_statistics(slide):
    pixels = normalised_pixels(slide, REFERENCE)
    mean, std = _tissue_statistics(pixels, slide)
    np.testing.assert_allclose(mean, REFERENCE.mean, atol=1.0)  # rounding to whole levels
    np.testing.assert_allclose(std, REFERENCE.std, atol=1.0)
    assert pixels.dtype == np.uint8 and pixels.shape == slide.pixels.shape


def test_padding_of_edge_patches_stays_background(slide):
    edge = int(np.flatnonzero(slide.sizes[:, 1] == 20)[0])
    pixels = normalised_pixels(slide, REFERENCE)
    assert (pixels[edge, :, 20:] == BACKGROUND).all()
    assert not (pixels[edge, :, :20] == slide.pixels[edge, :, :20]).all()  # its real pixels did change


def test_a_global_colour_cast_is_undone(slide):
    """A slide stained or scanned differently (each channel scaled and shifted over the whole slide)
    comes out as the original does."""
    cast = np.clip(slide.pixels.astype(float) * [0.8, 1.1, 0.9] + [20, -25, 10], 0, 255).astype(np.uint8)
    cast[~real_pixel_mask(slide)] = BACKGROUND  # padding is not slide, and stays white
    shifted = replace(slide, pixels=cast)
    original, recovered = normalised_pixels(slide, REFERENCE), normalised_pixels(shifted, REFERENCE)
    before = np.abs(cast.astype(int) - slide.pixels).mean()
    after = np.abs(recovered.astype(int) - original).mean()
    assert before > 10 and after < 1.5


def test_a_slide_without_enough_tissue_keeps_its_colours(tmp_path):
    white = load_slide(make_patient(tmp_path, "W", grid_patches(2, 2, pixels_of=lambda r, c: np.full((50, 50, 3), 245, np.uint8))))
    assert white.is_whole and slide_colour_statistics(white) is None
    assert normalised_pixels(white, REFERENCE) is white.pixels
    small = load_slide(make_patient(tmp_path, "S", {(1, 1): (1, _tinted(3, height=30, width=30))}))
    assert matched_pixels(small, REFERENCE) is small.pixels  # 900 tissue pixels: under one patch's worth


def test_a_scattered_sample_keeps_its_colours(tmp_path):
    """Patches with no grid neighbours (a `sparse/` folder) are scored as they are."""
    cells = [(0, 0), (0, 4), (4, 0), (4, 4), (8, 2)]
    scattered = load_slide(make_patient(tmp_path, "S", {(c * 50 + 1, r * 50 + 1): (0, _tinted(k))
                                                         for k, (r, c) in enumerate(cells)}))
    assert not scattered.is_whole and slide_colour_statistics(scattered) is not None
    assert normalised_pixels(scattered, REFERENCE) is scattered.pixels
    assert not (matched_pixels(scattered, REFERENCE) == scattered.pixels).all()  # it could be matched


def test_reference_is_the_mean_of_slide_statistics(tmp_path, slide):
    other = load_slide(make_patient(tmp_path, "Q", grid_patches(2, 2, pixels_of=lambda r, c: textured(r + c, base=120, spread=50))))
    reference = colour_reference([slide, other])
    stats = [slide_colour_statistics(s) for s in (slide, other)]
    np.testing.assert_allclose(reference.mean, np.mean([m for m, _ in stats], axis=0), atol=1e-4)
    np.testing.assert_allclose(reference.std, np.mean([s for _, s in stats], axis=0), atol=1e-4)
    with pytest.raises(ValueError, match="enough tissue"):
        colour_reference([])


def test_reference_is_the_mean_not_the_median_of_three_slides(tmp_path):
    slides = [load_slide(make_patient(tmp_path, name, grid_patches(
        2, 2, pixels_of=lambda r, c, base=base: textured(r + c, base=base, spread=40))))
        for name, base in (("A", 60), ("B", 80), ("C", 180))]
    means = np.array([slide_colour_statistics(s)[0] for s in slides])
    np.testing.assert_allclose(colour_reference(slides).mean, means.mean(axis=0), atol=1e-3)
    assert np.abs(means.mean(axis=0) - np.median(means, axis=0)).min() > 10  # the two differ here


def test_mapping_keeps_the_order_of_levels_past_the_ends_of_the_range(tmp_path):
    """Levels mapped beyond 0-255 are clipped, never wrapped around (bright tissue turned dark)."""
    slide = load_slide(make_patient(tmp_path, "P", grid_patches(2, 2, pixels_of=lambda r, c: textured(
        r * 2 + c, base=100, spread=90))))
    pixels = matched_pixels(slide, ColourReference((200.0, 200.0, 200.0), (80.0, 80.0, 80.0)))
    for channel in range(3):
        order = np.argsort(slide.pixels[..., channel], axis=None, kind="stable")
        mapped = pixels[..., channel].ravel()[order].astype(int)
        assert (np.diff(mapped) >= 0).all() and mapped.max() == 255


def test_normalise_slide_without_reference_is_the_slide(slide):
    assert normalise_slide(slide, None) is slide


def test_a_channel_with_almost_no_spread_leaves_the_slide_alone(tmp_path):
    """A channel whose values hardly vary would need a huge gain: the slide keeps its colours."""
    def flat_blue(r, c):
        patch = _tinted(r * 3 + c)
        patch[..., 2] = 170
        patch[0, 0, 2] = 171  # one level off, once per patch
        return patch
    flat = load_slide(make_patient(tmp_path, "F", grid_patches(2, 3, pixels_of=flat_blue)))
    assert slide_colour_statistics(flat) is None
    assert normalised_pixels(flat, REFERENCE) is flat.pixels


@pytest.mark.parametrize("stored, problem", [
    ({"mean": [1, 2, 3], "std": [1, 1, 0]}, "std under 1.0"),
    ({"mean": [1, 2, 300], "std": [1, 1, 1]}, "outside 0-255"),
    ({"mean": [1, float("nan"), 3], "std": [1, 1, 1]}, "outside 0-255"),
    ({"mean": [1, 10**400, 3], "std": [1, 1, 1]}, "outside 0-255"),
    ({"mean": [1, 2], "std": [1, 1]}, "3 means and 3 stds"),
    ({"mean": [1, None, 3], "std": [1, 1, 1]}, "3 means and 3 stds"),
    ({"mean": [1, 2, 3]}, "is not {'mean'"),
    ({"mean": [1, 2, 3], "std": [1, 1, 1], "gain": 2}, "is not {'mean'"),
    ({"mean": "pink", "std": [1, 1, 1]}, "is not {'mean'"),
    ([], "is not {'mean'"),
])
def test_reference_problems(stored, problem):
    with pytest.raises(ValueError, match=re.escape(problem)):
        ColourReference.from_stored(stored)
    assert ColourReference.from_stored(REFERENCE.as_dict()) == REFERENCE


def test_a_model_with_a_reference_scores_the_normalised_pixels(tmp_path, slide):
    plain = write_tiny_weights(tmp_path / "plain.pt")
    save_checkpoint(tmp_path / "colour.pt", {**read_weights(plain), "colour_reference": REFERENCE.as_dict()})
    model = load_model(MODEL_NAME, tmp_path / "colour.pt")
    assert model.colour_reference == REFERENCE
    scorer = Scorer(model, device="cpu", backend="torch")
    seen = []
    backbone = scorer.backbone
    scorer.backbone = lambda x: seen.append(x.clone()) or backbone(x)
    scores = scorer.score(slide)
    probability = scores.probability
    assert scores.colour_normalised
    expected = to_input(torch.from_numpy(normalised_pixels(slide, REFERENCE)), scorer.mean, scorer.std)
    torch.testing.assert_close(torch.cat(seen), expected)
    assert ((probability >= 0) & (probability <= 1)).all()


@pytest.mark.parametrize("stored", [{"mean": [1, 2, 3], "std": [0, 1, 1]}, {"mean": [1, 2, 3]}, "pink"])
def test_a_bad_stored_reference_is_refused(tmp_path, stored):
    payload = read_weights(write_tiny_weights(tmp_path / "plain.pt"))
    save_checkpoint(tmp_path / "bad.pt", {**payload, "colour_reference": stored})
    with pytest.raises(WeightsError, match=r"bad\.pt: its colour reference .*; restore the file, or retrain"):
        load_model(MODEL_NAME, tmp_path / "bad.pt")


def test_render_says_whether_it_normalised_the_slide(tmp_path, slide):
    """summary.json records whether the slide's colours were normalised: yes for a whole slide,
    no for a scattered sample, and no for a model without a reference."""
    payload = read_weights(write_tiny_weights(tmp_path / "plain.pt"))
    save_checkpoint(tmp_path / "colour.pt", {**payload, "colour_reference": REFERENCE.as_dict()})
    cells = [(0, 0), (0, 4), (4, 0), (4, 4)]
    scattered = make_patient(tmp_path / "in", "S", {(c * 50 + 1, r * 50 + 1): (0, _tinted(k))
                                                     for k, (r, c) in enumerate(cells)})
    whole = make_patient(tmp_path / "in", "W", grid_patches(2, 3, pixels_of=lambda r, c: _tinted(r * 3 + c)))
    expected = {("colour.pt", "W"): True, ("colour.pt", "S"): False, ("plain.pt", "W"): False}
    for (weights, patient), normalised in expected.items():
        out = tmp_path / "out" / weights
        render_folder(whole if patient == "W" else scattered, out,
                      RenderOptions(model=MODEL_NAME, weights=tmp_path / weights, device="cpu", progress=False))
        assert json.loads((out / patient / "summary.json").read_text())["colour_normalised"] is normalised


def test_real_slides_come_closer_in_colour():
    """On real slides the normalisation brings every slide's tissue means onto the reference."""
    slides = [load_slide(real_patient_folder(p)) for p in ("10253", "9037")]
    reference = colour_reference(slides)
    spread_before = np.abs(np.subtract(*[slide_colour_statistics(s)[0] for s in slides])).max()
    means = [slide_colour_statistics(replace(s, pixels=normalised_pixels(s, reference)))[0] for s in slides]
    assert spread_before > 5
    for mean in means:
        np.testing.assert_allclose(mean, reference.mean, atol=1.0)


def test_background_and_padding_do_not_count_as_tissue(tmp_path, slide):
    """White patches beside the tissue, and the padding of edge patches, leave the statistics as
    they are: only tissue is measured."""
    patches = grid_patches(3, 4, pixels_of=lambda r, c: _tinted(r * 4 + c))
    patches[(4 * 50 + 1, 1)] = (0, _tinted(99, height=50, width=20))
    for r in range(3):
        patches[(5 * 50 + 1, r * 50 + 1)] = (0, np.full((50, 50, 3), 240, np.uint8))  # background
    patches[(4 * 50 + 1, 51)] = (0, np.full((50, 20, 3), 250, np.uint8))
    with_background = load_slide(make_patient(tmp_path, "B", patches))
    np.testing.assert_array_equal(tissue_histograms(with_background), tissue_histograms(slide))
    assert tissue_histograms(slide).sum(axis=1).tolist() == [12 * 2500 + 50 * 20] * 3
