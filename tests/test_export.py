"""idcmap.export: atomic writes and the file formats other tools read."""
from __future__ import annotations

import csv
import io
import json
import os
import stat
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from idcmap import export
from idcmap.errors import OutputError


def _leftovers(folder, keep):
    return sorted(p.name for p in folder.iterdir() if p.name not in keep)


def test_json_is_strict_nan_and_infinities_become_null(tmp_path):
    data = {"auc": float("nan"), "x": [float("inf"), -float("inf"), 0.5], "n": {"y": np.float64("nan")},
            "interval": (float("nan"), 1.0)}  # bootstrap intervals are tuples
    expected = {"auc": None, "x": [None, None, 0.5], "n": {"y": None}, "interval": [None, 1.0]}
    assert json.loads(export.json_text(data)) == expected
    export.write_json(tmp_path / "m.json", data)
    assert "NaN" not in (tmp_path / "m.json").read_text()
    assert json.loads((tmp_path / "m.json").read_text()) == expected


def test_atomic_writes_leave_only_their_targets(tmp_path):
    export.atomic_write_bytes(tmp_path / "a.bin", b"\x00\x01")
    export.atomic_write_text(tmp_path / "b.txt", "héllo\n")
    export.write_json(tmp_path / "c.json", {"x": [1, 2.5, None]})
    export.write_npy(tmp_path / "d.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    image = np.arange(4 * 5 * 3, dtype=np.uint8).reshape(4, 5, 3)
    export.write_png(tmp_path / "e.png", image)
    export.write_csv(tmp_path / "f.csv", ["k"], [{"k": 1}])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.bin", "b.txt", "c.json", "d.npy", "e.png", "f.csv"]
    assert (tmp_path / "a.bin").read_bytes() == b"\x00\x01"
    assert (tmp_path / "b.txt").read_text(encoding="utf-8") == "héllo\n"
    assert json.loads((tmp_path / "c.json").read_text()) == {"x": [1, 2.5, None]}
    np.testing.assert_array_equal(np.load(tmp_path / "d.npy"), np.arange(6, dtype=np.float32).reshape(2, 3))
    with Image.open(tmp_path / "e.png") as png:
        assert png.mode == "RGB"
        np.testing.assert_array_equal(np.asarray(png), image)


def test_atomic_write_creates_parents_and_replaces(tmp_path):
    target = tmp_path / "deep" / "er" / "x.txt"
    export.atomic_write_text(target, "one")
    export.atomic_write_text(target, "two")
    assert target.read_text() == "two"
    assert _leftovers(target.parent, {"x.txt"}) == []


def test_written_files_get_the_umask_mode(tmp_path):
    export.atomic_write_text(tmp_path / "x.txt", "x")
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE((tmp_path / "x.txt").stat().st_mode) == 0o666 & ~umask


def test_failure_inside_atomic_path_keeps_old_file(tmp_path):
    target = tmp_path / "summary.csv"
    target.write_text("old contents\n")
    with pytest.raises(RuntimeError):
        with export.atomic_path(target) as tmp:
            assert tmp.parent == tmp_path and tmp != target
            tmp.write_text("half-writ")
            raise RuntimeError("interrupted")
    assert target.read_text() == "old contents\n"
    assert _leftovers(tmp_path, {"summary.csv"}) == []


def test_failure_inside_atomic_path_creates_nothing(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with export.atomic_path(tmp_path / "new.json") as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_atomic_paths_replace_files_together_or_not_at_all(tmp_path):
    weights, card = tmp_path / "m.pt", tmp_path / "m.json"
    weights.write_text("old weights")
    with pytest.raises(RuntimeError):
        with export.atomic_paths(weights, card) as (new_weights, new_card):
            new_weights.write_text("new weights")
            raise RuntimeError("the card could not be made")
    assert weights.read_text() == "old weights" and not card.exists()
    with export.atomic_paths(weights, card) as (new_weights, new_card):
        new_weights.write_text("new weights")
        new_card.write_text("new card")
    assert (weights.read_text(), card.read_text()) == ("new weights", "new card")
    assert _leftovers(tmp_path, {"m.pt", "m.json"}) == []


def test_atomic_paths_put_back_what_they_renamed_when_a_later_rename_fails(tmp_path, monkeypatch):
    weights, card = tmp_path / "m.pt", tmp_path / "m.json"
    weights.write_text("old weights")
    card.write_text("old card")
    real_replace = os.replace

    def full_at_the_card(source, target):
        if Path(target) == card and Path(source).name.endswith(".tmp"):
            raise OSError(28, "No space left on device")
        return real_replace(source, target)
    monkeypatch.setattr(os, "replace", full_at_the_card)
    with pytest.raises(OutputError, match=r"m\.pt \(nor .*m\.json\): writing failed \(No space left on device\)"):
        with export.atomic_paths(weights, card) as (new_weights, new_card):
            new_weights.write_text("new weights")
            new_card.write_text("new card")
    assert (weights.read_text(), card.read_text()) == ("old weights", "old card")
    assert _leftovers(tmp_path, {"m.pt", "m.json"}) == []


def test_atomic_paths_remove_a_new_file_that_had_no_earlier_one_when_a_later_rename_fails(tmp_path, monkeypatch):
    """New weights must not stay beside the old card when the card cannot be replaced."""
    weights, card = tmp_path / "m.pt", tmp_path / "m.json"
    card.write_text("old card")
    real_replace = os.replace

    def full_at_the_card(source, target):
        if Path(target) == card and Path(source).name.endswith(".tmp"):
            raise OSError(28, "No space left on device")
        return real_replace(source, target)
    monkeypatch.setattr(os, "replace", full_at_the_card)
    with pytest.raises(OutputError):
        with export.atomic_paths(weights, card) as (new_weights, new_card):
            new_weights.write_text("new weights")
            new_card.write_text("new card")
    assert not weights.exists() and card.read_text() == "old card"
    assert _leftovers(tmp_path, {"m.json"}) == []


def test_atomic_paths_put_back_what_they_renamed_on_ctrl_c_between_renames(tmp_path, monkeypatch):
    files = [tmp_path / name for name in ("m.pt", "m.json", "m.split.json")]
    for path in files:
        path.write_text(f"old {path.name}")
    real_replace, calls = os.replace, []

    def interrupted(source, target):
        calls.append(target)
        if len(calls) == 4:  # m.json moved aside, its new file not yet in
            raise KeyboardInterrupt
        return real_replace(source, target)
    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        with export.atomic_paths(*files) as temps:
            for tmp in temps:
                tmp.write_text("new")
    assert [path.read_text() for path in files] == [f"old {path.name}" for path in files]
    assert _leftovers(tmp_path, {path.name for path in files}) == []


def test_a_writers_failure_inside_atomic_paths_names_the_target_not_the_temp_file(tmp_path, monkeypatch):
    weights, card = tmp_path / "m.pt", tmp_path / "m.json"

    def no_space(*args):
        raise OSError(28, "No space left on device")
    with pytest.raises(OutputError) as info:
        with export.atomic_paths(weights, card) as (new_weights, new_card):
            new_weights.write_text("weights")
            monkeypatch.setattr(os, "fsync", no_space)
            export.write_json(new_card, {"sha256": "x"})
    assert str(info.value).startswith(f"{card}: writing failed (No space left on device)")
    assert ".tmp" not in str(info.value) and _leftovers(tmp_path, set()) == []


def test_write_csv_round_trip(tmp_path):
    fields = ["patient", "status", "error", "value"]
    rows = [
        {"patient": "8864", "status": "ok", "error": None, "value": 0.25},
        {"patient": "odd, name", "status": "failed", "error": 'bad "quote"\nsecond line', "value": None,
         "extra": "ignored"},
    ]
    export.write_csv(tmp_path / "s.csv", fields, rows)
    with open(tmp_path / "s.csv", newline="") as handle:
        read = list(csv.DictReader(handle))
    assert [list(r) for r in read] == [fields, fields]
    assert read[0] == {"patient": "8864", "status": "ok", "error": "", "value": "0.25"}
    assert read[1] == {"patient": "odd, name", "status": "failed", "error": 'bad "quote"\nsecond line', "value": ""}


def test_write_csv_header_only(tmp_path):
    export.write_csv(tmp_path / "s.csv", export.SUMMARY_FIELDS, [])
    assert (tmp_path / "s.csv").read_text() == ",".join(export.SUMMARY_FIELDS) + "\n"


def test_unwritable_directory_raises_output_error(tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if os.access(locked, os.W_OK):
            pytest.skip("running as a user (root?) for whom chmod 0500 does not block writing")
        with pytest.raises(OutputError) as info:
            export.write_json(locked / "x.json", {})
        assert str(locked / "x.json") in str(info.value)
        with pytest.raises(OutputError):
            export.write_csv(locked / "sub" / "x.csv", ["a"], [])
    finally:
        locked.chmod(0o700)


def test_permission_denied_raises_output_error(tmp_path, monkeypatch):
    """The same refusal as a read-only folder, simulated so that it also runs as root."""
    import errno
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")

    monkeypatch.setattr(tempfile, "mkstemp", refuse)
    with pytest.raises(OutputError) as info:
        export.write_json(tmp_path / "x.json", {})
    message = str(info.value)
    assert str(tmp_path / "x.json") in message and "Permission denied" in message and "-o" in message
    assert list(tmp_path.iterdir()) == []


def test_parent_that_is_a_file_raises_output_error(tmp_path):
    """Works for root too: a path whose parent is a regular file can never be written."""
    (tmp_path / "afile").write_text("")
    with pytest.raises(OutputError) as info:
        export.atomic_write_text(tmp_path / "afile" / "sub" / "x.txt", "x")
    assert "afile" in str(info.value)


def test_target_that_is_a_directory_raises_output_error_and_cleans_up(tmp_path):
    (tmp_path / "x.json").mkdir()
    with pytest.raises(OutputError):
        export.write_json(tmp_path / "x.json", {})
    assert _leftovers(tmp_path, {"x.json"}) == []
    assert (tmp_path / "x.json").is_dir()


def test_png_bytes_are_a_png(tmp_path):
    export.write_png(tmp_path / "x.png", np.zeros((3, 2, 3), np.uint8))
    data = (tmp_path / "x.png").read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n")
    assert Image.open(io.BytesIO(data)).size == (2, 3)


@pytest.mark.parametrize("shape", [(1, 1, 3), (1, 7, 3), (9, 1, 3), (37, 53, 3)])
def test_encode_png_round_trips_exactly(shape):
    image = np.random.default_rng(sum(shape)).integers(0, 256, size=shape, dtype=np.uint8)
    image[0, 0] = (255, 0, 1)  # a filter difference that wraps around 0 and 255
    decoded = Image.open(io.BytesIO(export.encode_png(image)))
    decoded.load()  # pillow checks every chunk's CRC while reading
    assert decoded.mode == "RGB" and decoded.size == (shape[1], shape[0])
    np.testing.assert_array_equal(np.asarray(decoded), image)


def test_encode_png_compresses_flat_background():
    image = np.full((400, 600, 3), 255, dtype=np.uint8)  # a mosaic's white gaps
    image[100:150, 200:250] = (200, 120, 180)
    assert len(export.encode_png(image)) < image.nbytes / 50


@pytest.mark.parametrize("bad", [np.zeros((4, 4), np.uint8), np.zeros((4, 4, 4), np.uint8),
                                 np.zeros((4, 4, 3), np.float32), np.zeros((0, 4, 3), np.uint8)])
def test_encode_png_rejects_what_it_cannot_write(bad):
    with pytest.raises(ValueError, match="uint8"):
        export.encode_png(bad)


def test_encode_png_splits_long_data_into_chunks(monkeypatch):
    monkeypatch.setattr(export, "PNG_CHUNK_BYTES", 100)
    image = np.random.default_rng(7).integers(0, 256, size=(40, 30, 3), dtype=np.uint8)
    data = export.encode_png(image)
    assert data.count(b"IDAT") > 10
    decoded = Image.open(io.BytesIO(data))
    decoded.load()
    np.testing.assert_array_equal(np.asarray(decoded), image)
