"""Options tried for the default model and not adopted, measured on the VALIDATION patients only.

    python benchmarks/validation_experiments.py [--data ../shared/data] [--skip-tta] [--weights W] [--only N ...]
                                                [--other W2 [W3 ...]]

Prints, side by side in one run (each against `resnet18-context` as shipped, fp32 ONNX Runtime;
"calibration refitted" means refitted with one fitted threshold for every slide, the rule shipped
until the eleventh session, except where experiment 9 compares the rules):
  1. test-time augmentation: logits and features averaged over 1, 2, 4 or 8 flips/rotations,
     calibration refitted on validation (objective: mean Dice - mean area-fraction error);
  2. ensembles: temperature-scaled logits of resnet18-context averaged with a CancerNet model or
     the patch-only resnet18, calibration refitted; and per whole validation slide the AUC of
     each member and of the mix;
  3. smoothing alone on the patch-only resnet18 (sigma fitted on validation) against its
     unsmoothed calibration and the learned head;
  4. an expected-area estimator (area-weighted mean probability) against the thresholded regions;
  5. ONNX Runtime scoring speed of CancerNet and resnet18-context (fp32, and the default's int8
     network) by batch size (patient 10262), and each patch network's GMAC a patch;
  6. per-slide colour normalisation of the default's inputs: none, per-channel RGB (idcmap.colour,
     reference from the training patients) on whole slides only (as shipped) or on the scattered
     samples too, and Reinhard's in CIELAB, calibration refitted; the scattered samples' pooled
     patch AUC, and per whole slide the AUC under each;
  7. other resnet18-context networks (`--other`, trained on the same split), given the default's
     colour reference when they have none, against the default's: each alone and the logit
     average of every mix of them, calibration refitted; the fitted calibration, per whole slide
     the AUC and the predicted and labelled IDC area fractions, and the scattered samples' pooled
     patch AUC;
  8. the strength of the per-slide colour normalisation: each whole slide mapped part of the way
     (0.5, 0.75) or all the way (1, as shipped) from its own colour statistics to the reference
     (means interpolated, stds geometrically), calibration refitted; per whole slide the AUC;
  9. leave-one-slide-out estimates of the decision rules, for the default and each `--other`
     network and their logit average: the calibration is fitted without one whole validation
     slide (the scattered samples always kept for the temperatures) and judged on that slide
     alone, slide after slide. Rules: one fitted threshold and post-processing (shipped until the
     eleventh session);
     per-slide area matching (each slide's threshold set so that its thresholded area equals its
     expected area, the area-weighted mean calibrated probability; temperature and smoothing fitted
     as shipped); the same followed by the fitted post-processing; the threshold midway between the
     fitted and the area-matched one, Otsu's threshold of each slide's probabilities (as
     shipped: `regions.slide_threshold`), and Li's and the triangle threshold of them (scikit-image,
     patches unweighted, kept at or above Otsu's floor), each followed by the fitted post-processing;
 10. stain test-time augmentation: the default and each `--other` network score each (colour-
     normalised) slide as it is and with its haematoxylin or eosin amount scaled by 1 +/- 0.2
     (3 or 5 views, logits averaged), calibration refitted; in sample and left one slide out.
 11. per-slide batch-norm statistics (AdaBN): before scoring a whole slide, the patch network's
     batch-norm means and variances are re-estimated on that slide's own (colour-normalised)
     patches and blended with the trained ones (weight 0 = as shipped, 0.5, 1), PyTorch fp32,
     calibration refitted; in sample and left one slide out, per whole slide the AUC.
 12. how training batches mix slides: with 16x16- and 8x8-cell windows (`--window`), grouped into
     batches of 256 patches as `idcmap train` groups them, how many training slides a batch holds
     and the largest one's share of it (what its batch-norm statistics are computed on).
 13. precise batch-norm statistics: the running means and variances that training leaves (a moving
     average, momentum 0.1, weighted to its last 10-20 batches, each mostly one or two slides) replaced by the
     average over one pass of the training patients: in training batches (grid windows,
     augmented, as the network's card says it was trained) or in batches of 256 patches drawn
     from all training slides, colour-normalised as at scoring, unaugmented. For the default and
     each `--other` network, calibration refitted; in sample and left one slide out.
 14. a safety check of Otsu's per-slide threshold (experiment 9) on slides with little IDC: the
     default scores the whole TRAINING slides (the `patients/` folders; the network has seen them, neither decision rule was fitted
     on them), and per slide, in order of labelled IDC area, the fitted threshold's and Otsu's
     predicted areas and Dice, and their means.
 15. smoothing and post-processing for Otsu's per-slide threshold: fitted for one threshold and
     then thresholded per slide (as shipped), against searched again under the rule (the
     threshold, which serves scattered samples and sets Otsu's floor, kept from the fixed fit);
     for the default, each `--other` network and their logit average, in sample and left one
     slide out, with the choices made.
 16. Macenko stain normalisation (Macenko et al. 2009) of each whole slide in place of the
     per-channel RGB matching (shipped): each slide's haematoxylin and eosin optical-density
     vectors (the extremes of its tissue's optical densities in the plane of their two main
     axes) and 99th-percentile stain amounts, mapped onto the mean over the whole training slides;
     for the default and each `--other` network, calibration refitted under the Otsu rule as
     shipped, in sample and left one slide out, per whole slide the AUC.
 17. the threshold for scattered samples: for the default and each `--other` network, under its own
     stored calibration, the scattered validation patients' pooled BAC and F1 and their objective
     (mean Dice - mean area-fraction error per patient) at the whole-slide threshold and at 0.22,
     0.30 and 0.38; the threshold `training.scattered_threshold_fit` chooses and its objective,
     in sample and with each patient left out of the fit.
`--only N [N ...]` runs the numbered experiments alone.
"""
from __future__ import annotations

import argparse
import copy
import itertools
import sys
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import fields, replace
from pathlib import Path

import numpy as np
import torch
from skimage import filters

from common import DATA_ROOT, require_folder, run

from idcmap import metrics  # noqa: E402
from idcmap.colour import (ColourReference, colour_reference, matched_pixels, normalised_pixels,  # noqa: E402
                           normalise_slide, real_pixel_mask, slide_colour_statistics)
from idcmap.dataset import load_slides, load_split, patient_ids  # noqa: E402
from idcmap.loader import BACKGROUND, Slide, load_slide  # noqa: E402
from idcmap.models import Calibration, get_spec, load_model  # noqa: E402
from idcmap.regions import OTSU_FLOOR, dice, idc_area_fraction, predicted_mask, slide_threshold  # noqa: E402
from idcmap.scoring import Scorer, calibrated_scores, to_input  # noqa: E402
from idcmap.train_config import TrainConfig  # noqa: E402
from idcmap.training import (SMOOTHING_SIGMAS, THRESHOLDS, BatchMaker, best_regions, collect_scores,  # noqa: E402
                             fit_calibration, grid_windows, left_out_fits, mean_patient_auc, region_figures,
                             scattered_threshold_fit, smoothing_candidates, stain_jitter)

DEFAULT = "resnet18-context"


def fitted(scored, reach: int, sigmas=SMOOTHING_SIGMAS, left_out: bool = False) -> tuple[Calibration, str]:
    """The calibration fitted on `scored` and its objective in words (`left_out`: also the
    objective with each whole slide left out of the fit)."""
    calibration, choice = fit_calibration(scored, reach, sigmas, left_out=left_out)
    words = (f"objective {choice['value']:.4f} (Dice {choice['val_dice']:.4f}, area MAE "
             f"{choice['val_area_fraction_mae']:.4f}), patient AUC {mean_patient_auc(scored):.4f}")
    if left_out:
        figures = choice["left_one_slide_out"]
        words += (f"; left out: objective {figures['value']:.4f} (Dice {figures['val_dice']:.4f}, area MAE "
                  f"{figures['val_area_fraction_mae']:.4f})")
    return calibration, words


def whole_slide_aucs(scored) -> str:
    """Each whole slide's patient and the AUC of its context logits: "10253 0.956, ..."."""
    return ", ".join(f"{s.patient} {metrics.roc_auc(s.labels, r.context_logit):.3f}" for s, r in scored if s.is_whole)


def objective(scored, reach: int, sigmas=SMOOTHING_SIGMAS) -> str:
    return fitted(scored, reach, sigmas)[1]


def dihedral(x: torch.Tensor, t: int) -> torch.Tensor:
    return torch.rot90(x.flip(3) if t >= 4 else x, t % 4, (2, 3)).contiguous()


def tta(model, slides) -> None:
    print("\n1. test-time augmentation (resnet18-context)")
    scorer = Scorer(model, "cpu", backend="onnx")
    plain = scorer.backbone
    for transforms in ([0], [0, 4], [0, 1, 2, 3], list(range(8))):
        def averaged(x, transforms=transforms):
            features, logits = zip(*(plain(dihedral(x, t)) for t in transforms))
            return torch.stack(features).mean(0), torch.stack(logits).mean(0)

        scorer.backbone = averaged
        started = time.perf_counter()
        scored = collect_scores(scorer, slides)
        print(f"  {len(transforms)} views: {objective(scored, model.network.context_reach)}, "
              f"{time.perf_counter() - started:.0f} s")


def scaled(model, slides):
    """Scores with patch and context logits divided by the model's patch temperature."""
    t = model.calibration.patch_temperature
    return [(s, replace(r, patch_logit=r.patch_logit / t, context_logit=r.context_logit / t))
            for s, r in collect_scores(Scorer(model, "cpu", backend="onnx"), slides)]


def ensembles(slides) -> None:
    print("\n2. ensembles with resnet18-context (logits averaged after each model's patch temperature)")
    members = ["resnet18-context", "cancernet-smooth", "cancernet-context-wide", "resnet18"]
    scored = {name: scaled(load_model(name), slides) for name in members}
    reach = load_model(DEFAULT).network.context_reach
    print(f"  resnet18-context alone: {objective(scored[DEFAULT], reach)}")
    mixes = {}
    for other in members[1:]:
        for weight in (0.5, 0.67):
            mix = [(s, replace(a, patch_logit=weight * a.patch_logit + (1 - weight) * b.patch_logit,
                               context_logit=weight * a.context_logit + (1 - weight) * b.context_logit))
                   for (s, a), (_, b) in zip(scored[DEFAULT], scored[other])]
            mixes[(other, weight)] = mix
            print(f"  + {other}, weight {weight}: {objective(mix, reach)}")
    print("  per whole slide, AUC of the context logits: resnet18-context / cancernet-smooth / 0.5 mix")
    for i, (slide, r) in enumerate(scored[DEFAULT]):
        if slide.is_whole:
            other = scored["cancernet-smooth"][i][1].context_logit
            mix = mixes[("cancernet-smooth", 0.5)][i][1].context_logit
            print(f"    {slide.patient}: " + " / ".join(f"{metrics.roc_auc(slide.labels, x):.3f}"
                                                      for x in (r.context_logit, other, mix)))


def smoothing_alone(slides) -> None:
    print("\n3. the patch-only resnet18: unsmoothed (as shipped) vs grid smoothing alone")
    scored = collect_scores(Scorer(load_model("resnet18"), "cpu", backend="onnx"), slides)
    print(f"  unsmoothed: {objective(scored, 0, (0.0,))}")
    print(f"  smoothing fitted on validation: {objective(scored, 0)}")


def expected_area(model, slides) -> None:
    print("\n4. per-patient area fraction on the whole validation slides: regions vs expected area")
    scorer = Scorer(model, "cpu", backend="onnx")
    errors = {"thresholded regions": [], "mean calibrated probability": []}
    for slide in (s for s in slides if s.is_whole):
        scores = scorer.score(slide)
        truth = idc_area_fraction(slide, slide.labels == 1)
        area = slide.sizes.prod(1).astype(float)
        errors["thresholded regions"].append(
            abs(idc_area_fraction(slide, predicted_mask(slide, scores.probability, model.calibration)) - truth))
        errors["mean calibrated probability"].append(abs(float((scores.probability * area).sum() / area.sum()) - truth))
    for name, values in errors.items():
        print(f"  {name}: MAE {np.mean(values):.4f}")


def gmac_per_patch(model) -> float:
    """Multiply-accumulates (billions) of the model's patch network on one 50x50 patch (torch's count)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter, torch.inference_mode():
        model.network.backbone(torch.zeros(1, 3, 50, 50))
    return counter.get_total_flops() / 2e9


def batch_sweep(data: Path) -> None:
    print("\n5. ONNX Runtime scoring speed by batch size, patient 10262 (best of 3)")
    slide = load_slide(data / "patients" / "10262")
    for name, backends in (("cancernet", ("onnx",)), (DEFAULT, ("onnx", "onnx-int8"))):
        model = load_model(name)
        print(f"  {name}: {gmac_per_patch(model):.3f} GMAC a patch")
        for backend in backends:
            rates = []
            for batch in (16, 64, 128, 256, 512, 1024):
                scorer = Scorer(model, "cpu", batch_size=batch, backend=backend)
                scorer.score(slide)
                best = min(_seconds(scorer, slide) for _ in range(3))
                rates.append(f"{batch}: {len(slide) / best:,.0f}")
            print(f"  {name} ({backend}) patches/s by batch: " + ", ".join(rates))


def lab_tissue(slide) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(CIELAB of every pixel (M, 3), mask of the real patch pixels, mask of the tissue: real and
    L < 88)."""
    from skimage.color import rgb2lab

    lab = rgb2lab(slide.pixels.reshape(-1, 50, 3)).reshape(-1, 3)
    real = real_pixel_mask(slide).reshape(-1)
    return lab, real, real & (lab[:, 0] < 88)


def lab_statistics(slide, measured: tuple[np.ndarray, np.ndarray] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Mean and std of the slide's tissue in CIELAB (from `measured` = (lab, tissue mask) of
    `lab_tissue` when given, so the conversion is not done twice)."""
    lab, tissue = measured or lab_tissue(slide)[::2]
    return lab[tissue].mean(0), lab[tissue].std(0)


def lab_reinhard(slide: Slide, reference: tuple[np.ndarray, np.ndarray]) -> Slide:
    """The slide with its tissue's CIELAB mean and std per channel mapped onto `reference`."""
    from skimage.color import lab2rgb

    lab, real, tissue = lab_tissue(slide)
    mean, std = lab_statistics(slide, (lab, tissue))
    lab[tissue] = (lab[tissue] - mean) / std * reference[1] + reference[0]
    with warnings.catch_warnings():  # lab2rgb warns about the few colours outside sRGB, clipped here
        warnings.simplefilter("ignore")
        rgb = lab2rgb(lab.reshape(-1, 50, 3))
    rgb = (np.clip(rgb, 0, 1) * 255 + 0.5).astype(np.uint8).reshape(-1, 3)
    rgb[~real] = 255
    return replace(slide, pixels=rgb.reshape(slide.pixels.shape))


def _timed(normalise, slides: list[Slide]) -> tuple[list[Slide], float]:
    """(normalise(s) for each slide, seconds per 1,000 patches)."""
    started = time.perf_counter()
    done = [normalise(s) for s in slides]
    return done, (time.perf_counter() - started) / sum(len(s) for s in slides) * 1000


def colour_normalisation(model, slides, train_slides) -> None:
    print("\n6. per-slide colour normalisation of resnet18-context's inputs (calibration refitted)")
    reach = model.network.context_reach
    plain = replace(model, colour_reference=None)
    reference = model.colour_reference or colour_reference(train_slides)
    lab = [lab_statistics(s) for s in train_slides]
    lab_reference = (np.mean([m for m, _ in lab], axis=0), np.mean([d for _, d in lab], axis=0))
    whole = [s for s in slides if s.is_whole]
    _, rgb_s = _timed(lambda s: matched_pixels(s, reference), whole)
    _, lab_s = _timed(lambda s: lab_reinhard(s, lab_reference), whole)
    print(f"  time per 1,000 patches of the whole slides: per-channel RGB {rgb_s:.3f} s, CIELAB {lab_s:.3f} s")
    inputs = {
        "none": slides,
        "per-channel RGB, whole slides (as shipped)": [replace(s, pixels=normalised_pixels(s, reference)) for s in slides],
        "per-channel RGB, scattered samples too": [replace(s, pixels=matched_pixels(s, reference)) for s in slides],
        "CIELAB (Reinhard), whole slides": [lab_reinhard(s, lab_reference) if s.is_whole else s for s in slides],
    }
    runs = {name: collect_scores(Scorer(plain, "cpu", backend="onnx"), normalised) for name, normalised in inputs.items()}
    for name, scored in runs.items():
        sparse = [(s, r) for s, r in scored if not s.is_whole]
        pooled = metrics.roc_auc(np.concatenate([s.labels for s, _ in sparse]),
                                 np.concatenate([r.probability for _, r in sparse]))
        print(f"  {name}: {objective(scored, reach)}; scattered samples: pooled patch AUC {pooled:.4f}")
    print("  per whole slide, AUC: " + " / ".join(runs))
    for i, slide in enumerate(slides):
        if slide.is_whole:
            print(f"    {slide.patient}: " + " / ".join(f"{metrics.roc_auc(slide.labels, r[i][1].context_logit):.3f}"
                                                      for r in runs.values()))


def with_others(model, others: list[Path]) -> dict:
    """{"shipped": model, path: the resnet18-context network of each other weights file}, each given
    `model`'s colour reference when it has none."""
    networks = {"shipped": model}
    for path in others:
        other = load_model(DEFAULT, path)
        networks[str(path)] = other if other.colour_reference else replace(other, colour_reference=model.colour_reference)
    return networks


def averaged(runs: list[list]) -> list:
    """Per slide, the scores of the first run with the patch and context logits averaged over
    `runs` (each a list of (slide, scores) over the same slides)."""
    return [(group[0][0], replace(group[0][1], patch_logit=np.mean([r.patch_logit for _, r in group], axis=0),
                                  context_logit=np.mean([r.context_logit for _, r in group], axis=0)))
            for group in zip(*runs)]


def other_networks(model, others: list[Path], slides) -> None:
    print(f"\n7. resnet18-context ({model.path}) against {', '.join(map(str, others))}, each given the first's "
          f"colour reference ({model.colour_reference}) if it has none")
    networks = with_others(model, others)
    scored = {name: scaled(network, slides) for name, network in networks.items()}
    for size in range(2, len(scored) + 1):  # every mix: logits averaged after each network's patch temperature
        for names in itertools.combinations(list(networks), size):
            scored[" + ".join(names)] = averaged([scored[name] for name in names])
    reach = model.network.context_reach
    for name, pairs in scored.items():
        calibration, fit = fitted(pairs, reach)
        sparse = [(s, r) for s, r in pairs if not s.is_whole]
        pooled = metrics.roc_auc(np.concatenate([s.labels for s, _ in sparse]),
                                 np.concatenate([r.patch_logit for _, r in sparse])) if sparse else float("nan")
        print(f"  {name}: {fit}; sigma {calibration.smoothing_sigma:g}, threshold "
              f"{calibration.threshold:.2f}, min region {calibration.min_region_cells}; scattered pooled AUC {pooled:.4f}")
        print("    per whole slide AUC: " + whole_slide_aucs(pairs))
        areas = []
        for s, r in pairs:
            if s.is_whole:
                probability = calibrated_scores(s, r.patch_logit, r.context_logit, reach, calibration).probability
                areas.append(f"{s.patient} {idc_area_fraction(s, predicted_mask(s, probability, calibration)):.2f}"
                             f"/{idc_area_fraction(s, s.labels == 1):.2f}")
        print("    per whole slide IDC area fraction, predicted/labelled: " + ", ".join(areas))


def partly_normalised(slide: Slide, reference: ColourReference, strength: float) -> Slide:
    """A whole slide with its tissue colours mapped `strength` of the way onto `reference`
    (per channel: the target mean interpolated, the target std geometrically); 1: as shipped."""
    stats = slide_colour_statistics(slide)
    if stats is None or not slide.is_whole:
        return slide
    mean, std = stats
    target = ColourReference(tuple(strength * np.asarray(reference.mean) + (1 - strength) * mean),
                             tuple(np.exp(strength * np.log(reference.std) + (1 - strength) * np.log(std))))
    return replace(slide, pixels=matched_pixels(slide, target))


def normalisation_strength(model, slides) -> None:
    print("\n8. strength of the per-slide colour normalisation (calibration refitted)")
    plain = replace(model, colour_reference=None)
    for strength in (0.5, 0.75, 1.0):
        scored = collect_scores(Scorer(plain, "cpu", backend="onnx"),
                                [partly_normalised(s, model.colour_reference, strength) for s in slides])
        print(f"  strength {strength:g}: {objective(scored, model.network.context_reach)}")
        print("    per whole slide AUC: " + whole_slide_aucs(scored))


def area_matched_threshold(slide: Slide, probability: np.ndarray) -> float:
    """The threshold whose thresholded area fraction (patches at their real size) comes closest to
    the slide's expected area fraction, the area-weighted mean of `probability`."""
    area = slide.areas.astype(float)
    expected = float((probability * area).sum() / area.sum())
    order = np.argsort(-probability, kind="stable")
    covered = np.cumsum(area[order]) / area.sum()
    k = int(np.argmin(np.abs(np.concatenate([[0.0], covered]) - expected)))  # the k most probable patches
    return float(probability[order[k - 1]]) if k else float(np.nextafter(probability.max(), np.inf))


def left_out_rules(pairs, reach: int) -> dict[str, list[tuple[float, float]]]:
    """Rule name -> (Dice, |area error|) on each whole slide, with the calibration fitted without it."""
    judged = {"one fitted threshold and post-processing (shipped until the eleventh session)": [], "area-matched threshold": [],
              "area-matched threshold, then fitted post-processing": [],
              "midway between the fitted and area-matched thresholds, then fitted post-processing": [],
              "Otsu's threshold per slide, then fitted post-processing": [],
              "Li's threshold per slide (floor as Otsu's), then fitted post-processing": [],
              "the triangle threshold per slide (floor as Otsu's), then fitted post-processing": []}
    for slide, probability, calibration in left_out_fits(pairs, [p for p in pairs if p[0].is_whole], reach,
                                                         SMOOTHING_SIGMAS):
        matched_at = area_matched_threshold(slide, probability)
        matched = replace(calibration, threshold=matched_at)
        trials = (calibration, replace(matched, min_region_cells=0, max_hole_cells=0), matched,
                  replace(calibration, threshold=(calibration.threshold + matched_at) / 2),
                  replace(calibration, threshold_rule="otsu"),
                  *(replace(calibration, threshold=max(float(rule(probability)), OTSU_FLOOR * calibration.threshold))
                    for rule in (filters.threshold_li, filters.threshold_triangle)))
        for rule, trial in zip(judged, trials):
            judged[rule].append(region_figures(slide, probability, trial))
    return judged


def leave_one_slide_out(model, others: list[Path], slides) -> None:
    print("\n9. leave-one-slide-out: calibration fitted without each whole validation slide, judged on it")
    scored = {name: scaled(network, slides) for name, network in with_others(model, others).items()}
    if len(scored) > 1:
        scored["average of all"] = averaged(list(scored.values()))
    reach = model.network.context_reach
    seconds = []
    for left_out in (False, True):
        started = time.perf_counter()
        fit_calibration(scored["shipped"], reach, left_out=left_out)
        seconds.append(time.perf_counter() - started)
    print(f"  fitting the shipped network's calibration: {seconds[0]:.1f} s, {seconds[1]:.1f} s with the "
          f"left-one-slide-out figure that idcmap train and calibrate record")
    patients = [s.patient for s in slides if s.is_whole]
    for name, pairs in scored.items():
        print(f"  {name}: in-sample {objective(pairs, reach)}")
        for rule, figures in left_out_rules(pairs, reach).items():
            dices, errors = np.array(figures).T
            print(f"    {rule}: objective {dices.mean() - errors.mean():.4f} (Dice {dices.mean():.4f}, "
                  f"area MAE {errors.mean():.4f})")
            print("      per slide Dice/area error: " + ", ".join(f"{p} {d:.2f}/{e:.2f}"
                                                            for p, d, e in zip(patients, dices, errors)))


STAIN_VIEWS = ((1.0, 1.0, 1.0), (1.2, 1.0, 1.0), (0.8, 1.0, 1.0), (1.0, 1.2, 1.0), (1.0, 0.8, 1.0))
"""Haematoxylin, eosin, DAB scales of the stain views: as it is, H +/- 20%, E +/- 20%."""


def stained(pixels: np.ndarray, scale: tuple[float, float, float]) -> np.ndarray:
    """(N, 50, 50, 3) uint8 pixels with every patch's stain amounts scaled by `scale`."""
    if scale == (1.0, 1.0, 1.0):
        return pixels
    x = torch.from_numpy(pixels).permute(0, 3, 1, 2).float().div_(255)
    factors = torch.tensor(scale).expand(len(x), 3)
    out = stain_jitter(x, factors, torch.zeros_like(factors))
    return out.mul_(255).round_().byte().permute(0, 2, 3, 1).numpy()


def stain_views(model, others: list[Path], slides) -> None:
    print("\n10. stain test-time augmentation: logits averaged over H/E-scaled views of the normalised slides")
    networks = with_others(model, others)  # all score the slides as normalised to the default's reference
    normalised = [replace(s, pixels=normalised_pixels(s, model.colour_reference)) for s in slides]
    reach = model.network.context_reach
    for name, network in networks.items():
        scorer = Scorer(replace(network, colour_reference=None), "cpu", backend="onnx")
        views = [collect_scores(scorer, [replace(s, pixels=stained(s.pixels, scale)) for s in normalised])
                 for scale in STAIN_VIEWS]
        for count in (1, 3, 5):
            pairs = averaged(views[:count])
            print(f"  {name}, {count} view(s): in sample {fitted(pairs, reach, left_out=True)[1]}")
            print("    per whole slide AUC: " + whole_slide_aucs(pairs))


def batch_norms(network: torch.nn.Module) -> list[torch.nn.Module]:
    """The batch-norm layers of `network`, in module order."""
    return [m for m in network.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


def reestimated_batchnorm(backbone: torch.nn.Module, batches: Iterable[torch.Tensor]) -> torch.nn.Module:
    """A copy of `backbone`, in eval mode, whose batch-norm running means and variances are the
    average of those of the normalised input `batches` (labels are not used)."""
    adapted = copy.deepcopy(backbone).eval()
    for m in batch_norms(adapted):
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
        m.train()
    with torch.no_grad():
        for x in batches:
            adapted(x)
    return adapted.eval()


def slide_batchnorm(backbone: torch.nn.Module, x: torch.Tensor, weight: float, batch_size: int = 256) -> torch.nn.Module:
    """A copy of `backbone` whose batch-norm means and variances are `weight` of the way from the
    trained ones to those of the normalised input patches `x` (AdaBN; labels are not used)."""
    adapted = reestimated_batchnorm(backbone, (x[start : start + batch_size] for start in range(0, len(x), batch_size)))
    for m, trained in zip(batch_norms(adapted), batch_norms(backbone)):
        m.running_mean.mul_(weight).add_((1 - weight) * trained.running_mean)
        m.running_var.mul_(weight).add_((1 - weight) * trained.running_var)
    return adapted


def slide_batchnorm_scores(model, slides, weight: float) -> list:
    """(slide, scores) with each whole slide scored by the patch network adapted to it (PyTorch fp32)."""
    scorer = Scorer(model, "cpu", backend="torch")
    shipped = scorer.backbone
    pairs = []
    for slide in slides:
        if slide.is_whole and weight > 0:
            seen = torch.from_numpy(normalise_slide(slide, model.colour_reference).pixels)
            scorer.backbone = slide_batchnorm(shipped, to_input(seen, scorer.mean, scorer.std), weight)
        pairs.append((slide, scorer.score(slide)))
        scorer.backbone = shipped
    return pairs


def batchnorm_adaptation(model, slides) -> None:
    print("\n11. per-slide batch-norm statistics (AdaBN) on the whole slides, PyTorch fp32 (calibration refitted)")
    reach = model.network.context_reach
    for weight in (0.0, 0.5, 1.0):
        started = time.perf_counter()
        pairs = slide_batchnorm_scores(model, slides, weight)
        seconds = time.perf_counter() - started
        print(f"  weight {weight:g} ({seconds:.0f} s): {fitted(pairs, reach, left_out=True)[1]}")
        print("    per whole slide AUC: " + whole_slide_aucs(pairs))


def batch_composition(train_slides: list[Slide], batch_patches: int = 256) -> None:
    print(f"\n12. slides in a training batch of {batch_patches} patches (whole windows, grouped as idcmap train does)")
    for size in (16, 8):
        rng = np.random.default_rng(0)
        maker = BatchMaker(train_slides, TrainConfig(window=size, batch_patches=batch_patches), torch.zeros(3),
                           torch.ones(3), rng)
        windows = grid_windows(train_slides, size, rng)
        slides_in, largest = [], []
        for group in maker.window_groups(windows):
            counts = np.bincount([w.slide for w in group for _ in w.patches])
            slides_in.append(int((counts > 0).sum()))
            largest.append(counts.max() / counts.sum())
        print(f"  {size}x{size} windows: {len(windows)} windows, {len(largest)} batches; slides per batch median "
              f"{np.median(slides_in):.0f}, largest slide's share of a batch median {np.median(largest):.2f} "
              f"(mean {np.mean(largest):.2f})")


def training_batches(model, train_slides: list[Slide]) -> Iterator[torch.Tensor]:
    """One epoch of `model`'s training batches (grid windows, augmented as its card's training
    settings say; seed 0): the pixels alone."""
    trained = model.card.get("training", {})
    config = TrainConfig(**{f.name: trained[f.name] for f in fields(TrainConfig) if f.name in trained})
    if config.colour_normalise:
        train_slides = [normalise_slide(s, model.colour_reference) for s in train_slides]
    rng = np.random.default_rng(0)
    maker = BatchMaker(train_slides, config, torch.tensor(model.mean), torch.tensor(model.std), rng)
    return (x for x, _, _, _ in maker.batches(grid_windows(train_slides, config.window, rng)))


def mixed_batches(model, train_slides: list[Slide], batch_size: int = 256) -> Iterator[torch.Tensor]:
    """The training patches colour-normalised as `model` scores them, unaugmented, shuffled across
    slides (seed 0) into batches of `batch_size`."""
    pixels = np.concatenate([normalise_slide(s, model.colour_reference).pixels for s in train_slides])
    order = np.random.default_rng(0).permutation(len(pixels))
    mean, std = torch.tensor(model.mean), torch.tensor(model.std)
    for start in range(0, len(order) - 1, batch_size):  # a last batch of one patch: no variance
        yield to_input(torch.from_numpy(pixels[np.sort(order[start : start + batch_size])]), mean, std)


def precise_batchnorm(model, others: list[Path], slides, train_slides: list[Slide]) -> None:
    print("\n13. precise batch-norm statistics: re-estimated over one pass of the training patients (calibration refitted)")
    reach = model.network.context_reach
    for name, network in with_others(model, others).items():
        for label, batches in (("as trained", None), ("training batches", training_batches),
                               ("mixed batches, normalised", mixed_batches)):
            started = time.perf_counter()
            variant = network
            if batches is not None:
                whole = copy.deepcopy(network.network)
                whole.backbone = reestimated_batchnorm(whole.backbone, batches(network, train_slides))
                variant = replace(network, network=whole)
            pairs = scaled(variant, slides)
            print(f"  {name}, {label} ({time.perf_counter() - started:.0f} s): {fitted(pairs, reach, left_out=True)[1]}")
            print("    per whole slide AUC: " + whole_slide_aucs(pairs))


def otsu_on_training_slides(model, train_slides: list[Slide], whole: set[str]) -> None:
    """Experiment 14 on the training slides whose patient is in `whole` (the `patients/` folders)."""
    print("\n14. the fitted threshold against Otsu's per-slide threshold on the whole training slides (seen by the "
          "network), by labelled IDC area")
    calibration = replace(model.calibration, threshold_rule="fixed")
    scored = collect_scores(Scorer(model, "cpu", backend="onnx"), [s for s in train_slides if s.patient in whole])
    figures = []
    for slide, scores in sorted(scored, key=lambda pair: idc_area_fraction(pair[0], pair[0].labels == 1)):
        labelled = slide.labels == 1
        otsu = replace(calibration, threshold_rule="otsu")
        masks = [predicted_mask(slide, scores.probability, trial) for trial in (calibration, otsu)]
        row = [idc_area_fraction(slide, labelled)] + [idc_area_fraction(slide, m) for m in masks] + \
              [dice(slide, m, labelled) for m in masks]
        figures.append(row)
        print(f"  {slide.patient}: labelled {row[0]:.3f}; predicted area, fitted {row[1]:.3f} / Otsu {row[2]:.3f} "
              f"(threshold {calibration.threshold:.2f} / {slide_threshold(slide, scores.probability, otsu).value:.2f}); Dice {row[3]:.2f} / {row[4]:.2f}")
    labelled, fitted_area, otsu_area, fitted_dice, otsu_dice = np.array(figures).T
    print(f"  {len(figures)} slides: area MAE fitted {np.abs(fitted_area - labelled).mean():.4f}, Otsu "
          f"{np.abs(otsu_area - labelled).mean():.4f}; mean Dice fitted {fitted_dice.mean():.4f}, Otsu "
          f"{otsu_dice.mean():.4f}")


def otsu_fits(model, others: list[Path], slides) -> None:
    print("\n15. smoothing and post-processing for Otsu's per-slide threshold: fitted for one threshold, or "
          "searched under the rule")
    scored = {name: scaled(network, slides) for name, network in with_others(model, others).items()}
    if len(scored) > 1:
        scored["average of all"] = averaged(list(scored.values()))
    reach = model.network.context_reach

    def searched_under_otsu(pairs) -> Calibration:
        candidates = smoothing_candidates(pairs, reach, SMOOTHING_SIGMAS)[1]
        fixed = best_regions(candidates, THRESHOLDS)[3]
        return best_regions(candidates, [fixed.threshold], "otsu")[3]

    fits = {"fitted for one threshold, then Otsu (shipped)":
            lambda pairs: fit_calibration(pairs, reach, left_out=False, threshold_rule="otsu")[0],
            "searched under Otsu": searched_under_otsu}
    whole = lambda pairs: [(s, r) for s, r in pairs if s.is_whole]  # noqa: E731
    probability = lambda slide, scores, c: calibrated_scores(slide, scores.patch_logit, scores.context_logit,  # noqa: E731
                                                             reach, c).probability
    for name, pairs in scored.items():
        print(f"  {name}:")
        for label, fit in fits.items():
            calibration = fit(pairs)
            inside = np.array([region_figures(s, probability(s, r, calibration), calibration) for s, r in whole(pairs)])
            outside = []
            for slide, scores in whole(pairs):
                without = fit([p for p in pairs if p[0] is not slide])
                outside.append(region_figures(slide, probability(slide, scores, without), without))
            outside = np.array(outside)
            print(f"    {label}: sigma {calibration.smoothing_sigma:g}, threshold {calibration.threshold:.2f}, min region "
                  f"{calibration.min_region_cells}, max hole {calibration.max_hole_cells}; in sample objective "
                  f"{inside[:, 0].mean() - inside[:, 1].mean():.4f}; left out objective "
                  f"{outside[:, 0].mean() - outside[:, 1].mean():.4f} (Dice {outside[:, 0].mean():.4f}, area MAE "
                  f"{outside[:, 1].mean():.4f})")
            print("      left out, per slide Dice/area error: " + ", ".join(
                f"{s.patient} {d:.2f}/{e:.2f}" for (s, _), (d, e) in zip(whole(pairs), outside)))


MACENKO_BETA = 0.15  # optical density under which a channel counts as unstained (Macenko's beta)
MACENKO_ALPHA = 1.0  # percentile of the angles taken as the stain vectors' extremes (Macenko's alpha)
OD_OF_LEVEL = -np.log((np.arange(256) + 1.0) / 256.0)  # optical density of each 8-bit level


def macenko_stains(slide: Slide, samples: int = 200_000) -> tuple[np.ndarray, np.ndarray] | None:
    """(3x2 unit haematoxylin and eosin optical-density vectors, their 99th-percentile amounts)
    of the slide's stained pixels (every channel's optical density above MACENKO_BETA; at most
    `samples` of them, drawn with a fixed seed); None with fewer than one patch's worth."""
    od = OD_OF_LEVEL[slide.pixels[real_pixel_mask(slide)]]
    od = od[(od > MACENKO_BETA).all(axis=1)]
    if len(od) < 2500:
        return None
    if len(od) > samples:
        od = od[np.random.default_rng(0).choice(len(od), samples, replace=False)]
    _, vectors = np.linalg.eigh(np.cov(od.T))
    plane = vectors[:, [2, 1]] * np.sign(vectors[:, [2, 1]].sum(axis=0))  # the two main axes, pointing into the stains
    projected = od @ plane
    angle = np.arctan2(projected[:, 1], projected[:, 0])
    ends = [plane @ np.array([np.cos(a), np.sin(a)]) for a in np.percentile(angle, [MACENKO_ALPHA, 100 - MACENKO_ALPHA])]
    stains = np.stack(ends if ends[0][0] > ends[1][0] else ends[::-1], axis=1)  # haematoxylin absorbs more red
    stains /= np.linalg.norm(stains, axis=0)
    amounts = np.linalg.lstsq(stains, od.T, rcond=None)[0]
    return stains, np.percentile(amounts, 99, axis=1)


def macenko_reference(slides: list[Slide]) -> tuple[np.ndarray, np.ndarray]:
    """The mean over `slides` (each counted once) of their stain vectors (renormalised) and amounts."""
    measured = [m for m in map(macenko_stains, slides) if m is not None]
    stains = np.mean([m[0] for m in measured], axis=0)
    return stains / np.linalg.norm(stains, axis=0), np.mean([m[1] for m in measured], axis=0)


def macenko_normalised(slide: Slide, reference: tuple[np.ndarray, np.ndarray]) -> Slide:
    """A whole slide with its stain vectors and amounts mapped onto `reference`: in optical density
    a linear map, reference stains x (reference amounts / slide amounts) x the slide's stains'
    pseudo-inverse. Padding stays BACKGROUND; other slides, or one too pale to measure, unchanged."""
    measured = macenko_stains(slide) if slide.is_whole else None
    if measured is None:
        return slide
    stains, amounts = measured
    mapping = reference[0] @ np.diag(reference[1] / amounts) @ np.linalg.pinv(stains)
    od = OD_OF_LEVEL.astype(np.float32)[slide.pixels] @ mapping.T.astype(np.float32)
    pixels = np.clip(np.rint(256.0 * np.exp(-od) - 1.0), 0, 255).astype(np.uint8)
    pixels[~real_pixel_mask(slide)] = BACKGROUND
    return replace(slide, pixels=pixels)


def stain_normalisation(model, others: list[Path], slides, train_slides: list[Slide]) -> None:
    print("\n16. Macenko stain normalisation of the whole slides against the per-channel RGB matching (shipped); "
          "calibration refitted under the Otsu rule")
    reference = macenko_reference([s for s in train_slides if s.is_whole])
    print(f"  reference from the whole training slides: H {np.round(reference[0][:, 0], 3)}, "
          f"E {np.round(reference[0][:, 1], 3)}, 99th-percentile amounts {np.round(reference[1], 3)}")
    started = time.perf_counter()
    stained_slides = [macenko_normalised(s, reference) for s in slides]
    whole = [s for s in slides if s.is_whole]
    print(f"  Macenko: {(time.perf_counter() - started) / sum(map(len, whole)) * 1000:.3f} s per 1,000 patches "
          "(estimate and map)")
    reach = model.network.context_reach
    for name, network in with_others(model, others).items():
        runs = {"per-channel RGB (shipped)": collect_scores(Scorer(network, "cpu", backend="onnx"), slides),
                "Macenko": collect_scores(Scorer(replace(network, colour_reference=None), "cpu", backend="onnx"),
                                          stained_slides)}
        print(f"  {name}:")
        for label, scored in runs.items():
            calibration, choice = fit_calibration(scored, reach, threshold_rule="otsu")
            out = choice["left_one_slide_out"]
            print(f"    {label}: in sample objective {choice['value']:.4f} (Dice {choice['val_dice']:.4f}, area MAE "
                  f"{choice['val_area_fraction_mae']:.4f}); left out {out['value']:.4f} (Dice {out['val_dice']:.4f}, "
                  f"area MAE {out['val_area_fraction_mae']:.4f}); patient AUC {mean_patient_auc(scored):.4f}; "
                  f"sigma {calibration.smoothing_sigma:g}, threshold {calibration.threshold:.2f}")
            print("      per whole slide AUC: " + whole_slide_aucs(scored))
            print("      left out, per slide Dice/area error: " + ", ".join(
                f"{p} {f['dice']:.2f}/{f['area_fraction_error']:.2f}" for p, f in out["per_slide"].items()))


def scattered_thresholds(model, others: list[Path], slides) -> None:
    print("\n17. the threshold for scattered samples, on the scattered validation patients")
    scattered = [s for s in slides if not s.is_whole]
    reach = model.network.context_reach
    for name, network in with_others(model, others).items():
        calibration = replace(network.calibration, scattered_threshold=None)
        scored = collect_scores(Scorer(network, "cpu", backend="onnx"), scattered)

        def figures(c: Calibration, pairs=scored) -> tuple[float, float, float]:
            """(pooled BAC, pooled F1, objective) of `pairs` under `c`."""
            masks, per_patient = [], []
            for slide, r in pairs:
                probability = calibrated_scores(slide, r.patch_logit, r.context_logit, reach, c).probability
                masks.append(predicted_mask(slide, probability, c))
                per_patient.append(region_figures(slide, probability, c))
            report = metrics.classification_report(np.concatenate([s.labels for s, _ in pairs]), np.concatenate(masks))
            dices, errors = np.array(per_patient).T
            return report["balanced_accuracy"], report["f1_idc"], float(dices.mean() - errors.mean())

        print(f"  {name} ({len(scored)} patients, whole-slide threshold {calibration.threshold:.2f}):")
        for threshold in sorted({calibration.threshold, 0.22, 0.30, 0.38}):
            bac, f1, value = figures(replace(calibration, scattered_threshold=threshold))
            print(f"    at {threshold:.2f}: BAC {bac:.4f}, F1 {f1:.4f}, objective {value:.4f}")
        fitted_calibration, fit = scattered_threshold_fit(scored, reach, calibration)
        outside = []
        for i, (slide, r) in enumerate(scored):
            without, _ = scattered_threshold_fit(scored[:i] + scored[i + 1:], reach, calibration)
            probability = calibrated_scores(slide, r.patch_logit, r.context_logit, reach, without).probability
            outside.append((*region_figures(slide, probability, without), without.scattered_threshold))
        dices, errors, chosen = np.array(outside).T
        print(f"    fitted: {fitted_calibration.scattered_threshold:.2f}, objective {fit['value']:.4f} in sample, "
              f"{dices.mean() - errors.mean():.4f} with each patient left out of the fit (thresholds chosen: "
              + ", ".join(f"{t:.2f} x{int((chosen == t).sum())}" for t in sorted(set(chosen))) + ")")


def _seconds(scorer: Scorer, slide) -> float:
    started = time.perf_counter()
    scorer.score(slide)
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA_ROOT, help="data root (patients/, sparse/)")
    parser.add_argument("--skip-tta", action="store_true", help="skip the slowest experiment (about 3 minutes)")
    parser.add_argument("--weights", type=Path, default=None,
                        help="resnet18-context weights to experiment on [default: the shipped ones]")
    parser.add_argument("--only", type=int, nargs="+", choices=range(1, 18), help="run only these experiments")
    parser.add_argument("--other", type=Path, nargs="+", default=None,
                        help="for experiments 7, 9, 10, 13, 15, 16 and 17: other resnet18-context weights files trained on the same split")
    args = parser.parse_args()
    if 7 in (args.only or []) and args.other is None:
        parser.error("experiment 7 needs --other W2 [W3 ...] (other resnet18-context weights files)")
    require_folder(args.data)
    folders = patient_ids(args.data)
    split = load_split((args.weights or get_spec(DEFAULT).weights_path).with_suffix(".split.json"), folders)
    slides = [s for s in load_slides(split["val"], folders, "load val") if s.has_labels]
    print(f"{len(slides)} validation patients ({sum(s.is_whole for s in slides)} whole slides), "
          f"{sum(len(s) for s in slides):,} patches")
    model = load_model(DEFAULT, args.weights)
    run = set(args.only or range(1, 18)) - ({1} if args.skip_tta else set()) - (set() if args.other else {7})
    if 1 in run:
        tta(model, slides)
    if 2 in run:
        ensembles(slides)
    if 3 in run:
        smoothing_alone(slides)
    if 4 in run:
        expected_area(model, slides)
    if 5 in run:
        batch_sweep(args.data)
    if run & {6, 12, 13, 14, 16}:
        train_slides = [s for s in load_slides(split["train"], folders, "load train") if s.has_labels]
    if 6 in run:
        colour_normalisation(model, slides, train_slides)
    if 7 in run:
        other_networks(model, args.other, slides)
    if 8 in run:
        if model.colour_reference is None:
            sys.exit("experiment 8 needs weights with a colour reference (idcmap calibrate --colour-normalise)")
        normalisation_strength(model, slides)
    if 9 in run:
        leave_one_slide_out(model, args.other or [], slides)
    if 10 in run:
        stain_views(model, args.other or [], slides)
    if 11 in run:
        batchnorm_adaptation(model, slides)
    if 12 in run:
        batch_composition(train_slides)
    if 13 in run:
        precise_batchnorm(model, args.other or [], slides, train_slides)
    if 14 in run:
        otsu_on_training_slides(model, train_slides, {p.split("/", 1)[1] for p in split["train"]
                                                       if p.startswith("patients/")})
    if 15 in run:
        otsu_fits(model, args.other or [], slides)
    if 16 in run:
        stain_normalisation(model, args.other or [], slides, train_slides)
    if 17 in run:
        scattered_thresholds(model, args.other or [], slides)


if __name__ == "__main__":
    run(main)
