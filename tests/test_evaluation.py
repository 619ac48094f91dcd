"""idcmap.evaluation.evaluate_models end to end on a tiny synthetic data root with tiny weights.

Every figure in metrics.json is checked against what is recomputed here from the files written
(labels, patch sizes) and from scoring the test patients directly with the same weights.
"""
from __future__ import annotations

import errno
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import make_patient, textured, write_tiny_weights
from idcmap import evaluation
from idcmap import models as models_module
from idcmap.dataset import make_split, patient_ids, save_split
from idcmap.colour import ColourReference
from idcmap.evaluation import evaluate_models, models_table
from idcmap.errors import IdcmapError, OptionError, OutputError, SplitError
from idcmap.loader import load_slide
from idcmap.models import build_model, card_path, load_model, sha256_of
from idcmap.scoring import Scorer

MODELS = ["cancernet", "cancernet-context"]
ROWS, COLS, EDGE_WIDTH = 4, 5, 30  # whole patients: 4 x 5 patches, the right column 30 px wide
SPARSE_CELLS = [(0, 0), (0, 4), (4, 0), (4, 4), (8, 2)]  # no two cells touch: not a whole slide


def _patch(seed: int, label: int, width: int = 50) -> np.ndarray:
    """IDC patches dark, the others light (like tests/test_training.py)."""
    return textured(seed, width=width, base=70 if label else 190, spread=40)


def _build_root(root):
    """root/patients/p0..p6 (whole) and root/sparse/s0..s2; returns {patient id: {(x, y): (label, w)}}."""
    truth = {}
    for i in range(7):
        patches = {}
        for r in range(ROWS):
            for c in range(COLS):
                label = int(c < 1 + i % 3 or (r == 0 and i % 2 == 0))
                width = EDGE_WIDTH if c == COLS - 1 else 50
                patches[(c * 50 + 1, r * 50 + 1)] = (label, _patch(i * 100 + r * COLS + c, label, width))
        make_patient(root / "patients", f"p{i}", patches)
        truth[f"patients/p{i}"] = {xy: (label, a.shape[1]) for xy, (label, a) in patches.items()}
    for i in range(3):
        patches = {}
        for k, (r, c) in enumerate(SPARSE_CELLS):
            label = int(k % 2 == i % 2)  # both classes in every sparse patient
            patches[(c * 50 + 1, r * 50 + 1)] = (label, _patch(5000 + i * 10 + k, label))
        make_patient(root / "sparse", f"s{i}", patches)
        truth[f"sparse/s{i}"] = {xy: (label, a.shape[1]) for xy, (label, a) in patches.items()}
    return truth


HISTORY = [{"epoch": 1, "train_loss": 0.7, "val_loss": 0.69, "val_auc": 0.55},
           {"epoch": 2, "train_loss": 0.6, "val_loss": 0.65, "val_auc": 0.61}]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """One evaluate_models(record=True) run: (root, truth, split, weights dir, cards before, out, report)."""
    base = tmp_path_factory.mktemp("evaluation")
    root = base / "data"
    truth = _build_root(root)
    weights = base / "weights"
    for seed, name in enumerate(MODELS):
        write_tiny_weights(weights / f"{name}.pt", model=name, seed=seed)
    # cancernet-context gets a minimal card (with a training history); cancernet has none
    context_card = {"model": "cancernet-context", "sha256": sha256_of(weights / "cancernet-context.pt"),
                    "note": "kept", "history": HISTORY}
    card_path(weights / "cancernet-context.pt").write_text(json.dumps(context_card))
    split = make_split(sorted(patient_ids(root)), seed=0, test_fraction=0.4)
    save_split(split, base / "split.json")
    out = base / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models_module, "WEIGHTS_DIR", weights)
        report = evaluate_models(root, MODELS, out, split_file=base / "split.json", device="cpu", record=True)
        cards = {name: json.loads(card_path(weights / f"{name}.pt").read_text())
                 if card_path(weights / f"{name}.pt").is_file() else None for name in MODELS}
    return {"root": root, "truth": truth, "split": split, "weights": weights, "out": out, "report": report,
            "context_card": context_card, "cards": cards}


def test_the_split_has_both_groups_in_test(evaluated):
    test = evaluated["split"]["test"]
    assert sum(pid.startswith("patients/") for pid in test) == 3  # round(0.4 * 7)
    assert sum(pid.startswith("sparse/") for pid in test) == 1  # round(0.4 * 3)


def test_metrics_json_re_reads_with_both_models(evaluated):
    path = evaluated["out"] / "metrics.json"
    assert path.is_file()
    on_disk = json.loads(path.read_text())
    assert sorted(on_disk["models"]) == sorted(MODELS) == sorted(on_disk["summary"])
    assert on_disk == json.loads(json.dumps(evaluated["report"]))  # what was returned is what was written
    assert on_disk["test_patients"] == evaluated["split"]["test"]
    assert sorted(p.name for p in evaluated["out"].iterdir() if p.name.startswith(".")) == []  # no temp files
    for name in MODELS:
        entry = on_disk["models"][name]
        assert entry["sha256"] == sha256_of(evaluated["weights"] / f"{name}.pt")
        assert entry["scoring_patches_per_s"] > 0
        assert entry["calibration"]["threshold"] == 0.5


def _test_patches(evaluated):
    return sum(len(evaluated["truth"][pid]) for pid in evaluated["split"]["test"])


@pytest.mark.parametrize("name", MODELS)
def test_patch_metrics(evaluated, name):
    entry = evaluated["report"]["models"][name]
    assert sorted(entry["patch"]) == ["all", "patients", "sparse"]
    test = evaluated["split"]["test"]
    for group, report in entry["patch"].items():
        ids = [pid for pid in test if group == "all" or pid.startswith(group + "/")]
        labels = [label for pid in ids for label, _ in evaluated["truth"][pid].values()]
        assert report["patches"] == len(labels)
        assert report["idc_patches"] == sum(labels)
        matrix = np.array(report["confusion_matrix"])
        assert matrix.shape == (2, 2) and (matrix >= 0).all()
        assert matrix.sum() == len(labels)
        assert matrix[1].sum() == sum(labels)  # row 1: the labelled IDC patches
        for key in ("accuracy", "balanced_accuracy", "precision_idc", "recall_idc", "f1_idc", "precision_non_idc",
                    "recall_non_idc", "f1_non_idc", "roc_auc", "pr_auc", "ece"):
            assert 0.0 <= report[key] <= 1.0, (group, key, report[key])
        (tn, fp), (fn, tp) = matrix
        assert report["accuracy"] == pytest.approx((tn + tp) / len(labels))
    assert entry["patch"]["all"]["patches"] == _test_patches(evaluated)


@pytest.mark.parametrize("name", MODELS)
def test_figures_match_a_direct_scoring(evaluated, name):
    """Score the test patients here with the same weights: same confusion matrix, same area fractions."""
    model = load_model(name, evaluated["weights"] / f"{name}.pt")
    scorer = Scorer(model, device="cpu")
    entry = evaluated["report"]["models"][name]
    threshold = model.calibration.threshold
    labels, predicted, rows = [], [], {}
    for pid in evaluated["split"]["test"]:
        slide = load_slide(evaluated["root"] / pid)
        positive = scorer.score(slide).probability >= threshold  # no region post-processing in this calibration
        labels.append(slide.labels == 1)
        predicted.append(positive)
        rows[slide.patient] = float(slide.areas[positive].sum() / slide.areas.sum())
    labels, predicted = np.concatenate(labels), np.concatenate(predicted)
    expected = [[int((~labels & ~predicted).sum()), int((~labels & predicted).sum())],
                [int((labels & ~predicted).sum()), int((labels & predicted).sum())]]
    assert entry["patch"]["all"]["confusion_matrix"] == expected
    for row in entry["per_patient"]:
        assert row["predicted_idc_area_fraction"] == pytest.approx(rows[row["patient"]], abs=1e-9)


@pytest.mark.parametrize("name", MODELS)
def test_per_patient_entries(evaluated, name):
    entry = evaluated["report"]["models"][name]
    test = evaluated["split"]["test"]
    per_patient = entry["per_patient"]
    assert sorted(f"{row['group']}/{row['patient']}" for row in per_patient) == sorted(test)
    for row in per_patient:
        pid = f"{row['group']}/{row['patient']}"
        truth = evaluated["truth"][pid]
        assert row["patches"] == len(truth)
        # labelled area fraction from the written labels and widths (edge patches count 30 px)
        areas = {xy: 50 * width for xy, (_, width) in truth.items()}
        labelled = sum(a for xy, a in areas.items() if truth[xy][0] == 1) / sum(areas.values())
        assert row["labelled_idc_area_fraction"] == pytest.approx(labelled, abs=1e-12)
        assert row["area_fraction_error"] == pytest.approx(
            abs(row["predicted_idc_area_fraction"] - row["labelled_idc_area_fraction"]), abs=1e-12)
        assert 0.0 <= row["predicted_idc_area_fraction"] <= 1.0
        assert 0.0 <= row["dice"] <= 1.0


@pytest.mark.parametrize("name", MODELS)
def test_slide_metrics_and_bootstrap_intervals(evaluated, name):
    entry = evaluated["report"]["models"][name]
    # only the whole patients get slide figures; sparse/ folders are scattered samples
    assert sorted(entry["slides"]) == ["patients"]
    whole = [row for row in entry["per_patient"] if row["group"] == "patients"]
    slides = entry["slides"]["patients"]
    assert slides["slides"] == len(whole) == 3
    assert slides["area_fraction_mae"] == pytest.approx(np.mean([r["area_fraction_error"] for r in whole]))
    assert slides["dice"] == pytest.approx(np.mean([r["dice"] for r in whole]))
    for mean_key, ci_key in (("area_fraction_mae", "area_fraction_mae_ci95"), ("dice", "dice_ci95")):
        low, high = slides[ci_key]
        assert low - 1e-12 <= slides[mean_key] <= high + 1e-12, (mean_key, low, slides[mean_key], high)
        values = [r["area_fraction_error" if mean_key == "area_fraction_mae" else "dice"] for r in whole]
        assert min(values) - 1e-12 <= low and high <= max(values) + 1e-12
    summary = evaluated["report"]["summary"][name]
    assert summary["slides_patients"]["slides"] == 3
    assert summary["slides_patients"]["area_fraction_mae"] == round(slides["area_fraction_mae"], 4)
    assert sorted(k for k in summary if k.startswith("patch_")) == ["patch_all", "patch_patients", "patch_sparse"]


def test_figures_exist_and_open(evaluated):
    out = evaluated["out"]
    expected = ["roc_pr.png", *(f"confusion_{m}.png" for m in MODELS), *(f"samples_{m}.png" for m in MODELS),
                "training_cancernet-context.png"]  # only the model whose card has a training history
    pixels = {}
    for name in expected:
        with Image.open(out / name) as image:
            image.verify()
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 100
            pixels[name] = np.asarray(image.convert("RGB"))
        assert len(np.unique(pixels[name].reshape(-1, 3), axis=0)) > 10, name  # drawn, not blank
    for kind in ("confusion", "samples"):  # each model's own figures
        first, second = (pixels[f"{kind}_{m}.png"] for m in MODELS)
        assert first.shape != second.shape or not np.array_equal(first, second), kind
    assert not (out / "training_cancernet.png").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no temp files left


def test_record_writes_a_test_section_into_the_cards(evaluated):
    cards, report = evaluated["cards"], evaluated["report"]
    for name in MODELS:
        card = cards[name]
        assert card is not None, f"no card written for {name}"
        test = card["test"]
        assert test["split_file"] == "split.json"
        assert test["patients"] == len(evaluated["split"]["test"])
        assert test["patch_all"] == report["summary"][name]["patch_all"]
        assert test["slides_patients"] == json.loads(json.dumps(report["summary"][name]["slides_patients"]))
    # an existing card keeps what it had
    for key, value in evaluated["context_card"].items():
        assert cards["cancernet-context"][key] == value
    # and the weights still load against the rewritten cards
    for name in MODELS:
        assert load_model(name, evaluated["weights"] / f"{name}.pt").card["test"] == cards[name]["test"]


def _unlabelled_root(root):
    """patients/u0 unlabelled (flat, no _class), patients/w0 labelled, sparse/s0 labelled."""
    whole = {(c * 50 + 1, r * 50 + 1): (None, _patch(r * 3 + c, int(c == 0))) for r in range(3) for c in range(3)}
    make_patient(root / "patients", "u0", whole, layout="flat")
    make_patient(root / "patients", "w0", {xy: (int(c == 0), a) for (xy, (_, a)), c in
                                           zip(whole.items(), [0, 1, 2] * 3)})
    make_patient(root / "sparse", "s0", {(c * 50 + 1, r * 50 + 1): (k % 2, _patch(90 + k, k % 2))
                                         for k, (r, c) in enumerate(SPARSE_CELLS)})


def test_unlabelled_test_patient_does_not_shift_groups(tmp_path, monkeypatch):
    root = tmp_path / "data"
    _unlabelled_root(root)
    weights = tmp_path / "weights"
    write_tiny_weights(weights / "cancernet.pt", model="cancernet")
    monkeypatch.setattr(models_module, "WEIGHTS_DIR", weights)
    split = {"seed": 0, "train": [], "val": [], "test": ["patients/u0", "patients/w0", "sparse/s0"]}
    save_split(split, tmp_path / "split.json")
    report = evaluate_models(root, ["cancernet"], tmp_path / "out", split_file=tmp_path / "split.json", device="cpu")
    assert not card_path(weights / "cancernet.pt").exists()  # no --record: cards untouched
    entry = report["models"]["cancernet"]
    groups = {row["patient"]: row["group"] for row in entry["per_patient"]}
    assert groups == {"w0": "patients", "s0": "sparse"}
    assert entry["patch"]["sparse"]["patches"] == len(SPARSE_CELLS)


def _strict_json(text: str):
    def refuse(token):
        raise ValueError(f"non-JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def test_metrics_json_is_strict_json(evaluated):
    """metrics.json is read by other tools: no NaN/Infinity tokens (not JSON)."""
    report = _strict_json((evaluated["out"] / "metrics.json").read_text())
    for name in MODELS:
        assert all(math.isfinite(v) for v in report["models"][name]["patch"]["all"].values() if isinstance(v, float))


def test_single_class_group_still_gives_strict_json(tmp_path, monkeypatch):
    root = tmp_path / "data"
    whole = {(c * 50 + 1, r * 50 + 1): (int(c == 0), _patch(r * 3 + c, int(c == 0)))
             for r in range(3) for c in range(3)}
    make_patient(root / "patients", "w0", whole)
    make_patient(root / "sparse", "s0", {(c * 50 + 1, r * 50 + 1): (0, _patch(90 + k, 0))  # no IDC at all
                                         for k, (r, c) in enumerate(SPARSE_CELLS)})
    weights = tmp_path / "weights"
    write_tiny_weights(weights / "cancernet.pt", model="cancernet")
    monkeypatch.setattr(models_module, "WEIGHTS_DIR", weights)
    save_split({"seed": 0, "train": [], "val": [], "test": ["patients/w0", "sparse/s0"]}, tmp_path / "split.json")
    evaluate_models(root, ["cancernet"], tmp_path / "out", split_file=tmp_path / "split.json", device="cpu")
    report = json.loads((tmp_path / "out" / "metrics.json").read_text())
    assert report["models"]["cancernet"]["patch"]["sparse"]["idc_patches"] == 0  # the case this test is about
    _strict_json((tmp_path / "out" / "metrics.json").read_text())


def test_models_table_gives_the_commands_that_reproduce_each_row(tmp_path, monkeypatch):
    """A model that `calibrate --colour-normalise` gave a colour reference, and one quantised to
    int8: the reproduce command repeats those steps after its training command, on the weights
    file evaluated where it lies outside weights/ (on the registry's own file otherwise)."""
    figures = {"balanced_accuracy": 0.9, "f1_idc": 0.8, "roc_auc": 0.95}
    slides = {"area_fraction_mae": 0.05, "area_fraction_mae_ci95": [0.01, 0.1], "dice": 0.8, "dice_ci95": [0.7, 0.9]}
    report = {"test_patients": ["patients/p0"], "summary": {}}
    loaded = []
    for seed, (name, backend, colour) in enumerate([("cancernet", "onnx", False),
                                                     ("cancernet-context", "onnx-int8", True)]):
        model = load_model(name, write_tiny_weights(tmp_path / f"{name}.pt", model=name, seed=seed))
        model.card = {"parameters": 10, "training": {"command": f"idcmap train D --model {name}", "data_root": "D"}}
        if colour:
            model.colour_reference = ColourReference((180.0, 120.0, 160.0), (30.0, 30.0, 25.0))
        report["summary"][name] = {"patch_patients": figures, "slides_patients": slides, "backend": backend,
                                   "scoring_patches_per_s": 1000.0}
        loaded.append(model)
    def rows():
        table = models_table(report, loaded, {"train": ["a"], "val": ["b"], "test": ["patients/p0"]})
        return {line.split(" | ")[0]: line for line in table.splitlines() if line.startswith("| `")}

    outside = f"--weights {tmp_path / 'cancernet-context.pt'}"
    assert rows()["| `cancernet-context`"].endswith(
        f"| `idcmap train D --model cancernet-context && idcmap calibrate D {outside} --colour-normalise && "
        f"idcmap quantize D {outside}` |")
    monkeypatch.setattr(models_module, "WEIGHTS_DIR", tmp_path)  # now the registry's own files
    assert rows()["| `cancernet`"].endswith("| `idcmap train D --model cancernet` |")
    assert rows()["| `cancernet-context`"].endswith(
        "| `idcmap train D --model cancernet-context && idcmap calibrate D --model cancernet-context "
        "--colour-normalise && idcmap quantize D --model cancernet-context` |")
    assert "0.900 / 0.800 / 0.950 | 0.050 [0.01, 0.10] | 0.800 [0.70, 0.90]" in rows()["| `cancernet`"]


def test_paired_differences_against_the_reference_model(evaluated):
    """Each model's Dice and area-fraction error minus the reference model's (here the first
    model: the default is not evaluated), on the same whole slides, with a paired interval."""
    report = evaluated["report"]
    paired = report["paired"]
    assert set(paired) == {"patients"}  # the sparse patients are no whole slides
    assert paired["patients"]["reference"] == MODELS[0]
    difference = paired["patients"]["against"][MODELS[1]]
    rows = {name: [r for r in report["models"][name]["per_patient"] if r["group"] == "patients"] for name in MODELS}
    assert difference["slides"] == len(rows[MODELS[0]]) > 0
    for key in ("dice", "area_fraction_error"):
        expected = np.mean([a[key] - b[key] for a, b in zip(rows[MODELS[0]], rows[MODELS[1]])])
        assert difference[key] == pytest.approx(expected)
        low, high = difference[f"{key}_ci95"]
        assert low <= expected + 1e-12 and expected - 1e-12 <= high
    table = (evaluated["out"] / "models.md").read_text()
    assert f"Paired against `{MODELS[0]}`" in table and f"| `{MODELS[1]}` | {difference['dice']:+.3f} [" in table


def test_models_table_counts_parameters_of_a_model_without_a_card(evaluated):
    assert evaluated["cards"]["cancernet"] is None or "parameters" not in evaluated["cards"]["cancernet"]
    count = sum(p.numel() for p in build_model("cancernet").parameters())
    assert count > 0 and f"| `cancernet` | {count:,} |" in (evaluated["out"] / "models.md").read_text()


def test_evaluate_a_weights_file_outside_weights(tmp_path, evaluated):
    """--weights: a freshly trained file is evaluated under the model it holds, with the split beside
    it, and --record writes into its own card."""
    trained = tmp_path / "run" / "trained.pt"
    write_tiny_weights(trained, model="cancernet", seed=5)
    save_split(evaluated["split"], trained.with_suffix(".split.json"))
    report = evaluate_models(evaluated["root"], [], tmp_path / "out", device="cpu", record=True, weights=trained)
    assert list(report["models"]) == ["cancernet"]
    assert report["split_file"] == str(trained.with_suffix(".split.json"))
    assert report["models"]["cancernet"]["sha256"] == sha256_of(trained)
    card = json.loads(card_path(trained).read_text())
    assert card["test"]["patch_all"] == report["summary"]["cancernet"]["patch_all"]
    with pytest.raises(OptionError, match="at most one --model"):
        evaluate_models(evaluated["root"], ["cancernet", "resnet18"], tmp_path / "out", device="cpu", weights=trained)


def test_evaluating_again_into_the_same_folder_replaces_the_earlier_figures(tmp_path, evaluated):
    """A second evaluation (one model) into a folder of an earlier one (two models) leaves no figure of
    the model it did not evaluate, and keeps files idcmap did not write."""
    out = tmp_path / "out"
    out.mkdir()
    for path in evaluated["out"].iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    (out / "confusion_notes.png").write_bytes(b"mine")  # named like a figure, but not listed by idcmap
    trained = tmp_path / "run" / "trained.pt"
    write_tiny_weights(trained, model="cancernet", seed=5)
    save_split(evaluated["split"], trained.with_suffix(".split.json"))
    report = evaluate_models(evaluated["root"], [], out, device="cpu", weights=trained)
    listed = ["metrics.json", "models.md", "roc_pr.png", "confusion_cancernet.png", "samples_cancernet.png"]
    assert report["files"] == listed
    assert sorted(p.name for p in out.iterdir()) == sorted([*listed, "confusion_notes.png"])
    assert json.loads((out / "metrics.json").read_text())["files"] == listed


def test_a_failed_write_keeps_every_earlier_output(tmp_path, evaluated, monkeypatch):
    """Outputs are replaced together: where one cannot be written, metrics.json, the figures and the
    card all stay as the earlier evaluation left them."""
    out = tmp_path / "out"
    out.mkdir()
    for path in evaluated["out"].iterdir():
        (out / path.name).write_bytes(path.read_bytes())
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    trained = tmp_path / "run" / "trained.pt"
    write_tiny_weights(trained, model="cancernet", seed=5)
    save_split(evaluated["split"], trained.with_suffix(".split.json"))
    real_replace = os.replace

    def failing_replace(src, dst):
        if Path(dst).name == "samples_cancernet.png" and str(src).endswith(".tmp"):  # the new file, not a put-back
            raise OSError(errno.ENOSPC, "No space left on device")
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OutputError, match="nothing was left half-written"):
        evaluate_models(evaluated["root"], [], out, device="cpu", record=True, weights=trained)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert not card_path(trained).exists()


def _one_patient_setup(tmp_path, monkeypatch):
    """A data root with one whole test patient, tiny cancernet weights, a split naming it test."""
    root = tmp_path / "data"
    make_patient(root / "patients", "w0", {(c * 50 + 1, r * 50 + 1): (int(c == 0), _patch(r * 3 + c, int(c == 0)))
                                           for r in range(3) for c in range(3)})
    make_patient(root / "patients", "w1", {(c * 50 + 1, 1): (c % 2, _patch(50 + c, c % 2)) for c in range(3)})
    weights = tmp_path / "weights"
    write_tiny_weights(weights / "cancernet.pt", model="cancernet")
    monkeypatch.setattr(models_module, "WEIGHTS_DIR", weights)
    save_split({"seed": 0, "train": ["patients/w1"], "val": [], "test": ["patients/w0"]}, tmp_path / "split.json")
    return root, weights


def test_an_unwritable_output_is_refused_before_any_scoring(tmp_path, monkeypatch):
    root, _ = _one_patient_setup(tmp_path, monkeypatch)

    def never(*args, **kwargs):
        raise AssertionError("scored before the output folder was checked")

    monkeypatch.setattr(Scorer, "score", never)
    taken = tmp_path / "a file"
    taken.write_text("mine")
    with pytest.raises(OutputError, match="a file: exists and is not a folder; choose a writable -o"):
        evaluate_models(root, ["cancernet"], taken, split_file=tmp_path / "split.json", device="cpu")
    assert taken.read_text() == "mine"



@pytest.mark.parametrize("option, error", [({"device": "foo"}, "--device foo"),
                                           ({"backend": "onnx-int8"}, "no int8 patch network")])
def test_device_and_backend_are_checked_before_loading_or_writing(tmp_path, monkeypatch, option, error):
    root, _ = _one_patient_setup(tmp_path, monkeypatch)

    def never(*args, **kwargs):
        raise AssertionError("test slides loaded before the options were checked")

    monkeypatch.setattr(evaluation, "load_labelled_slides", never)
    with pytest.raises(IdcmapError, match=error):
        evaluate_models(root, ["cancernet"], tmp_path / "out", split_file=tmp_path / "split.json",
                        **{"device": "cpu", **option})
    assert not (tmp_path / "out").exists()


def test_a_split_without_test_patients_says_so(tmp_path, monkeypatch):
    root, _ = _one_patient_setup(tmp_path, monkeypatch)
    save_split({"seed": 0, "train": ["patients/w1"], "val": ["patients/w0"], "test": []}, tmp_path / "none.json")
    with pytest.raises(SplitError, match=r"none.json: no test patients; pass a --split"):
        evaluate_models(root, ["cancernet"], tmp_path / "out", split_file=tmp_path / "none.json", device="cpu")


def test_a_model_named_twice_is_evaluated_once(tmp_path, monkeypatch):
    root, _ = _one_patient_setup(tmp_path, monkeypatch)
    report = evaluate_models(root, ["cancernet", "cancernet"], tmp_path / "out", split_file=tmp_path / "split.json",
                             device="cpu")
    assert list(report["models"]) == ["cancernet"]
    assert (tmp_path / "out" / "models.md").read_text().count("| `cancernet` |") == 1


def test_test_patients_that_trained_the_model_are_refused(tmp_path, monkeypatch):
    """A --split whose test patients trained or validated the model (by the split stored beside its
    weights) would give test figures that overstate."""
    root, weights = _one_patient_setup(tmp_path, monkeypatch)
    save_split({"seed": 0, "train": ["patients/w0"], "val": ["patients/w1"], "test": []},
               weights / "cancernet.split.json")
    with pytest.raises(SplitError, match=r"1 of its test patients trained or validated .*cancernet.pt .*patients/w0"):
        evaluate_models(root, ["cancernet"], tmp_path / "out", split_file=tmp_path / "split.json", device="cpu")
    assert not (tmp_path / "out").exists()
    save_split({"seed": 0, "train": ["patients/w1"], "val": [], "test": ["patients/w0"]}, weights / "cancernet.split.json")
    report = evaluate_models(root, ["cancernet"], tmp_path / "out", split_file=tmp_path / "split.json", device="cpu")
    assert report["test_patients"] == ["patients/w0"]


def test_test_patients_are_recognised_by_name_from_another_depth_of_the_data(tmp_path, monkeypatch):
    """A split written against `patients/` itself names `w0`, not `patients/w0`: still the patient
    that trained the model."""
    root, weights = _one_patient_setup(tmp_path, monkeypatch)
    save_split({"seed": 0, "train": ["patients/w0"], "val": ["patients/w1"], "test": []},
               weights / "cancernet.split.json")
    save_split({"seed": 0, "train": [], "val": [], "test": ["w0"]}, tmp_path / "inner.split.json")
    with pytest.raises(SplitError, match=r"1 of its test patients trained or validated .*cancernet.pt .*e\.g\. w0,"):
        evaluate_models(root / "patients", ["cancernet"], tmp_path / "out", split_file=tmp_path / "inner.split.json",
                        device="cpu")


def test_one_patient_in_two_folders_is_refused_for_a_split(tmp_path):
    from idcmap.dataset import patient_ids

    for group in ("patients", "copies"):
        make_patient(tmp_path / group, "8864", {(1, 1): (0, _patch(0, 0))})
    with pytest.raises(SplitError, match=r"copies/8864 and patients/8864 are folders of one patient \(8864\)"):
        patient_ids(tmp_path)


def test_patch_figures_use_each_slides_own_threshold(tmp_path, monkeypatch):
    """E4: scattered samples are judged at the calibration's scattered threshold, as render predicts."""
    from test_evaluation import _build_root

    from idcmap.evaluation import evaluate_models

    root = tmp_path / "data"
    _build_root(root)
    weights = tmp_path / "weights"
    write_tiny_weights(weights / "cancernet.pt", model="cancernet",
                       calibration={"threshold": 1.0, "scattered_threshold": 0.0})
    monkeypatch.setattr(models_module, "WEIGHTS_DIR", weights)
    split = make_split(sorted(patient_ids(root)), seed=0, test_fraction=0.4)
    save_split(split, tmp_path / "split.json")
    report = evaluate_models(root, ["cancernet"], tmp_path / "out", split_file=tmp_path / "split.json", device="cpu",
                             progress=False)
    (tn, fp), (fn, tp) = report["models"]["cancernet"]["patch"]["sparse"]["confusion_matrix"]
    assert tn == fn == 0 and fp + tp > 0  # threshold 0 on scattered samples: every patch predicted IDC
    (tn, fp), (fn, tp) = report["models"]["cancernet"]["patch"]["patients"]["confusion_matrix"]
    assert fp == tp == 0  # threshold 1 on whole slides: none


def test_paired_differences_are_against_the_default_model_when_it_is_evaluated(tmp_path, monkeypatch):
    """E6: the default model is the reference whatever the order of --model."""
    from test_evaluation import _build_root

    from idcmap.evaluation import evaluate_models

    root = tmp_path / "data"
    _build_root(root)
    weights = tmp_path / "weights"
    names = ["cancernet", models_module.DEFAULT_MODEL]
    for seed, name in enumerate(names):
        write_tiny_weights(weights / f"{name}.pt", model=name, seed=seed)
    monkeypatch.setattr(models_module, "WEIGHTS_DIR", weights)
    split = make_split(sorted(patient_ids(root)), seed=0, test_fraction=0.4)
    save_split(split, tmp_path / "split.json")
    report = evaluate_models(root, names, tmp_path / "out", split_file=tmp_path / "split.json", device="cpu",
                             progress=False)
    assert report["paired"]["patients"]["reference"] == models_module.DEFAULT_MODEL
    assert list(report["paired"]["patients"]["against"]) == ["cancernet"]


def test_unlabelled_test_patients_are_not_counted_as_evaluated(tmp_path, monkeypatch):
    """E7 (metrics.json's test_patients) and E8 (the card's test patients) count the evaluated ones."""
    from test_evaluation import _unlabelled_root

    from idcmap.evaluation import evaluate_models
    from idcmap.models import card_path

    root = tmp_path / "data"
    _unlabelled_root(root)
    weights = tmp_path / "weights"
    write_tiny_weights(weights / "cancernet.pt", model="cancernet")
    monkeypatch.setattr(models_module, "WEIGHTS_DIR", weights)
    split = {"seed": 0, "train": [], "val": [], "test": ["patients/u0", "patients/w0", "sparse/s0"]}
    save_split(split, tmp_path / "split.json")
    report = evaluate_models(root, ["cancernet"], tmp_path / "out", split_file=tmp_path / "split.json", device="cpu",
                             record=True, progress=False)
    assert report["test_patients"] == ["patients/w0", "sparse/s0"]
    assert json.loads(card_path(weights / "cancernet.pt").read_text())["test"]["patients"] == 2
