"""`render` end to end: folder -> slide -> scores -> regions -> files, for one or many patients.

Each patient's files are written into a hidden temp folder that is renamed into place only when
all of them are complete, so an interrupted or failed patient never leaves half its outputs.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Iterator

import numpy as np
import shapely
from shapely.geometry import mapping

from .errors import IdcmapError, OptionError, OutputError
from .export import (SUMMARY_FIELDS, SUMMARY_TYPES, atomic_write_bytes, atomic_write_text, encode_png, file_in_the_way,
                     write_csv, write_json, write_npy)
from .loader import (DEFAULT_MAX_MOSAIC_PIXELS, PATCH_SIZE, Slide, find_patient_folders, folder_name, inputs_sha256,
                     load_slide, named_patient)
from .models import Calibration, load_model
from .progress import progress_bar
from .regions import dice, idc_area_fraction, predicted_mask, region_polygons, slide_threshold
from .render import overlay_png, overview_html
from .scoring import Scorer, SlideScores

log = logging.getLogger(__name__)

PATIENT_FILES = ("mosaic.png", "overlay.png", "probabilities.csv", "probabilities.npy", "regions.geojson",
                 "summary.json")
RECORDED_FILES = tuple(name for name in PATIENT_FILES if name != "summary.json")
"""The outputs whose size and sha256 summary.json records, for `--resume` to check."""
# the longest name a folder may have (most file systems) less what the staging and trash names add
# (".NAME.0123abcd.tmp", ".NAME.old.0123abcd")
MAX_PATIENT_NAME_BYTES = 255 - len(".old.0123abcd") - 1
THRESHOLD_TAGS = {"fixed": "", "scattered": " (scattered samples)", "otsu": " (Otsu)", "otsu floor": " (Otsu's floor)"}
"""The overlay's note after a slide's threshold, by `regions.SlideThreshold.source`."""
PROBABILITY_FIELDS = ["file", "x", "y", "width", "height", "label", "patch_probability", "probability",
                      "predicted_idc"]


@dataclass
class RenderOptions:
    """What `idcmap render` takes besides its folders (None = the model's fitted default)."""

    model: str | None = None  # None: the model the weights file holds, or DEFAULT_MODEL
    weights: Path | None = None
    device: str = "auto"
    backend: str = "auto"
    mixed_precision: bool = False
    batch_size: int | None = None
    threshold: float | None = None
    threshold_rule: str | None = None
    smoothing_sigma: float | None = None
    min_region_cells: int | None = None
    max_hole_cells: int | None = None
    max_mosaic_pixels: int = DEFAULT_MAX_MOSAIC_PIXELS
    jobs: int | None = None  # CPU threads for CPU scoring (None: every core)
    resume: bool = False
    progress: bool = True
    shard: tuple[int, int] | None = None  # (index, count): render patients index, index+count, ...


def shard_from_env(environ: dict[str, str]) -> tuple[int, int]:
    """(RANK, WORLD_SIZE) as torchrun sets them; (0, 1) outside torchrun, with a warning."""
    if "WORLD_SIZE" not in environ:
        log.warning("--shard env: WORLD_SIZE is not set (not under torchrun); rendering every patient in one shard")
    try:
        return int(environ.get("RANK", 0)), int(environ.get("WORLD_SIZE", 1))
    except ValueError as err:
        raise OptionError(f"RANK/WORLD_SIZE are not integers ({err}); run under torchrun or pass --shard I/N") from err


def parse_shard(text: str, environ: dict[str, str]) -> tuple[int, int]:
    """`I/N` (0 <= I < N) or `env` (torchrun's RANK/WORLD_SIZE) -> (I, N)."""
    if text == "env":
        index, count = shard_from_env(environ)
    else:
        try:
            index, count = (int(part) for part in text.split("/"))
        except ValueError:
            raise OptionError(f"--shard {text}: write it as I/N, e.g. 0/4, or env under torchrun") from None
    if not 0 <= index < count:
        raise OptionError(f"--shard {text}: need 0 <= I < N")
    return index, count


def summary_name(shard: tuple[int, int] | None) -> str:
    """summary.csv, or summary-<I>-of-<N>.csv for one shard of a sharded run."""
    return "summary.csv" if shard is None or shard[1] == 1 else f"summary-{shard[0]}-of-{shard[1]}.csv"


def _file_record(path: Path) -> dict:
    """Size and sha256 of an output file, as summary.json records them for `--resume`."""
    data = path.read_bytes()
    return {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}


@dataclass(frozen=True)
class InputFolders:
    """A run's input patient folders (resolved), and every folder above them, for quick overlap checks."""

    folders: frozenset[Path]
    above: frozenset[Path]

    @classmethod
    def of(cls, folders: list[Path]) -> InputFolders:
        resolved = [f.resolve() for f in folders]
        return cls(frozenset(resolved), frozenset(parent for f in resolved for parent in f.parents))


def check_output_folder(out: Path, name: str, inputs: InputFolders) -> None:
    """Refuse, before anything is written, a patient's output folder out/<name> that is, holds or
    lies inside any input patient folder of the run, that is a file or lies below one, or that
    holds files idcmap did not write (hidden ones aside): replacing it would lose them."""
    out_dir = out / name
    if len(os.fsencode(out_dir.name)) > MAX_PATIENT_NAME_BYTES:
        raise OutputError(f"{out_dir}: the patient folder's name is too long for idcmap's outputs "
                          f"({len(os.fsencode(out_dir.name))} bytes, at most {MAX_PATIENT_NAME_BYTES}); "
                          "rename the patient folder")
    blocking = file_in_the_way(out_dir.parent)  # out itself is checked once per run
    if blocking is not None and blocking != out:
        raise OutputError(f"{blocking}: a file where idcmap writes the folder of {name}; move it or choose another -o")
    target = out_dir.resolve()
    if target in inputs.above or target in inputs.folders or not inputs.folders.isdisjoint(target.parents):
        source = min(f for f in inputs.folders if f == target or f in target.parents or target in f.parents)
        raise OutputError(f"{out_dir}: would replace, hold or lie inside the input folder {source}; "
                          "choose an -o folder outside the patient folders")
    if out_dir.is_symlink() or (out_dir.exists() and not out_dir.is_dir()):
        raise OutputError(f"{out_dir}: exists and is not an idcmap output folder; move it or choose another -o")
    if out_dir.is_dir():
        foreign = sorted(name for name in os.listdir(out_dir) if name not in PATIENT_FILES and not name.startswith("."))
        if foreign:
            raise OutputError(f"{out_dir}: holds files idcmap did not write ({', '.join(foreign[:3])}); move them "
                              "or choose another -o, so that re-rendering replaces nothing of yours")


def effective_calibration(model_calibration: Calibration, options: RenderOptions) -> Calibration:
    """The model's calibration with the user's overrides applied (a threshold given: the fixed rule,
    unless a rule is given too, and the same threshold for scattered samples)."""
    overrides = {k: getattr(options, k) for k in ("threshold", "threshold_rule", "smoothing_sigma", "min_region_cells",
                                                  "max_hole_cells") if getattr(options, k) is not None}
    if options.threshold is not None:
        overrides.setdefault("threshold_rule", "fixed")
        overrides["scattered_threshold"] = None
    calibration = replace(model_calibration, **overrides)
    unusable = calibration.problem()
    if unusable:
        raise OptionError(f"render options {overrides}: {unusable.removeprefix('its ')}; pass usable values")
    return calibration


def summarise(slide: Slide, folder: str, predicted: np.ndarray, threshold: float, calibration: Calibration,
              model_name: str, sha256: str) -> dict:
    """One patient's summary row (the fields of summary.csv); `folder`: its output folder below OUT;
    `threshold`: the slide's own (see `regions.slide_threshold`)."""
    labelled = slide.labels == 1
    return {
        "patient": slide.patient,
        "folder": folder,
        "status": "ok",
        "error": None,
        "patches": len(slide),
        "skipped_files": len(slide.skipped),
        "tissue_area_px": int(slide.areas.sum()),
        "predicted_idc_area_fraction": round(idc_area_fraction(slide, predicted), 6),
        "labelled_idc_area_fraction": round(idc_area_fraction(slide, labelled), 6) if slide.has_labels else None,
        "dice": round(dice(slide, predicted, labelled), 6) if slide.has_labels else None,
        "threshold": threshold,
        "min_region_cells": calibration.min_region_cells,
        "max_hole_cells": calibration.max_hole_cells,
        "model": model_name,
        "weights_sha256": sha256,
    }


def regions_geojson(slide: Slide, probability: np.ndarray, predicted: np.ndarray) -> dict:
    """Predicted IDC regions as a GeoJSON FeatureCollection in slide pixel coordinates (QuPath-ready)."""
    centres = slide.xy + slide.sizes[:, ::-1] / 2
    features = []
    for number, polygon in enumerate(region_polygons(slide, predicted), start=1):
        inside = predicted & shapely.contains_xy(polygon, centres[:, 0], centres[:, 1])
        features.append({
            "type": "Feature",
            "id": f"{slide.patient}-idc-{number}",
            "geometry": mapping(polygon),
            "properties": {
                "objectType": "annotation",
                "name": f"IDC region {number}",
                "classification": {"name": "IDC", "color": [255, 45, 45]},
                "patches": int(inside.sum()),
                "area_px": float(polygon.area),
                "mean_probability": round(float(probability[inside].mean()), 6),
                "max_probability": round(float(probability[inside].max()), 6),
            },
        })
    return {"type": "FeatureCollection", "features": features}


def _probability_rows(slide: Slide, scores: SlideScores, predicted: np.ndarray) -> list[dict]:
    return [
        {"file": path.name, "x": int(x), "y": int(y), "width": int(w), "height": int(h),
         "label": None if label < 0 else int(label), "patch_probability": f"{pp:.6f}",
         "probability": f"{p:.6f}", "predicted_idc": int(m)}
        for path, (x, y), (h, w), label, pp, p, m in zip(
            slide.paths, slide.xy.tolist(), slide.sizes.tolist(), slide.labels.tolist(),
            scores.patch_probability.tolist(), scores.probability.tolist(), predicted.tolist())
    ]


def render_patient(folder: Path, out_dir: Path, scorer: Scorer, calibration: Calibration,
                   options: RenderOptions, name: str | None = None) -> dict:
    """Write every output file of one patient into `out_dir` (all or nothing); return its summary,
    whose `folder` is `name` (out_dir's path below OUT; default: out_dir's own name)."""
    name = out_dir.name if name is None else name
    started = time.perf_counter()
    slide = load_slide(folder, max_mosaic_pixels=options.max_mosaic_pixels)
    loaded = time.perf_counter()
    scores = scorer.score(slide, progress=options.progress)
    log.debug("%s: %d patches (%d files skipped) loaded in %.2f s, scored in %.2f s", name, len(slide),
              len(slide.skipped), loaded - started, time.perf_counter() - loaded)
    threshold = slide_threshold(slide, scores.probability, calibration)
    predicted = predicted_mask(slide, scores.probability, calibration, threshold)
    mosaic = slide.mosaic()
    row = summarise(slide, name, predicted, threshold.value, calibration, scorer.model.name, scorer.model.sha256)
    details = {
        **row,
        "grid": {"origin_x": slide.origin_xy[0], "origin_y": slide.origin_xy[1], "cell_px": PATCH_SIZE,
                 "shape": list(slide.grid_shape),
                 "note": "probabilities.npy[r, c] covers slide pixels x = origin_x + c*cell_px, "
                         "y = origin_y + r*cell_px; NaN where no patch"},
        "mosaic_origin_xy": list(slide.origin_xy),
        "calibration": asdict(calibration),
        "runtime": scorer.runtime,  # how the patch network ran: backend, int8 network, fp16
        "colour_normalised": scores.colour_normalised,
        "skipped": slide.skipped,
        "inputs_sha256": slide.inputs_sha256,
    }
    labelled = slide.labels >= 0
    if labelled.any() and not labelled.all():
        log.warning("%s: only %d of %d patch names carry a class; the labelled IDC area and Dice are left out",
                    folder, int(labelled.sum()), len(slide))
    subtitle = (f"{len(slide)} patch{'es' if len(slide) != 1 else ''} · "
                f"predicted IDC area {row['predicted_idc_area_fraction']:.1%}"
                + (f" · labelled {row['labelled_idc_area_fraction']:.1%} · Dice {row['dice']:.2f}"
                   if slide.has_labels else "")
                + f" · {scorer.model.name}, threshold {row['threshold']:.2f}"
                + THRESHOLD_TAGS[threshold.source])
    with ThreadPoolExecutor(1) as encoder:
        # zlib releases the GIL: the mosaic PNG is encoded while the overlay and tables are made
        # (0.055-0.09 s of a 0.8 s CancerNet render in 4 of 5 runs of benchmarks/bench_render_stages.py)
        mosaic_png = encoder.submit(encode_png, mosaic)
        overlay = overlay_png(slide, mosaic, scores.probability, predicted, f"Patient {slide.patient}", subtitle)
        rows = _probability_rows(slide, scores, predicted)
        regions = regions_geojson(slide, scores.probability, predicted)
        mosaic_bytes = mosaic_png.result()
    with _staged(out_dir) as staging:  # written in PATIENT_FILES' order
        atomic_write_bytes(staging / "mosaic.png", mosaic_bytes)
        atomic_write_bytes(staging / "overlay.png", overlay)
        write_csv(staging / "probabilities.csv", PROBABILITY_FIELDS, rows)
        write_npy(staging / "probabilities.npy", slide.grid_values(scores.probability).astype(np.float32))
        write_json(staging / "regions.geojson", regions)
        details["files"] = {name: _file_record(staging / name) for name in RECORDED_FILES}
        write_json(staging / "summary.json", details)
    return row


def record_failure(out_dir: Path, row: dict) -> None:
    """Replace a failed patient's earlier outputs by a summary.json that says it failed and why,
    so that `export` and `--resume` see the failure rather than outputs of older inputs."""
    with _staged(out_dir) as staging:
        write_json(staging / "summary.json", row)


TRASH = re.compile(r"\.(.+)\.old\.[0-9a-f]{8}")
"""A patient output folder's earlier outputs, moved aside while new ones are moved in (`_swap_into_place`)."""


@contextmanager
def _staged(out_dir: Path) -> Iterator[Path]:
    """A hidden staging folder beside `out_dir`, swapped into its place if the block succeeds."""
    _remove_leftovers(out_dir)
    staging = out_dir.parent / f".{out_dir.name}.{uuid.uuid4().hex[:8]}.tmp"
    try:
        staging.mkdir(parents=True)
    except OSError as err:
        raise OutputError(f"{staging.parent}: cannot create or write in this folder ({err.strerror}); "
                          "choose a writable -o") from err
    try:
        yield staging
        _swap_into_place(staging, out_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    _remove_leftovers(out_dir)  # a killed render's trash, kept while it held the only outputs


def _remove_leftovers(out_dir: Path) -> None:
    """Remove what a killed earlier render of this patient left beside `out_dir`: its hidden
    staging folders, and its trash folders once `out_dir` exists (else a trash folder holds the
    only copy of the earlier outputs and is kept). Only one process renders a given patient."""
    if not out_dir.parent.is_dir():
        return
    staging = re.compile(rf"\.{re.escape(out_dir.name)}\.[0-9a-f]{{8}}\.tmp")
    for leftover in out_dir.parent.iterdir():
        trash = TRASH.fullmatch(leftover.name)
        if staging.fullmatch(leftover.name) or (trash and trash[1] == out_dir.name and out_dir.is_dir()):
            shutil.rmtree(leftover, ignore_errors=True)


def _swap_into_place(staging: Path, out_dir: Path) -> None:
    """Replace `out_dir` by `staging` (old outputs removed only after the new ones are in place;
    if the new ones cannot be moved in, the old ones are moved back). Hidden files in `out_dir`,
    which idcmap never writes, are moved into the new one."""
    trash = out_dir.parent / f".{out_dir.name}.old.{uuid.uuid4().hex[:8]}" if out_dir.exists() else None
    try:
        if trash is not None:
            out_dir.rename(trash)
        try:
            staging.rename(out_dir)
        except BaseException:  # an OSError, or Ctrl-C between the two renames: the earlier outputs go back
            if trash is not None:
                trash.rename(out_dir)
            raise
    except OSError as err:
        raise OutputError(f"{out_dir}: cannot move outputs into place ({err.strerror}); "
                          "earlier outputs, if any, are kept") from err
    if trash is not None:
        try:  # hidden files of the user's (.DS_Store, notes) stay with the patient's outputs
            for kept in sorted(p for p in trash.iterdir() if p.name.startswith(".")):
                kept.rename(out_dir / kept.name)
        except OSError as err:
            log.warning("%s: hidden files of the earlier outputs could not be moved back in (%s); they lie in %s "
                        "until the next render of this patient: move them", out_dir, err.strerror, trash)
            return
        shutil.rmtree(trash, ignore_errors=True)
        if trash.exists():
            log.warning("%s: the earlier outputs could not be removed; delete it (the next render of this patient "
                        "tries again)", trash)


def completed_summary(out_dir: Path, input_folder: Path, sha256: str, calibration: Calibration,
                      runtime: dict) -> dict | None:
    """The summary row of an earlier render of the same input files with the same model, runtime
    and settings, whose output files are all there as written (sizes and sha256 match)."""
    try:
        summary = json.loads((out_dir / "summary.json").read_text())
        if not isinstance(summary, dict) or summary.get("status") != "ok" or not isinstance(
                summary.get("calibration"), dict):
            return None
        recorded = {"threshold_rule": "fixed", "scattered_threshold": None,  # summaries written before either
                    **summary["calibration"]}
        same = (summary.get("weights_sha256") == sha256 and recorded == asdict(calibration)
                and summary.get("runtime") == runtime and summary.get("inputs_sha256") == inputs_sha256(input_folder))
        files = summary.get("files")
        intact = isinstance(files, dict) and all(
            files.get(name) == _file_record(out_dir / name) for name in RECORDED_FILES)
        return summary_row(summary, out_dir / "summary.json") if same and intact else None
    except (OSError, ValueError, RecursionError, IdcmapError):  # RecursionError: JSON nested absurdly deep
        return None


def render_folder(folder: str | Path, out: str | Path, options: RenderOptions) -> list[dict]:
    """Render one patient folder or every patient folder below `folder` into `out`.

    One model load serves all patients. A patient that fails gets status `failed` and its
    error in summary.csv; the others go on. Returns this run's summary rows. out/summary.csv
    lists every patient rendered into `out`, by this run or earlier ones (a shard's
    summary-I-of-N.csv: its own patients).
    """
    folder, out = Path(folder), Path(out)
    folders = find_patient_folders(folder)
    inputs = InputFolders.of(folders)
    model = load_model(options.model, options.weights)
    calibration = effective_calibration(model.calibration, options)
    model = replace(model, calibration=calibration)  # the scorer applies its smoothing and temperatures
    scorer = Scorer(model, options.device, options.batch_size, options.mixed_precision, options.backend, options.jobs)
    log.debug("%d patient folder(s) at or below %s; model %s (%s), %s on %s, calibration %s", len(folders), folder,
              model.name, model.path, scorer.backend, scorer.device, asdict(calibration))
    if folders == [folder]:
        names = [folder_name(folder)]  # `render .` inside a patient folder
    else:
        names = [f.relative_to(folder).as_posix() for f in folders]
    if options.shard is not None:
        index, count = options.shard
        folders, names = folders[index::count], names[index::count]
    blocking = file_in_the_way(out)  # every output place is checked before anything is written
    if blocking is not None:
        where = "exists" if blocking == out else f"lies below {blocking}, which exists"
        raise OutputError(f"{out}: {where} and is not a folder; choose another -o")
    rendered = patient_output_around(out)
    if rendered is not None:
        raise OutputError(f"{out}: inside {rendered}, the output folder of a rendered patient, whose files idcmap "
                          "manages; choose an -o outside it")
    summary = out / summary_name(options.shard)
    overview_path(summary)
    for name in names:
        check_output_folder(out, name, inputs)
    mine = set(names) if options.shard is not None and options.shard[1] > 1 else None  # a shard lists its own
    rows: list[dict] = []
    try:
        resumed = _render_each(folders, names, out, scorer, calibration, options, rows)
    except BaseException:  # Ctrl-C, or an output error: list what is on disk now, not the last run's
        if rows:
            try:
                write_run_summary(out, merged_summaries(out, rows, mine), summary)
            except (OSError, IdcmapError) as err:
                log.warning("%s: not updated after the run stopped (%s); run `idcmap export %s` to rebuild it",
                            summary, err, out)
        raise
    write_run_summary(out, merged_summaries(out, rows, mine), summary)
    if resumed:
        log.warning("%d of %d patients were complete in %s and kept as they were (--resume)", resumed, len(rows), out)
    warn_copies(rows)
    return rows


def _render_each(folders: list[Path], names: list[str], out: Path, scorer: Scorer, calibration: Calibration,
                 options: RenderOptions, rows: list[dict]) -> int:
    """Render (or, with --resume, keep) each patient folder into out/<name>, appending its summary row
    to `rows` as it is done; return how many were kept by --resume."""
    resumed = 0
    for patient_folder, name in progress_bar(list(zip(folders, names)), options.progress and len(folders) > 1,
                                             desc="patients", unit="patient"):
        out_dir = out / name
        row = (completed_summary(out_dir, patient_folder, scorer.model.sha256, calibration, scorer.runtime)
               if options.resume else None)
        if row is not None:
            row["folder"] = name  # where it lies now (summaries written before idcmap recorded it lack it)
            log.info("%s: complete in %s, skipped (--resume)", name, out_dir)
            resumed += 1
        else:
            try:
                row = render_patient(patient_folder, out_dir, scorer, calibration, options, name)
            except Exception as err:  # noqa: BLE001 (idcmap errors, and bugs isolated per patient)
                if isinstance(err, OutputError):
                    raise
                if not isinstance(err, IdcmapError):  # a bug: the patient fails, the others go on
                    log.debug("%s: unexpected error", name, exc_info=True)
                    err = IdcmapError(f"{patient_folder}: unexpected {type(err).__name__} ({err}); please report "
                                      "it with `idcmap -v` output")
                log.info("%s: failed: %s", name, err)  # the CLI prints every failure at the end
                row = {field: None for field in SUMMARY_FIELDS}
                row.update(patient=named_patient(patient_folder), folder=name, status="failed", error=str(err),
                           model=scorer.model.name, weights_sha256=scorer.model.sha256)
                record_failure(out_dir, row)
        rows.append(row)
    return resumed


def overview_path(csv_path: Path) -> Path:
    """The overview page written beside the summary CSV `csv_path` (its name, .html); OutputError
    where the two would be one file or either is a folder."""
    page = csv_path.with_suffix(".html")
    if csv_path.suffix.lower() == ".html":  # the same file (on a case-blind file system too)
        raise OutputError(f"{csv_path}: the summary CSV would overwrite its overview page; name it <name>.csv")
    for path, what in ((csv_path, "summary CSV"), (page, "overview page")):
        if path.is_dir():
            raise OutputError(f"{path}: a folder where idcmap writes its {what}; move it or choose another -o")
    return page


def write_run_summary(out: Path, rows: list[dict], csv_path: Path) -> Path:
    """Write the summary CSV `csv_path` of the patients rendered into `out` (their summary `rows`)
    and, beside it, its overview page (figures and overlays to look through); return the page."""
    page = overview_path(csv_path)
    write_csv(csv_path, SUMMARY_FIELDS, rows)
    atomic_write_text(page, overview_html(rows, out, page))
    return page


def warn_copies(rows: list[dict]) -> None:
    """Warn about patients rendered from more than one folder (copies of one slide are counted apart)."""
    folders: dict[str, list[str]] = {}
    for row in rows:
        folders.setdefault(row["patient"], []).append(row["folder"])
    for patient, places in folders.items():
        if len(places) > 1:
            log.warning("patient %s was rendered from %d folders (%s): copies of one slide? each has its own row "
                        "in summary.csv", patient, len(places), ", ".join(places))


def folder_order(folder: str) -> tuple[str, ...]:
    """Sort key of a patient's output folder below OUT ("a/b"): folder by folder, as a tree lists
    them (so `batch/8916` comes before `batch-2/9035`), the same in every summary."""
    return tuple(folder.split("/"))


def _summary_paths(out: Path) -> Iterator[tuple[str, Path]]:
    """(folder below `out`, its summary.json) of every rendered patient below `out`, sorted
    (`folder_order`); hidden folders (staging, trash) left out, links to folders not followed, and
    a folder that cannot be listed named in a warning (its patients are missing from the summary),
    as is the trash of a render killed between its two renames (the only copy of that patient's outputs)."""
    def unreadable(err: OSError) -> None:
        log.warning("%s: cannot list this folder (%s); patients rendered into it are left out of the summary",
                    err.filename, err.strerror)

    found = {}
    for dirpath, dirnames, filenames in os.walk(out, onerror=unreadable):
        for name in dirnames:
            trash = TRASH.fullmatch(name)
            if trash and trash[1] not in dirnames:
                log.warning("%s: the outputs of %s, left there by a render that was killed; render that patient "
                            "again, or rename the folder back to %s", Path(dirpath) / name, trash[1], trash[1])
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]
        if "summary.json" in filenames and Path(dirpath) != out:
            found[Path(dirpath).relative_to(out).as_posix()] = Path(dirpath) / "summary.json"
    for folder in sorted(found, key=folder_order):
        yield folder, found[folder]


def read_summary(path: Path, folder: str) -> dict:
    """The summary row in a patient's summary.json; `folder` (its place below OUT) is taken from
    where the file lies. OutputError when it is unreadable or not idcmap's."""
    try:
        summary = json.loads(path.read_text())
    except (OSError, ValueError, RecursionError) as err:
        raise OutputError(f"{path}: unreadable summary ({str(err)[:200]}); render that patient again") from err
    if not isinstance(summary, dict) or summary.get("status") not in ("ok", "failed"):
        raise OutputError(f"{path}: not a summary idcmap wrote (no ok/failed status); render that patient again")
    return {**summary_row(summary, path), "folder": folder}


REQUIRED_FIELDS = {"ok": ("patient", "predicted_idc_area_fraction", "model"), "failed": ("patient", "error")}
"""The summary fields that a patient's summary.json holds for each status, in every idcmap version
(the others may be null, or absent from the summaries of earlier versions)."""
UNIT_FIELDS = ("predicted_idc_area_fraction", "labelled_idc_area_fraction", "dice", "threshold")
"""Summary fields whose values lie in [0, 1]."""


def summary_row(summary: dict, path: Path) -> dict:
    """The summary.csv columns of a patient's summary.json (`summary`, read from `path`);
    OutputError naming the file where one holds a value of another type than idcmap writes."""
    row = {field: summary.get(field) for field in SUMMARY_FIELDS}
    wrong = next((f for f, v in row.items()  # bool is an int to Python, never one in a summary
                  if isinstance(v, bool) or (v is not None and not isinstance(v, SUMMARY_TYPES[f]))
                  or (f in UNIT_FIELDS and v is not None and not 0 <= v <= 1)  # NaN fails too
                  or (SUMMARY_TYPES[f] is int and v is not None and v < 0)), None)
    if wrong is not None:
        raise OutputError(f"{path}: {wrong} is {json.dumps(row[wrong])[:40]}, not what idcmap writes there "
                          "(edited by hand?); render that patient again")
    missing = [f for f in REQUIRED_FIELDS.get(row["status"], ()) if row[f] is None]
    if missing:
        raise OutputError(f"{path}: a summary of status {row['status']} without {', '.join(missing)} "
                          "(edited by hand?); render that patient again")
    return row


def patient_output_around(path: Path) -> Path | None:
    """The patient output folder (one holding a summary.json idcmap wrote) that `path` is or lies
    in, if any: writing there would mix outputs into that patient's and block its next render."""
    for folder in (path, *path.resolve().parents):
        try:
            read_summary(folder / "summary.json", folder.name)
            return folder
        except OutputError:
            continue
    return None


def export_target(out: Path, output: Path | None) -> Path:
    """The summary CSV `export` writes: `output`, or out/summary.csv. OutputError where it has no
    file name, or where it or its overview page would land in a rendered patient's output folder
    (`patient_output_around`: replacing its summary.json, or leaving a file that blocks its next render)."""
    target = output if output is not None else out / "summary.csv"
    if target.name in ("", ".", ".."):
        raise OutputError(f"-o: {str(output)!r} is not a file name; name the CSV, e.g. -o {out / 'merged.csv'}")
    inside = patient_output_around(target.parent)
    if inside is not None:
        raise OutputError(f"{target}: inside the output folder of patient {inside.name} ({inside}), whose files "
                          f"idcmap manages; write it elsewhere, e.g. -o {out / 'merged.csv'}")
    return target


def collect_summaries(out: str | Path) -> list[dict]:
    """Summary rows of every rendered patient below `out` (from their summary.json), sorted by folder."""
    out = Path(out)
    rows = [read_summary(path, folder) for folder, path in _summary_paths(out)]
    if not rows and (out / "summary.json").is_file():
        raise IdcmapError(f"{out}: the output folder of one patient; export the folder it lies in ({out.parent})")
    if not rows:
        raise IdcmapError(f"{out}: no rendered patient (no */summary.json); run `idcmap render` first")
    warn_copies(rows)
    warn_mixed_models(rows)
    warn_missing_shards(out)
    return rows


def warn_mixed_models(rows: list[dict]) -> None:
    """Warn where the summaries come from more than one model or weights file: their area fractions
    and thresholds are not comparable (shards run with different --model or --weights?)."""
    used: dict[tuple, int] = {}
    for row in rows:
        key = (row["model"], (row["weights_sha256"] or "")[:12])
        used[key] = used.get(key, 0) + 1
    if len(used) > 1:
        log.warning("the summaries come from %d models or weights files (%s): their figures are not comparable; "
                    "render them again with one", len(used),
                    ", ".join(f"{model} {sha}: {n} patients" for (model, sha), n in sorted(used.items(), key=str)))


def warn_missing_shards(out: Path) -> None:
    """Warn where OUT holds the summaries of some shards of a `--shard I/N` run but not of all N
    (a shard not run yet, still running, or failed before its first patient)."""
    seen: dict[int, set[int]] = {}
    for path in out.glob("summary-*-of-*.csv"):
        shard = re.fullmatch(r"summary-(\d+)-of-(\d+)\.csv", path.name)
        if shard:
            seen.setdefault(int(shard[2]), set()).add(int(shard[1]))
    for count, shards in sorted(seen.items()):
        missing = sorted(set(range(count)) - shards)
        if missing:
            log.warning("%s: no summary of shard %s of %d (not run, still running, or failed before its first "
                        "patient): its patients are missing", out, ", ".join(map(str, missing)), count)


def merged_summaries(out: Path, rows: list[dict], folders: set[str] | None = None) -> list[dict]:
    """This run's `rows` with the summaries of the other patients already rendered into `out` (of
    those in `folders` alone, where given), sorted by folder. An earlier summary that cannot be read
    is left out with a warning: this run's outputs are complete, and `idcmap export` names the file."""
    by_folder = {row["folder"]: row for row in rows}
    for folder, path in _summary_paths(out):
        if folder not in by_folder and (folders is None or folder in folders):
            try:
                by_folder[folder] = read_summary(path, folder)
            except OutputError as err:
                log.warning("%s; left out of %s", err, out / "summary.csv")
    return [by_folder[folder] for folder in sorted(by_folder, key=folder_order)]
