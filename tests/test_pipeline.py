"""idcmap.pipeline: `render` end to end, re-reading every file it writes."""
from __future__ import annotations

import csv
import json
import logging
import math
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import numpy as np
import pytest
from PIL import Image
from shapely.geometry import shape

from conftest import (MODEL_NAME, grid_patches, make_patient, real_patient_folder, solid, textured,
                      write_tiny_weights)
from idcmap.errors import EmptyFolderError, FolderLayoutError, IdcmapError, OutputError
from idcmap.export import SUMMARY_FIELDS
from idcmap.loader import load_slide
from idcmap.models import sha256_of
from idcmap.pipeline import (
    MAX_PATIENT_NAME_BYTES,
    PATIENT_FILES,
    PROBABILITY_FIELDS,
    RenderOptions,
    collect_summaries,
    parse_shard,
    regions_geojson,
    render_folder,
    summary_name,
    write_run_summary,
)
from idcmap.render import overview_html


def _options(weights, **overrides):
    return RenderOptions(model=MODEL_NAME, weights=weights, device="cpu", progress=False, **overrides)


def _patches(seed=0):
    """A 4 x 5 block with a gap at (1, 2), an edge patch 34 px wide on the right, mixed labels."""
    patches = grid_patches(4, 5, label_of=lambda r, c: int(c >= 3), skip={(1, 2)},
                           pixels_of=lambda r, c: textured(seed * 100 + r * 5 + c, base=80 + 20 * c))
    patches[(251, 51)] = (1, textured(seed * 100 + 99, width=34))
    return patches


def _read_csv(path):
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def _hidden(out: Path):
    return [p for p in out.rglob("*") if p.name.startswith(".")]


def _midpoint_threshold(probability):
    values = np.unique(probability.astype(np.float64))
    assert len(values) >= 2
    k = len(values) // 2
    return float((values[k - 1] + values[k]) / 2)


def test_render_one_patient_writes_consistent_files(tmp_path, tiny_weights, cpu_scorer):
    folder = make_patient(tmp_path / "in", "P", _patches())
    slide = load_slide(folder)
    scores = cpu_scorer.score(slide)
    threshold = _midpoint_threshold(scores.probability)
    out = tmp_path / "out"

    rows = render_folder(folder, out, _options(tiny_weights, threshold=threshold))

    patient_dir = out / "P"
    assert sorted(p.name for p in patient_dir.iterdir()) == sorted(PATIENT_FILES)
    assert sorted(p.name for p in out.iterdir()) == ["P", "summary.csv", "summary.html"]
    assert _hidden(out) == []
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["patient"] == "P"
    n = len(slide)
    predicted = scores.probability >= threshold
    assert 0 < predicted.sum() < n

    # probabilities.csv: one row per patch, in the slide's order
    table = _read_csv(patient_dir / "probabilities.csv")
    assert len(table) == n
    assert list(table[0]) == PROBABILITY_FIELDS == [  # the README's columns, in order: scripts read them by place
        "file", "x", "y", "width", "height", "label", "patch_probability", "probability", "predicted_idc"]
    assert {r["file"] for r in table} == {p.name for p in folder.rglob("*.png")}
    for row, path, (x, y), (h, w), label, p, m in zip(table, slide.paths, slide.xy.tolist(), slide.sizes.tolist(),
                                                      slide.labels.tolist(), scores.probability, predicted):
        assert row["file"] == path.name
        assert (int(row["x"]), int(row["y"]), int(row["width"]), int(row["height"])) == (x, y, w, h)
        assert int(row["label"]) == label
        assert 0.0 <= float(row["probability"]) <= 1.0 and 0.0 <= float(row["patch_probability"]) <= 1.0
        assert float(row["probability"]) == pytest.approx(float(p), abs=1e-6)
        assert int(row["predicted_idc"]) == int(m)

    # probabilities.npy: the grid, NaN at the gap
    grid = np.load(patient_dir / "probabilities.npy")
    assert grid.shape == slide.grid_shape == (4, 6)
    assert grid.dtype == np.float32
    assert np.isnan(grid[1, 2])
    assert np.isnan(grid).sum() == grid.size - n
    rc = slide.cells
    np.testing.assert_array_equal(grid[rc[:, 0], rc[:, 1]], scores.probability)

    # summary.json
    summary = json.loads((patient_dir / "summary.json").read_text())
    tissue = int(slide.areas.sum())
    assert tissue == 19 * 2500 + 34 * 50
    predicted_area = int(slide.areas[predicted].sum())
    labelled = slide.labels == 1
    labelled_area = int(slide.areas[labelled].sum())
    assert summary["patient"] == "P" and summary["status"] == "ok" and summary["error"] is None
    assert summary["patches"] == n and summary["skipped_files"] == 0 and summary["skipped"] == []
    assert summary["tissue_area_px"] == tissue
    assert summary["predicted_idc_area_fraction"] == pytest.approx(predicted_area / tissue, abs=1e-6)
    assert summary["labelled_idc_area_fraction"] == pytest.approx(labelled_area / tissue, abs=1e-6)
    overlap = int(slide.areas[predicted & labelled].sum())
    assert summary["dice"] == pytest.approx(2 * overlap / (predicted_area + labelled_area), abs=1e-6)
    assert summary["threshold"] == threshold
    assert summary["model"] == MODEL_NAME
    assert summary["weights_sha256"] == sha256_of(tiny_weights)
    assert summary["grid"]["shape"] == [4, 6]
    assert (summary["grid"]["origin_x"], summary["grid"]["origin_y"]) == (1, 1)  # the top-left patch's x, y
    assert summary["mosaic_origin_xy"] == [1, 1]
    assert summary["calibration"]["threshold"] == threshold
    assert set(SUMMARY_FIELDS) <= set(summary)

    # regions.geojson: polygons cover exactly the predicted patches
    regions = json.loads((patient_dir / "regions.geojson").read_text())
    assert regions["type"] == "FeatureCollection"
    polygons = [shape(f["geometry"]) for f in regions["features"]]
    assert polygons and all(p.is_valid and p.geom_type == "Polygon" for p in polygons)
    assert sum(p.area for p in polygons) == pytest.approx(predicted_area)
    assert sum(p.area for p in polygons) == pytest.approx(summary["predicted_idc_area_fraction"] * tissue,
                                                          abs=tissue * 1e-6)
    assert sum(f["properties"]["patches"] for f in regions["features"]) == int(predicted.sum())
    for feature, polygon in zip(regions["features"], polygons):
        assert feature["type"] == "Feature"
        assert feature["properties"]["area_px"] == pytest.approx(polygon.area)
        assert threshold <= feature["properties"]["max_probability"] <= 1
        assert threshold - 1e-6 <= feature["properties"]["mean_probability"] <= feature["properties"]["max_probability"]
    assert len({f["id"] for f in regions["features"]}) == len(polygons)

    # images
    with Image.open(patient_dir / "mosaic.png") as mosaic:
        np.testing.assert_array_equal(np.asarray(mosaic.convert("RGB")), slide.mosaic())
    with Image.open(patient_dir / "overlay.png") as overlay:
        assert overlay.format == "PNG" and overlay.size[0] > 100 and overlay.size[1] > 100

    # summary.csv: the returned row
    summary_rows = _read_csv(out / "summary.csv")
    assert len(summary_rows) == 1 and list(summary_rows[0]) == SUMMARY_FIELDS
    assert (out / "summary.csv").read_text().splitlines()[0] == (  # the README's columns, in order
        "patient,folder,status,error,patches,skipped_files,tissue_area_px,predicted_idc_area_fraction,"
        "labelled_idc_area_fraction,dice,threshold,min_region_cells,max_hole_cells,model,weights_sha256")
    assert summary_rows[0]["patient"] == "P" and summary_rows[0]["status"] == "ok"
    assert float(summary_rows[0]["predicted_idc_area_fraction"]) == rows[0]["predicted_idc_area_fraction"]
    assert int(summary_rows[0]["patches"]) == n


def test_unlabelled_patient(tmp_path, tiny_weights):
    patches = {xy: (None, pixels) for xy, (_, pixels) in _patches().items()}
    folder = make_patient(tmp_path / "in", "U", patches, layout="flat")
    rows = render_folder(folder, tmp_path / "out", _options(tiny_weights, threshold=0.0))
    assert rows[0]["status"] == "ok"
    assert rows[0]["labelled_idc_area_fraction"] is None and rows[0]["dice"] is None
    assert rows[0]["predicted_idc_area_fraction"] == 1.0  # threshold 0: every patch
    table = _read_csv(tmp_path / "out" / "U" / "probabilities.csv")
    assert {r["label"] for r in table} == {""}
    assert {r["predicted_idc"] for r in table} == {"1"}
    regions = json.loads((tmp_path / "out" / "U" / "regions.geojson").read_text())
    assert sum(shape(f["geometry"]).area for f in regions["features"]) == rows[0]["tissue_area_px"]


def test_nothing_predicted_gives_empty_feature_collection(tmp_path, tiny_weights, cpu_scorer):
    folder = make_patient(tmp_path / "in", "P", _patches())
    assert cpu_scorer.score(load_slide(folder)).probability.max() < 1.0
    rows = render_folder(folder, tmp_path / "out", _options(tiny_weights, threshold=1.0))
    assert rows[0]["predicted_idc_area_fraction"] == 0.0
    assert rows[0]["dice"] == 0.0  # the patient has labelled IDC, none predicted
    regions = json.loads((tmp_path / "out" / "P" / "regions.geojson").read_text())
    assert regions == {"type": "FeatureCollection", "features": []}


def _three_patients(root: Path):
    make_patient(root, "A", _patches(1))
    broken = make_patient(root, "B", _patches(2))
    bad = broken / "0" / "B_idx5_x1_y1_class0.png"
    data = bad.read_bytes()
    bad.write_bytes(data[: len(data) // 3])
    make_patient(root, "C", _patches(3))
    return bad


def test_one_broken_patient_does_not_stop_the_others(tmp_path, tiny_weights):
    bad = _three_patients(tmp_path / "in")
    out = tmp_path / "out"
    rows = render_folder(tmp_path / "in", out, _options(tiny_weights))
    assert [r["patient"] for r in rows] == ["A", "B", "C"]
    assert [r["status"] for r in rows] == ["ok", "failed", "ok"]
    assert str(bad) in rows[1]["error"]
    assert rows[1]["model"] == MODEL_NAME and rows[1]["patches"] is None
    for name in ("A", "C"):
        assert sorted(p.name for p in (out / name).iterdir()) == sorted(PATIENT_FILES)
    assert [p.name for p in (out / "B").iterdir()] == ["summary.json"]  # the failure, for export and --resume
    assert json.loads((out / "B" / "summary.json").read_text())["status"] == "failed"
    assert _hidden(out) == []
    table = _read_csv(out / "summary.csv")
    assert [(r["patient"], r["status"]) for r in table] == [("A", "ok"), ("B", "failed"), ("C", "ok")]
    assert str(bad) in table[1]["error"]
    assert table[1]["patches"] == ""


def _stamps(folder: Path):
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


def test_resume_skips_complete_and_redoes_incomplete(tmp_path, tiny_weights, caplog):
    root = tmp_path / "in"
    make_patient(root, "A", _patches(1))
    make_patient(root, "C", _patches(3))
    out = tmp_path / "out"
    first = render_folder(root, out, _options(tiny_weights))
    a_before = _stamps(out / "A")
    c_before = _stamps(out / "C")
    (out / "C" / "overlay.png").unlink()  # C is now incomplete

    second = render_folder(root, out, _options(tiny_weights, resume=True))

    assert _stamps(out / "A") == a_before  # skipped: not rewritten
    assert "1 of 2 patients were complete" in caplog.text  # and said so
    assert "was rendered from" not in caplog.text  # two patients, no copies
    assert sorted(p.name for p in (out / "C").iterdir()) == sorted(PATIENT_FILES)
    c_after = _stamps(out / "C")
    assert c_after["summary.json"] != c_before["summary.json"]  # redone
    assert [r["status"] for r in second] == ["ok", "ok"]
    for before, after in zip(first, second):
        assert before["predicted_idc_area_fraction"] == after["predicted_idc_area_fraction"]
        assert before["patches"] == after["patches"]
    assert len(_read_csv(out / "summary.csv")) == 2
    assert _hidden(out) == []

    # a changed setting makes the earlier render unusable: redone even with --resume
    render_folder(root, out, _options(tiny_weights, resume=True, threshold=0.25))
    assert _stamps(out / "A")["summary.json"] != a_before["summary.json"]
    assert json.loads((out / "A" / "summary.json").read_text())["threshold"] == 0.25

    # another runtime of the patch network, too
    stamp = _stamps(out / "A")["summary.json"]
    render_folder(root, out, _options(tiny_weights, resume=True, threshold=0.25, backend="torch"))
    assert _stamps(out / "A")["summary.json"] != stamp
    assert json.loads((out / "A" / "summary.json").read_text())["runtime"] == {
        "backend": "torch", "int8_sha256": None, "mixed_precision": False}

    # an empty or truncated file counts as incomplete
    (out / "A" / "regions.geojson").write_text("")
    mosaic = (out / "C" / "mosaic.png").read_bytes()
    (out / "C" / "mosaic.png").write_bytes(mosaic[:100])
    render_folder(root, out, _options(tiny_weights, resume=True, threshold=0.25))
    assert (out / "A" / "regions.geojson").stat().st_size > 0
    assert (out / "C" / "mosaic.png").read_bytes() == mosaic

    # so do changed inputs: a patch added to A
    stamp = _stamps(out / "A")["summary.json"]
    stamp_c = _stamps(out / "C")["summary.json"]
    make_patient(root, "A", {(451, 1): (1, textured(7))})
    rows = render_folder(root, out, _options(tiny_weights, resume=True, threshold=0.25))
    assert _stamps(out / "A")["summary.json"] != stamp and rows[0]["patches"] == first[0]["patches"] + 1
    assert _stamps(out / "C")["summary.json"] == stamp_c  # unchanged: skipped


def test_rendering_again_replaces_outputs_cleanly(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights, threshold=0.0))
    render_folder(folder, out, _options(tiny_weights, threshold=1.0))
    assert sorted(p.name for p in (out / "P").iterdir()) == sorted(PATIENT_FILES)
    assert json.loads((out / "P" / "summary.json").read_text())["threshold"] == 1.0
    assert _hidden(out) == []


def test_an_output_folder_holding_other_files_is_refused_untouched(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights, threshold=0.0))
    (out / "P" / "notes.txt").write_text("the user's own notes")
    before = _stamps(out / "P")
    with pytest.raises(OutputError, match="notes.txt"):
        render_folder(folder, out, _options(tiny_weights, threshold=1.0))
    assert _stamps(out / "P") == before
    (out / "Q").write_text("a file")  # where patient Q's folder would go
    make_patient(tmp_path / "in2", "Q", _patches())
    with pytest.raises(OutputError, match="not an idcmap output folder"):
        render_folder(tmp_path / "in2" / "Q", out, _options(tiny_weights))
    assert (out / "Q").read_text() == "a file" and _hidden(out) == []


@pytest.mark.parametrize("where", ["root", "patient parent", "inside patient"])
def test_outputs_never_replace_or_land_inside_the_inputs(tmp_path, tiny_weights, where):
    root = tmp_path / "in"
    make_patient(root, "A", _patches(1))
    make_patient(root, "B", _patches(2))
    before = sorted(p.relative_to(root) for p in root.rglob("*"))
    folder, out = {"root": (root, root), "patient parent": (root / "A", root),
                   "inside patient": (root / "A", root / "A" / "out")}[where]
    with pytest.raises(OutputError, match="input folder"):
        render_folder(folder, out, _options(tiny_weights))
    assert sorted(p.relative_to(root) for p in root.rglob("*")) == before


def test_outputs_inside_the_dataset_root_are_not_taken_for_patients(tmp_path, tiny_weights):
    root = tmp_path / "in"
    make_patient(root, "A", _patches(1))
    make_patient(root, "B", _patches(2))
    first = render_folder(root, root / "out", _options(tiny_weights))
    second = render_folder(root, root / "out", _options(tiny_weights))
    assert [r["patient"] for r in first] == [r["patient"] for r in second] == ["A", "B"]
    assert [r["status"] for r in second] == ["ok", "ok"]


def test_render_dot_inside_a_patient_folder(tmp_path, tiny_weights, monkeypatch):
    folder = make_patient(tmp_path / "in", "P", _patches())
    monkeypatch.chdir(folder)
    rows = render_folder(Path("."), tmp_path / "out", _options(tiny_weights))
    assert [(r["patient"], r["status"]) for r in rows] == [("P", "ok")]
    assert sorted(p.name for p in (tmp_path / "out" / "P").iterdir()) == sorted(PATIENT_FILES)


def test_a_failed_render_replaces_the_outputs_of_older_inputs(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights))
    patch = sorted(folder.rglob("*.png"))[0]
    patch.write_bytes(patch.read_bytes()[:40])
    rows = render_folder(folder, out, _options(tiny_weights, resume=True))
    assert rows[0]["status"] == "failed" and str(patch) in rows[0]["error"]
    assert [p.name for p in (out / "P").iterdir()] == ["summary.json"]
    assert collect_summaries(out)[0]["status"] == "failed"


def test_leftovers_of_a_killed_render_are_removed(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights))
    for leftover in (".P.0badc0de.tmp", ".P.old.0badc0de"):  # what a kill -9 mid-render leaves
        (out / leftover).mkdir(parents=True)
        (out / leftover / "mosaic.png").write_bytes(b"half")
    (out / ".Q.12345678.tmp").mkdir()  # another patient's, maybe in use by another shard: kept
    (out / ".P.x.12345678.tmp").mkdir()  # patient "P.x"'s: kept
    render_folder(folder, out, _options(tiny_weights))
    assert sorted(p.name for p in _hidden(out)) == [".P.x.12345678.tmp", ".Q.12345678.tmp"]
    assert sorted(p.name for p in (out / "P").iterdir()) == sorted(PATIENT_FILES)


def test_trash_holding_the_only_earlier_render_is_named_then_removed(tmp_path, tiny_weights, caplog):
    folder = make_patient(tmp_path / "in", "P", _patches())
    out = tmp_path / "out"
    (out / ".P.old.0badc0de").mkdir(parents=True)  # killed between the two renames of a swap
    (out / ".P.old.0badc0de" / "summary.json").write_text("{}")
    (out / "Q").mkdir()
    (out / "Q" / "summary.json").write_text(json.dumps({"patient": "Q", "status": "failed", "error": "x"}))
    with caplog.at_level(logging.WARNING, logger="idcmap"):
        collect_summaries(out)  # export names the only copy of P's earlier outputs
    assert ".P.old.0badc0de: the outputs of P, left there by a render that was killed" in caplog.text
    render_folder(folder, out, _options(tiny_weights, resume=True))  # now out/P exists: the trash goes
    assert _hidden(out) == []
    caplog.clear()
    collect_summaries(out)
    assert "killed" not in caplog.text


def test_ctrl_c_between_the_renames_of_a_swap_keeps_the_earlier_outputs(tmp_path, tiny_weights, monkeypatch):
    folder = make_patient(tmp_path / "in", "P", _patches())
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights))
    before = {p.name: p.read_bytes() for p in (out / "P").iterdir()}
    rename = Path.rename

    def interrupted(self, target):
        if self.name.endswith(".tmp"):  # the staging folder moving into place, after out/P moved aside
            raise KeyboardInterrupt
        return rename(self, target)
    monkeypatch.setattr(Path, "rename", interrupted)
    with pytest.raises(KeyboardInterrupt):
        render_folder(folder, out, _options(tiny_weights, threshold=0.9))
    assert {p.name: p.read_bytes() for p in (out / "P").iterdir()} == before and _hidden(out) == []


def test_unwritable_output_is_an_error_not_a_failed_patient(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    (tmp_path / "out").write_text("a file where the output folder should be")
    with pytest.raises(OutputError):
        render_folder(folder, tmp_path / "out", _options(tiny_weights))


def test_missing_or_empty_input(tmp_path, tiny_weights):
    with pytest.raises(EmptyFolderError):
        render_folder(tmp_path / "missing", tmp_path / "out", _options(tiny_weights))
    (tmp_path / "empty").mkdir()
    with pytest.raises(EmptyFolderError):
        render_folder(tmp_path / "empty", tmp_path / "out", _options(tiny_weights))


def _small_patients(root: Path, names: list[str]) -> None:
    """2 x 2 patients of plain colours, one colour scheme each."""
    for i, name in enumerate(names):
        make_patient(root, name, grid_patches(2, 2, pixels_of=lambda r, c, i=i: solid((i * 50, r * 90, c * 90))))


def test_sharded_renders_partition_patients_and_merge(tmp_path, tiny_weights):
    root = tmp_path / "in"
    _small_patients(root, ["A", "B", "C"])
    out = tmp_path / "out"
    first = render_folder(root, out, _options(tiny_weights, shard=(0, 2)))
    second = render_folder(root, out, _options(tiny_weights, shard=(1, 2)))
    assert [r["patient"] for r in first] == ["A", "C"] and [r["patient"] for r in second] == ["B"]
    assert (out / "summary-0-of-2.csv").is_file() and (out / "summary-1-of-2.csv").is_file()
    assert not (out / "summary.csv").exists()
    merged = collect_summaries(out)
    assert [r["patient"] for r in merged] == ["A", "B", "C"]
    assert all(list(r) == SUMMARY_FIELDS for r in merged)


def test_collect_summaries_without_renders(tmp_path):
    with pytest.raises(IdcmapError):
        collect_summaries(tmp_path)


def test_parse_shard(caplog):
    assert parse_shard("0/4", {}) == (0, 4)
    assert parse_shard("3/4", {}) == (3, 4)
    assert parse_shard("env", {"RANK": "2", "WORLD_SIZE": "3"}) == (2, 3)
    assert "not under torchrun" not in caplog.text
    assert parse_shard("env", {}) == (0, 1)
    assert "not under torchrun" in caplog.text  # said, not silent
    for bad in ("4/4", "-1/4", "1", "a/b", "1/2/3", "0/0"):
        with pytest.raises(IdcmapError):
            parse_shard(bad, {})
    with pytest.raises(IdcmapError):
        parse_shard("env", {"RANK": "x", "WORLD_SIZE": "2"})
    assert summary_name(None) == "summary.csv" and summary_name((0, 1)) == "summary.csv"
    assert summary_name((1, 3)) == "summary-1-of-3.csv"


def test_render_real_patient(tmp_path, tiny_weights):
    folder = real_patient_folder("8916")
    out = tmp_path / "out"
    rows = render_folder(folder, out, _options(tiny_weights))
    row = rows[0]
    assert row["status"] == "ok" and row["patient"] == "8916" and row["patches"] == 171
    positives = list((folder / "1").glob("*.png"))
    assert len(positives) == 111
    assert row["labelled_idc_area_fraction"] == pytest.approx(111 / 171, abs=1e-6)  # all patches are 50x50
    table = _read_csv(out / "8916" / "probabilities.csv")
    assert len(table) == 171
    assert all(0.0 <= float(r["probability"]) <= 1.0 for r in table)
    assert sum(int(r["label"]) for r in table) == 111
    with Image.open(out / "8916" / "mosaic.png") as mosaic:
        np.testing.assert_array_equal(np.asarray(mosaic.convert("RGB")), load_slide(folder).mosaic())
    predicted = np.array([int(r["predicted_idc"]) for r in table]) == 1
    labelled = np.array([int(r["label"]) for r in table]) == 1  # all 50x50: counts are areas
    assert row["dice"] == pytest.approx(2 * (predicted & labelled).sum() / (predicted.sum() + labelled.sum()), abs=1e-6)
    assert row["predicted_idc_area_fraction"] == pytest.approx(predicted.mean(), abs=1e-6)
    assert _hidden(out) == []
    assert sorted(os.listdir(out)) == ["8916", "summary.csv", "summary.html"]


def test_smoothing_override_reaches_the_scores(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    plain = render_folder(folder, tmp_path / "plain", _options(tiny_weights, smoothing_sigma=0.0))
    smooth = render_folder(folder, tmp_path / "smooth", _options(tiny_weights, smoothing_sigma=2.0))
    assert plain[0]["status"] == smooth[0]["status"] == "ok"
    a = np.load(tmp_path / "plain" / "P" / "probabilities.npy")
    b = np.load(tmp_path / "smooth" / "P" / "probabilities.npy")
    assert np.nanstd(b) < np.nanstd(a)
    summary = json.loads((tmp_path / "smooth" / "P" / "summary.json").read_text())
    assert summary["calibration"]["smoothing_sigma"] == 2.0


def test_a_stray_patch_beside_patient_folders_is_an_error_not_a_one_patch_slide(tmp_path, tiny_weights):
    root = tmp_path / "in"
    make_patient(root, "A", _patches(1))
    make_patient(root, "B", _patches(2))
    stray = sorted((root / "A").rglob("*.png"))[0]
    (root / stray.name).write_bytes(stray.read_bytes())
    with pytest.raises(FolderLayoutError, match="stray") as info:
        render_folder(root, tmp_path / "out", _options(tiny_weights))
    assert stray.name in str(info.value)
    assert not (tmp_path / "out").exists()


def test_output_places_are_checked_before_scoring(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    (tmp_path / "afile").write_text("x")
    with pytest.raises(OutputError, match="not a folder"):
        render_folder(folder, tmp_path / "afile", _options(tiny_weights))
    (tmp_path / "out" / "summary.csv").mkdir(parents=True)
    with pytest.raises(OutputError, match="summary CSV"):
        render_folder(folder, tmp_path / "out", _options(tiny_weights))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["summary.csv"]


def test_unusable_render_options_are_refused(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    with pytest.raises(IdcmapError, match="finite"):
        render_folder(folder, tmp_path / "out", _options(tiny_weights, threshold=math.nan))
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content", ["[]", '"text"', '{"patient": 5}'])
def test_export_refuses_a_summary_it_did_not_write(tmp_path, tiny_weights, content):
    folder = make_patient(tmp_path / "in", "P", _patches())
    render_folder(folder, tmp_path / "out", _options(tiny_weights))
    (tmp_path / "out" / "P" / "summary.json").write_text(content)
    with pytest.raises(OutputError, match="not a summary idcmap wrote"):
        collect_summaries(tmp_path / "out")


def test_resume_renders_again_a_patient_whose_summary_was_edited(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    first = render_folder(folder, tmp_path / "out", _options(tiny_weights))
    path = tmp_path / "out" / "P" / "summary.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "dice": "high"}))
    again = render_folder(folder, tmp_path / "out", _options(tiny_weights, resume=True))
    assert again[0]["dice"] == first[0]["dice"] and isinstance(again[0]["dice"], float)
    assert json.loads(path.read_text())["dice"] == first[0]["dice"]


@pytest.mark.parametrize("field, value", [("dice", "high"), ("patches", 2.5), ("threshold", True), ("model", 3),
                                          ("dice", math.nan), ("dice", -99), ("labelled_idc_area_fraction", 1.5),
                                          ("patches", -1)])
def test_export_refuses_a_summary_value_of_the_wrong_type(tmp_path, tiny_weights, field, value):
    folder = make_patient(tmp_path / "in", "P", _patches())
    render_folder(folder, tmp_path / "out", _options(tiny_weights))
    path = tmp_path / "out" / "P" / "summary.json"
    assert len(collect_summaries(tmp_path / "out")) == 1  # as written, it is read
    path.write_text(json.dumps({**json.loads(path.read_text()), field: value}))
    with pytest.raises(OutputError, match=rf"summary.json: {field} is {re.escape(json.dumps(value))}, not what idcmap "
                                          "writes"):
        collect_summaries(tmp_path / "out")


@pytest.mark.parametrize("summary, missing", [({"status": "ok"}, "patient, predicted_idc_area_fraction, model"),
                                              ({"status": "failed", "patient": "P"}, "error")])
def test_export_refuses_a_summary_without_the_fields_idcmap_always_writes(tmp_path, summary, missing):
    (tmp_path / "out" / "P").mkdir(parents=True)
    (tmp_path / "out" / "P" / "summary.json").write_text(json.dumps(summary))
    with pytest.raises(OutputError, match=f"P/summary.json: a summary of status {summary['status']} without {missing}"):
        collect_summaries(tmp_path / "out")


@pytest.mark.parametrize("calibration", ['"otsu"', "[0.3]", "1", "[" * 100_000 + "]" * 100_000],
                         ids=["text", "list", "number", "nested-100000-deep"])
def test_resume_renders_again_a_patient_whose_summary_is_garbled(tmp_path, tiny_weights, calibration):
    folder = make_patient(tmp_path / "in", "P", _patches())
    first = render_folder(folder, tmp_path / "out", _options(tiny_weights))
    path = tmp_path / "out" / "P" / "summary.json"
    written = path.read_text()
    path.write_text(json.dumps({**json.loads(written), "calibration": "here"}).replace('"here"', calibration))
    if len(calibration) > 100:
        with pytest.raises(OutputError, match="unreadable summary"):
            collect_summaries(tmp_path / "out")
    assert render_folder(folder, tmp_path / "out", _options(tiny_weights, resume=True)) == first
    assert path.read_text() == written


def test_export_warns_about_mixed_models_and_missing_shards(tmp_path, tiny_weights, caplog):
    root = tmp_path / "in"
    _small_patients(root, ["A", "B", "C"])
    out = tmp_path / "out"
    render_folder(root, out, _options(tiny_weights, shard=(0, 3)))
    other = write_tiny_weights(tmp_path / "other.pt", seed=1)
    render_folder(root, out, _options(other, shard=(1, 3)))
    with caplog.at_level(logging.WARNING, logger="idcmap"):
        assert len(collect_summaries(out)) == 2
    assert "no summary of shard 2 of 3" in caplog.text
    assert "the summaries come from 2 models or weights files" in caplog.text
    caplog.clear()
    render_folder(root, out, _options(other, shard=(2, 3)))
    render_folder(root, out, _options(other, shard=(0, 3)))
    with caplog.at_level(logging.WARNING, logger="idcmap"):
        assert len(collect_summaries(out)) == 3
    assert caplog.text == ""


def test_export_of_one_patients_output_folder_points_at_the_folder_above(tmp_path, tiny_weights):
    render_folder(make_patient(tmp_path / "in", "P", _patches()), tmp_path / "out", _options(tiny_weights))
    with pytest.raises(IdcmapError, match=rf"the output folder of one patient; export the folder it lies in "
                                          rf"\({re.escape(str(tmp_path / 'out'))}\)"):
        collect_summaries(tmp_path / "out" / "P")


def test_render_and_export_list_nested_folders_in_one_order(tmp_path, tiny_weights):
    root = tmp_path / "in"
    _small_patients(root / "batch", ["A"])
    _small_patients(root / "batch-2", ["B"])
    out = tmp_path / "out"
    render_folder(root, out, _options(tiny_weights))
    rendered = (out / "summary.csv").read_bytes()
    assert [r["folder"] for r in _read_csv(out / "summary.csv")] == ["batch/A", "batch-2/B"]
    write_run_summary(out, collect_summaries(out), out / "summary.csv")
    assert (out / "summary.csv").read_bytes() == rendered


def test_a_stray_patch_one_level_down_is_an_error_too(tmp_path, tiny_weights):
    root = tmp_path / "in"
    make_patient(root / "patients", "A", _patches(1))
    make_patient(root / "patients", "B", _patches(2))
    make_patient(root / "sparse", "C", _patches(3))
    stray = sorted((root / "patients" / "A").rglob("*.png"))[0]
    (root / "patients" / stray.name).write_bytes(stray.read_bytes())
    with pytest.raises(FolderLayoutError, match="stray"):
        render_folder(root, tmp_path / "out", _options(tiny_weights))
    assert not (tmp_path / "out").exists()


def test_a_shard_never_writes_into_another_patients_input(tmp_path, tiny_weights):
    root = tmp_path / "in"
    make_patient(root, "A", _patches(1))
    make_patient(root, "B", _patches(2))
    with pytest.raises(OutputError, match="input folder"):
        render_folder(root, root / "A" / "out", _options(tiny_weights, shard=(1, 2)))  # renders B only
    assert not (root / "A" / "out").exists()


def test_patches_in_an_extra_subfolder_of_a_patient_are_skipped_not_fatal(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    (folder / "extra").mkdir()
    backup = sorted(folder.rglob("*.png"))[0]
    (folder / "extra" / backup.name).write_bytes(backup.read_bytes())
    rows = render_folder(folder, tmp_path / "out", _options(tiny_weights))
    assert rows[0]["status"] == "ok" and rows[0]["skipped_files"] == 1


def test_hidden_files_in_an_output_folder_do_not_block_a_new_render(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights, threshold=0.0))
    (out / "P" / ".DS_Store").write_bytes(b"finder")
    rows = render_folder(folder, out, _options(tiny_weights, threshold=1.0))
    assert rows[0]["status"] == "ok" and rows[0]["threshold"] == 1.0


def test_names_of_linked_and_failed_patients(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in" / "patients", "P", _patches())
    (tmp_path / "alias").symlink_to(folder)
    render_folder(tmp_path / "alias", tmp_path / "out", _options(tiny_weights))
    assert (tmp_path / "out" / "alias" / "summary.json").is_file()  # a link keeps its own name
    bad = sorted(folder.rglob("*.png"))[0]
    bad.write_bytes(b"")
    rows = render_folder(tmp_path / "in", tmp_path / "out2", _options(tiny_weights))
    assert [(r["patient"], r["status"]) for r in rows] == [("P", "failed")]  # the patient, not "patients/P"
    assert (tmp_path / "out2" / "patients" / "P" / "summary.json").is_file()


def test_resume_keeps_a_summary_written_before_threshold_rules(tmp_path, tiny_weights):
    root = tmp_path / "in"
    make_patient(root, "A", _patches(1))
    out = tmp_path / "out"
    render_folder(root, out, _options(tiny_weights))
    summary = json.loads((out / "A" / "summary.json").read_text())
    for key in ("threshold_rule", "scattered_threshold"):  # as idcmap wrote it before these existed
        del summary["calibration"][key]
    (out / "A" / "summary.json").write_text(json.dumps(summary))
    before = _stamps(out / "A")
    render_folder(root, out, _options(tiny_weights, resume=True))
    assert _stamps(out / "A") == before  # the same (fixed) rule: kept


def test_resume_sees_a_same_size_edit_of_a_patch(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights))
    stamp = _stamps(out / "P")["summary.json"]
    patch = sorted(folder.rglob("*.png"))[0]
    data = patch.read_bytes()
    patch.write_bytes(data)
    os.utime(patch, ns=(patch.stat().st_atime_ns, patch.stat().st_mtime_ns + 10**9))
    render_folder(folder, out, _options(tiny_weights, resume=True))
    assert _stamps(out / "P")["summary.json"] != stamp


def test_a_folder_of_misnamed_patches_is_named_in_a_warning(tmp_path, tiny_weights, caplog):
    root = tmp_path / "in"
    make_patient(root, "A", _patches(1))
    misnamed = make_patient(root, "B", _patches(2))
    for i, path in enumerate(sorted(misnamed.rglob("*.png"))):
        path.rename(path.with_name(f"img{i}.png"))
    make_patient(tmp_path / "old_out", "A", {})  # idcmap's own outputs below the root are not reported
    (root / "A_out").mkdir()
    for name in ("mosaic.png", "overlay.png"):
        (root / "A_out" / name).write_bytes(b"")
    with caplog.at_level("WARNING", logger="idcmap"):
        rows = render_folder(root, tmp_path / "out", _options(tiny_weights))
    assert [r["patient"] for r in rows] == ["A"]
    reported = [r.getMessage() for r in caplog.records if "none named like a patch" in r.getMessage()]
    assert sorted(m.split(":")[0] for m in reported) == [str(misnamed / "0"), str(misnamed / "1")]
    assert "img0.png" in reported[0] and "not rendered" in reported[0]


def test_a_root_of_only_misnamed_patches_says_what_it_found(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "B", grid_patches(1, 2), layout="flat")
    for path in folder.iterdir():
        path.rename(path.with_name("scan_" + path.name.split("_x")[1]))
    with pytest.raises(EmptyFolderError, match=r"no patient folder at or below it: no file is named like a patch "
                       r"\(<patient>_idx5_x<X>_y<Y>_class<C>\.png, .*e\.g\. 9035_idx5_x1001_y401_class0\.png\); "
                       r"found .*B: 2 image files, e.g. scan_1_y1_class0\.png, not named like a patch"):
        render_folder(tmp_path / "in", tmp_path / "out", _options(tiny_weights))


def test_summary_rows_say_their_folder_and_keep_one_patient_id(tmp_path, tiny_weights, caplog):
    root = tmp_path / "in"
    make_patient(root, "9035", _patches(1))
    (root / "9035").rename(root / "copyA")
    make_patient(root, "9035", _patches(1))
    (root / "9035").rename(root / "copyB")
    bad = sorted((root / "copyB").rglob("*.png"))[0]
    bad.write_bytes(bad.read_bytes()[:40])
    out = tmp_path / "out"
    with caplog.at_level("WARNING", logger="idcmap"):
        rows = render_folder(root, out, _options(tiny_weights))
    assert "patient 9035 was rendered from 2 folders (copyA, copyB)" in caplog.text
    # the failed copy keeps the id its file names give, as the rendered one does; folders tell them apart
    assert [(r["patient"], r["folder"], r["status"]) for r in rows] == [("9035", "copyA", "ok"),
                                                                       ("9035", "copyB", "failed")]
    table = _read_csv(out / "summary.csv")
    assert [(r["patient"], r["folder"]) for r in table] == [("9035", "copyA"), ("9035", "copyB")]
    assert [(r["patient"], r["folder"]) for r in collect_summaries(out)] == [("9035", "copyA"), ("9035", "copyB")]


def test_summary_csv_lists_every_patient_rendered_into_the_output(tmp_path, tiny_weights):
    root = tmp_path / "in"
    _small_patients(root, ["A", "B"])
    out = tmp_path / "out"
    render_folder(root / "B", out, _options(tiny_weights))
    rows = render_folder(root / "A", out, _options(tiny_weights))
    assert [r["patient"] for r in rows] == ["A"]  # this run's rows
    assert [r["folder"] for r in _read_csv(out / "summary.csv")] == ["A", "B"]  # every patient in out/
    (out / "B" / "summary.json").write_text("{")
    render_folder(root / "A", out, _options(tiny_weights))  # an unreadable earlier summary is left out
    assert [r["folder"] for r in _read_csv(out / "summary.csv")] == ["A"]


def test_an_unexpected_error_fails_one_patient_not_the_run(tmp_path, tiny_weights, monkeypatch):
    from idcmap import pipeline

    _three_patients(tmp_path / "in")  # B's broken patch is never read: render_patient fails first
    real = pipeline.render_patient

    def buggy(folder, *args, **kwargs):
        if folder.name == "B":
            raise ZeroDivisionError("division by zero")
        return real(folder, *args, **kwargs)

    monkeypatch.setattr(pipeline, "render_patient", buggy)
    rows = render_folder(tmp_path / "in", tmp_path / "out", _options(tiny_weights))
    assert [(r["patient"], r["status"]) for r in rows] == [("A", "ok"), ("B", "failed"), ("C", "ok")]
    assert "unexpected ZeroDivisionError (division by zero)" in rows[1]["error"]
    assert str(tmp_path / "in" / "B") in rows[1]["error"]


def test_a_single_shard_writes_the_whole_summary(tmp_path, tiny_weights):
    root = tmp_path / "in"
    _small_patients(root, ["A", "B"])
    out = tmp_path / "out"
    render_folder(root / "B", out, _options(tiny_weights))
    render_folder(root / "A", out, _options(tiny_weights, shard=(0, 1)))  # `--shard env` outside torchrun
    assert [r["folder"] for r in _read_csv(out / "summary.csv")] == ["A", "B"]


def test_min_region_and_max_hole_reach_the_outputs(tmp_path, tiny_weights, cpu_scorer):
    """The post-processing options change what render predicts, exactly as regions.predicted_mask says."""
    from dataclasses import replace

    from idcmap.regions import predicted_mask

    folder = make_patient(tmp_path / "in", "P", _patches())
    slide = load_slide(folder)
    probability = cpu_scorer.score(slide).probability
    base = replace(cpu_scorer.model.calibration, min_region_cells=0, max_hole_cells=0)

    def changes(threshold, **setting):
        trial = replace(base, threshold=threshold, **setting)
        return not np.array_equal(predicted_mask(slide, probability, trial), probability >= threshold)

    thresholds = sorted(set(probability.tolist()))[1:]  # each leaves some patch below it
    cases = [(next(t for t in thresholds if changes(t, min_region_cells=3)), {"min_region_cells": 3}),
             (next(t for t in thresholds if changes(t, max_hole_cells=2)), {"max_hole_cells": 2})]
    for i, (threshold, setting) in enumerate(cases):
        out = tmp_path / f"out{i}"
        options = {"min_region_cells": 0, "max_hole_cells": 0, **setting}
        render_folder(folder, out, _options(tiny_weights, threshold=threshold, **options))
        expected = predicted_mask(slide, probability, replace(base, threshold=threshold, **options))
        table = _read_csv(out / "P" / "probabilities.csv")
        assert [int(r["predicted_idc"]) for r in table] == expected.astype(int).tolist()
        assert not np.array_equal(expected, probability >= threshold)
        summary = json.loads((out / "P" / "summary.json").read_text())
        assert summary["predicted_idc_area_fraction"] == pytest.approx(
            float(slide.areas[expected].sum() / slide.areas.sum()), abs=1e-6)


class _OverviewRows(HTMLParser):
    """Each table row of an overview page: its cells' text and its link (None for a failed patient)."""

    def __init__(self, page: Path):
        super().__init__()
        self.rows: list[tuple[list[str], str | None]] = []
        self._cell: list[str] | None = None
        self.feed(page.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        if tag == "tr":
            self.rows.append(([], None))
        elif tag == "td":
            self._cell = []
        elif tag == "a":
            self.rows[-1] = (self.rows[-1][0], dict(attrs)["href"])

    def handle_data(self, data):
        if self._cell is not None:
            self._cell.append(data)

    def handle_endtag(self, tag):
        if tag == "td":
            self.rows[-1][0].append("".join(self._cell))
            self._cell = None


def test_overview_page_lists_every_patient_with_its_figures_and_overlay(tmp_path, tiny_weights):
    _three_patients(tmp_path / "in")
    out = tmp_path / "out"
    render_folder(tmp_path / "in", out, _options(tiny_weights))
    table = _read_csv(out / "summary.csv")
    rows = _OverviewRows(out / "summary.html").rows[1:]  # the header row first
    assert [cells[:2] for cells, _ in rows] == [[r["patient"], r["folder"]] for r in table]
    for (cells, link), csv_row in zip(rows, table):
        if csv_row["status"] == "ok":
            assert cells[2:7] == [csv_row["patches"], f"{100 * float(csv_row['predicted_idc_area_fraction']):.1f}%",
                                  f"{100 * float(csv_row['labelled_idc_area_fraction']):.1f}%",
                                  f"{float(csv_row['dice']):.2f}", f"{float(csv_row['threshold']):.2f}"]
            assert (out / unquote(link)).resolve() == (out / csv_row["folder"] / "overlay.png").resolve()
            assert Image.open(out / unquote(link)).size[0] > 0
        else:
            assert link is None and cells[2] == f"failed: {csv_row['error']}"
    assert [csv_row["status"] for csv_row in table] == ["ok", "failed", "ok"]


def test_overview_pages_of_shards_and_of_an_export_elsewhere_link_the_overlays(tmp_path, tiny_weights):
    root = tmp_path / "in"
    _small_patients(root, ["A", "B", "C"])
    out = tmp_path / "out"
    render_folder(root, out, _options(tiny_weights, shard=(1, 2)))
    assert not (out / "summary.html").exists()
    assert [(cells[0], link) for cells, link in _OverviewRows(out / "summary-1-of-2.html").rows[1:]] == \
        [("B", "B/overlay.png")]
    elsewhere = tmp_path / "reports" / "merged.csv"
    write_run_summary(out, collect_summaries(out), elsewhere)
    links = [link for _, link in _OverviewRows(elsewhere.with_suffix(".html")).rows[1:]]
    assert links == ["../out/B/overlay.png"]
    assert all((elsewhere.parent / unquote(link)).is_file() for link in links)


def test_overview_page_shows_a_dash_for_figures_an_older_summary_lacks(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights))
    summary = json.loads((out / "P" / "summary.json").read_text())
    for field in ("threshold", "patches", "dice"):
        summary[field] = None
    (out / "P" / "summary.json").write_text(json.dumps(summary))
    write_run_summary(out, collect_summaries(out), out / "summary.csv")
    (cells, link), = _OverviewRows(out / "summary.html").rows[1:]
    assert cells[2] == cells[5] == cells[6] == "–" and link == "P/overlay.png"


@pytest.mark.parametrize("name, page_is_a_folder", [("report.html", False), ("report.HTML", False),
                                                    ("report.csv", True)])
def test_a_summary_csv_whose_overview_page_cannot_be_written_is_refused(tmp_path, tiny_weights, name,
                                                                          page_is_a_folder):
    folder = make_patient(tmp_path / "in", "P", _patches())
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights))
    target = tmp_path / name
    if page_is_a_folder:
        (tmp_path / "report.html").mkdir()
    with pytest.raises(OutputError, match="overview page") as info:
        write_run_summary(out, collect_summaries(out), target)
    assert str(tmp_path / ("report.html" if page_is_a_folder else name)) in str(info.value)
    assert not target.is_file()  # refused before the CSV was written


def test_overview_links_survive_odd_folder_names():
    names = ["x#1", "what?", "100%", "pätient 7"]
    rows = [{"patient": "P", "folder": name, "status": "ok", "patches": 1, "predicted_idc_area_fraction": 0.0,
             "labelled_idc_area_fraction": 0.0, "dice": 1.0, "threshold": 0.5, "model": "m"} for name in names]
    out = Path("/runs/out")
    page = overview_html(rows, out, out / "summary.html")
    links = re.findall(r'href="([^"]+)"', page)
    assert [unquote(link) for link in links] == [f"{name}/overlay.png" for name in names]
    assert all("#" not in link and "?" not in link and " " not in link for link in links)


def test_overview_page_escapes_names_and_errors():
    rows = [{"patient": "P<1>", "folder": "a&b c", "status": "ok", "patches": 4, "predicted_idc_area_fraction": 0.25,
             "labelled_idc_area_fraction": None, "dice": None, "threshold": 0.5, "model": "m"},
            {"patient": "Q", "folder": "q", "status": "failed", "error": "<script>x</script> & more", "model": "m"}]
    page = overview_html(rows, Path("/runs/out"), Path("/runs/out/summary.html"))
    assert "<script>" not in page and "&lt;script&gt;x&lt;/script&gt; &amp; more" in page
    assert 'href="a%26b%20c/overlay.png"' in page and "<td>P&lt;1&gt;</td><td>a&amp;b c</td>" in page
    assert "<td class=\"number\">25.0%</td><td class=\"number\">–</td><td class=\"number\">–</td>" in page
    assert "idcmap: 2 patients, 1 failed" in page


def test_resume_renders_again_when_a_skipped_file_appears_or_goes(tmp_path, tiny_weights):
    folder = make_patient(tmp_path / "in", "P", _patches())
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights))
    notes = folder / "notes.txt"
    notes.write_text("scanned twice")  # not a patch: skipped, and the summary lists it
    render_folder(folder, out, _options(tiny_weights, resume=True))
    summary = json.loads((out / "P" / "summary.json").read_text())
    assert summary["skipped_files"] == 1 and str(notes) in summary["skipped"][0]
    stamp = _stamps(out / "P")["summary.json"]
    render_folder(folder, out, _options(tiny_weights, resume=True))
    assert _stamps(out / "P")["summary.json"] == stamp  # nothing changed: kept
    notes.unlink()
    render_folder(folder, out, _options(tiny_weights, resume=True))
    assert json.loads((out / "P" / "summary.json").read_text())["skipped_files"] == 0


def _stop_at(monkeypatch, patient: str, stop: BaseException) -> None:
    """Make render_patient raise `stop` when it reaches `patient` (the others render as usual)."""
    from idcmap import pipeline

    real = pipeline.render_patient

    def stopped(folder, *args, **kwargs):
        if folder.name == patient:
            raise stop
        return real(folder, *args, **kwargs)
    monkeypatch.setattr(pipeline, "render_patient", stopped)


@pytest.mark.parametrize("stop", [KeyboardInterrupt(), OutputError("out/B: cannot move outputs into place")])
def test_a_run_stopped_early_lists_the_patients_it_replaced(tmp_path, tiny_weights, monkeypatch, stop):
    root, out = tmp_path / "in", tmp_path / "out"
    _small_patients(root, ["A", "B"])
    render_folder(root, out, _options(tiny_weights, threshold=0.9))
    _stop_at(monkeypatch, "B", stop)
    with pytest.raises(type(stop)):
        render_folder(root, out, _options(tiny_weights, threshold=0.1))
    thresholds = {row["patient"]: float(row["threshold"]) for row in _read_csv(out / "summary.csv")}
    assert thresholds == {"A": 0.1, "B": 0.9}  # A as replaced by the stopped run, B as it still is
    assert json.loads((out / "A" / "summary.json").read_text())["threshold"] == 0.1
    assert "0.10" in (out / "summary.html").read_text()


def test_a_file_above_a_patients_output_folder_is_refused_before_anything_is_written(tmp_path, tiny_weights):
    root, out = tmp_path / "in", tmp_path / "out"
    _small_patients(root / "g", ["A"])
    _small_patients(root / "h", ["B"])
    out.mkdir()
    (out / "h").write_text("mine")  # where out/h/B would go
    with pytest.raises(OutputError, match=r"out/h: a file where idcmap writes the folder of h/B"):
        render_folder(root, out, _options(tiny_weights))
    assert sorted(p.name for p in out.iterdir()) == ["h"] and (out / "h").read_text() == "mine"


def test_a_patient_folder_name_too_long_for_the_staging_folder_is_named_as_the_cause(tmp_path, tiny_weights):
    """A name of 242-255 bytes is a valid folder, but ".NAME.0123abcd.tmp" beside its outputs is not:
    refused before anything is written, naming the folder (not "choose a writable -o")."""
    root, out = tmp_path / "in", tmp_path / "out"
    _small_patients(root, ["A"])
    long_name = "P" * (MAX_PATIENT_NAME_BYTES + 1)
    (root / "A").rename(root / long_name)
    with pytest.raises(OutputError, match=rf"{long_name}: the patient folder's name is too long .*rename the patient"):
        render_folder(root, out, _options(tiny_weights))
    assert not out.exists() or not any(out.iterdir())
    (root / long_name).rename(root / long_name[1:])  # at the limit: rendered
    assert [row["status"] for row in render_folder(root, out, _options(tiny_weights))] == ["ok"]



@pytest.mark.skipif(os.name != "posix", reason="file names of arbitrary bytes are a POSIX matter")
def test_names_that_are_not_utf8_render_resume_and_export(tmp_path, tiny_weights):
    """A patient folder and a stray file named in latin-1 (from an old archive): rendered, the
    summaries written with the name escaped, the overview linking to the bytes on disk."""
    root, out = tmp_path / "in", tmp_path / "out"
    _small_patients(root, ["A"])
    os.rename(root / "A", os.fsdecode(bytes(root) + b"/caf\xe9"))
    folder = root / os.fsdecode(b"caf\xe9")
    open(os.fsencode(folder) + b"/0/notes \xe9.txt", "w").close()
    rows = render_folder(root, out, _options(tiny_weights))
    assert [(row["status"], row["skipped_files"]) for row in rows] == [("ok", 1)]
    assert [row["folder"] for row in _read_csv(out / "summary.csv")] == ["caf\\udce9"]
    assert 'href="caf%E9/overlay.png"' in (out / "summary.html").read_text()
    assert render_folder(root, out, _options(tiny_weights, resume=True)) == rows  # unchanged inputs: kept
    assert [row["status"] for row in collect_summaries(out)] == ["ok"]



def test_an_output_folder_that_cannot_be_listed_is_named_not_passed_over(tmp_path, tiny_weights, monkeypatch, caplog):
    """Permissions on out/B (simulated: tests may run as root): the summary lacks B, and says so."""
    root, out = tmp_path / "in", tmp_path / "out"
    _small_patients(root, ["A", "B"])
    render_folder(root, out, _options(tiny_weights))
    real_scandir = os.scandir

    def scandir(path="."):
        if Path(os.fsdecode(path)) == out / "B":
            raise PermissionError(13, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with caplog.at_level(logging.WARNING, logger="idcmap"):
        assert [row["patient"] for row in collect_summaries(out)] == ["A"]
    assert f"{out / 'B'}: cannot list this folder (Permission denied)" in caplog.text


def test_hidden_files_in_a_patients_output_folder_survive_a_new_render(tmp_path, tiny_weights):
    root, out = tmp_path / "in", tmp_path / "out"
    _small_patients(root, ["A"])
    render_folder(root, out, _options(tiny_weights))
    (out / "A" / ".notes").write_text("ask the pathologist")
    render_folder(root, out, _options(tiny_weights, threshold=0.2))
    assert (out / "A" / ".notes").read_text() == "ask the pathologist"
    assert json.loads((out / "A" / "summary.json").read_text())["threshold"] == 0.2
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no trash or staging left


def test_a_shard_stopped_early_keeps_its_other_patients_in_its_summary(tmp_path, tiny_weights, monkeypatch):
    root, out = tmp_path / "in", tmp_path / "out"
    _small_patients(root, ["A", "B", "C", "D"])
    render_folder(root, out, _options(tiny_weights, shard=(0, 2), threshold=0.9))  # A and C
    _stop_at(monkeypatch, "C", KeyboardInterrupt())
    with pytest.raises(KeyboardInterrupt):
        render_folder(root, out, _options(tiny_weights, shard=(0, 2), threshold=0.1))
    rows = _read_csv(out / summary_name((0, 2)))
    assert {row["patient"]: float(row["threshold"]) for row in rows} == {"A": 0.1, "C": 0.9}  # not B or D


def test_regions_geojson_gives_each_region_its_own_figures(tmp_path):
    """P23 (max over every predicted patch), and the per-region patches and mean."""
    slide = load_slide(make_patient(tmp_path, "P", grid_patches(1, 5)))
    probability = np.array([0.6, 0.7, 0.1, 0.8, 0.95])
    predicted = probability >= 0.5
    features = regions_geojson(slide, probability, predicted)["features"]
    figures = [(f["properties"]["patches"], f["properties"]["mean_probability"], f["properties"]["max_probability"])
               for f in features]
    assert figures == [(2, 0.65, 0.7), (2, 0.875, 0.95)]


def test_probabilities_csv_patch_probability_is_the_patch_networks(tmp_path, tiny_weights, cpu_scorer):
    """P7 (the patch_probability column repeats the final probability)."""
    folder = make_patient(tmp_path / "in", "P", grid_patches(4, 5, label_of=lambda r, c: int(c >= 3)))
    scores = cpu_scorer.score(load_slide(folder))
    assert np.abs(scores.patch_probability - scores.probability).max() > 1e-5  # the context head changes them
    render_folder(folder, tmp_path / "out", _options(tiny_weights))
    table = _read_csv(tmp_path / "out" / "P" / "probabilities.csv")
    np.testing.assert_allclose([float(r["patch_probability"]) for r in table], scores.patch_probability, atol=1e-6)


def test_a_shards_summary_lists_its_own_patients_only(tmp_path, tiny_weights):
    """P16: summary-I-of-N.csv lists shard I's patients, not those another shard rendered into OUT."""
    root, out = tmp_path / "in", tmp_path / "out"
    _small_patients(root, ["A", "B", "C"])
    render_folder(root, out, _options(tiny_weights, shard=(0, 2)))  # A and C
    render_folder(root, out, _options(tiny_weights, shard=(1, 2)))  # B
    assert [r["patient"] for r in _read_csv(out / "summary-1-of-2.csv")] == ["B"]
    assert [r["patient"] for r in _read_csv(out / "summary-0-of-2.csv")] == ["A", "C"]


def test_resume_renders_again_with_other_weights_of_the_same_model(tmp_path, tiny_weights):
    """P20: --resume keeps an earlier render only when it came from the same weights."""
    root, out = tmp_path / "in", tmp_path / "out"
    _small_patients(root, ["A"])
    render_folder(root, out, _options(tiny_weights))
    other = write_tiny_weights(tmp_path / "other" / f"{MODEL_NAME}.pt", seed=1)
    rows = render_folder(root, out, _options(other, resume=True))
    summary = json.loads((out / "A" / "summary.json").read_text())
    assert summary["weights_sha256"] == rows[0]["weights_sha256"] == sha256_of(other)
