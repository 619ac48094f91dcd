"""Per-slide colour normalisation: every slide's tissue colours mapped onto one reference.

H&E staining and scanning shift a slide's colours as a whole, and patch networks trained on a
few dozen patients misread the outliers. idcmap sees every patch of a slide, so it can measure
the slide's own colour statistics and map them, channel by channel, onto the mean statistics of
the training slides (Reinhard-style matching of per-channel mean and standard deviation, here in
RGB: a 256-entry lookup table per channel). Only tissue pixels are measured: real patch pixels
(not the white padding of edge patches) that are not near-white background.

Only whole slides are normalised. A scattered sample of a slide's patches (the `sparse/` folders)
keeps its colours and is scored as the patch network sees each patch alone: on the validation
patients, normalising such samples lowered their pooled patch AUC from 0.922 to 0.893
(`benchmarks/validation_experiments.py`, experiment 6).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
from PIL import Image

from .loader import BACKGROUND, PATCH_SIZE, Slide

NEAR_WHITE = 3 * 220  # a pixel whose R + G + B reaches this counts as background, not tissue
MIN_TISSUE_PIXELS = PATCH_SIZE * PATCH_SIZE  # fewer (one patch's worth): the slide keeps its colours
MIN_SPREAD = 1.0  # a channel whose std is under one level: the slide keeps its colours (no huge gains)


@dataclass(frozen=True)
class ColourReference:
    """Per-channel (R, G, B) mean and standard deviation, 0-255, that slides are mapped onto."""

    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    def problem(self) -> str | None:
        """What makes this reference unusable (None when it is usable): 3 means in [0, 255] and
        3 stds in [MIN_SPREAD, 255]."""
        values = [*self.mean, *self.std]
        shown = f"({self.mean}, {self.std})"[:120]
        if len(self.mean) != 3 or len(self.std) != 3 or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
            return f"its colour reference must hold 3 means and 3 stds {shown}"
        if not all(0 <= v <= 255 for v in self.mean) or not all(MIN_SPREAD <= v <= 255 for v in self.std):
            return f"its colour reference holds values outside 0-255 levels, or a std under {MIN_SPREAD} {shown}"
        return None

    @classmethod
    def from_stored(cls, stored: object) -> ColourReference:
        """The reference a weights file stores ({"mean": [3], "std": [3]}); ValueError saying what
        is wrong when it is not usable."""
        if not isinstance(stored, dict) or set(stored) != {"mean", "std"} or not all(
                isinstance(stored[k], (list, tuple)) for k in ("mean", "std")):
            raise ValueError(f"its colour reference is not {{'mean': [R, G, B], 'std': [R, G, B]}} ({stored!r:.80})")
        reference = cls(tuple(stored["mean"]), tuple(stored["std"]))
        unusable = reference.problem()
        if unusable:
            raise ValueError(unusable)
        return reference

    def as_dict(self) -> dict:
        """The form weights files and model cards store (see `from_stored`)."""
        return {"mean": list(self.mean), "std": list(self.std)}


def real_pixel_mask(slide: Slide) -> np.ndarray:
    """(N, 50, 50) bool: True on each patch's real pixels, False on the padding of edge patches."""
    ramp = np.arange(PATCH_SIZE)
    return (ramp[None, :, None] < slide.sizes[:, 0, None, None]) & (ramp[None, None, :] < slide.sizes[:, 1, None, None])


def _stacked_image(pixels: np.ndarray) -> Image.Image:
    """(N, 50, 50, 3) patches as one RGB image 50 px wide, patch under patch, for pillow's per-band
    histogram and lookup tables (C loops over one copy; numpy needed a strided pass per channel)."""
    return Image.fromarray(pixels.reshape(-1, PATCH_SIZE, 3))


def tissue_histograms(slide: Slide) -> np.ndarray:
    """(3, 256) counts of each channel's values over the slide's tissue pixels (the padding of
    edge patches is BACKGROUND, white, so it never counts as tissue)."""
    stacked = slide.pixels.reshape(-1, PATCH_SIZE, 3)
    brightness = stacked[..., 0].astype(np.uint16) + stacked[..., 1] + stacked[..., 2]
    tissue = Image.fromarray(np.where(brightness < NEAR_WHITE, np.uint8(255), np.uint8(0)))
    return np.array(_stacked_image(stacked).histogram(mask=tissue), dtype=np.int64).reshape(3, 256)


def slide_colour_statistics(slide: Slide) -> tuple[np.ndarray, np.ndarray] | None:
    """Per-channel mean and std of the slide's tissue pixels; None when it has too little tissue
    (under one patch's worth) or a channel with almost no spread (std under MIN_SPREAD levels)."""
    counts = tissue_histograms(slide)
    total = counts[0].sum()
    if total < MIN_TISSUE_PIXELS:
        return None
    levels = np.arange(256, dtype=np.float64)
    mean = counts @ levels / total
    std = np.sqrt(np.maximum(counts @ levels**2 / total - mean**2, 0.0))
    return (mean, std) if std.min() >= MIN_SPREAD else None


def colour_reference(slides: list[Slide]) -> ColourReference:
    """The mean, over slides (each counted once), of their tissue colour statistics."""
    stats = [s for s in map(slide_colour_statistics, slides) if s is not None]
    if not stats:
        raise ValueError("no slide has enough tissue to measure its colours")
    mean = np.mean([m for m, _ in stats], axis=0)
    std = np.mean([s for _, s in stats], axis=0)
    return ColourReference(tuple(round(float(v), 4) for v in mean), tuple(round(float(v), 4) for v in std))


def matched_pixels(slide: Slide, reference: ColourReference) -> np.ndarray:
    """The slide's (N, 50, 50, 3) pixels with its tissue colour statistics mapped onto `reference`
    (per channel: (v - slide mean) / slide std * reference std + reference mean, rounded and
    clipped to 0-255), whatever the slide's layout. Padding stays BACKGROUND. A slide with too
    little tissue to measure comes back unchanged."""
    stats = slide_colour_statistics(slide)
    if stats is None:
        return slide.pixels
    mean, std = (v[:, None] for v in stats)
    target_mean, target_std = (np.asarray(v)[:, None] for v in (reference.mean, reference.std))
    levels = np.arange(256, dtype=np.float64)[None, :]
    # (3, 256): row c, column v holds channel c's new value for v
    table = np.clip(np.rint((levels - mean) / std * target_std + target_mean), 0, 255).astype(np.uint8)
    pixels = np.array(_stacked_image(slide.pixels).point(table.ravel().tolist())).reshape(slide.pixels.shape)
    if (slide.sizes < PATCH_SIZE).any():
        pixels[~real_pixel_mask(slide)] = BACKGROUND
    return pixels


def normalised_pixels(slide: Slide, reference: ColourReference) -> np.ndarray:
    """The pixels a model with a colour reference scores: `matched_pixels` for a whole slide; a
    scattered sample of patches (not `slide.is_whole`) keeps its colours, so its patches are
    scored as they are."""
    return matched_pixels(slide, reference) if slide.is_whole else slide.pixels


def normalise_slide(slide: Slide, reference: ColourReference | None) -> Slide:
    """`slide` with normalised pixels (see `normalised_pixels`); itself when `reference` is None."""
    return slide if reference is None else replace(slide, pixels=normalised_pixels(slide, reference))
