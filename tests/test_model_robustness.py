"""Refusals of damaged model files and of training inputs: one clear IdcmapError naming the file,
raised before anything is trained or written."""
from __future__ import annotations

import json
import math
import re
import os
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import MODEL_NAME, run_main, write_tiny_weights
from idcmap import training
from idcmap.errors import IdcmapError, OptionError, OutputError, SplitError, WeightsError
from idcmap.models import build_model, card_path, load_model, save_checkpoint
from idcmap.training import TrainConfig, recalibrate, train
from test_training import _synthetic_root

FAST = dict(epochs=1, batch_patches=32, device="cpu")


class Planted:
    """Pickles into a call of os.mkdir: what a planted file could run on loading."""

    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return os.mkdir, (self.marker,)


def assert_one_clear_line(err: Exception, *named) -> None:
    message = str(err)
    assert "\n" not in message and "weights_only" not in message and len(message) < 400, message
    for name in named:
        assert str(name) in message, message


# ----------------------------------------------------------------------------------------------
# model cards


@pytest.mark.parametrize("card, problem", [
    ([1, 2], "JSON object, not a list"),
    ("weights", "JSON object, not a string"),
    (None, "JSON object, not null"),
    ({"sha256": 5}, "'sha256' is an integer"),
    ({"int8": [1]}, "'int8' is a list"),
    ({"int8": None}, "'int8' is null"),
    ({"parameters": "many"}, "'parameters' is a string"),
    ({"training": []}, "'training' is a list"),
    ({"history": {}}, "'history' is an object"),
])
def test_malformed_card_is_refused_naming_it(tmp_path, card, problem):
    path = write_tiny_weights(tmp_path / "m.pt")
    card_path(path).write_text(json.dumps(card))
    with pytest.raises(WeightsError) as info:
        load_model(MODEL_NAME, path)
    assert_one_clear_line(info.value, card_path(path), problem)
    assert "restore the card" in str(info.value) and "idcmap calibrate" in str(info.value)


def test_card_with_unknown_fields_and_right_types_loads(tmp_path):
    path = write_tiny_weights(tmp_path / "m.pt")
    card = {"note": [1], "int8": {}, "parameters": 3, "history": [], "training": {"command": "x"}}
    card_path(path).write_text(json.dumps(card))
    assert load_model(MODEL_NAME, path).card == card


def test_unreadable_card_names_the_card(tmp_path):
    path = write_tiny_weights(tmp_path / "m.pt")
    card_path(path).write_bytes(b"\xff\xfe not utf-8")
    with pytest.raises(WeightsError) as info:
        load_model(MODEL_NAME, path)
    assert_one_clear_line(info.value, card_path(path), "unreadable model card")


# ----------------------------------------------------------------------------------------------
# weights files


@pytest.mark.parametrize("content", [b"", b"garbage" * 40, b"PK\x03\x04" + b"\x00" * 100,
                                     b"idcmap weights: bfloat16, zlib\nnot zlib"])
def test_garbage_weights_file_is_one_line(tmp_path, content):
    path = tmp_path / "garbage.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        load_model(weights=path)
    assert_one_clear_line(info.value, path, "not an idcmap weights file", "idcmap train")


def test_torch_file_that_is_not_weights(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([1, 2], path)
    with pytest.raises(WeightsError) as info:
        load_model(weights=path)
    assert_one_clear_line(info.value, path, "not an idcmap weights file (it holds a list")
    torch.save({"model": MODEL_NAME}, path)
    with pytest.raises(WeightsError, match="no state_dict"):
        load_model(weights=path)


def test_weights_that_would_run_code_are_refused_without_running_it(tmp_path):
    path, marker = tmp_path / "planted.pt", tmp_path / "ran"
    torch.save({"model": MODEL_NAME, "state_dict": {}, "x": Planted(marker)}, path)
    with pytest.raises(WeightsError) as info:
        load_model(weights=path)
    assert_one_clear_line(info.value, path)
    assert not marker.exists()


def test_weights_folder_is_named_as_a_folder(tmp_path):
    with pytest.raises(WeightsError) as info:
        load_model(weights=tmp_path)
    assert_one_clear_line(info.value, tmp_path, "is a folder, not a weights file")


@pytest.mark.parametrize("name", ["rn.v2.int8.onnx", "rn.v2.json", "rn.v2.split.json"])
def test_a_file_beside_the_weights_points_to_the_weights(tmp_path, name):
    (tmp_path / name).write_text("{}")
    with pytest.raises(WeightsError) as info:
        load_model(weights=tmp_path / name)
    assert_one_clear_line(info.value, tmp_path / name, f"pass the .pt file beside it ({tmp_path / 'rn.v2.pt'})")


def test_missing_weights_file_names_it(tmp_path):
    with pytest.raises(WeightsError) as info:
        load_model(weights=tmp_path / "absent.pt")
    assert_one_clear_line(info.value, tmp_path / "absent.pt", "no such weights file")
    assert "of that file" not in str(info.value)


def test_cli_garbage_weights_is_one_line(tmp_path, patient_factory):
    from conftest import grid_patches

    folder = patient_factory("P1", grid_patches(2, 2))
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"not weights at all")
    code, _, err = run_main(["render", str(folder), "-o", str(tmp_path / "out"), "--weights", str(garbage)])
    errors = [line for line in err.splitlines() if line.startswith("idcmap: error:")]
    assert code == 2 and len(errors) == 1 and str(garbage) in errors[0] and "weights_only" not in err, err


# ----------------------------------------------------------------------------------------------
# training checkpoints


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    return _synthetic_root(tmp_path_factory.mktemp("robust") / "data")


def _resume_against(data_root, out, checkpoint: bytes | dict) -> WeightsError:
    out.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(checkpoint, dict):
        save_checkpoint(out.with_suffix(".ckpt"), checkpoint)
    else:
        out.with_suffix(".ckpt").write_bytes(checkpoint)
    with pytest.raises(WeightsError) as info:
        train(data_root, MODEL_NAME, out, TrainConfig(**FAST), resume=True)
    assert_one_clear_line(info.value, out.with_suffix(".ckpt"), "--resume")
    assert sorted(p.name for p in out.parent.iterdir()) == [out.with_suffix(".ckpt").name]  # nothing else written
    return info.value


def test_garbage_checkpoint_is_refused(data_root, tmp_path):
    error = _resume_against(data_root, tmp_path / "w" / "m.pt", b"\x00garbage" * 20)
    assert "not an idcmap training checkpoint" in str(error)


def test_checkpoint_of_another_model_is_refused(data_root, tmp_path):
    torch.manual_seed(0)
    error = _resume_against(data_root, tmp_path / "w" / "m.pt", {"network": build_model("cancernet").state_dict()})
    assert "does not fit a 'cancernet-context' training run" in str(error)


def _interrupted_checkpoint(data_root, out, monkeypatch) -> dict:
    """The checkpoint a run of MODEL_NAME into `out` leaves when killed after its epoch (in calibration)."""
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(training, "fit_calibration", interrupted)
        train(data_root, MODEL_NAME, out, TrainConfig(**FAST))
    return torch.load(out.with_suffix(".ckpt"), weights_only=True)  # a real checkpoint needs no pickled code


def test_checkpoint_with_a_malformed_run_record_is_refused(data_root, tmp_path, monkeypatch):
    state = _interrupted_checkpoint(data_root, tmp_path / "first" / "m.pt", monkeypatch)
    _resume_against(data_root, tmp_path / "w" / "m.pt", {**state, "history": "not a list"})


def test_checkpoint_of_another_model_with_the_same_network_is_refused(data_root, tmp_path, monkeypatch):
    """cancernet and cancernet-smooth share one network, so the state fits; the recorded model name decides."""
    out = tmp_path / "w" / "m.pt"
    state = _interrupted_checkpoint(data_root, out, monkeypatch)
    assert state["model"] == MODEL_NAME
    save_checkpoint(out.with_suffix(".ckpt"), {**state, "model": "other-model"})
    with pytest.raises(OptionError) as info:
        train(data_root, MODEL_NAME, out, TrainConfig(**FAST), resume=True)
    assert_one_clear_line(info.value, out.with_suffix(".ckpt"), "--model other-model")
    assert sorted(p.name for p in out.parent.iterdir()) == [out.with_suffix(".ckpt").name]


def test_checkpoint_that_would_run_code_is_refused_without_running_it(data_root, tmp_path):
    marker = tmp_path / "ran"
    _resume_against(data_root, tmp_path / "w" / "m.pt", {"network": Planted(marker)})
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------
# training settings and outputs, checked before anything is read or written


@pytest.fixture
def unread(monkeypatch, tmp_path):
    """A data root that training must refuse before reading it."""
    def read(root):
        raise AssertionError(f"{root} was read before the refusal")

    monkeypatch.setattr(training, "patient_ids", read)
    return tmp_path / "data"


@pytest.mark.parametrize("setting, value", [
    ("learning_rate", -1.0), ("learning_rate", math.nan), ("learning_rate", math.inf), ("learning_rate", 0),
    ("weight_decay", -1e-4), ("weight_decay", math.nan), ("epochs", 0), ("epochs", 1.5), ("batch_patches", 0),
    ("window", 0), ("patience", 0), ("seed", -1), ("cell_dropout", 1.0), ("stain_jitter", -0.1),
    ("test_fraction", 0.0), ("val_fraction", 1.0), ("epochs", True), ("device", "tpu"),
    ("precision", "fp16"), ("seed", 10**400), ("batch_patches", 7),
])
def test_unusable_setting_is_refused_before_reading_data(unread, tmp_path, setting, value):
    out = tmp_path / "w" / "m.pt"
    with pytest.raises(IdcmapError) as info:
        train(unread, MODEL_NAME, out, TrainConfig(**{**FAST, setting: value}))
    assert "\n" not in str(info.value)
    assert not out.parent.exists()


def test_lr_error_names_the_option():
    with pytest.raises(IdcmapError, match=r"--lr nan: must be a finite number > 0 \(default 0.002\)"):
        TrainConfig(learning_rate=math.nan).validate()


def test_output_that_is_a_folder_is_refused_before_training(unread, tmp_path):
    out = tmp_path / "cn.pt"
    out.mkdir()
    with pytest.raises(OutputError) as info:
        train(unread, MODEL_NAME, out, TrainConfig(**FAST))
    assert_one_clear_line(info.value, out, "is a folder")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cn.pt"]


def test_output_beside_which_a_folder_blocks_the_card_is_refused(unread, tmp_path):
    (tmp_path / "cn.split.json").mkdir()
    with pytest.raises(OutputError, match="cn.split.json: is a folder"):
        train(unread, MODEL_NAME, tmp_path / "cn.pt", TrainConfig(**FAST))


def test_output_below_a_file_is_refused(unread, tmp_path):
    (tmp_path / "afile.txt").write_text("x")
    with pytest.raises(OutputError, match="not a writable folder"):
        train(unread, MODEL_NAME, tmp_path / "afile.txt" / "sub" / "cn.pt", TrainConfig(**FAST))


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_output_in_a_read_only_folder_is_refused(unread, tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        with pytest.raises(OutputError, match="not a writable folder"):
            train(unread, MODEL_NAME, folder / "cn.pt", TrainConfig(**FAST))
    finally:
        folder.chmod(0o755)


def test_output_in_a_folder_the_user_cannot_write_is_refused(unread, tmp_path, monkeypatch):
    """The same refusal as above, simulated so that it runs as root too (root may write anywhere)."""
    folder = tmp_path / "ro"
    folder.mkdir()
    real_temporary_file = tempfile.TemporaryFile

    def temporary_file(*args, dir=None, **kwargs):
        if dir is not None and Path(dir) == folder:
            raise PermissionError(13, "Permission denied")
        return real_temporary_file(*args, dir=dir, **kwargs)

    monkeypatch.setattr(tempfile, "TemporaryFile", temporary_file)
    with pytest.raises(OutputError, match=f"{folder}: not a writable folder"):
        train(unread, MODEL_NAME, folder / "cn.pt", TrainConfig(**FAST))
    assert list(folder.iterdir()) == []


@pytest.mark.parametrize("name", ["cn.json", "m.seed1", "m"])
def test_weights_not_named_pt_are_refused(unread, tmp_path, name):
    """Card, split and checkpoint are named after the weights: cn.json would overwrite itself, and
    m.seed1 and m.seed2 would share m.json and m.split.json."""
    with pytest.raises(OutputError, match=r"name the weights file <name>.pt"):
        train(unread, MODEL_NAME, tmp_path / name, TrainConfig(**FAST))


def test_refused_training_leaves_no_split(tmp_path):
    root = _synthetic_root(tmp_path / "data", label_of=lambda i, r, c: i % 2)  # every patient one class
    out = tmp_path / "w" / "m.pt"
    with pytest.raises(SplitError, match="no validation patient has both"):
        train(root, MODEL_NAME, out, TrainConfig(**FAST))
    assert not out.with_suffix(".split.json").exists()


# ----------------------------------------------------------------------------------------------
# recalibration


def test_recalibrate_refuses_single_class_validation(tmp_path):
    weights = write_tiny_weights(tmp_path / "m.pt")
    before = weights.read_bytes()
    split = {"train": ["group/p0", "group/p1"], "val": ["group/p2"], "test": ["group/p3"]}
    split_file = tmp_path / "one-class.split.json"
    split_file.write_text(json.dumps(split))
    single = _synthetic_root(tmp_path / "single", label_of=lambda i, r, c: 1)
    with pytest.raises(SplitError) as info:
        recalibrate(single, MODEL_NAME, weights, split_file, device="cpu")
    assert_one_clear_line(info.value, split_file, "no validation patient has both", "--split")
    assert weights.read_bytes() == before and not card_path(weights).exists()


@pytest.mark.parametrize("calibration", [
    {"threshold": math.nan}, {"threshold": 1.5}, {"temperature": 0.0}, {"patch_temperature": -1.0},
    {"smoothing_sigma": math.inf}, {"min_region_cells": -2}, {"min_region_cells": 2.5}, {"max_hole_cells": 4.0},
])
def test_weights_with_an_unusable_calibration_are_refused(tmp_path, calibration):
    path = write_tiny_weights(tmp_path / f"{MODEL_NAME}.pt", calibration=calibration)
    with pytest.raises(WeightsError, match="calibrat") as info:
        load_model(MODEL_NAME, path)
    assert_one_clear_line(info.value, str(path))


def test_weights_naming_an_unknown_model_name_the_file(tmp_path):
    path = write_tiny_weights(tmp_path / "w.pt")
    payload = torch.load(path, weights_only=True)
    save_checkpoint(path, {**payload, "model": "nosuch"})
    with pytest.raises(WeightsError, match="'nosuch'") as info:
        load_model(None, path)
    assert_one_clear_line(info.value, str(path))


@pytest.mark.parametrize("key, value, problem", [
    ("std", "abc", "its std is 'abc', not three numbers"), ("mean", [0.5, 0.5], "its mean is '[0.5, 0.5]', not three"),
    ("std", [0.2, 0.0, 0.2], "must be above 0"), ("mean", [0.5, math.nan, 0.5], "is not finite"),
])
def test_weights_with_unusable_input_statistics_are_refused(tmp_path, key, value, problem):
    path = write_tiny_weights(tmp_path / "w.pt")
    payload = torch.load(path, weights_only=True)
    save_checkpoint(path, {**payload, key: value})
    with pytest.raises(WeightsError, match=re.escape(problem)) as info:
        load_model(None, path)
    assert_one_clear_line(info.value, str(path))
