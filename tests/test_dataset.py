"""idcmap.dataset: patient ids under a data root, the split by patient, and its validation."""
from __future__ import annotations

import json
import logging
import sys

import pytest

from conftest import grid_patches, make_patient, solid
from idcmap.dataset import (SPLIT_SETS, load_labelled_slides, load_slides, load_split, make_split, patient_ids,
                            save_split)
from idcmap.errors import SplitError

IDS = [f"patients/p{i:02d}" for i in range(10)] + [f"sparse/s{i:02d}" for i in range(20)]


def _group(pid):
    return pid.rpartition("/")[0]


def test_make_split_is_by_patient_and_complete():
    split = make_split(IDS, seed=0)
    sets = {name: set(split[name]) for name in SPLIT_SETS}
    assert sets["train"].isdisjoint(sets["val"])
    assert sets["train"].isdisjoint(sets["test"])
    assert sets["val"].isdisjoint(sets["test"])
    assert sets["train"] | sets["val"] | sets["test"] == set(IDS)
    assert sum(len(split[name]) for name in SPLIT_SETS) == len(IDS)  # no id twice within a set either
    assert split["seed"] == 0 and split["test_fraction"] == 0.2 and split["val_fraction"] == 0.1
    for name in SPLIT_SETS:
        assert split[name] == sorted(split[name])


def test_make_split_stratifies_groups():
    split = make_split(IDS, seed=3)
    count = {(name, group): sum(_group(pid) == group for pid in split[name])
             for name in SPLIT_SETS for group in ("patients", "sparse")}
    # per group: round(0.2 n) to test, round(0.1 * rest) to val
    assert count[("test", "patients")] == 2 and count[("test", "sparse")] == 4
    assert count[("val", "patients")] == 1 and count[("val", "sparse")] == 2
    assert count[("train", "patients")] == 7 and count[("train", "sparse")] == 14


def test_make_split_small_group_still_gets_a_val_patient():
    split = make_split(["g/a", "g/b", "g/c"], seed=0)
    assert len(split["test"]) == 1 and len(split["val"]) == 1 and len(split["train"]) == 1


def test_make_split_deterministic_for_a_seed():
    assert make_split(IDS, seed=7) == make_split(list(reversed(IDS)), seed=7)
    others = [make_split(IDS, seed=s) for s in range(1, 6)]
    assert any(o["test"] != make_split(IDS, seed=7)["test"] for o in others)


@pytest.mark.parametrize("test_fraction, val_fraction", [(0.0, 0.1), (1.0, 0.1), (0.2, 1.0), (0.2, -0.1)])
def test_make_split_rejects_bad_fractions(test_fraction, val_fraction):
    with pytest.raises(SplitError):
        make_split(IDS, test_fraction=test_fraction, val_fraction=val_fraction)


def test_split_round_trip(tmp_path):
    split = make_split(IDS, seed=1)
    path = tmp_path / "split.json"
    save_split(split, path)
    available = {pid: tmp_path / pid for pid in IDS}
    assert load_split(path, available) == split
    assert not [p for p in tmp_path.iterdir() if p.name != "split.json"]  # no temp files left


def _write(tmp_path, split):
    path = tmp_path / "split.json"
    path.write_text(json.dumps(split))
    return path


@pytest.mark.parametrize("a, b", [("train", "val"), ("train", "test"), ("val", "test")])
def test_load_split_rejects_overlap(tmp_path, a, b):
    split = {"train": ["g/1", "g/2"], "val": ["g/3"], "test": ["g/4"]}
    split[b] = split[b] + [split[a][0]]
    with pytest.raises(SplitError) as info:
        load_split(_write(tmp_path, split), {f"g/{i}": tmp_path for i in range(1, 5)})
    assert split[a][0] in str(info.value)


def test_load_split_rejects_unknown_patients(tmp_path):
    split = {"train": ["g/1", "g/ghost"], "val": ["g/3"], "test": ["g/4"]}
    with pytest.raises(SplitError) as info:
        load_split(_write(tmp_path, split), {f"g/{i}": tmp_path for i in range(1, 5)})
    assert "g/ghost" in str(info.value)


@pytest.mark.parametrize("content", ["not json", "[]", json.dumps({"train": [], "val": []}), ""])
def test_load_split_rejects_malformed_files(tmp_path, content):
    path = tmp_path / "split.json"
    path.write_text(content)
    with pytest.raises(SplitError):
        load_split(path, {})


def test_load_split_missing_file(tmp_path):
    with pytest.raises(SplitError, match="--split"):
        load_split(tmp_path / "nope.json", {})


@pytest.mark.parametrize("train", ["patients/9035", [1, 2], {"a": 1}])
def test_load_split_wants_lists_of_patient_ids(tmp_path, train):
    path = tmp_path / "split.json"
    path.write_text(json.dumps({"train": train, "val": [], "test": []}))
    with pytest.raises(SplitError, match="'train' must be a list of patient ids"):
        load_split(path, {"patients/9035": tmp_path})


def test_patient_ids_relative_to_root(tmp_path):
    make_patient(tmp_path / "patients", "8864", {(1, 1): (0, solid((1, 1, 1)))})
    make_patient(tmp_path / "sparse", "9000", {(1, 1): (1, solid((1, 1, 1)))})
    assert patient_ids(tmp_path) == {"patients/8864": tmp_path / "patients" / "8864",
                                     "sparse/9000": tmp_path / "sparse" / "9000"}


def test_patient_ids_of_a_single_patient_folder(tmp_path):
    folder = make_patient(tmp_path, "8864", {(1, 1): (0, solid((1, 1, 1)))})
    assert patient_ids(folder) == {"8864": folder}


def test_load_slides_progress_bar_can_be_silenced(tmp_path, capsys, monkeypatch):
    make_patient(tmp_path / "patients", "8864", {(1, 1): (0, solid((1, 1, 1)))})
    folders = patient_ids(tmp_path)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    load_slides(["patients/8864"], folders, "load", progress=False)
    assert capsys.readouterr().err == ""
    load_slides(["patients/8864"], folders, "load")
    assert "load" in capsys.readouterr().err


def test_load_slides_draws_no_bar_into_a_log(tmp_path, capsys, monkeypatch):
    make_patient(tmp_path / "patients", "8864", {(1, 1): (0, solid((1, 1, 1)))})
    monkeypatch.setattr(sys.stderr, "isatty", lambda: False)
    slides = load_slides(["patients/8864"], patient_ids(tmp_path), "load")
    assert capsys.readouterr().err == "" and len(slides) == 1


def test_load_split_rejects_a_patient_listed_twice(tmp_path):
    split = {"train": ["g/1", "g/2", "g/1"], "val": ["g/3"], "test": ["g/4"]}
    with pytest.raises(SplitError, match=r"\['g/1'\] listed more than once in train"):
        load_split(_write(tmp_path, split), {f"g/{i}": tmp_path for i in range(1, 5)})


def test_a_partly_labelled_patient_is_left_out_of_labelled_slides(tmp_path, caplog):
    """D11: a patient whose file names carry a class only in part is not a labelled slide."""
    patches = grid_patches(2, 3, label_of=lambda r, c: None if c == 2 else r % 2)
    make_patient(tmp_path / "root", "half", patches, layout="flat")
    make_patient(tmp_path / "root", "full", grid_patches(2, 3, label_of=lambda r, c: r % 2), layout="flat")
    folders = patient_ids(tmp_path / "root")
    with caplog.at_level(logging.WARNING):
        labelled = load_labelled_slides(sorted(folders), folders, "test", "load", progress=False)
    assert [pid for pid, _ in labelled] == ["full"]
    assert "half" in caplog.text
