"""Train a registry model on patient folders, split by patient, and calibrate it on validation.

Training samples windows of the slide grid (window x window cells, random offset each epoch),
so a slide-aware model learns from real neighbourhoods; sparse patients' patches keep their
real positions and are mostly isolated, which trains the patch-only fallback.
"""
from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import math
import shlex
import tempfile
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Iterator

import numpy as np
import torch
from torch.nn import functional as F
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from . import metrics
from .colour import ColourReference, colour_reference, normalise_slide
from .dataset import (SPLIT_SETS, check_unseen, load_labelled_slides, load_slides, load_split, make_split,
                      patient_ids, save_split)
from .errors import OptionError, OutputError, SplitError, TrainingError, WeightsError
from .export import atomic_paths, atomic_write_bytes, write_json
from .loader import Slide
from .models import (THRESHOLD_RULES, Calibration, LoadedModel, ModelSpec, PatchClassifier, build_model, card_path,
                     get_spec, load_model, load_torch_file, read_weights, save_checkpoint, save_weights, sha256_of,
                     stored_precision)
from .progress import progress_bar
from .regions import dice, idc_area_fraction, predicted_mask
from .scoring import Scorer, SlideScores, calibrated_scores, quantize_backbone, to_input
from .train_config import TrainConfig, number_text, recipe_change, recipe_of

log = logging.getLogger(__name__)



def colour_fields(reference: ColourReference | None) -> dict:
    """What weights files and model cards record of a colour reference: nothing without one; the
    card's `input` text comes from `input_description`."""
    return {} if reference is None else {"colour_reference": reference.as_dict()}


def input_description(reference: ColourReference | None) -> str:
    """The model card's account of what the network is fed."""
    text = "50x50 RGB patch, edge patches padded with white; x/255 then (x - mean) / std"
    if reference is not None:
        text += ("; before that, each whole slide's tissue colours mapped per channel onto colour_reference "
                 "(idcmap.colour)")
    return text


def cpu_has_bf16() -> bool:
    """True when this CPU computes bfloat16 natively (AVX512-BF16 or AMX), where autocast pays off."""
    checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(getattr(torch.cpu, name, lambda: False)() for name in checks)


def training_precision(precision: str, device: torch.device) -> str:
    """The precision a run trains in: `auto` is bf16 autocast on a GPU or a CPU with native bf16
    (about 2x faster per step on this project's CPU), fp32 elsewhere. An explicit bf16 where the
    hardware only emulates it is kept (the recipe asks for it), with a warning: it is far slower."""
    native = torch.cuda.is_bf16_supported(including_emulation=False) if device.type == "cuda" else cpu_has_bf16()
    if precision == "bf16" and not native:
        log.warning("--precision bf16 on %s, which does not compute bfloat16 natively (no AVX512-BF16 or AMX on a "
                    "CPU): it is emulated, about 17x slower a step than fp32 on an AVX2-only CPU. Pass --precision "
                    "auto or fp32 to train in fp32 (its weights differ slightly from a bf16 run's)", device)
    if precision != "auto":
        return precision
    return "bf16" if native else "fp32"


@dataclass
class Window:
    """Patches of one slide that fall in one grid window, with their cells inside it."""

    slide: int
    patches: np.ndarray
    rows: np.ndarray
    cols: np.ndarray


def grid_windows(slides: list[Slide], size: int, rng: np.random.Generator) -> list[Window]:
    """Tile every slide's grid into size x size windows at a random offset; keep non-empty ones."""
    windows = []
    for s, slide in enumerate(slides):
        cells = slide.cells + rng.integers(0, size, 2)
        key = (cells[:, 0] // size) * 1_000_000 + cells[:, 1] // size
        order = np.argsort(key, kind="stable")
        bounds = np.flatnonzero(np.diff(key[order])) + 1
        for members in np.split(order, bounds):
            local = cells[members] % size
            windows.append(Window(s, members, local[:, 0], local[:, 1]))
    return windows


# Ruifrok & Johnston's stain vectors (skimage.color.rgb_from_hed): optical density = HED @ RGB_FROM_HED
RGB_FROM_HED = torch.tensor([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)


def stain_jitter(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Perturb haematoxylin, eosin and DAB amounts (Tellez et al. 2018): x (N, 3, H, W) in [0, 1],
    `scale` and `shift` (N, 3) per patch. Optical density is scaled, so white glass stays white
    up to `shift`."""
    density = -torch.log(x.clamp_min(1 / 255)).permute(0, 2, 3, 1)  # N, H, W, RGB
    stains = density @ HED_FROM_RGB
    stains = stains * scale[:, None, None, :] + shift[:, None, None, :]
    return torch.exp(-(stains @ RGB_FROM_HED)).permute(0, 3, 1, 2).clamp_(0, 1)


def _dihedral(x: torch.Tensor, t: int) -> torch.Tensor:
    """One of the 8 flips/rotations of the last two dims."""
    x = torch.rot90(x, t % 4, dims=(-2, -1))
    return torch.flip(x, dims=(-1,)) if t >= 4 else x


class BatchMaker:
    """Turns windows into augmented training batches (pixels, labels, grid index)."""

    def __init__(self, slides: list[Slide], config: TrainConfig, mean: torch.Tensor, std: torch.Tensor,
                 rng: np.random.Generator) -> None:
        self.slides, self.config, self.mean, self.std, self.rng = slides, config, mean, std, rng
        size = config.window
        ids = torch.arange(size * size).view(size, size)
        # where cell (r, c) lands under each of the 8 transforms
        self.cell_maps = []
        for t in range(8):
            moved = _dihedral(ids, t)
            target = torch.empty(size * size, 2, dtype=torch.long)
            target[moved.flatten()] = torch.stack(torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij"), -1).view(-1, 2)
            self.cell_maps.append(target)

    def window_groups(self, windows: list[Window]) -> Iterator[list[Window]]:
        """The windows in random order, grouped until each group holds at least batch_patches
        patches (before cell dropout): the windows of one training batch each."""
        group: list[Window] = []
        count = 0
        for i in self.rng.permutation(len(windows)):
            group.append(windows[i])
            count += len(windows[i].patches)
            if count >= self.config.batch_patches:
                yield group
                group, count = [], 0
        if count > 1:  # a last batch of one patch is dropped: batch norm cannot train on it
            yield group

    def batches(self, windows: list[Window]):
        """Yield (x, labels, index, k): one augmented batch per group of `window_groups`, but for one
        that cell dropout left with a single patch (batch norm cannot train on it)."""
        for group in self.window_groups(windows):
            batch = self._make(group)
            if len(batch[1]) > 1:
                yield batch

    def _make(self, group: list[Window]):
        size, rng = self.config.window, self.rng
        pixels, labels, index, transform = [], [], [], []
        for k, window in enumerate(group):
            keep = np.ones(len(window.patches), bool)
            if len(keep) > 1:
                keep = rng.random(len(keep)) >= self.config.cell_dropout
                keep[rng.integers(len(keep))] = True
            slide = self.slides[window.slide]
            chosen = window.patches[keep]
            t = int(rng.integers(8))
            pixels.append(slide.pixels[chosen])
            labels.append(slide.labels[chosen])
            cells = torch.from_numpy(window.rows[keep] * size + window.cols[keep])
            moved = self.cell_maps[t][cells]
            index.append(torch.cat([torch.full((len(chosen), 1), k), moved], 1))
            transform.append(np.full(len(chosen), t))
        x = torch.from_numpy(np.concatenate(pixels)).permute(0, 3, 1, 2).float().div_(255.0)
        transform_of = torch.from_numpy(np.concatenate(transform))
        for t in range(8):
            picked = transform_of == t
            if picked.any():
                x[picked] = _dihedral(x[picked], t)
        window_of = torch.cat(index)[:, 0]  # one colour change per window: neighbours stay alike
        jitter = self.config.stain_jitter
        if jitter > 0:
            stain_scale = 1 + (torch.rand(len(group), 3) * 2 - 1) * jitter
            stain_shift = (torch.rand(len(group), 3) * 2 - 1) * jitter / 4
            x = stain_jitter(x, stain_scale[window_of], stain_shift[window_of])
        scale = 1 + (torch.rand(len(group), 3, 1, 1) * 2 - 1) * 0.08
        shift = (torch.rand(len(group), 3, 1, 1) * 2 - 1) * 0.04
        x = (x * scale[window_of] + shift[window_of]).clamp_(0, 1)
        x = x.sub_(self.mean.view(1, 3, 1, 1)).div_(self.std.view(1, 3, 1, 1))
        y = torch.from_numpy(np.concatenate(labels).astype(np.float32))
        return x.contiguous(memory_format=torch.channels_last), y, torch.cat(index), (len(group), size, size)


def pixel_statistics(slides: list[Slide]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the training patches' real pixels, in [0, 1]."""
    total, total_sq, count = np.zeros(3), np.zeros(3), 0
    for slide in slides:
        for patch, (h, w) in zip(slide.pixels[::4], slide.sizes[::4]):
            values = patch[:h, :w].reshape(-1, 3).astype(np.float64) / 255
            total += values.sum(0)
            total_sq += (values**2).sum(0)
            count += len(values)
    mean = total / count
    return mean.round(4).tolist(), np.sqrt(total_sq / count - mean**2).round(4).tolist()


def collect_scores(scorer: Scorer, slides: list[Slide], progress: bool = False) -> list[tuple[Slide, SlideScores]]:
    """(slide, its scores under the scorer's model) for each slide; a bar with `progress`."""
    return [(slide, scorer.score(slide)) for slide in progress_bar(slides, progress, desc="score", unit="patient")]


def mean_patient_auc(scored: list[tuple[Slide, SlideScores]], patch_only: bool = False) -> float:
    """ROC-AUC of the context (or patch) logits averaged over patients with both classes, so no
    single large slide dominates."""
    aucs = [metrics.roc_auc(slide.labels, scores.patch_logit if patch_only else scores.context_logit)
            for slide, scores in scored]
    aucs = [a for a in aucs if not np.isnan(a)]
    return float(np.mean(aucs)) if aucs else float("nan")


SMOOTHING_SIGMAS = (0.0, 0.7, 1.0, 1.5, 2.0, 3.0)
THRESHOLDS = np.round(np.arange(0.20, 0.81, 0.02), 2)
SPECK_CELLS = (0, 2, 3, 4, 6, 9)
HOLE_CELLS = (0, 1, 2, 4, 8)


def fit_calibration(scored: list[tuple[Slide, SlideScores]], context_reach: int,
                    sigmas: tuple[float, ...] = SMOOTHING_SIGMAS, left_out: bool = True,
                    threshold_rule: str = "fixed", progress: bool = False) -> tuple[Calibration, dict]:
    """Smoothing, temperatures, threshold and region post-processing fitted on validation patients
    (with `progress`, a bar counts the fits: on all slides, then one per slide left out).

    Patches are weighted 1/patches of their patient, so one large, atypical slide cannot set the
    calibration. The patch temperature minimises the weighted log loss of the patch logits, to which
    every validation patient contributes the same; for each smoothing sigma of `sigmas`, the
    temperature of the final logits minimises that of the patches they refine (the same weights:
    a scattered patient with few refined patches counts that much less). Smoothing, threshold, speck and hole
    sizes are chosen together on the whole validation slides (all slides when none is whole) to
    maximise mean Dice minus mean area-fraction error: regions that overlap the labelled ones
    and have their size. `left_out`: the choice also records `left_one_slide_out` (see there),
    the objective on slides the calibration was not fitted on. `threshold_rule` "otsu": the
    calibration found so then thresholds each whole slide at its own Otsu threshold (see
    `regions.slide_threshold`), and the objectives recorded are those of that rule. Smoothing and
    post-processing stay those fitted for one threshold: searched again under the rule, they
    fitted the validation slides better but carried over worse to a slide left out of the fit
    (docs/experiments.md, twelfth session). Where the validation patients hold whole slides and
    scattered samples too, the scattered samples get their own threshold (`scattered_threshold_fit`;
    recorded as `scattered_samples`).
    """
    whole = whole_slides(scored)
    with progress_bar(None, progress, total=1 + (len(whole) if left_out and len(whole) > 1 else 0),
                      desc="fit calibration", unit="fit") as bar:
        best, choice = whole_slide_calibration(scored, context_reach, sigmas, threshold_rule)
        bar.update()
        if not whole[0][0].is_whole:
            log.warning("no validation patient is a whole slide, so smoothing, threshold and post-processing are "
                        "fitted on scattered samples; for a calibration that suits whole slides, validate on whole "
                        "ones (--split)")
        if len(whole) < len(scored):  # whole slides and scattered samples: the latter get a threshold of their own
            scattered = [(s, r) for s, r in scored if not s.is_whole]
            best, choice["scattered_samples"] = scattered_threshold_fit(scattered, context_reach, best)
        if left_out:
            choice["left_one_slide_out"] = left_one_slide_out(scored, whole, context_reach, sigmas, threshold_rule,
                                                              after_each=bar.update)
    if left_out and choice["left_one_slide_out"] is not None:
        log.info("calibration: objective %.4f on the %d validation slides it was fitted on, %.4f on each left out "
                 "of the fit", choice["value"], len(whole), choice["left_one_slide_out"]["value"])
    return best, choice


def whole_slide_calibration(scored: list[tuple[Slide, SlideScores]], context_reach: int,
                            sigmas: tuple[float, ...], threshold_rule: str) -> tuple[Calibration, dict]:
    """`fit_calibration` without the scattered samples' threshold and the left-out objective: the
    temperatures fitted on all of `scored`, the rest on its whole slides; (calibration, its figures)."""
    check_threshold_rule(threshold_rule)
    whole, candidates = smoothing_candidates(scored, context_reach, sigmas)
    objective, val_dice, val_error, best = best_regions(candidates, THRESHOLDS)
    if threshold_rule != "fixed":
        best = replace(best, threshold_rule=threshold_rule)
        judged = next(j for base, j in candidates if base.smoothing_sigma == best.smoothing_sigma)
        objective, val_dice, val_error = mean_region_figures(judged, best)
    slides = "whole validation slides" if whole[0][0].is_whole else "validation patients (none a whole slide)"
    return best, {"objective": f"mean Dice - mean area-fraction error, {slides}",
                  "value": objective, "val_dice": val_dice, "val_area_fraction_mae": val_error,
                  "slides": [s.patient for s, _ in whole]}


def scattered_threshold_fit(scattered: list[tuple[Slide, SlideScores]], context_reach: int,
                            calibration: Calibration) -> tuple[Calibration, dict]:
    """(`calibration` with the `scattered_threshold` of `THRESHOLDS` that maximises mean Dice minus
    mean area-fraction error over the scattered-sample patients `scattered`, the lowest on ties;
    its figures). Their probabilities come from few neighbours or none, so the threshold fitted
    for whole slides need not suit them."""
    judged = [(s, calibrated_scores(s, r.patch_logit, r.context_logit, context_reach, calibration).probability)
              for s, r in scattered]
    trials = [replace(calibration, scattered_threshold=float(threshold)) for threshold in THRESHOLDS]
    objective, dice_mean, error_mean, best = max(((*mean_region_figures(judged, trial), trial) for trial in trials),
                                                 key=lambda r: r[0])
    return best, {"objective": "mean Dice - mean area-fraction error, scattered-sample validation patients",
                  "value": objective, "val_dice": dice_mean, "val_area_fraction_mae": error_mean,
                  "patients": len(scattered), "threshold": best.scattered_threshold}


def check_threshold_rule(threshold_rule: str) -> None:
    """OptionError unless `threshold_rule` is one of `THRESHOLD_RULES`."""
    if threshold_rule not in THRESHOLD_RULES:
        raise OptionError(f"threshold rule {threshold_rule!r}: choose one of {', '.join(THRESHOLD_RULES)}")


Candidates = list[tuple[Calibration, list[tuple[Slide, np.ndarray]]]]
"""Per smoothing sigma: the calibration with its temperatures, and each whole slide with its probabilities."""


def whole_slides(scored: list[tuple[Slide, SlideScores]]) -> list[tuple[Slide, SlideScores]]:
    """The whole slides of `scored`, on which smoothing, threshold and post-processing are fitted;
    all of `scored` when none is whole."""
    return [(s, r) for s, r in scored if s.is_whole] or scored


def smoothing_candidates(scored: list[tuple[Slide, SlideScores]], context_reach: int,
                         sigmas: tuple[float, ...]) -> tuple[list[tuple[Slide, SlideScores]], Candidates]:
    """(the whole slides of `scored`, or all when none is whole; per sigma of `sigmas`, the
    calibration with the temperatures fitted for it as `fit_calibration` says, and each of those
    slides with its probabilities under it)."""
    labels = np.concatenate([s.labels for s, _ in scored])
    weights = np.concatenate([np.full(len(s), 1 / len(s)) for s, _ in scored])
    patch_temperature = metrics.fit_temperature(labels, np.concatenate([r.patch_logit for _, r in scored]), weights)
    whole = whole_slides(scored)
    candidates = []
    for sigma in sigmas:
        base = Calibration(patch_temperature=patch_temperature, temperature=patch_temperature, smoothing_sigma=sigma)
        final = [calibrated_scores(s, r.patch_logit, r.context_logit, context_reach, base) for s, r in scored]
        refined = np.concatenate([f.refined for f in final])
        if refined.any():
            logits = np.concatenate([f.logit for f in final])
            base = replace(base, temperature=metrics.fit_temperature(labels[refined], logits[refined], weights[refined]))
        candidates.append((base, [(s, calibrated_scores(s, r.patch_logit, r.context_logit, context_reach,
                                                        base).probability) for s, r in whole]))
    return whole, candidates


def best_regions(candidates: Candidates, thresholds: list[float] | np.ndarray,
                 threshold_rule: str = "fixed") -> tuple[float, float, float, Calibration]:
    """(objective, mean Dice, mean area-fraction error, calibration) of the best choice of a
    smoothing candidate, a threshold of `thresholds`, speck and hole sizes, each judged under
    `threshold_rule`; on ties the least smoothing and post-processing, then the first threshold."""
    check_threshold_rule(threshold_rule)
    results = []
    for base, judged in candidates:
        for threshold in thresholds:
            for speck in SPECK_CELLS:
                for hole in HOLE_CELLS:
                    trial = replace(base, threshold=float(threshold), threshold_rule=threshold_rule,
                                    min_region_cells=speck, max_hole_cells=hole)
                    results.append((*mean_region_figures(judged, trial), trial))
    return max(results, key=lambda r: (r[0], -r[3].smoothing_sigma, -r[3].min_region_cells, -r[3].max_hole_cells))


def region_figures(slide: Slide, probability: np.ndarray, calibration: Calibration) -> tuple[float, float]:
    """(Dice, absolute area-fraction error) of the slide's predicted regions against its labelled ones."""
    mask, truth = predicted_mask(slide, probability, calibration), slide.labels == 1
    return dice(slide, mask, truth), abs(idc_area_fraction(slide, mask) - idc_area_fraction(slide, truth))


def mean_region_figures(judged: list[tuple[Slide, np.ndarray]], calibration: Calibration) -> tuple[float, float, float]:
    """(objective: mean Dice minus mean area-fraction error, mean Dice, mean area-fraction error) of
    the slides of `judged`, each with its probabilities, under `calibration`."""
    return mean_figures([region_figures(slide, probability, calibration) for slide, probability in judged])


def mean_figures(figures: list[tuple[float, float]]) -> tuple[float, float, float]:
    """(objective: mean Dice minus mean area-fraction error, mean Dice, mean area-fraction error) of
    per-slide (Dice, area-fraction error) pairs."""
    dice_mean, error_mean = (float(np.mean(column)) for column in zip(*figures))
    return dice_mean - error_mean, dice_mean, error_mean


def left_out_fits(scored: list[tuple[Slide, SlideScores]], judged: list[tuple[Slide, SlideScores]],
                  context_reach: int, sigmas: tuple[float, ...],
                  threshold_rule: str = "fixed") -> Iterator[tuple[Slide, np.ndarray, Calibration]]:
    """Each `judged` (whole) slide with the whole-slide calibration fitted on all the other
    validation patients of `scored`, and its probabilities under that calibration."""
    for slide, scores in judged:
        calibration, _ = whole_slide_calibration([p for p in scored if p[0] is not slide], context_reach, sigmas,
                                                 threshold_rule)
        yield slide, calibrated_scores(slide, scores.patch_logit, scores.context_logit, context_reach,
                                       calibration).probability, calibration


def left_one_slide_out(scored: list[tuple[Slide, SlideScores]], judged: list[tuple[Slide, SlideScores]],
                       context_reach: int, sigmas: tuple[float, ...], threshold_rule: str = "fixed",
                       after_each: Callable[[], object] | None = None) -> dict | None:
    """How the calibration carries over to a slide it was not fitted on: each `judged` slide under
    the calibration fitted on all the other validation patients, and the objective (mean Dice
    minus mean area-fraction error) over them; None with fewer than 2 judged slides. The
    in-sample objective overstates, since the grid choices are fitted on the slides they are
    judged on. `after_each`: called after each slide's fit (a progress bar's update)."""
    if len(judged) < 2:
        return None
    figures = {}
    for slide, probability, calibration in left_out_fits(scored, judged, context_reach, sigmas, threshold_rule):
        figures[slide.patient] = region_figures(slide, probability, calibration)
        if after_each is not None:
            after_each()
    objective, dice_mean, error_mean = mean_figures(list(figures.values()))
    return {"value": objective, "val_dice": dice_mean, "val_area_fraction_mae": error_mean,
            "per_slide": {p: {"dice": d, "area_fraction_error": e} for p, (d, e) in figures.items()}}


def require_mixed_validation(val_slides: list[Slide], source: str | Path, remedy: str) -> None:
    """SplitError naming `source` unless a validation patient has both IDC and non-IDC patches:
    early stopping (AUC) and calibration (temperatures, threshold) are meaningless without one."""
    if not any(len(set(s.labels.tolist())) == 2 for s in val_slides):
        raise SplitError(f"{source}: no validation patient has both IDC and non-IDC patches; "
                         f"early stopping and calibration need one ({remedy})")


def smoothing_sigmas(spec: ModelSpec) -> tuple[float, ...]:
    """The grid-smoothing sigmas calibration may choose from: none for a patch-only model."""
    return SMOOTHING_SIGMAS if spec.smoothing else (0.0,)


def recalibrate(data_root: str | Path, model_name: str | None, weights: str | Path | None = None,
                split_file: str | Path | None = None, device: str = "auto", progress: bool = True,
                colour_normalise: bool = False, threshold_rule: str | None = None) -> dict:
    """Refit a trained model's calibration on its validation patients; rewrite weights and card.
    `model_name` None: the model `weights` holds (the default model without `weights`).
    `threshold_rule` (fixed, otsu; None: the model's own) as `fit_calibration` takes it.
    `colour_normalise`: a model without a colour reference gets one, from its training patients
    (one that has a reference keeps it); its int8 network, calibrated on other colours, is then no
    longer listed in the card (run `quantize` again); otherwise it stays, and its figures against
    fp32 are measured again under the new calibration."""
    model = load_model(model_name, weights)
    path, spec = model.path, get_spec(model.name)
    folders = patient_ids(data_root)
    split_path = Path(split_file or path.with_suffix(".split.json"))
    split = load_split(split_path, folders)
    check_unseen(split["val"], "val", split_path, path, ("test",), "are test patients of",
                 "so calibrating on them would make its test figures overstate; calibrate on its own split (leave "
                 "out --split) or with val patients outside its test set")
    new_reference = colour_normalise and model.colour_reference is None
    if new_reference:
        model = replace(model, colour_reference=colour_reference(
            [s for s in load_slides(split["train"], folders, "load train", progress) if s.has_labels]))
    elif colour_normalise:
        log.info("%s: keeps the colour reference it has", path)
    val_slides = [s for s in load_slides(split["val"], folders, "load val", progress) if s.has_labels]
    require_mixed_validation(val_slides, split_path, "pass a --split whose val patients include one")
    calibration, choice = fit_calibration(collect_scores(Scorer(model, device, backend="torch"), val_slides, progress),
                                          model.network.context_reach, smoothing_sigmas(spec),
                                          threshold_rule=threshold_rule or model.calibration.threshold_rule,
                                          progress=progress)
    int8 = model.card.get("int8")  # kept as is where it is of other weights (unused, see scoring)
    same_network = int8 and int8.get("weights_sha256") == model.sha256 and not new_reference
    if same_network and "validation" in int8 and model.int8_path.is_file():  # its figures under the new calibration
        int8 = {**int8, "validation": int8_agreement(replace(model, calibration=calibration), val_slides)}
    payload = read_weights(path)
    payload["calibration"] = asdict(calibration)
    payload.update(colour_fields(model.colour_reference))
    with atomic_paths(path, card_path(path)) as (weights_file, card_file):  # replaced together, or neither
        save_weights(weights_file, payload)
        card = {key: value for key, value in model.card.items() if key != "test"}  # of the old calibration
        card.update(calibration=asdict(calibration), calibration_fit=choice, sha256=sha256_of(weights_file),
                    input=input_description(model.colour_reference), **colour_fields(model.colour_reference))
        if new_reference and "int8" in card:
            del card["int8"]  # its activation ranges and figures are of unnormalised colours
        elif same_network:  # its int8 version holds
            card["int8"] = {**int8, "weights_sha256": card["sha256"]}
        write_json(card_file, card)
    if new_reference and "int8" in model.card:
        log.warning("%s: its int8 network was made for unnormalised colours and is no longer used; run "
                    "`idcmap quantize %s --model %s` to make one for the normalised colours", path, data_root, model.name)
    return card


def int8_agreement(model: LoadedModel, slides: list[Slide], int8_network: bytes | None = None) -> dict:
    """How far the int8 patch network (`int8_network`, or the one stored beside the weights) stays
    from fp32 ONNX Runtime on labelled `slides`: the largest calibrated-probability difference, the
    share of post-processed decisions that change, and each one's mean patient AUC."""
    reference = collect_scores(Scorer(model, "cpu", backend="onnx"), slides)
    quantised = collect_scores(Scorer(model, "cpu", backend="onnx-int8", int8_network=int8_network), slides)
    difference = max(float(np.abs(a.probability - b.probability).max()) for (_, a), (_, b) in zip(reference, quantised))
    same = np.concatenate([
        predicted_mask(s, a.probability, model.calibration) == predicted_mask(s, b.probability, model.calibration)
        for (s, a), (_, b) in zip(reference, quantised)])
    return {
        "patients": len(slides), "patches": int(sum(len(s) for s in slides)),
        "max_probability_difference": round(difference, 5),
        "decisions_changed": round(1 - float(same.mean()), 5),
        "mean_patient_auc_fp32": round(mean_patient_auc(reference), 4),
        "mean_patient_auc_int8": round(mean_patient_auc(quantised), 4),
    }


def quantize(data_root: str | Path, model_name: str | None, weights: str | Path | None = None,
             split_file: str | Path | None = None, patches: int = 1024, seed: int = 0, progress: bool = True) -> dict:
    """Quantise a trained model's patch network to int8 for `--backend onnx-int8`.

    Activation ranges are calibrated on `patches` patches drawn (seeded) from the training
    patients. The int8 network goes beside the weights (`<weights>.int8.onnx`); the card records
    it and how far its calibrated probabilities and decisions stay from fp32 on the validation
    patients. The fp32 calibration (temperatures, threshold, post-processing) is kept.
    `model_name` None: the model `weights` holds (the default model without `weights`)."""
    model = load_model(model_name, weights)
    path = model.path
    folders = patient_ids(data_root)
    split_path = split_file or path.with_suffix(".split.json")
    split = load_split(split_path, folders)
    check_unseen(split["train"], "train", split_path, path, ("test",), "are test patients of",
                 "so the int8 network's activation ranges would be fitted on them; quantise on its own split (leave "
                 "out --split) or with train patients outside its test set")
    if not split["train"]:
        raise SplitError(f"{split_path}: no training patients, and the int8 activation ranges are calibrated on "
                         "training patches; pass a --split with training patients")
    slides = load_slides(split["train"], folders, "load train", progress)
    starts = np.cumsum([0] + [len(s) for s in slides])
    chosen = np.sort(np.random.default_rng(seed).choice(starts[-1], min(patches, starts[-1]), replace=False))
    pixels = np.concatenate([  # each slide normalised as a whole (as scoring does), only its chosen patches kept
        normalise_slide(slide, model.colour_reference).pixels[chosen[(chosen >= start) & (chosen < end)] - start]
        for slide, start, end in zip(slides, starts[:-1], starts[1:])])
    mean, std = torch.tensor(model.mean), torch.tensor(model.std)
    inputs = to_input(torch.from_numpy(pixels), mean, std, channels_last=False).numpy()
    data = quantize_backbone(model.network.backbone, inputs)
    record = {"file": model.int8_path.name, "sha256": hashlib.sha256(data).hexdigest(),
              "weights_sha256": model.sha256, "calibration_patches": len(chosen),
              "calibration_from": "training patients", "seed": seed,
              "method": "ONNX Runtime static quantisation, QDQ, per-channel int8 weights (reduce_range), "
                        "uint8 activations"}
    val_slides = [s for s in load_slides(split["val"], folders, "load val", progress) if s.has_labels]
    if val_slides:
        record["validation"] = int8_agreement(model, val_slides, data)
    card = {**model.card, "int8": record}
    with atomic_paths(model.int8_path, card_path(path)) as (int8_file, card_file):  # together, or neither
        atomic_write_bytes(int8_file, data)
        write_json(card_file, card)
    return card


def weight_average(network: PatchClassifier, decay: float) -> AveragedModel | None:
    """An exponential moving average of `network`'s weights and batch-norm statistics (a copy that
    `update_parameters(network)` moves towards it by 1 - `decay` after each step); None when
    `decay` is 0. Averaging damps the epoch-to-epoch swings of the validation AUC that early
    stopping and the choice of the kept epoch read."""
    if not decay:
        return None
    return AveragedModel(network, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def training_step(network: PatchClassifier, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
                  index: torch.Tensor, grid_shape: tuple[int, int, int], bf16: bool) -> float:
    """One optimiser step on a batch of grid windows; returns its loss: the patch logits' binary
    cross-entropy, plus the context logits' for a model with a context head. `bf16`: the forward
    pass under bfloat16 autocast (the losses in float32)."""
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=bf16):
        patch_logit, context_logit = network(x, index, grid_shape)
    loss = F.binary_cross_entropy_with_logits(patch_logit.float(), y)
    if network.context is not None:
        loss = loss + F.binary_cross_entropy_with_logits(context_logit.float(), y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def training_command(data_root: str | Path, model_name: str, out: str | Path, config: TrainConfig,
                     split_file: str | Path | None = None) -> str:
    """The `idcmap train` command line that reproduces a run (recorded in the model card)."""
    split = (f"--split {shlex.quote(str(split_file))}" if split_file else
             f"--test-fraction {config.test_fraction:g} --val-fraction {config.val_fraction:g}")
    return (f"idcmap train {shlex.quote(str(data_root))} --model {model_name} -o {shlex.quote(str(out))} {split} "
            f"--epochs {config.epochs} --patience {config.patience} --window {config.window} "
            f"--batch-patches {config.batch_patches} --lr {number_text(config.learning_rate)} "
            f"--stain-jitter {number_text(config.stain_jitter)} --seed {config.seed}"
            + (f" --weight-decay {number_text(config.weight_decay)}" if config.weight_decay != TrainConfig.weight_decay
               else "")
            + (f" --ema {number_text(config.ema)}" if config.ema else "")
            + (f" --scattered-repeat {config.scattered_repeat}" if config.scattered_repeat != 1 else "")
            + f" --device {config.device} --precision {config.precision}"
            + (" --colour-normalise" if config.colour_normalise else ""))


def split_fractions(split: dict, split_file: str | Path | None) -> dict:
    """The test and validation fractions a reused split file (--split) was drawn with, as it records
    them (None where it does not), in place of the command line's unused ones; {} for a drawn split."""
    return {key: split.get(key) for key in ("test_fraction", "val_fraction")} if split_file else {}


def check_outputs(out: Path) -> None:
    """OutputError before any training when `out`, its card, split or checkpoint could not be written:
    one of them is a folder, or the folder they go in is not writable (or not a folder)."""
    if out.suffix != ".pt":  # m.seed1 and m.seed2 would share m.json, m.split.json and m.ckpt
        raise OutputError(f"{out}: name the weights file <name>.pt (its card, split and checkpoint are named after "
                          "it: <name>.json, <name>.split.json, <name>.ckpt)")
    written = [out, card_path(out), out.with_suffix(".split.json"), out.with_suffix(".ckpt")]
    for path in written:
        if path.is_dir():
            raise OutputError(f"{path}: is a folder, not a file training can write; move it away or pass another -o")
    folder = next(p for p in out.absolute().parents if p.exists())  # the one to write in, or to create it in
    try:  # a real file, not os.access: that misjudges ACLs, root and some network file systems
        if not folder.is_dir():
            raise NotADirectoryError
        tempfile.TemporaryFile(dir=folder).close()
    except OSError as err:
        raise OutputError(f"{folder}: not a writable folder, so {out} cannot be written; choose another -o") from err


def diverged(out: Path, epoch: int, loss: float, config: TrainConfig, checkpoint: Path) -> str:
    """The error line for a training run whose loss became `loss` (NaN or infinite) in `epoch`."""
    again = f"Delete {checkpoint} (resuming would repeat the same steps) and train" if checkpoint.is_file() else "Train"
    return (f"{out}: training diverged in epoch {epoch} (loss {loss}), so no weights were written. "
            f"{again} again with a lower --lr (this run: {config.learning_rate:g})")


CHECKPOINT_REMEDY = "delete it, or train without --resume"


def patient_sets(split: dict) -> dict[str, list[str]]:
    """A split's train, val and test patients, each sorted: what a checkpoint's run trained on."""
    return {name: sorted(split[name]) for name in SPLIT_SETS}


def resume_from(path: Path, model_name: str, network: PatchClassifier, optimizer: torch.optim.Optimizer,
                scheduler: torch.optim.lr_scheduler.LRScheduler, rng: np.random.Generator,
                config: TrainConfig, split: dict,
                averaged: AveragedModel | None = None) -> tuple[list[dict], dict | None, float, int, str, dict | None]:
    """Restore a run from its checkpoint: network, optimizer, scheduler, both RNGs and the weight
    average (`averaged`, of a run with --ema) in place; returns (history, best state, best AUC,
    stale epochs, the precision it trained in: fp32 for checkpoints older than --precision, the
    colour reference it trained with as stored or None). WeightsError naming the checkpoint when it
    is not one, or belongs to another run (another model, another idcmap version); OptionError when
    it was trained with another recipe (`recipe_of(config)`) or on another split. Checkpoints older
    than the recorded recipe and split are checked for --ema alone."""
    state = load_torch_file(path, "an idcmap training checkpoint", CHECKPOINT_REMEDY)
    misfit = (f"{path}: this checkpoint does not fit a {model_name!r} training run (another model's, or from "
              f"another idcmap version); {CHECKPOINT_REMEDY}")
    trained_as = state.get("model", model_name) if isinstance(state, dict) else model_name  # older: unrecorded
    if trained_as != model_name:  # e.g. cancernet and cancernet-smooth: one network, other calibrations
        raise OptionError(f"--model {model_name}: {path} is a checkpoint of a {trained_as!r} training run; resume "
                          f"with --model {trained_as}, or train without --resume")
    try:
        network.load_state_dict(state["network"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        rng.bit_generator.state = state["numpy_rng"]
        torch.set_rng_state(state["torch_rng"])
        change = recipe_change(state.get("recipe") or {"ema": float(state.get("ema", 0.0))}, config)
        if change is not None:
            now, trained = change
            raise OptionError(f"{now}: {path} was trained with {trained}; resume with {trained}, or train without "
                              f"--resume")
        if state.get("split", patient_sets(split)) != patient_sets(split):
            raise OptionError(f"{path} was trained on another split of the patients; resume with the split it was "
                              "trained on (the same --split, or the same --seed and fractions that drew it), or train "
                              "without --resume")
        if averaged is not None:
            averaged.load_state_dict(state["averaged"])
        history, best_state, best_auc, stale = state["history"], state["best_state"], state["best_auc"], state["stale"]
        precision = state.get("precision", "fp32")
        if precision not in ("bf16", "fp32"):
            raise ValueError(precision)
        colour = state.get("colour_reference")
        if colour is not None:
            ColourReference.from_stored(colour)
    except (KeyError, TypeError, ValueError, RuntimeError) as err:
        raise WeightsError(misfit) from err
    if not (isinstance(history, list) and isinstance(best_auc, float) and isinstance(stale, int)
            and (best_state is None or isinstance(best_state, dict) and best_state.keys() == state["network"].keys())):
        raise WeightsError(misfit)
    return history, best_state, best_auc, stale, precision, colour


def train(data_root: str | Path, model_name: str, out: str | Path, config: TrainConfig,
          split_file: str | Path | None = None, resume: bool = False, progress: bool = True) -> dict:
    """Train `model_name` on the train patients of `data_root`, early-stop and calibrate on val,
    and write `out` (.pt weights), its model card (.json) and its split (.split.json). `progress`
    False: no progress bars."""
    config.validate()
    spec = get_spec(model_name)
    out = Path(out)
    check_outputs(out)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    folders = patient_ids(data_root)
    split = load_split(split_file, folders) if split_file else make_split(sorted(folders), config.seed, config.test_fraction,
                                                                       config.val_fraction)
    if split_file and (not split["train"] or not split["val"]):
        raise SplitError(f"{split_file}: its train and val lists must each name a patient; add them, or leave out "
                         "--split to draw one")
    empty = [] if split_file else [name for name in SPLIT_SETS if not split[name]]
    if empty:  # of the split drawn here (a given --split may leave test empty: its patients, its choice)
        sizes = ", ".join(f"{len(split[name])} {name}" for name in SPLIT_SETS)
        raise OptionError(f"--test-fraction {config.test_fraction}, --val-fraction {config.val_fraction}: leave no "
                          f"{' and no '.join(empty)} patient among the {len(folders)} of {data_root} ({sizes}); "
                          "change the fractions, or use more patients")
    train_slides = [s for _, s in load_labelled_slides(split["train"], folders, "training", "load train", progress)]
    if not train_slides:
        raise SplitError(f"{split_file or data_root}: no training patient carries labels (_class0/_class1 in its file "
                         "names, or 0/ and 1/ folders); training needs labelled patches")
    val_slides = [s for s in load_slides(split["val"], folders, "load val", progress) if s.has_labels]
    remedy = "pass a --split whose val patients include one" if split_file else "use more patients or another --seed"
    require_mixed_validation(val_slides, split_file or data_root, remedy)
    reference = colour_reference(train_slides) if config.colour_normalise else None
    train_slides = [normalise_slide(s, reference) for s in train_slides]  # val: the scorer normalises
    mean, std = pixel_statistics(train_slides)
    network = build_model(model_name)
    averaged = weight_average(network, config.ema)
    evaluated = network if averaged is None else averaged.module  # what is validated, kept and stored
    scorer_model = LoadedModel(model_name, evaluated, tuple(mean), tuple(std), Calibration(), sha256="",
                               colour_reference=reference)
    scorer = Scorer(scorer_model, config.device, backend="torch")
    device = scorer.device
    if config.precision == "bf16" and device.type == "cpu" and not cpu_has_bf16():
        log.warning("--precision bf16: this CPU has no native bfloat16 (AVX512-BF16/AMX), so training "
                    "will likely be slower than in fp32; use --precision auto or fp32")
    network.to(device).to(memory_format=torch.channels_last)
    if averaged is not None:
        averaged.to(device)
    optimizer = torch.optim.AdamW(network.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=config.epochs)
    checkpoint_path = out.with_suffix(".ckpt")
    history: list[dict] = []
    best_state, best_auc, epoch0, stale = None, -1.0, 0, 0
    if resume and checkpoint_path.is_file():
        history, best_state, best_auc, stale, trained_in, colour = resume_from(checkpoint_path, model_name, network,
                                                                               optimizer, scheduler, rng, config,
                                                                               split, averaged)
        if (colour is None) != (reference is None):
            trained = "with colour normalisation" if colour is not None else \
                "without colour normalisation (or by an idcmap that did not record it)"
            raise OptionError(f"--colour-normalise: {checkpoint_path} was trained {trained}; "
                              f"resume with the same setting, or train without --resume")
        if colour is not None and colour != reference.as_dict():
            raise OptionError(f"--colour-normalise: {checkpoint_path} was trained with another colour reference "
                              f"(other training slides?); resume on the same data and split, or train without --resume")
        if config.precision not in ("auto", trained_in):
            raise OptionError(f"--precision {config.precision}: {checkpoint_path} was trained in {trained_in}; "
                              f"resume with --precision {trained_in} (or auto), or train without --resume")
        config = replace(config, precision=trained_in)  # one precision for the whole run, as the card says
        epoch0 = len(history)
        log.info("resumed from %s at epoch %d", checkpoint_path, epoch0)
        if epoch0 >= config.epochs:
            log.warning("%s already ran %d epochs (--epochs %d): no more training, only the best epoch's "
                        "calibration and files", checkpoint_path, epoch0, config.epochs)
    # recorded as run: `auto` resolved, so the card's command repeats this run on any machine
    config = replace(config, device=str(device), precision=training_precision(config.precision, device))
    split_path = out.with_suffix(".split.json")
    maker = BatchMaker(train_slides, config, torch.tensor(mean), torch.tensor(std), rng)
    autocast = config.precision == "bf16"
    scattered = {i for i, slide in enumerate(train_slides) if not slide.is_whole}
    started = time.time()
    for epoch in range(epoch0, config.epochs):
        if stale >= config.patience:
            break
        network.train()
        windows = grid_windows(train_slides, config.window, rng)
        windows += [w for w in windows if w.slide in scattered] * (config.scattered_repeat - 1)
        total_loss, seen = 0.0, 0
        bar = progress_bar(maker.batches(windows), progress, desc=f"epoch {epoch + 1}/{config.epochs}",
                           unit="batch", total=None, leave=False)
        for x, y, index, grid_shape in bar:
            x, y, index = x.to(device), y.to(device), index.to(device)
            loss = training_step(network, optimizer, x, y, index, grid_shape, autocast)
            if not math.isfinite(loss):
                raise TrainingError(diverged(out, epoch + 1, loss, config, checkpoint_path))
            if averaged is not None:
                averaged.update_parameters(network)
            total_loss += loss * len(y)
            seen += len(y)
            bar.set_postfix(loss=f"{total_loss / seen:.4f}")
        scheduler.step()
        evaluated.eval()
        scored = collect_scores(scorer, val_slides)
        val_labels = np.concatenate([s.labels for s, _ in scored])
        val_logits = np.concatenate([r.context_logit for _, r in scored])
        record = {
            "epoch": epoch + 1,
            "train_loss": total_loss / max(seen, 1),
            "val_loss": metrics.log_loss(val_labels, val_logits),
            "val_auc": mean_patient_auc(scored),
            "val_patch_auc": mean_patient_auc(scored, patch_only=True),
            "val_pooled_auc": metrics.roc_auc(val_labels, val_logits),
            "seconds": round(time.time() - started, 1),
        }
        history.append(record)
        log.info("epoch %d: %s", epoch + 1, record)
        if progress:
            tqdm.write(json.dumps(record))
        if best_state is None or record["val_auc"] > best_auc:
            best_auc, stale = record["val_auc"], 0
            best_state = {k: v.detach().cpu().clone() for k, v in evaluated.state_dict().items()}
        else:
            stale += 1
        save_checkpoint(checkpoint_path, {
            "model": model_name, "network": network.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "history": history, "best_state": best_state,
            "best_auc": best_auc, "stale": stale, "numpy_rng": rng.bit_generator.state,
            "torch_rng": torch.get_rng_state(), "precision": config.precision, **colour_fields(reference),
            "recipe": recipe_of(config), "split": patient_sets(split),
            **({"averaged": averaged.state_dict()} if averaged is not None else {}),
        })
    evaluated.load_state_dict(stored_precision(best_state))  # calibrated as shipped: bfloat16 weights
    evaluated.eval()
    calibration, choice = fit_calibration(collect_scores(scorer, val_slides, progress), network.context_reach,
                                          smoothing_sigmas(spec), progress=progress)
    # weights, card and split replace earlier ones together, once the run succeeded: a failed run
    # leaves the earlier weights with their own split, which `evaluate` reads to know what they saw
    with atomic_paths(out, card_path(out), split_path) as (weights_file, card_file, split_file_written):
        save_weights(weights_file, {
            "model": model_name,
            "state_dict": {k: v.cpu() for k, v in evaluated.state_dict().items()},
            "mean": mean, "std": std, "calibration": asdict(calibration),
            **colour_fields(reference),
        })
        card = {
            "model": model_name,
            "architecture": spec.description,
            "parameters": sum(p.numel() for p in network.parameters()),
            "input": input_description(reference),
            "mean": mean, "std": std,
            **colour_fields(reference),
            "calibration": asdict(calibration),
            "calibration_fit": choice,
            "training": {**asdict(config), **split_fractions(split, split_file),
                         "command": training_command(data_root, model_name, out, config, split_file),
                         "data_root": str(data_root), "split_file": split_path.name,
                         "train_patients": len(split["train"]), "val_patients": len(split["val"]),
                         "test_patients": len(split["test"]),
                         "train_patches": int(sum(len(s) for s in train_slides)),
                         "epochs_run": len(history), "best_val_auc": best_auc,
                         "seconds": round(time.time() - started, 1),
                         "date": dt.date.today().isoformat()},
            "history": history,
            "sha256": sha256_of(weights_file),
        }
        write_json(card_file, card)
        save_split(split, split_file_written)
    checkpoint_path.unlink(missing_ok=True)
    return card
