"""idcmap.training: a tiny end-to-end training run on synthetic patients, and its outputs."""
from __future__ import annotations

import json
import logging
from dataclasses import replace

import numpy as np
import pytest
import torch

from conftest import make_patient, textured
from idcmap.colour import colour_reference, normalise_slide
from idcmap.dataset import SPLIT_SETS, make_split, patient_ids, save_split
from idcmap.errors import IdcmapError, OptionError, SplitError
from idcmap.loader import load_slide
from idcmap.models import build_model, card_path, load_model, read_weights, sha256_of
from idcmap.scoring import Scorer
from idcmap.training import (BatchMaker, TrainConfig, Window, int8_agreement, pixel_statistics, quantize, recalibrate,
                             train, training_precision)

MODEL = "cancernet-context"


def _synthetic_root(root, patients=6, label_of=None):
    """`root/group/p<i>`: 4 x 5 patches each; IDC patches dark, the others light (easy to learn)."""
    label_of = label_of or (lambda i, r, c: int(c < 2))
    for i in range(patients):
        patches = {}
        for r in range(4):
            for c in range(5):
                label = label_of(i, r, c)
                patches[(c * 50 + 1, r * 50 + 1)] = (label, textured(i * 100 + r * 5 + c,
                                                                     base=70 if label else 190, spread=40))
        make_patient(root / "group", f"p{i}", patches)
    return root


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    base = tmp_path_factory.mktemp("training")
    root = _synthetic_root(base / "data")
    out = base / "weights" / f"{MODEL}.pt"
    card = train(root, MODEL, out, TrainConfig(epochs=2, batch_patches=32, device="cpu", seed=0, precision="fp32"))
    return root, out, card


def test_training_lowers_the_loss(trained):
    _, _, card = trained
    history = card["history"]
    assert [h["epoch"] for h in history] == [1, 2]
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert all(np.isfinite(h["train_loss"]) and np.isfinite(h["val_loss"]) for h in history)


def test_training_writes_weights_card_and_split(trained):
    root, out, card = trained
    assert out.is_file()
    assert sorted(p.name for p in out.parent.iterdir()) == sorted(
        [out.name, card_path(out).name, out.with_suffix(".split.json").name])  # no checkpoint or temp left
    on_disk = json.loads(card_path(out).read_text())
    assert on_disk["sha256"] == sha256_of(out) == card["sha256"]
    assert on_disk["model"] == MODEL
    assert on_disk["training"]["epochs_run"] == 2
    assert on_disk["training"]["train_patches"] == 20 * on_disk["training"]["train_patients"]
    split = json.loads(out.with_suffix(".split.json").read_text())
    ids = [pid for name in SPLIT_SETS for pid in split[name]]
    assert sorted(ids) == [f"group/p{i}" for i in range(6)]
    assert len(ids) == len(set(ids))
    assert split["train"] and split["val"] and split["test"]
    assert on_disk["training"]["split_file"] == out.with_suffix(".split.json").name
    assert len(on_disk["mean"]) == len(on_disk["std"]) == 3


def test_a_reused_split_records_the_fractions_it_was_drawn_with(trained, tmp_path):
    """With --split, the card gives the split file's fractions, not the unused command-line ones."""
    root, out, card = trained
    split_file = out.with_suffix(".split.json")
    split = json.loads(split_file.read_text())
    assert card["training"]["val_fraction"] == split["val_fraction"]  # drawn: the config's own
    reused = train(root, MODEL, tmp_path / f"{MODEL}.pt", TrainConfig(epochs=1, batch_patches=32, device="cpu",
                                                                       seed=0, precision="fp32", val_fraction=0.3,
                                                                       test_fraction=0.4), split_file=split_file)
    assert (reused["training"]["test_fraction"], reused["training"]["val_fraction"]) == (
        split["test_fraction"], split["val_fraction"])
    assert "--split" in reused["training"]["command"]


def test_auto_precision_is_bf16_where_the_hardware_computes_it_natively(monkeypatch):
    import torch

    from idcmap import training

    for native in (True, False):
        monkeypatch.setattr(training, "cpu_has_bf16", lambda native=native: native)
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True, native=native: native)
        expected = "bf16" if native else "fp32"
        assert training_precision("auto", torch.device("cpu")) == expected
        assert training_precision("auto", torch.device("cuda")) == expected
    assert training_precision("fp32", torch.device("cuda")) == "fp32"
    assert training_precision("bf16", torch.device("cpu")) == "bf16"


@pytest.mark.parametrize("native", [True, False])
def test_explicit_bf16_on_a_cpu_that_only_emulates_it_is_kept_with_a_warning(monkeypatch, caplog, native):
    import torch

    from idcmap import training

    monkeypatch.setattr(training, "cpu_has_bf16", lambda: native)
    assert training_precision("bf16", torch.device("cpu")) == "bf16"  # the recipe's precision, not switched
    warned = "does not compute bfloat16 natively" in caplog.text and "--precision auto or fp32" in caplog.text
    assert warned is not native
    caplog.clear()
    assert training_precision("fp32", torch.device("cpu")) == "fp32" and caplog.text == ""


def _spy_on_steps(monkeypatch) -> list[bool]:
    """Record the bf16 flag of every training step."""
    from idcmap import training

    flags: list[bool] = []
    real_step = training.training_step

    def spy(*args):
        flags.append(args[-1])
        return real_step(*args)
    monkeypatch.setattr(training, "training_step", spy)
    return flags


def test_scattered_repeat_shows_scattered_patients_more_often_per_epoch(tmp_path, monkeypatch):
    """--scattered-repeat K: each epoch holds the scattered-sample patients' patches K times, the
    whole slides' once; the card's command repeats the setting."""
    from idcmap import training

    root = _synthetic_root(tmp_path / "data", patients=4)
    scattered = {(1 + 150 * k, 1 + 150 * j): (int(k == 0), textured(900 + 3 * k + j, base=70 if k == 0 else 190,
                                                                      spread=40))
                 for k in range(2) for j in range(2)}  # 4 patches, 2 grid cells apart: no neighbours
    for i in range(2):
        make_patient(root / "group", f"s{i}", scattered)
    split = {"train": ["group/p0", "group/p1", "group/s0", "group/s1"], "val": ["group/p2", "group/p3"], "test": []}
    split_file = tmp_path / "split.json"
    split_file.write_text(json.dumps(split))
    seen: list[int] = []
    real_step = training.training_step

    def spy(network, optimizer, x, *rest):
        seen.append(len(x))
        return real_step(network, optimizer, x, *rest)
    monkeypatch.setattr(training, "training_step", spy)
    counts = []
    for repeat in (1, 3):
        seen.clear()
        card = train(root, MODEL, tmp_path / f"r{repeat}" / f"{MODEL}.pt",
                     TrainConfig(epochs=1, batch_patches=32, cell_dropout=0.0, device="cpu", seed=0, precision="fp32",
                                 scattered_repeat=repeat), split_file=split_file)
        counts.append(sum(seen))
        assert card["training"]["scattered_repeat"] == repeat
        assert ("--scattered-repeat 3" in card["training"]["command"]) == (repeat == 3)
    assert counts == [2 * 20 + 2 * 4, 2 * 20 + 3 * 2 * 4]


def test_bf16_runs_every_step_under_autocast_and_the_card_says_so(trained, tmp_path, monkeypatch):
    root, _, fp32_card = trained
    assert fp32_card["training"]["precision"] == "fp32"
    assert fp32_card["training"]["command"].endswith("--precision fp32")
    flags = _spy_on_steps(monkeypatch)
    card = train(root, MODEL, tmp_path / "bf16.pt", TrainConfig(epochs=2, batch_patches=32, device="cpu",
                                                                precision="bf16"))
    assert flags and all(flags)
    assert card["training"]["precision"] == "bf16"
    assert card["training"]["command"].endswith("--precision bf16")
    assert card["history"][-1]["train_loss"] < card["history"][0]["train_loss"]


def test_auto_is_resolved_so_the_command_reproduces_the_run(trained, tmp_path, monkeypatch):
    from idcmap import training

    root, _, _ = trained
    import torch

    from idcmap.scoring import resolve_device

    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: False)
    flags = _spy_on_steps(monkeypatch)
    card = train(root, MODEL, tmp_path / "auto.pt", TrainConfig(epochs=1, batch_patches=32, device="auto"))
    device = str(resolve_device("auto"))
    assert flags and not any(flags)
    assert card["training"]["precision"] == "fp32" and card["training"]["device"] == device
    assert card["training"]["command"].endswith(f"--device {device} --precision fp32")


def _killed_after_first_epoch(root, target, config, monkeypatch) -> None:
    """Run `train` until its first epoch's checkpoint is written, then interrupt it (Ctrl-C)."""
    from idcmap import training

    real_collect = training.collect_scores
    calls = []

    def killed_in_epoch_two(scorer, slides):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_collect(scorer, slides)

    monkeypatch.setattr(training, "collect_scores", killed_in_epoch_two)
    with pytest.raises(KeyboardInterrupt):
        train(root, MODEL, target, config)
    monkeypatch.setattr(training, "collect_scores", real_collect)


def test_resume_keeps_the_precision_the_checkpoint_trained_in(trained, tmp_path, monkeypatch):
    from idcmap import training

    root, out, _ = trained
    target = tmp_path / "resumed" / out.name
    _killed_after_first_epoch(root, target, TrainConfig(epochs=2, batch_patches=32, device="cpu", precision="fp32"),
                              monkeypatch)
    with pytest.raises(IdcmapError, match=r"--precision bf16: .* was trained in fp32; resume with --precision fp32"):
        train(root, MODEL, target, TrainConfig(epochs=2, batch_patches=32, device="cpu", precision="bf16"),
              resume=True)
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: True)  # auto alone would now pick bf16
    flags = _spy_on_steps(monkeypatch)
    card = train(root, MODEL, target, TrainConfig(epochs=2, batch_patches=32, device="cpu"), resume=True)
    assert flags and not any(flags)
    assert card["training"]["precision"] == "fp32"


def test_bf16_on_a_cpu_without_native_bf16_warns(trained, tmp_path, monkeypatch, caplog):
    from idcmap import training

    root, _, _ = trained
    monkeypatch.setattr(training, "cpu_has_bf16", lambda: False)
    card = train(root, MODEL, tmp_path / "bf16.pt", TrainConfig(epochs=1, batch_patches=32, device="cpu",
                                                                 precision="bf16"))
    assert card["training"]["precision"] == "bf16"
    assert "no native bfloat16" in caplog.text


def test_trained_weights_load_and_score(trained):
    root, out, card = trained
    model = load_model(MODEL, out)
    assert model.sha256 == card["sha256"]
    assert model.card["sha256"] == card["sha256"]
    assert model.calibration.threshold == card["calibration"]["threshold"]
    split = json.loads(out.with_suffix(".split.json").read_text())
    slide = load_slide(root / split["test"][0])
    scores = Scorer(model, device="cpu").score(slide)
    assert scores.probability.shape == (20,)
    assert ((scores.probability >= 0) & (scores.probability <= 1)).all()
    # (two epochs are too few for batch-norm running statistics to settle, so no accuracy is asked)
    stored = read_weights(out)["state_dict"]  # the trained tensors, not a fresh initialisation, are scored
    loaded = model.network.state_dict()
    assert stored.keys() == loaded.keys()
    assert all(torch.equal(stored[k], loaded[k]) for k in stored)
    assert not all(torch.equal(stored[k], v) for k, v in build_model(MODEL).state_dict().items())


def test_recalibrate_rewrites_weights_and_card(trained, tmp_path):
    root, out, _ = trained
    copy = tmp_path / out.name
    copy.write_bytes(out.read_bytes())
    card_path(copy).write_text(card_path(out).read_text())
    copy.with_suffix(".split.json").write_text(out.with_suffix(".split.json").read_text())
    card_path(copy).write_text(json.dumps({**json.loads(card_path(out).read_text()), "test": {"dice": 0.5}}))
    card = recalibrate(root, None, copy, device="cpu")  # the model is the one the weights hold
    assert card["model"] == MODEL and card["sha256"] == sha256_of(copy)
    assert "test" not in card  # test figures of the old calibration do not describe the new one
    assert json.loads(card_path(copy).read_text())["calibration"] == card["calibration"]
    assert load_model(MODEL, copy).calibration.threshold == card["calibration"]["threshold"]


def test_too_few_patients(tmp_path):
    root = _synthetic_root(tmp_path / "data", patients=2)
    with pytest.raises(OptionError, match=r"leave no val and no test patient among the 2 of .*\(2 train, 0 val, 0 "):
        train(root, MODEL, tmp_path / "w" / "m.pt", TrainConfig(epochs=1, batch_patches=32, device="cpu"))


def test_fractions_that_draw_no_test_patient_are_refused_before_training(tmp_path):
    root = _synthetic_root(tmp_path / "data", patients=4)
    with pytest.raises(OptionError, match=r"--test-fraction 0.1, --val-fraction 0.1: leave no test patient"):
        train(root, MODEL, tmp_path / "w" / "m.pt", TrainConfig(epochs=1, batch_patches=32, device="cpu",
                                                                 test_fraction=0.1))
    assert not (tmp_path / "w").exists() or not any((tmp_path / "w").iterdir())


def test_calibration_smooths_noisy_logits_of_a_coherent_region(tmp_path):
    from idcmap.models import Calibration
    from idcmap.regions import dice, predicted_mask
    from idcmap.scoring import calibrated_scores
    from idcmap.training import fit_calibration

    from conftest import grid_patches

    rng = np.random.default_rng(0)
    scored = []
    for i in range(2):
        slide = load_slide(make_patient(tmp_path, f"P{i}", grid_patches(12, 12, label_of=lambda r, c: int(c < 5 + i))))
        truth = slide.labels == 1
        logit = (np.where(truth, 1.0, -1.0) + rng.normal(0, 2.0, len(slide))).astype(np.float32)
        scored.append((slide, calibrated_scores(slide, logit, logit, 0, Calibration())))
    best, choice = fit_calibration(scored, context_reach=0)
    assert best.smoothing_sigma > 0
    assert 0 < best.threshold < 1 and best.temperature > 0
    unsmoothed = np.mean([dice(s, predicted_mask(s, r.probability, Calibration(threshold=0.5)), s.labels == 1)
                          for s, r in scored])
    assert choice["val_dice"] > unsmoothed + 0.1
    assert choice["slides"] == ["P0", "P1"]


def _scored_slides(tmp_path, shifts: list[float], noise: float = 0.0) -> list:
    """Whole 10x10 slides, IDC in the left 4 columns, logits +2 (IDC) / -2 (not) plus each slide's shift
    (and Gaussian noise of sd `noise`, seeded)."""
    from idcmap.models import Calibration
    from idcmap.scoring import calibrated_scores

    from conftest import grid_patches

    scored = []
    for i, shift in enumerate(shifts):
        slide = load_slide(make_patient(tmp_path, f"P{i}", grid_patches(10, 10, label_of=lambda r, c: int(c < 4))))
        logit = (np.where(slide.labels == 1, 2.0, -2.0) + shift
                 + noise * np.random.default_rng(i).standard_normal(len(slide))).astype(np.float32)
        scored.append((slide, calibrated_scores(slide, logit, logit, 0, Calibration())))
    return scored


def test_scattered_samples_get_their_own_threshold(tmp_path):
    """Whole slides separable at any threshold (the lowest is kept); scattered samples whose non-IDC
    patches sit at 0.5: they get a threshold of their own above 0.5, which calls them right, and
    `render` applies it to them only."""
    from idcmap.models import Calibration
    from idcmap.regions import slide_threshold
    from idcmap.scoring import calibrated_scores
    from idcmap.training import fit_calibration

    from conftest import grid_patches

    whole = _scored_slides(tmp_path, [0.0, 0.0])
    alone, _ = fit_calibration(whole, context_reach=0, sigmas=(0.0,), left_out=False)
    scattered = []
    for i in range(2):
        skip = {(r, c) for r in range(3) for c in range(3)} - {(0, 0), (0, 2), (2, 0), (2, 2)}
        slide = load_slide(make_patient(tmp_path, f"S{i}", grid_patches(3, 3, label_of=lambda r, c: int(r == 0),
                                                                        skip=skip)))
        assert not slide.is_whole
        logit = np.where(slide.labels == 1, 3.0, 0.0).astype(np.float32)
        scattered.append((slide, calibrated_scores(slide, logit, logit, 0, Calibration())))
    best, choice = fit_calibration(whole + scattered, context_reach=0, sigmas=(0.0,), left_out=False)
    assert alone.scattered_threshold is None and best.threshold == alone.threshold < 0.5
    assert 0.5 < best.scattered_threshold < 1
    assert choice["scattered_samples"]["value"] == pytest.approx(1.0) and choice["scattered_samples"]["patients"] == 2
    assert choice["scattered_samples"]["threshold"] == best.scattered_threshold
    slide, scores = scattered[0]
    probability = calibrated_scores(slide, scores.patch_logit, scores.context_logit, 0, best).probability
    assert slide_threshold(slide, probability, best) == (best.scattered_threshold, "scattered")
    assert slide_threshold(whole[0][0], whole[0][1].probability, best) == (best.threshold, "fixed")


def test_left_one_slide_out_equals_in_sample_on_alike_slides(tmp_path):
    from idcmap.training import fit_calibration

    _, choice = fit_calibration(_scored_slides(tmp_path, [0.0, 0.0, 0.0]), context_reach=0, sigmas=(0.0,))
    left_out = choice["left_one_slide_out"]
    assert sorted(left_out["per_slide"]) == ["P0", "P1", "P2"]
    assert left_out["value"] == pytest.approx(choice["value"]) and choice["value"] == pytest.approx(1.0)


def test_left_one_slide_out_judges_each_slide_by_a_fit_without_it(tmp_path):
    from idcmap.training import fit_calibration

    # P2's logits sit 2.5 lower: fitted with it, the calibration takes in its IDC; fitted without it, not
    _, choice = fit_calibration(_scored_slides(tmp_path, [0.0, 0.0, -2.5]), context_reach=0, sigmas=(0.0,))
    left_out = choice["left_one_slide_out"]
    assert choice["value"] == pytest.approx(1.0)
    assert left_out["per_slide"]["P2"]["dice"] < 0.5 and left_out["per_slide"]["P0"]["dice"] == pytest.approx(1.0)
    assert left_out["value"] < choice["value"] - 0.1


def test_otsu_rule_is_stored_and_judged_with_its_own_thresholds(tmp_path):
    """fit_calibration(threshold_rule="otsu"): the calibration carries the rule, and the objectives it
    records (in sample and left out) are those of each slide's own threshold."""
    from idcmap.regions import predicted_mask, slide_threshold
    from idcmap.scoring import calibrated_scores
    from idcmap.training import fit_calibration, region_figures

    scored = _scored_slides(tmp_path, [0.0, 0.5, -0.5], noise=1.0)
    calibration, choice = fit_calibration(scored, context_reach=0, sigmas=(0.0,), threshold_rule="otsu")
    assert calibration.threshold_rule == "otsu"
    figures = []
    for slide, scores in scored:
        probability = calibrated_scores(slide, scores.patch_logit, scores.context_logit, 0, calibration).probability
        assert slide_threshold(slide, probability, calibration).source == "otsu"  # each slide its own
        figures.append(region_figures(slide, probability, calibration))
        assert predicted_mask(slide, probability, calibration).any()
    dices, errors = np.array(figures).T
    assert choice["value"] == pytest.approx(dices.mean() - errors.mean())
    assert set(choice["left_one_slide_out"]["per_slide"]) == {"P0", "P1", "P2"}


def test_best_regions_judges_post_processing_under_the_rule(tmp_path):
    """best_regions under the otsu rule judges speck and hole sizes with each slide's own
    threshold: a better choice for that rule than the one made for one threshold (which
    fit_calibration keeps, since it carried over better to slides left out of the fit)."""
    from idcmap.training import THRESHOLDS, best_regions, fit_calibration, region_figures, smoothing_candidates

    scored = _scored_slides(tmp_path, [1.0, -1.0, -2.0], noise=1.5)
    _, candidates = smoothing_candidates(scored, context_reach=0, sigmas=(0.0,))
    _, _, _, fixed = best_regions(candidates, THRESHOLDS)
    shipped, choice = fit_calibration(scored, context_reach=0, sigmas=(0.0,), left_out=False, threshold_rule="otsu")
    assert shipped == replace(fixed, threshold_rule="otsu")
    searched_value, _, _, searched = best_regions(candidates, [fixed.threshold], "otsu")
    assert searched.threshold_rule == "otsu"
    assert (searched.min_region_cells, searched.max_hole_cells) != (fixed.min_region_cells, fixed.max_hole_cells)
    assert searched_value > choice["value"] + 0.05
    figures = np.array([region_figures(s, p, searched) for s, p in candidates[0][1]])
    assert searched_value == pytest.approx(figures[:, 0].mean() - figures[:, 1].mean())
    with pytest.raises(IdcmapError, match="threshold rule 'Otsu'"):
        best_regions(candidates, THRESHOLDS, "Otsu")


def test_left_one_slide_out_needs_two_slides(tmp_path):
    from idcmap.training import fit_calibration

    _, choice = fit_calibration(_scored_slides(tmp_path, [0.0]), context_reach=0, sigmas=(0.0,))
    assert choice["left_one_slide_out"] is None
    assert "left_one_slide_out" not in fit_calibration(_scored_slides(tmp_path, [0.0, 0.0]), 0, (0.0,), left_out=False)[1]


def test_patch_only_models_are_never_smoothed():
    from idcmap.models import REGISTRY
    from idcmap.training import SMOOTHING_SIGMAS, smoothing_sigmas

    assert smoothing_sigmas(REGISTRY["cancernet"]) == (0.0,)
    assert smoothing_sigmas(REGISTRY["resnet18"]) == (0.0,)
    assert smoothing_sigmas(REGISTRY["cancernet-smooth"]) == SMOOTHING_SIGMAS
    assert 0.0 in SMOOTHING_SIGMAS  # calibration may still choose no smoothing


def test_training_is_deterministic_and_resumes_where_it_stopped(trained, tmp_path, monkeypatch):
    import torch

    root, out, card = trained
    config = TrainConfig(epochs=2, batch_patches=32, device="cpu", seed=0, precision="fp32")
    # the same run again: the same weights, bit for bit
    again = train(root, MODEL, tmp_path / "again" / out.name, config)
    assert again["sha256"] == card["sha256"]

    # a run killed after its first epoch's checkpoint, then resumed: the same weights again
    target = tmp_path / "resumed" / out.name
    _killed_after_first_epoch(root, target, config, monkeypatch)
    assert target.with_suffix(".ckpt").is_file() and not target.exists()
    resumed = train(root, MODEL, target, config, resume=True)
    assert [h["epoch"] for h in resumed["history"]] == [1, 2]
    first = read_weights(out)["state_dict"]
    second = read_weights(target)["state_dict"]
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not target.with_suffix(".ckpt").exists()


@pytest.fixture(scope="module")
def quantised(trained, tmp_path_factory):
    """A copy of the trained weights with their int8 patch network made by `quantize`."""
    root, out, _ = trained
    folder = tmp_path_factory.mktemp("quantised")
    for source in (out, card_path(out), out.with_suffix(".split.json")):
        (folder / source.name).write_bytes(source.read_bytes())
    card = quantize(root, MODEL, folder / out.name, patches=64)
    return root, folder / out.name, card


def test_quantize_writes_an_int8_network_the_card_vouches_for(quantised):
    _, weights, card = quantised
    int8 = weights.with_suffix(".int8.onnx")
    assert int8.is_file() and json.loads(card_path(weights).read_text())["int8"] == card["int8"]
    assert card["int8"]["sha256"] == sha256_of(int8) and card["int8"]["weights_sha256"] == sha256_of(weights)
    assert card["int8"]["calibration_patches"] == 64
    validation = card["int8"]["validation"]
    assert validation["patches"] == 20 * validation["patients"] > 0
    assert 0 <= validation["max_probability_difference"] < 0.2 and 0 <= validation["decisions_changed"] <= 1


def test_int8_agreement_benchmark_repeats_the_cards_figures(quantised):
    """benchmarks/bench_int8_agreement.py runs end to end and, on the CPU that quantised the network,
    finds the figures `quantize` recorded."""
    import subprocess
    import sys

    from conftest import REPO_ROOT

    root, weights, card = quantised
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_int8_agreement.py"), "--model", MODEL,
                           "--weights", str(weights), "--data", str(root)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["this_cpu"] == report["card"] == card["int8"]["validation"]


def test_int8_backend_scores_close_to_fp32_and_auto_picks_it(quantised):
    root, weights, _ = quantised
    model = load_model(MODEL, weights)
    slide = load_slide(root / json.loads(weights.with_suffix(".split.json").read_text())["test"][0])
    auto = Scorer(model, device="cpu")
    assert auto.backend == "onnx-int8"
    int8 = auto.score(slide).probability
    fp32 = Scorer(model, device="cpu", backend="onnx").score(slide).probability
    assert ((int8 >= 0) & (int8 <= 1)).all()
    assert np.abs(int8 - fp32).max() < 0.2  # a tiny 2-epoch model; the shipped one stays within 0.02
    np.testing.assert_array_equal(int8, Scorer(model, device="cpu", backend="onnx-int8").score(slide).probability)


def test_int8_network_of_other_weights_is_refused(quantised, tmp_path):
    _, weights, _ = quantised
    for source in (weights, card_path(weights), weights.with_suffix(".int8.onnx")):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    copy = tmp_path / weights.name
    assert Scorer(load_model(MODEL, copy), device="cpu").backend == "onnx-int8"
    card = json.loads(card_path(copy).read_text())
    card["int8"]["weights_sha256"] = "0" * 64  # as after the weights were retrained
    card_path(copy).write_text(json.dumps(card))
    stale = load_model(MODEL, copy)
    assert Scorer(stale, device="cpu").backend == "onnx"  # auto falls back to fp32
    with pytest.raises(IdcmapError, match="idcmap quantize"):
        Scorer(stale, device="cpu", backend="onnx-int8")
    copy.with_suffix(".int8.onnx").unlink()
    with pytest.raises(IdcmapError, match="no int8 patch network"):
        Scorer(load_model(MODEL, copy), device="cpu", backend="onnx-int8")


def test_recalibrating_keeps_the_int8_network_usable(quantised, tmp_path):
    root, weights, _ = quantised
    for source in (weights, card_path(weights), weights.with_suffix(".int8.onnx"), weights.with_suffix(".split.json")):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    stale = json.loads(card_path(tmp_path / weights.name).read_text())
    stale["int8"]["validation"]["decisions_changed"] = 0.5  # as if measured under another calibration
    card_path(tmp_path / weights.name).write_text(json.dumps(stale))
    card = recalibrate(root, MODEL, tmp_path / weights.name, device="cpu")
    assert card["int8"]["weights_sha256"] == card["sha256"] == sha256_of(tmp_path / weights.name)
    model = load_model(MODEL, tmp_path / weights.name)
    assert Scorer(model, device="cpu").backend == "onnx-int8"
    split = json.loads(weights.with_suffix(".split.json").read_text())
    val_slides = [load_slide(root / patient) for patient in split["val"]]
    assert card["int8"]["validation"] == int8_agreement(model, val_slides)  # measured again, under the new calibration


def _train_slides(root, weights):
    split = json.loads(weights.with_suffix(".split.json").read_text())
    return [load_slide(root / patient) for patient in split["train"]]


def test_colour_normalised_training_learns_from_normalised_slides_and_stores_the_reference(trained, tmp_path):
    root, _, _ = trained
    out = tmp_path / f"{MODEL}.pt"
    card = train(root, MODEL, out, TrainConfig(epochs=1, batch_patches=32, device="cpu", seed=0, precision="fp32",
                                                colour_normalise=True))
    slides = _train_slides(root, out)
    reference = colour_reference(slides)
    assert card["colour_reference"] == reference.as_dict() == read_weights(out)["colour_reference"]
    assert load_model(MODEL, out).colour_reference == reference
    assert "colour_reference" in card["input"]
    assert card["training"]["command"].endswith("--precision fp32 --colour-normalise")
    mean, std = pixel_statistics([normalise_slide(s, reference) for s in slides])
    assert (card["mean"], card["std"]) == (mean, std)  # the input statistics of the normalised slides


def test_a_run_without_colour_normalisation_stores_no_reference(trained):
    _, out, card = trained
    assert "colour_reference" not in card and "colour_reference" not in read_weights(out)
    assert load_model(MODEL, out).colour_reference is None
    assert "--colour-normalise" not in card["training"]["command"]


def test_recalibrate_can_add_a_colour_reference_and_keeps_it(trained, tmp_path):
    root, out, _ = trained
    for source in (out, card_path(out), out.with_suffix(".split.json")):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    copy = tmp_path / out.name
    card = recalibrate(root, None, copy, device="cpu", colour_normalise=True)
    reference = colour_reference(_train_slides(root, copy))
    assert card["colour_reference"] == reference.as_dict() and "colour_reference" in card["input"]
    assert load_model(MODEL, copy).colour_reference == reference
    again = recalibrate(root, None, copy, device="cpu")  # without the flag: the reference stays
    assert again["colour_reference"] == reference.as_dict()
    assert load_model(MODEL, copy).colour_reference == reference


def test_resume_refuses_another_colour_normalisation_setting(trained, tmp_path, monkeypatch):
    root, out, _ = trained
    config = TrainConfig(epochs=2, batch_patches=32, device="cpu", precision="fp32")
    target = tmp_path / "resumed" / out.name
    _killed_after_first_epoch(root, target, config, monkeypatch)
    with pytest.raises(IdcmapError, match=r"--colour-normalise: .*ckpt was trained without colour normalisation \(or by an idcmap"):
        train(root, MODEL, target, replace(config, colour_normalise=True), resume=True)
    normalised = tmp_path / "normalised" / out.name
    _killed_after_first_epoch(root, normalised, replace(config, colour_normalise=True), monkeypatch)
    with pytest.raises(IdcmapError, match=r"--colour-normalise: .*ckpt was trained with colour normalisation"):
        train(root, MODEL, normalised, config, resume=True)
    card = train(root, MODEL, normalised, replace(config, colour_normalise=True), resume=True)
    assert [h["epoch"] for h in card["history"]] == [1, 2] and "colour_reference" in card


def test_every_recipe_setting_is_compared_and_named():
    """Each TrainConfig field is either in the recipe a checkpoint records (and a change to it is
    named as the user types it) or free to change on --resume: a new field cannot slip past both."""
    from dataclasses import fields

    from idcmap.train_config import LIMITS, RESUMABLE_FREELY, recipe_change, recipe_of

    base = TrainConfig()
    recipe = recipe_of(base)
    assert set(recipe) | set(RESUMABLE_FREELY) == {f.name for f in fields(TrainConfig)}
    assert not set(recipe) & set(RESUMABLE_FREELY)
    assert recipe_change(recipe, base) is None and recipe_change({}, base) is None
    for name, value in recipe.items():
        changed = replace(base, **{name: value + 1})
        now, trained = recipe_change(recipe, changed)
        assert now.startswith(LIMITS[name].label + " ") and trained.startswith(LIMITS[name].label + " ")
        assert now != trained
    assert recipe_change(recipe, replace(base, seed=2**64 - 1))[0] == f"--seed {2**64 - 1}"  # whole numbers exactly


def test_resume_refuses_another_recipe_or_split(trained, tmp_path, monkeypatch):
    """A checkpoint goes on only with the settings and patients it was trained with: a changed
    --scattered-repeat, --seed or split would silently mix two runs in one set of weights."""
    root, out, _ = trained
    config = TrainConfig(epochs=2, batch_patches=32, device="cpu", precision="fp32")
    target = tmp_path / "resumed" / out.name
    _killed_after_first_epoch(root, target, config, monkeypatch)
    with pytest.raises(IdcmapError, match=r"--scattered-repeat 2: .*ckpt was trained with --scattered-repeat 1; "
                                          r"resume with --scattered-repeat 1, or train without --resume"):
        train(root, MODEL, target, replace(config, scattered_repeat=2), resume=True)
    with pytest.raises(IdcmapError, match=r"--seed 1: .*ckpt was trained with --seed 0"):
        train(root, MODEL, target, replace(config, seed=1), resume=True)
    assert not target.with_suffix(".split.json").exists()  # written with the weights, once the run succeeds
    drawn = make_split(sorted(patient_ids(root)), config.seed, config.test_fraction, config.val_fraction)
    swapped = {**drawn, "train": [drawn["test"][0], *drawn["train"][1:]],
               "test": [drawn["train"][0], *drawn["test"][1:]]}
    for name, split in (("other", swapped), ("same", drawn)):
        (tmp_path / f"{name}.split.json").write_text(json.dumps(split))
    with pytest.raises(IdcmapError, match=r"ckpt was trained on another split of the patients; resume with the "
                                          r"split it was trained on \(the same --split, or the same --seed"):
        train(root, MODEL, target, config, split_file=tmp_path / "other.split.json", resume=True)
    with pytest.raises(IdcmapError, match=r"ckpt was trained on another split"):
        train(root, MODEL, target, replace(config, test_fraction=0.5), resume=True)  # draws another split
    assert target.with_suffix(".ckpt").is_file()  # refused runs leave the checkpoint as it was
    card = train(root, MODEL, target, replace(config, patience=1), split_file=tmp_path / "same.split.json",
                 resume=True)  # the split it drew, passed as a file, and a setting that may change
    assert [h["epoch"] for h in card["history"]] == [1, 2]


def test_adding_a_colour_reference_retires_the_int8_network(quantised, tmp_path, caplog):
    """The int8 network's activation ranges were fitted on unnormalised colours: after
    `calibrate --colour-normalise` the card no longer vouches for it, and auto scores in fp32."""
    root, weights, _ = quantised
    for source in (weights, card_path(weights), weights.with_suffix(".int8.onnx"), weights.with_suffix(".split.json")):
        (tmp_path / source.name).write_bytes(source.read_bytes())
    with caplog.at_level("WARNING"):
        card = recalibrate(root, MODEL, tmp_path / weights.name, device="cpu", colour_normalise=True)
    assert "int8" not in card and "idcmap quantize" in caplog.text
    model = load_model(MODEL, tmp_path / weights.name)
    assert model.colour_reference is not None and Scorer(model, device="cpu").backend == "onnx"
    requantised = quantize(root, MODEL, tmp_path / weights.name, patches=64)
    assert requantised["int8"]["weights_sha256"] == sha256_of(tmp_path / weights.name)
    assert Scorer(load_model(MODEL, tmp_path / weights.name), device="cpu").backend == "onnx-int8"


def test_ema_validates_and_keeps_the_average_and_resumes_it(trained, tmp_path, monkeypatch):
    """--ema: the network trains exactly as without it, but what is validated, kept and stored is
    the moving average, updated after every step; the card's command says so; a run killed after
    epoch 1 and resumed restores the average and ends bit for bit the same."""
    import torch

    from idcmap import training

    root, out, card = trained
    config = TrainConfig(epochs=2, batch_patches=32, device="cpu", seed=0, precision="fp32", ema=0.9)
    made, steps = [], []
    real_average, real_step = training.weight_average, training.training_step

    def watched(network, decay):
        made.append((network, real_average(network, decay)))
        return made[-1][1]

    def counted(*args):
        steps.append(1)
        return real_step(*args)

    monkeypatch.setattr(training, "weight_average", watched)
    monkeypatch.setattr(training, "training_step", counted)
    averaged = train(root, MODEL, tmp_path / "ema" / out.name, config)
    assert "--ema 0.9 --device cpu" in averaged["training"]["command"] and averaged["training"]["ema"] == 0.9
    network, average = made[0]
    assert int(average.n_averaged) == len(steps) > 2  # updated after every step
    # the raw network's path is untouched; validation (and so the kept epoch) scored the average
    assert [h["train_loss"] for h in averaged["history"]] == [h["train_loss"] for h in card["history"]]
    assert [h["val_auc"] for h in averaged["history"]] != [h["val_auc"] for h in card["history"]]
    stored = read_weights(tmp_path / "ema" / out.name)["state_dict"]
    kept = average.module.state_dict()
    assert all(torch.equal(stored[k], kept[k]) for k in stored)
    last_step = training.stored_precision(network.state_dict())  # rounded as stored weights are
    assert not all(torch.equal(stored[k], last_step[k]) for k in stored)

    target = tmp_path / "resumed" / out.name
    _killed_after_first_epoch(root, target, config, monkeypatch)
    with pytest.raises(IdcmapError, match=r"--ema 0: .*ckpt was trained with --ema 0.9; resume with --ema 0.9, or"):
        train(root, MODEL, target, replace(config, ema=0.0), resume=True)
    made.clear()
    resumed = train(root, MODEL, target, config, resume=True)
    assert int(made[0][1].n_averaged) == int(average.n_averaged)  # the average came back from the checkpoint
    assert resumed["sha256"] == averaged["sha256"]


@pytest.mark.parametrize("nan_step, epoch, fix", [
    (2, 1, "Train again"),  # epoch 1 has 2 steps
    (3, 2, r"Delete .*cancernet-context\.ckpt \(resuming would repeat the same steps\) and train again")])
def test_a_diverged_run_stops_with_an_error_and_writes_no_weights(trained, tmp_path, monkeypatch, nan_step, epoch, fix):
    """A loss that turns NaN (too high a learning rate) stops training at once, naming the epoch and
    the fix; no weights or card are written, so nothing broken can be rendered with."""
    from idcmap import training
    from idcmap.errors import TrainingError

    root, _, _ = trained
    real_step, steps = training.training_step, []

    def diverging(*args):
        steps.append(real_step(*args))
        return float("nan") if len(steps) == nan_step else steps[-1]

    monkeypatch.setattr(training, "training_step", diverging)
    target = tmp_path / "w" / f"{MODEL}.pt"
    with pytest.raises(TrainingError, match=rf"training diverged in epoch {epoch} \(loss nan\), so no weights were "
                                            rf"written\. {fix} with a lower --lr \(this run: 0\.001\)"):
        train(root, MODEL, target, TrainConfig(epochs=2, batch_patches=32, device="cpu", precision="fp32",
                                               learning_rate=0.001))
    assert len(steps) == nan_step
    assert not target.exists() and not card_path(target).exists() and not target.with_suffix(".split.json").exists()
    assert target.with_suffix(".ckpt").exists() == (epoch > 1)


def test_a_failed_run_over_earlier_weights_leaves_them_with_their_own_split(trained, tmp_path, monkeypatch):
    """`evaluate` reads the split beside the weights to know which patients they saw: a run that
    fails must not leave its own split beside the earlier weights (their test patients would be
    its training patients)."""
    from idcmap import training
    from idcmap.errors import TrainingError

    root, out, _ = trained
    target = tmp_path / "w" / out.name
    target.parent.mkdir()
    for source in (out, card_path(out), out.with_suffix(".split.json")):
        (target.parent / source.name).write_bytes(source.read_bytes())
    before = {p.name: p.read_bytes() for p in target.parent.iterdir()}
    monkeypatch.setattr(training, "training_step", lambda *args: float("nan"))
    with pytest.raises(TrainingError):
        train(root, MODEL, target, TrainConfig(epochs=1, batch_patches=32, device="cpu", precision="fp32", seed=1))
    assert {p.name: p.read_bytes() for p in target.parent.iterdir()} == before


def test_weights_that_give_nan_scores_are_refused(trained):
    from idcmap.errors import WeightsError

    root, out, _ = trained
    model = load_model(MODEL, out)
    with torch.no_grad():
        next(model.network.parameters()).fill_(float("nan"))
    slide = load_slide(root / "group" / "p0")
    with pytest.raises(WeightsError, match=r"gives NaN or infinite scores on p0, so its weights are broken"):
        Scorer(model, "cpu", backend="torch").score(slide)


def test_quantize_needs_training_patients(trained, tmp_path):
    from idcmap.dataset import save_split
    from idcmap.errors import SplitError

    root, out, _ = trained
    save_split({"seed": 0, "train": [], "val": ["group/p0"], "test": ["group/p1"]}, tmp_path / "split.json")
    with pytest.raises(SplitError, match="split.json: no training patients, and the int8 activation ranges"):
        quantize(root, MODEL, out, split_file=tmp_path / "split.json", patches=16)
    assert not out.with_suffix(".int8.onnx").exists()


def test_a_calibration_without_whole_validation_slides_says_so(tmp_path, caplog):
    """With no whole slide to fit on, the scattered samples set smoothing and threshold: the card's
    objective says so, and a warning asks for whole validation slides."""
    from idcmap.models import Calibration
    from idcmap.scoring import calibrated_scores
    from idcmap.training import fit_calibration

    scored = []
    for i in range(2):
        cells = {(c * 100 + 1, r * 100 + 1): (int(c < 2), textured(i * 10 + r * 4 + c)) for r in range(2) for c in range(4)}
        slide = load_slide(make_patient(tmp_path, f"S{i}", cells))
        assert not slide.is_whole
        logit = np.where(slide.labels == 1, 2.0, -2.0).astype(np.float32)
        scored.append((slide, calibrated_scores(slide, logit, logit, 0, Calibration())))
    _, choice = fit_calibration(scored, context_reach=0, sigmas=(0.0,), left_out=False)
    assert choice["objective"] == "mean Dice - mean area-fraction error, validation patients (none a whole slide)"
    assert "no validation patient is a whole slide" in caplog.text


def test_weight_decay_reaches_the_optimiser_and_the_cards_command(tmp_path, monkeypatch):
    root = _synthetic_root(tmp_path / "data", patients=4)
    decays = []
    real_adamw = torch.optim.AdamW

    def spy(params, **kwargs):
        decays.append(kwargs["weight_decay"])
        return real_adamw(params, **kwargs)
    monkeypatch.setattr(torch.optim, "AdamW", spy)
    for decay in (TrainConfig.weight_decay, 0.05):
        card = train(root, MODEL, tmp_path / str(decay) / f"{MODEL}.pt",
                     TrainConfig(epochs=1, batch_patches=32, device="cpu", seed=0, precision="fp32", weight_decay=decay))
        assert card["training"]["weight_decay"] == decay
        assert ("--weight-decay 0.05 " in card["training"]["command"]) == (decay == 0.05)  # the default: not written
    assert decays == [TrainConfig.weight_decay, 0.05]


def test_calibrate_and_quantize_refuse_the_models_own_test_patients(trained, tmp_path):
    """Fitting the calibration (or the int8 activation ranges) on the patients the weights are
    tested on would make their test figures overstate."""
    from idcmap.errors import SplitError

    root, out, _ = trained
    own = json.loads(out.with_suffix(".split.json").read_text())
    assert own["test"]
    leaky = tmp_path / "leaky.split.json"
    leaky.write_text(json.dumps({"train": own["train"], "val": own["test"], "test": []}))
    before = out.read_bytes()
    with pytest.raises(SplitError, match=r"leaky\.split\.json: \d+ of its val patients are test patients of .*"
                                         r"so calibrating on them"):
        recalibrate(root, MODEL, out, split_file=leaky, device="cpu")
    leaky.write_text(json.dumps({"train": own["test"], "val": own["val"], "test": []}))
    with pytest.raises(SplitError, match=r"of its train patients are test patients of .*activation ranges"):
        quantize(root, MODEL, out, split_file=leaky, patches=16)
    assert out.read_bytes() == before


def test_the_cards_command_keeps_every_digit_of_the_settings(tmp_path):
    from idcmap.training import training_command

    config = TrainConfig(learning_rate=0.00123456789, stain_jitter=0.123456789, weight_decay=0.0123456789)
    command = training_command("data", MODEL, tmp_path / "m.pt", config)
    assert "--lr 0.00123456789 " in command and "--stain-jitter 0.123456789 " in command
    assert "--weight-decay 0.0123456789 " in command


def test_a_split_file_without_val_patients_is_named(trained, tmp_path):
    from idcmap.errors import SplitError

    root, out, _ = trained
    own = json.loads(out.with_suffix(".split.json").read_text())
    no_val = tmp_path / "no-val.split.json"
    no_val.write_text(json.dumps({"train": own["train"], "val": [], "test": own["test"] + own["val"]}))
    with pytest.raises(SplitError, match=r"no-val\.split\.json: its train and val lists must each name a patient"):
        train(root, MODEL, tmp_path / "w" / out.name, TrainConfig(epochs=1, device="cpu"), split_file=no_val)


def test_a_batch_that_cell_dropout_leaves_with_one_patch_is_not_trained_on(trained):
    """A last group of two patches, one dropped: batch norm raises on a batch of one, and --resume
    would replay the same batch (its RNG state is checkpointed)."""
    root, _, _ = trained
    slide = load_slide(next(p for p in sorted(root.rglob("*")) if p.is_dir() and list(p.glob("[01]/*.png"))))
    config = TrainConfig(window=2, batch_patches=1000, cell_dropout=0.9, device="cpu")
    maker = BatchMaker([slide], config, torch.zeros(3), torch.ones(3), np.random.default_rng(0))
    pair = Window(0, np.array([0, 1]), np.array([0, 0]), np.array([0, 1]))
    assert 1 in [len(maker._make([pair])[1]) for _ in range(50)]  # dropout does leave single patches
    kept = [len(y) for _ in range(50) for _, y, _, _ in maker.batches([pair])]
    assert 0 < len(kept) < 50 and set(kept) == {2}


def test_training_patients_without_labels_are_named_and_none_left_is_refused(tmp_path, caplog):
    root = _synthetic_root(tmp_path / "data", patients=3)
    for name in ("u0", "u1"):  # flat folders, names without _class: no labels
        make_patient(root / "group", name, {(1, 1): (None, textured(1)), (51, 1): (None, textured(2))}, layout="flat")
    split = {"seed": 0, "train": ["group/u0", "group/u1"], "val": ["group/p0"], "test": ["group/p1"]}
    save_split(split, tmp_path / "split.json")
    with pytest.raises(SplitError, match=r"split.json: no training patient carries labels"):
        train(root, MODEL, tmp_path / "w" / "m.pt", TrainConfig(epochs=1, batch_patches=32, device="cpu"),
              split_file=tmp_path / "split.json")
    save_split({**split, "train": ["group/u0", "group/p2"]}, tmp_path / "split.json")
    with caplog.at_level(logging.WARNING, logger="idcmap"):
        train(root, MODEL, tmp_path / "w" / "m.pt", TrainConfig(epochs=1, batch_patches=32, device="cpu"),
              split_file=tmp_path / "split.json")
    assert "1 training patients left out" in caplog.text and "group/u0" in caplog.text


def test_train_draws_its_split_with_its_seed(tmp_path, monkeypatch):
    """T4: `idcmap train --seed S` draws the split by patient with seed S (not always seed 0)."""
    from idcmap import training
    from idcmap.train_config import TrainConfig

    root = tmp_path / "data"
    for i in range(12):
        make_patient(root / "group", f"p{i}", {(1, 1): (i % 2, textured(i))})
    ids = sorted(patient_ids(root))
    assert make_split(ids, 7)["train"] != make_split(ids, 0)["train"]  # the seed matters on these patients

    class Drawn(Exception):
        pass

    def stop(ids, *args, **kwargs):
        raise Drawn(sorted(ids))

    monkeypatch.setattr(training, "load_labelled_slides", stop)
    with pytest.raises(Drawn) as drawn:
        training.train(root, "cancernet", tmp_path / "w" / "m.pt",
                       TrainConfig(epochs=1, device="cpu", seed=7, precision="fp32"), progress=False)
    assert drawn.value.args[0] == make_split(ids, 7)["train"]
