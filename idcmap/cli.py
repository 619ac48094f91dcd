"""The `idcmap` command: parses options and calls the library. Errors become one line, exit 2."""
from __future__ import annotations

import logging
import math
import os
import sys
from collections.abc import Callable
from dataclasses import fields
from pathlib import Path

import click

from .errors import IdcmapError
from .export import json_text
from .loader import DEFAULT_MAX_MOSAIC_PIXELS
from .models import DEFAULT_MODEL, REGISTRY, THRESHOLD_RULES
from .scoring import BACKENDS
from .train_config import LIMITS, PRECISIONS, TrainConfig

log = logging.getLogger("idcmap")

MODEL_CHOICE = click.Choice(sorted(REGISTRY))
UNSHIPPED = ", ".join(name for name, spec in sorted(REGISTRY.items()) if not spec.weights_path.is_file())
UNSHIPPED_NOTE = f" Without shipped weights (train them, then pass --weights): {UNSHIPPED}." if UNSHIPPED else ""
DEVICE_HELP = "auto (a CUDA GPU when one is visible), cpu, cuda or cuda:N."
THRESHOLD_RULE_HELP = ("fixed: one threshold for every whole slide (scattered samples keep their own where the "
                       "model has one; --threshold sets one for all); otsu: each whole slide's own Otsu threshold "
                       "of its probabilities, never below half the fixed one (follows a slide scored higher or lower "
                       "than usual, but can over-call a slide with little IDC; scattered samples keep the fixed one, or "
                       "their own where the model has one)")


class FiniteFloatRange(click.FloatRange):
    """click's FloatRange, which also refuses NaN and infinities (click's own lets NaN through)."""

    def convert(self, value: object, param: click.Parameter | None, ctx: click.Context | None) -> float:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number.", param, ctx)
        return number


BACKEND_CHOICE = click.Choice(list(BACKENDS))


def training_option(name: str, help: str | None = None):
    """The `idcmap train` option for TrainConfig setting `name`: its type from the setting's
    `train_config.LIMITS` entry, its default from TrainConfig (one place for both)."""
    limit = LIMITS[name]
    kind = (click.IntRange if limit.whole else FiniteFloatRange)(
        limit.low, limit.high, min_open=limit.low_open, max_open=limit.high_open)
    default = next(f.default for f in fields(TrainConfig) if f.name == name)
    return click.option(limit.label, name, type=kind, default=default, show_default=True, help=help)


QUIET_HELP = "Only errors; no progress bars (drawn only on a terminal anyway)."
VERBOSE_HELP = "Debug logging."


def set_verbosity(obj: dict, quiet: bool = False, verbose: bool = False) -> None:
    """Add -q / -v to the run's settings `obj` and set the log levels: -q (errors only) wins over -v
    (idcmap's own debug lines, not those of pillow or matplotlib)."""
    obj["quiet"] = obj.get("quiet", False) or quiet
    obj["verbose"] = obj.get("verbose", False) or verbose
    logging.getLogger().setLevel(logging.ERROR if obj["quiet"] else logging.WARNING)
    log.setLevel(logging.ERROR if obj["quiet"] else logging.DEBUG if obj["verbose"] else logging.WARNING)


def verbosity_flag(ctx: click.Context, param: click.Parameter, value: bool) -> None:
    """A command's own -q / -v (given after the command name)."""
    if value:
        set_verbosity(ctx.find_object(dict), **{param.name: True})


def verbosity_options(command: Callable) -> Callable:
    """-q and -v after the command name too (`idcmap render FOLDER -q`), as before it."""
    command = click.option("-v", "--verbose", is_flag=True, expose_value=False, callback=verbosity_flag,
                           help=VERBOSE_HELP)(command)
    return click.option("-q", "--quiet", is_flag=True, expose_value=False, callback=verbosity_flag,
                        help=QUIET_HELP)(command)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="idcmap")
@click.option("-q", "--quiet", is_flag=True, help=QUIET_HELP)
@click.option("-v", "--verbose", is_flag=True, help=VERBOSE_HELP)
@click.pass_context
def cli(ctx: click.Context, quiet: bool, verbose: bool) -> None:
    """Reassemble IDC patch folders into slides, score every patch, and map the cancer."""
    logging.basicConfig(format="idcmap: %(levelname)s: %(message)s")
    ctx.obj = {}
    set_verbosity(ctx.obj, quiet, verbose)


@cli.command()
@click.argument("folder", type=click.Path(path_type=Path))
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("out"), show_default=True,
              help="Output folder; each patient folder gets out/<its path below FOLDER>/ (out/<its name> when "
                   "FOLDER is one patient).")
@click.option("--model", type=MODEL_CHOICE, default=None,
              help=f"Model from the registry [default: {DEFAULT_MODEL}, or the model a --weights file holds]."
                   + UNSHIPPED_NOTE)
@click.option("--weights", type=click.Path(path_type=Path), default=None,
              help="Weights file (default: weights/<model>.pt shipped with idcmap).")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--backend", type=BACKEND_CHOICE, default="auto", show_default=True,
              help="Patch network runtime: auto = ONNX Runtime on CPU (1.3-4x PyTorch eager), in int8 where the "
                   "model ships an int8 network, PyTorch on GPU; onnx-int8 = the int8 network `idcmap quantize` "
                   "made (CPU; ResNet-18 3.4x faster).")
@click.option("--mixed-precision", is_flag=True, help="fp16 autocast on the GPU (probabilities within 2.1e-4 of fp32 on an H100).")
@click.option("--batch-size", type=click.IntRange(1), default=None,
              help="Patches per batch [default: 512 on CPU, 1024 on GPU]. On a GPU every slide's last "
                   "batch is padded to this size (one batch shape), so keep it near the default.")
@click.option("--threshold", type=FiniteFloatRange(0, 1), default=None,
              help="IDC probability threshold: for every slide (implies --threshold-rule fixed, unless "
                   "--threshold-rule otsu is given too: then the fixed threshold of that rule, used for "
                   "scattered samples and, halved, as the floor under each whole slide's Otsu threshold) "
                   "[default: the model's, fitted on validation patients].")
@click.option("--threshold-rule", type=click.Choice(THRESHOLD_RULES), default=None,
              help=THRESHOLD_RULE_HELP + " [default: the model's].")
@click.option("--smoothing", "smoothing_sigma", type=FiniteFloatRange(0, 10), default=None,
              help="Sigma, in grid cells, of the Gaussian smoothing of the final logits over the slide "
                   "(0 = none) [default: the model's, fitted on validation patients].")
@click.option("--min-region", "min_region_cells", type=click.IntRange(0), default=None,
              help="Drop predicted regions smaller than this many patches that border non-IDC tissue "
                   "(an isolated sample's regions are kept) [default: the model's].")
@click.option("--max-hole", "max_hole_cells", type=click.IntRange(0), default=None,
              help="Fill holes of at most this many grid cells in predicted regions (cells without a patch "
                   "count towards a hole's size but are never filled) [default: the model's].")
@click.option("--max-mosaic-pixels", type=click.IntRange(1), default=DEFAULT_MAX_MOSAIC_PIXELS, show_default=True,
              help="Refuse a slide whose mosaic would exceed this many pixels.")
@click.option("--jobs", type=click.IntRange(1, 1024), default=None,
              help="CPU threads for scoring on the CPU [default: every core]. PNGs are decoded in one thread "
                   "(faster than a thread pool for 50 x 50 px patches). Patients are rendered one after another; "
                   "to run several at once, use --shard.")
@click.option("--resume", is_flag=True, help="Skip patients whose outputs are complete and valid.")
@click.option("--shard", default=None, metavar="I/N|env",
              help="Render only patients I, I+N, I+2N, ... (0-based); `env` takes RANK/WORLD_SIZE from "
                   "torchrun. Each shard writes summary-I-of-N.csv; `idcmap export` merges them. Shards split the "
                   "sorted patient folders by position: run all N on the same folder contents.")
@click.option("--json", "as_json", is_flag=True, help="Print the per-patient summary as JSON on stdout.")
@verbosity_options
@click.pass_obj
def render(obj: dict, folder: Path, out: Path, model: str | None, weights: Path | None, device: str,
           backend: str, mixed_precision: bool, batch_size: int | None, threshold: float | None,
           threshold_rule: str | None,
           smoothing_sigma: float | None, min_region_cells: int | None,
           max_hole_cells: int | None, max_mosaic_pixels: int, jobs: int | None, resume: bool, shard: str | None,
           as_json: bool) -> None:
    """Render FOLDER (one patient folder, or a folder of patient folders) into OUT.

    Per patient: mosaic.png, overlay.png, probabilities.csv, probabilities.npy, regions.geojson
    and summary.json; across patients: OUT/summary.csv and the overview page OUT/summary.html.
    Exit status 1 if any patient failed.
    """
    from .pipeline import RenderOptions, overview_path, parse_shard, render_folder, summary_name

    if shard == "env" and device == "auto" and "LOCAL_RANK" in os.environ and torch_has_cuda():
        device = f"cuda:{os.environ['LOCAL_RANK']}"
    options = RenderOptions(model=model, weights=weights, device=device, backend=backend,
                            mixed_precision=mixed_precision, batch_size=batch_size,
                            threshold=threshold, threshold_rule=threshold_rule, smoothing_sigma=smoothing_sigma,
                            min_region_cells=min_region_cells,
                            max_hole_cells=max_hole_cells, max_mosaic_pixels=max_mosaic_pixels,
                            jobs=jobs, resume=resume, progress=not obj["quiet"],
                            shard=parse_shard(shard, dict(os.environ)) if shard else None)
    rows = render_folder(folder, out, options)
    if as_json:
        click.echo(json_text(rows))
    failed = [r for r in rows if r["status"] == "failed"]
    if not obj["quiet"]:
        done = "ok in" if resume else "rendered into"  # --resume: its warning says how many were kept
        page = overview_path(out / summary_name(options.shard))
        click.echo(f"{len(rows) - len(failed)} of {len(rows)} patients {done} {out}; overview: {page}", err=True)
    if failed:
        for row in failed:
            click.echo(f"idcmap: failed: {row['patient']}: {row['error']}", err=True)
        sys.exit(1)


@cli.command()
@click.argument("out", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="CSV to write; its overview page (.html, each patient's figures and overlay) goes beside it "
                   "[default: OUT/summary.csv].")
@verbosity_options
@click.pass_obj
def export(obj: dict, out: Path, output: Path | None) -> None:
    """Merge the per-patient summaries below OUT (for example of sharded renders) into one CSV and
    its overview page."""
    from .pipeline import collect_summaries, export_target, write_run_summary

    rows = collect_summaries(out)
    target = export_target(out, output)
    page = write_run_summary(out, rows, target)
    failed = sum(row["status"] == "failed" for row in rows)
    if failed:
        click.echo(f"idcmap: {failed} of {len(rows)} patients failed to render (status and error in {target})", err=True)
    if not obj["quiet"]:
        click.echo(f"{len(rows)} patients -> {target}; overview: {page}", err=True)


@cli.command()
@click.argument("data_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", type=MODEL_CHOICE, default=DEFAULT_MODEL, show_default=True, help="Model to train.")
@click.option("-o", "--out", type=click.Path(path_type=Path), required=True,
              help="Weights file to write (.pt); its card (.json) and split (.split.json) go beside it.")
@click.option("--split", "split_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Reuse a split JSON instead of drawing one by patient (--test-fraction and --val-fraction then do "
                   "nothing; the card records the fractions the file names).")
@training_option("test_fraction", help="Share of each patient group (e.g. patients/, sparse/) held out for test.")
@training_option("val_fraction",
                 help="Share of the remaining patients of each group used for early stopping and calibration.")
@training_option("epochs", help="Most epochs to train; early stopping (--patience) may end it sooner.")
@training_option("batch_patches", help="Patches per training batch (whole grid windows are kept together).")
@training_option("window", help="Training windows of WINDOW x WINDOW grid cells (context seen in training).")
@training_option("learning_rate", help="AdamW learning rate.")
@training_option("weight_decay", help="AdamW (decoupled) weight decay, on every parameter.")
@training_option("patience", help="Stop after this many epochs without a better validation AUC.")
@training_option("stain_jitter",
                 help="Augmentation: haematoxylin/eosin amounts scaled by up to this fraction, per grid window.")
@training_option("ema", help="Validate, keep and store an exponential moving average of the weights, updated "
                             "after every step with this decay (0.995: about the last 200 steps); 0: off.")
@training_option("scattered_repeat",
                 help="Each epoch sees the patches of scattered-sample patients (not a whole slide, e.g. sparse/) "
                      "this many times, each time augmented afresh: more weight to the many patients with few patches.")
@training_option("seed", help="Seeds the split, initialisation, sampling and augmentation: the same seed on the "
                               "same machine gives the same weights.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--precision", type=click.Choice(list(PRECISIONS)), default="auto", show_default=True,
              help="bf16: bfloat16 autocast (master weights and optimiser state stay fp32; the weights file is "
                   "stored in bf16 either way). auto: bf16 on a GPU or on a CPU with native "
                   "bf16 (AVX512-BF16/AMX), fp32 elsewhere.")
@click.option("--colour-normalise", is_flag=True,
              help="Map each whole slide's tissue colours onto the training slides' mean colours, in training and "
                   "whenever the model scores (the reference is stored with the weights).")
@click.option("--resume", is_flag=True, help="Continue from OUT's .ckpt checkpoint if one exists, with the settings "
              "and split it was trained with (a change is refused; --device and --patience may change).")
@verbosity_options
@click.pass_obj
def train(obj: dict, data_root: Path, model: str, out: Path, split_file: Path | None, test_fraction: float,
          val_fraction: float, epochs: int, batch_patches: int, window: int, learning_rate: float, weight_decay: float,
          patience: int, stain_jitter: float, ema: float, scattered_repeat: int, seed: int, device: str, precision: str,
          colour_normalise: bool, resume: bool) -> None:
    """Train MODEL on the patient folders below DATA_ROOT, split by patient."""
    from .training import train as run_training

    config = TrainConfig(epochs=epochs, batch_patches=batch_patches, window=window, learning_rate=learning_rate,
                         weight_decay=weight_decay, patience=patience, stain_jitter=stain_jitter,
                         test_fraction=test_fraction, val_fraction=val_fraction, seed=seed, device=device,
                         precision=precision, colour_normalise=colour_normalise, ema=ema,
                         scattered_repeat=scattered_repeat)
    card = run_training(data_root, model, out, config, split_file=split_file, resume=resume,
                        progress=not obj["quiet"])
    click.echo(json_text({"weights": str(out), "calibration": card["calibration"],
                           "best_val_auc": card["training"]["best_val_auc"]}))


def trained_model_options(verb: str, weights_note: str):
    """DATA_ROOT, --model, --weights and --split: the arguments of commands that work on trained weights."""
    options = [
        click.argument("data_root", type=click.Path(exists=True, file_okay=False, path_type=Path)),
        click.option("--model", type=MODEL_CHOICE, default=None,
                     help=f"Model to {verb} [default: {DEFAULT_MODEL}, or the model a --weights file holds]."),
        click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
                     help=f"Weights file [default: weights/<model>.pt]; {weights_note}."),
        click.option("--split", "split_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     default=None, help="Split JSON [default: the one beside the weights]."),
    ]

    def decorate(command):
        for option in reversed(options):
            command = option(command)
        return command

    return decorate


@cli.command()
@trained_model_options("quantise", "the int8 network is written beside it")
@click.option("--patches", type=click.IntRange(16), default=1024, show_default=True,
              help="Training patches that calibrate the int8 activation ranges.")
@click.option("--seed", type=click.IntRange(LIMITS["seed"].low, LIMITS["seed"].high), default=0, show_default=True,
              help="Seeds the choice of calibration patches.")
@verbosity_options
@click.pass_obj
def quantize(obj: dict, data_root: Path, model: str | None, weights: Path | None, split_file: Path | None,
             patches: int, seed: int) -> None:
    """Quantise a model's patch network to int8 (used by `render` on the CPU), and report on the
    validation patients how far it stays from fp32."""
    from .training import quantize as run_quantize

    card = run_quantize(data_root, model, weights, split_file, patches, seed, progress=not obj["quiet"])
    click.echo(json_text(card["int8"]))


@cli.command()
@trained_model_options("calibrate", "rewritten with the new calibration")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--colour-normalise", is_flag=True,
              help="Also normalise each whole slide's colours before scoring: store the training patients' "
                   "mean tissue colours with the weights (the network itself is unchanged; a model that has "
                   "a reference keeps it). Run `idcmap quantize` again afterwards.")
@click.option("--threshold-rule", type=click.Choice(THRESHOLD_RULES), default=None,
              help=THRESHOLD_RULE_HELP + " [default: the model's current rule].")
@verbosity_options
@click.pass_obj
def calibrate(obj: dict, data_root: Path, model: str | None, weights: Path | None, split_file: Path | None,
              device: str, colour_normalise: bool, threshold_rule: str | None) -> None:
    """Refit temperatures, grid smoothing, threshold and region post-processing on the validation patients."""
    from .training import recalibrate

    card = recalibrate(data_root, model, weights, split_file, device, progress=not obj["quiet"],
                       colour_normalise=colour_normalise, threshold_rule=threshold_rule)
    click.echo(json_text({"calibration": card["calibration"], "fit": card["calibration_fit"]}))


@cli.command()
@click.argument("data_root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--model", "models", type=MODEL_CHOICE, multiple=True,
              help="Model(s) to evaluate side by side [default: every model with shipped weights].")
@click.option("--weights", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Evaluate this weights file (e.g. one `idcmap train -o` wrote) instead; --record writes into "
                   "its card.")
@click.option("--split", "split_file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="Split JSON [default: the one beside the first model's weights].")
@click.option("-o", "--out", type=click.Path(path_type=Path), default=Path("evaluation"), show_default=True,
              help="Folder for metrics.json, models.md and the figures.")
@click.option("--device", default="auto", show_default=True, help=DEVICE_HELP)
@click.option("--backend", type=BACKEND_CHOICE, default="auto", show_default=True,
              help="Patch network runtime, as for render (auto: int8 where a model ships an int8 network).")
@click.option("--record", is_flag=True, help="Write the test figures into each model's card.")
@verbosity_options
@click.pass_obj
def evaluate(obj: dict, data_root: Path, models: tuple[str, ...], weights: Path | None, split_file: Path | None,
             out: Path, device: str, backend: str, record: bool) -> None:
    """Evaluate models side by side on the test patients of DATA_ROOT: patch and slide metrics
    (whole and sparse patients apart, 95% bootstrap intervals), speed, figures."""
    from .evaluation import evaluate_models

    report = evaluate_models(data_root, list(models), out, split_file=split_file, device=device,
                             backend=backend, record=record, progress=not obj["quiet"], weights=weights)
    click.echo(json_text(report["summary"]))
    if not obj["quiet"]:
        click.echo(f"idcmap: metrics.json, models.md and the figures are in {out}", err=True)


def torch_has_cuda() -> bool:
    """True when PyTorch sees a CUDA GPU (imported only when asked: torch is slow to import)."""
    import torch

    return torch.cuda.is_available()


def main() -> None:
    """Entry point: run the CLI, turning idcmap errors and Ctrl-C into one line and an exit status."""
    try:
        cli.main(standalone_mode=False)
    except click.exceptions.Exit as done:
        sys.exit(done.exit_code)
    except click.ClickException as err:
        err.show()
        sys.exit(err.exit_code)
    except IdcmapError as err:
        click.echo(f"idcmap: error: {err}", err=True)
        sys.exit(2)
    except OSError as err:  # one the checks did not foresee (a name too long, an I/O error): still one line
        where = f"{err.filename}: " if err.filename else ""
        click.echo(f"idcmap: error: {where}{err.strerror or err}; check this path and try again", err=True)
        sys.exit(2)
    except (click.exceptions.Abort, KeyboardInterrupt):  # click turns Ctrl-C into Abort
        click.echo("idcmap: interrupted; finished files are complete, unfinished ones were not written", err=True)
        sys.exit(130)


if __name__ == "__main__":
    main()
