"""`idcmap evaluate`: models side by side on the test patients of a split.

Patch level (per group of patients, e.g. whole `patients/` and `sparse/`): accuracy, balanced
accuracy, precision/recall/F1 of both classes, ROC-AUC, PR-AUC, ECE, confusion matrix.
Slide level (whole slides, `Slide.is_whole`): area-fraction error and Dice, each with a 95% bootstrap
interval over patients, and each model's differences from the default's on the same slides with
paired bootstrap intervals. Also the scoring speed of each model, measured in the same run.
"""
from __future__ import annotations

import io
import json
import logging
import time
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from . import metrics  # noqa: E402
from .dataset import SPLIT_SETS, check_unseen, load_labelled_slides, load_split, patient_ids  # noqa: E402
from .errors import IdcmapError, OptionError, SplitError  # noqa: E402
from .export import atomic_paths, atomic_write_bytes, json_text, writable_folder  # noqa: E402
from .loader import Slide  # noqa: E402
from .models import DEFAULT_MODEL, REGISTRY, card_path, get_spec, load_model  # noqa: E402
from .regions import dice, idc_area_fraction, predicted_mask, slide_threshold  # noqa: E402
from .scoring import Scorer  # noqa: E402

log = logging.getLogger(__name__)


def patch_metrics(labels: np.ndarray, probability: np.ndarray, threshold: float | np.ndarray) -> dict:
    """Patch-level figures of calibrated probabilities at a threshold (or one per patch: its slide's)."""
    report = metrics.classification_report(labels, probability >= threshold)
    report.update(
        roc_auc=metrics.roc_auc(labels, probability),
        pr_auc=metrics.average_precision(labels, probability),
        ece=metrics.expected_calibration_error(labels, probability),
        patches=int(len(labels)),
        idc_patches=int(labels.sum()),
    )
    return report


def slide_metrics(rows: list[dict]) -> dict:
    """Mean area-fraction error and Dice over slides, with 95% bootstrap intervals."""
    errors = np.array([r["area_fraction_error"] for r in rows])
    dices = np.array([r["dice"] for r in rows])
    return {
        "slides": len(rows),
        "area_fraction_mae": float(errors.mean()),
        "area_fraction_mae_ci95": metrics.bootstrap_interval(errors),
        "dice": float(dices.mean()),
        "dice_ci95": metrics.bootstrap_interval(dices),
    }


def paired_differences(reference: list[dict], other: list[dict]) -> dict:
    """Per-slide differences, reference minus other, in Dice and in area-fraction error over the
    same slides (rows in the same order), each mean with a 95% paired bootstrap interval: the
    slides are resampled once for both models, so slide-to-slide difficulty cancels out."""
    result: dict = {"slides": len(reference)}
    for key in ("dice", "area_fraction_error"):
        differences = np.array([a[key] - b[key] for a, b in zip(reference, other, strict=True)])
        result[key] = float(differences.mean())
        result[f"{key}_ci95"] = metrics.bootstrap_interval(differences)
    return result


def _group(patient_id: str) -> str:
    """The folder a patient lies in below the data root (e.g. `patients`, `sparse`), or `root`."""
    return patient_id.rpartition("/")[0] or "root"


def _png(fig: plt.Figure) -> bytes:
    """The figure as PNG bytes (closed afterwards)."""
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def evaluate_models(data_root: str | Path, models: list[str], out: str | Path, split_file: str | Path | None = None,
                    device: str = "auto", record: bool = False, backend: str = "auto", progress: bool = True,
                    weights: str | Path | None = None) -> dict:
    """Evaluate `models` (default: every registry model with weights) on the split's test patients,
    or the one `weights` file (with at most one model name); write metrics.json, models.md and the
    figures to `out` (with `record`, each model's card gets its test figures), all replaced together,
    and remove the figures an earlier evaluation into `out` listed but this one did not write.
    Return the report."""
    out = Path(out)
    if weights is not None:
        if len(models) > 1:
            raise OptionError("--weights evaluates one weights file: pass at most one --model with it")
        loaded = [load_model(models[0] if models else None, weights)]
    else:
        models = list(dict.fromkeys(models)) or [name for name, spec in REGISTRY.items() if spec.weights_path.is_file()]
        if not models:
            raise IdcmapError("no model has weights in weights/; train one or pass --model")
        loaded = [load_model(name) for name in models]
    folders = patient_ids(data_root)
    split_file = Path(split_file) if split_file else loaded[0].path.with_suffix(".split.json")
    split = load_split(split_file, folders)
    test_ids = split["test"]
    if not test_ids:
        raise SplitError(f"{split_file}: no test patients; pass a --split that holds some")
    for model in loaded:
        check_unseen(test_ids, "test", split_file, model.path, ("train", "val"), "trained or validated",
                     "so its test figures would overstate; evaluate it on its own split (leave out --split) or on "
                     "patients it never saw")
    scorers = [Scorer(model, device, backend=backend) for model in loaded]  # --device, --backend checked
    writable_folder(out)  # before the scoring, not after it
    labelled = load_labelled_slides(test_ids, folders, "test", "load test", progress)
    if not labelled:
        raise IdcmapError(f"{split_file}: no test patient carries labels (_class0/_class1 in its file names)")
    slides = [s for _, s in labelled]
    groups = [_group(pid) for pid, _ in labelled]
    report: dict = {"data_root": str(data_root), "split_file": str(split_file), "test_patients": [pid for pid, _ in labelled],
                    "models": {}, "summary": {}}
    curves = {}
    for model, scorer in zip(loaded, scorers):
        started = time.perf_counter()
        scored = [scorer.score(slide) for slide in slides]
        seconds = time.perf_counter() - started
        calibration = model.calibration
        entry: dict = {"calibration": vars(calibration), "sha256": model.sha256, "backend": scorer.backend,
                       "scoring_patches_per_s": sum(len(s) for s in slides) / seconds, "patch": {}, "slides": {}}
        per_patient, thresholds = [], []  # thresholds: each patch's, its slide's (see slide_threshold)
        for slide, scores, group in zip(slides, scored, groups):
            threshold = slide_threshold(slide, scores.probability, calibration)
            predicted = predicted_mask(slide, scores.probability, calibration, threshold)
            thresholds.append(np.full(len(slide), threshold.value))
            truth = slide.labels == 1
            predicted_fraction = idc_area_fraction(slide, predicted)
            labelled_fraction = idc_area_fraction(slide, truth)
            per_patient.append({
                "patient": slide.patient, "group": group, "patches": len(slide),
                "predicted_idc_area_fraction": predicted_fraction, "labelled_idc_area_fraction": labelled_fraction,
                "area_fraction_error": abs(predicted_fraction - labelled_fraction),
                "dice": dice(slide, predicted, truth),
            })
        for group in sorted(set(groups)) + ["all"]:  # "all": every test patient together
            chosen = [i for i, g in enumerate(groups) if group in (g, "all")]
            labels = np.concatenate([slides[i].labels for i in chosen]).astype(int)
            probability = np.concatenate([scored[i].probability for i in chosen])
            entry["patch"][group] = patch_metrics(labels, probability, np.concatenate([thresholds[i] for i in chosen]))
            whole = [per_patient[i] for i in chosen if slides[i].is_whole]
            if whole and group != "all":
                entry["slides"][group] = slide_metrics(whole)
        entry["per_patient"] = per_patient
        report["models"][model.name] = entry
        labels = np.concatenate([s.labels for s in slides]).astype(int)
        probability = np.concatenate([s.probability for s in scored])
        curves[model.name] = (labels, probability, np.concatenate(thresholds), slides, scored)
        whole_groups = {g: v for g, v in entry["slides"].items()}
        report["summary"][model.name] = {
            "patch_all": {k: round(entry["patch"]["all"][k], 4)
                          for k in ("balanced_accuracy", "f1_idc", "roc_auc", "pr_auc", "ece")},
            **{f"slides_{g}": {"area_fraction_mae": round(v["area_fraction_mae"], 4),
                               "area_fraction_mae_ci95": [round(b, 4) for b in v["area_fraction_mae_ci95"]],
                               "dice": round(v["dice"], 4), "dice_ci95": [round(b, 4) for b in v["dice_ci95"]],
                               "slides": v["slides"]}
               for g, v in whole_groups.items()},
            **{f"patch_{g}": {k: round(entry["patch"][g][k], 4) for k in ("balanced_accuracy", "f1_idc", "roc_auc")}
               for g in sorted(set(groups))},
            "scoring_patches_per_s": round(entry["scoring_patches_per_s"], 1),
            "backend": scorer.backend,
        }
    reference = DEFAULT_MODEL if DEFAULT_MODEL in report["models"] else loaded[0].name
    whole = [i for i, s in enumerate(slides) if s.is_whole]
    rows = {name: entry["per_patient"] for name, entry in report["models"].items()}
    report["paired"] = {
        group: {"reference": reference,
                "against": {name: paired_differences([rows[reference][i] for i in chosen], [rows[name][i] for i in chosen])
                            for name in rows if name != reference}}
        for group in sorted(set(groups)) if (chosen := [i for i in whole if groups[i] == group]) and len(rows) > 1}
    files = _figures(curves, loaded)
    report["files"] = ["metrics.json", "models.md", *files]
    files = {"metrics.json": (json_text(report) + "\n").encode(),
             "models.md": models_table(report, loaded, split).encode("utf-8", "backslashreplace"), **files}
    outputs = {out / name: data for name, data in files.items()}
    if record:
        for model in loaded:
            card = dict(model.card)
            card["test"] = {"split_file": Path(split_file).name, "patients": len(slides),
                            **report["summary"][model.name]}
            outputs[card_path(model.path)] = (json_text(card) + "\n").encode()
    earlier = _earlier_files(out)
    with atomic_paths(*outputs) as temps:  # all or nothing: metrics, table, figures and cards agree
        for tmp, data in zip(temps, outputs.values()):
            atomic_write_bytes(tmp, data)  # synced to disk before the renames
    for name in sorted(earlier - set(files)):  # an earlier evaluation's figures of models not evaluated now
        if (out / name).is_file():
            (out / name).unlink()
    return report


def _earlier_files(out: Path) -> set[str]:
    """The files an earlier evaluation listed in out/metrics.json (plain names only), if it did."""
    try:
        listed = json.loads((out / "metrics.json").read_text()).get("files", [])
    except (OSError, ValueError, AttributeError):
        return set()
    return {name for name in listed
            if isinstance(name, str) and name and name == Path(name).name and not name.startswith(".")}


def models_table(report: dict, loaded: list, split: dict) -> str:
    """The README's model table (markdown): one row per model, test figures per patient group
    (whole slides: patch and slide figures; scattered samples: patch figures) and how to
    reproduce them."""

    def trio(figures: dict) -> str:
        return " / ".join(f"{figures[k]:.3f}" for k in ("balanced_accuracy", "f1_idc", "roc_auc"))

    def with_interval(figures: dict, key: str) -> str:
        low, high = figures[f"{key}_ci95"]
        return f"{figures[key]:.3f} [{low:.2f}, {high:.2f}]"

    groups = sorted({_group(pid) for pid in report["test_patients"]})
    whole = [g for g in groups if any(f"slides_{g}" in report["summary"][m.name] for m in loaded)]
    sets = ", ".join(f"{name} {len(split[name])}" for name in SPLIT_SETS)
    header = ["model", "parameters"]
    for g in groups:
        header.append(f"{g}: BAC / F1 / AUC")
        if g in whole:
            header += [f"{g}: area-fraction MAE", f"{g}: Dice"]
    header += ["scoring patches/s", "reproduce"]
    lines = [
        f"{len(report['test_patients'])} test patients (split: {sets} patients). Patch figures at each "
        "model's validation-fitted threshold (or, where its rule is otsu, each whole slide's own); slide "
        "figures on the whole test slides, mean and 95% bootstrap interval over patients.",
        "",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for model in loaded:
        summary = report["summary"][model.name]
        cells = [f"`{model.name}`", f"{sum(p.numel() for p in model.network.parameters()):,}"]
        for g in groups:
            cells.append(trio(summary[f"patch_{g}"]))
            if g in whole:
                slides = summary.get(f"slides_{g}")
                cells += [with_interval(slides, "area_fraction_mae"), with_interval(slides, "dice")] if slides else ["–"] * 2
        command = model.card.get("training", {}).get("command", f"idcmap train DATA_ROOT --model {model.name}")
        data_root = model.card.get("training", {}).get("data_root", "DATA_ROOT")
        given_by_calibrate = {  # what `idcmap calibrate` gave a network that `idcmap train` made
            "--colour-normalise": model.colour_reference is not None and "--colour-normalise" not in command,
            "--threshold-rule otsu": model.calibration.threshold_rule == "otsu",
        }
        calibrate_flags = [flag for flag, given in given_by_calibrate.items() if given]
        shipped = model.path is None or model.path.resolve() == get_spec(model.name).weights_path.resolve()
        which = f"--model {model.name}" if shipped else f"--weights {model.path}"  # a file outside weights/: that one
        if calibrate_flags:
            command += f" && idcmap calibrate {data_root} {which} {' '.join(calibrate_flags)}"
        if summary.get("backend") == "onnx-int8":
            command += f" && idcmap quantize {data_root} {which}"
        cells += [f"{summary['scoring_patches_per_s']:,.0f} ({summary.get('backend', '?')})", f"`{command}`"]
        lines.append("| " + " | ".join(cells) + " |")
    for group, paired in report.get("paired", {}).items():
        lines += ["", f"Paired against `{paired['reference']}` on the same whole test slides of `{group}/` (its figure "
                      "minus the model's, mean and 95% paired bootstrap interval over slides):", "",
                  "| model | Dice difference | area-fraction error difference |", "|---|---|---|"]
        for name, d in paired["against"].items():
            lines.append(f"| `{name}` | {d['dice']:+.3f} [{d['dice_ci95'][0]:+.2f}, {d['dice_ci95'][1]:+.2f}] | "
                         f"{d['area_fraction_error']:+.3f} [{d['area_fraction_error_ci95'][0]:+.2f}, "
                         f"{d['area_fraction_error_ci95'][1]:+.2f}] |")
    return "\n".join(lines) + "\n"


def _figures(curves: dict, loaded: list) -> dict[str, bytes]:
    """The PNG figures by file name: ROC/PR curves, and per model its confusion matrix, sample
    grid and (where its card has a history) training curves."""
    figures = {}
    fig, (roc_ax, pr_ax) = plt.subplots(1, 2, figsize=(11, 5))
    for name, (labels, probability, _, _, _) in curves.items():
        fpr, tpr = metrics.roc_curve(labels, probability)
        roc_ax.plot(fpr, tpr, label=f"{name} (AUC {metrics.roc_auc(labels, probability):.3f})")
        recall, precision = metrics.pr_curve(labels, probability)
        pr_ax.plot(recall, precision, label=f"{name} (AP {metrics.average_precision(labels, probability):.3f})")
    roc_ax.plot([0, 1], [0, 1], "k:", linewidth=0.8)
    roc_ax.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC, test patients")
    pr_ax.set(xlabel="recall (IDC)", ylabel="precision (IDC)", title="Precision-recall, test patients")
    roc_ax.legend(loc="lower right")
    pr_ax.legend(loc="lower left")
    figures["roc_pr.png"] = _png(fig)
    for name, (labels, probability, threshold, slides, scored) in curves.items():
        matrix = metrics.confusion(labels, probability >= threshold)
        fig, ax = plt.subplots(figsize=(4.2, 3.8))
        ax.imshow(matrix, cmap="Blues")
        for (r, c), value in np.ndenumerate(matrix):
            ax.text(c, r, f"{value:,}", ha="center", va="center", color="black" if value < matrix.max() / 2 else "white")
        ax.set(xticks=[0, 1], yticks=[0, 1], xticklabels=["non-IDC", "IDC"], yticklabels=["non-IDC", "IDC"],
               xlabel="predicted", ylabel="labelled",
               title=f"{name} @ {threshold[0]:.2f}" if np.ptp(threshold) == 0 else f"{name} @ each slide's threshold")
        figures[f"confusion_{name}.png"] = _png(fig)
        figures[f"samples_{name}.png"] = _sample_grid(slides, scored, threshold)
    for model in loaded:
        history = model.card.get("history") or []
        if history:
            fig, ax = plt.subplots(figsize=(6, 4))
            epochs = [h["epoch"] for h in history]
            ax.plot(epochs, [h["train_loss"] for h in history], label="train loss")
            ax.plot(epochs, [h["val_loss"] for h in history], label="validation loss")
            ax2 = ax.twinx()
            ax2.plot(epochs, [h["val_auc"] for h in history], "g--", label="validation AUC")
            ax.set(xlabel="epoch", title=f"{model.name} training")
            ax.legend(loc="upper left")
            ax2.legend(loc="upper right")
            figures[f"training_{model.name}.png"] = _png(fig)
    return figures


def _sample_grid(slides: list[Slide], scored: list, threshold: np.ndarray, per_cell: int = 8) -> bytes:
    """Patches in four rows: true positives, true negatives, false positives, false negatives
    (`threshold`: each patch's)."""
    rng = np.random.default_rng(0)
    pixels = np.concatenate([s.pixels for s in slides])
    labels = np.concatenate([s.labels for s in slides]) == 1
    predicted = np.concatenate([s.probability for s in scored]) >= threshold
    kinds = [("correct IDC", labels & predicted), ("correct non-IDC", ~labels & ~predicted),
             ("false IDC", ~labels & predicted), ("missed IDC", labels & ~predicted)]
    fig, axes = plt.subplots(len(kinds), per_cell, figsize=(per_cell * 1.1, len(kinds) * 1.25))
    for row, (title, mask) in enumerate(kinds):
        chosen = rng.permutation(np.flatnonzero(mask))[:per_cell]
        for col in range(per_cell):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(chosen):
                ax.imshow(pixels[chosen[col]])
        axes[row, 0].set_title(title, fontsize=8, loc="left")
    return _png(fig)
