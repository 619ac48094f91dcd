"""The disk filling up while idcmap writes: clean errors, no partial or temp files, old outputs kept.

The full disk is simulated in-process: `open()` as `idcmap.export` sees it hands out files that
accept a set number of bytes and then raise ENOSPC (the rest of the disk stays full); other cases
make fsync, close, the temp-file creation, mkdir or rename fail with ENOSPC.
"""
from __future__ import annotations

import builtins
import errno
import json
import os
from pathlib import Path

import numpy as np
import pytest

from conftest import MODEL_NAME, grid_patches, make_patient, run_main, textured
from idcmap import export
from idcmap.errors import OutputError
from idcmap.pipeline import PATIENT_FILES, RenderOptions, render_folder

NO_SPACE = os.strerror(errno.ENOSPC)  # "No space left on device"


def enospc() -> OSError:
    return OSError(errno.ENOSPC, NO_SPACE)


class _Handle:
    """A real file that takes `room` more bytes (None: any number) before raising ENOSPC."""

    def __init__(self, real, disk: "FullDisk", room: int | None) -> None:
        self._real, self._disk, self._room = real, disk, room

    def write(self, data) -> int:
        if self._room is None:
            return self._real.write(data)
        data = bytes(data)
        taken = data[: self._room]
        self._real.write(taken)
        self._real.flush()  # the partial bytes really land in the (temp) file
        self._room -= len(taken)
        if len(taken) < len(data):
            self._disk.full = True
            self._disk.partial.append((self._real.name, os.path.getsize(self._real.name)))
            raise enospc()
        return len(taken)

    def __getattr__(self, name):
        return getattr(self._real, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._real.close()


class FullDisk:
    """`open` for idcmap.export: files opened for writing before number `fail_at` work normally;
    file `fail_at` gets `room` bytes, then ENOSPC; every later one gets none."""

    def __init__(self, fail_at: int = 1, room: int = 10) -> None:
        self.fail_at, self.room = fail_at, room
        self.opened: list[Path] = []
        self.partial: list[tuple[str, int]] = []  # (temp file, its size when the disk filled)
        self.full = False

    def open(self, file, mode="r", *args, **kwargs):
        real = builtins.open(file, mode, *args, **kwargs)
        if not any(flag in mode for flag in "wax+"):
            return real
        self.opened.append(Path(file))
        number = len(self.opened)
        room = None if number < self.fail_at else self.room if number == self.fail_at else 0
        return _Handle(real, self, room)

    def install(self, monkeypatch) -> "FullDisk":
        monkeypatch.setattr(export, "open", self.open, raising=False)
        return self


def _everything(folder: Path) -> dict[str, bytes]:
    """{relative path: bytes} of every file below `folder` (hidden ones included)."""
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _hidden(folder: Path) -> list[str]:
    return sorted(p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.name.startswith("."))


# ----------------------------------------------------------------------------------------------
# (a), (b): the atomic writers


WRITERS = {
    "atomic_write_bytes": lambda path: export.atomic_write_bytes(path, bytes(range(256)) * 8),
    "atomic_write_text": lambda path: export.atomic_write_text(path, "é" * 1000),
    "write_json": lambda path: export.write_json(path, {"values": list(range(400))}),
    "write_csv": lambda path: export.write_csv(path, ["a", "b"], [{"a": i, "b": "x" * 20} for i in range(100)]),
    "write_png": lambda path: export.write_png(path, textured(5, height=40, width=40)),
    "write_npy": lambda path: export.write_npy(path, np.arange(1000, dtype=np.float64)),
}


@pytest.mark.parametrize("room", [0, 10, 500])
@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_disk_full_while_writing_a_new_file(tmp_path, monkeypatch, writer, room):
    target = tmp_path / "out" / "target.dat"
    disk = FullDisk(fail_at=1, room=room).install(monkeypatch)
    with pytest.raises(OutputError) as info:
        WRITERS[writer](target)
    assert disk.full, "the simulated disk never filled: the writer did not write through export's open()"
    # the partial bytes went to a temp file beside the target, never to the target itself
    assert [Path(name).parent for name, _ in disk.partial] == [target.parent]
    assert all(Path(name) != target for name, _ in disk.partial)
    assert [size for _, size in disk.partial] == [room]
    message = str(info.value)
    assert str(target) in message and NO_SPACE in message
    assert "\n" not in message
    assert sorted(p.name for p in target.parent.iterdir()) == []  # no temp, no partial target


@pytest.mark.parametrize("writer", sorted(WRITERS))
def test_disk_full_keeps_the_older_complete_file(tmp_path, monkeypatch, writer):
    target = tmp_path / "target.dat"
    WRITERS[writer](target)
    old = target.read_bytes()
    target.with_name("neighbour.txt").write_text("untouched")
    FullDisk(fail_at=1, room=7).install(monkeypatch)
    with pytest.raises(OutputError) as info:
        WRITERS[writer](target)
    assert str(target) in str(info.value)
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["neighbour.txt", "target.dat"]


def test_disk_full_at_fsync(tmp_path, monkeypatch):
    target = tmp_path / "summary.json"
    export.write_json(target, {"old": True})
    calls = []

    def failing_fsync(fd):
        calls.append(fd)
        raise enospc()

    monkeypatch.setattr(os, "fsync", failing_fsync)
    with pytest.raises(OutputError) as info:
        export.write_json(target, {"old": False, "pad": "x" * 5000})
    assert calls, "write_json no longer fsyncs: this test does not test what it says"
    assert str(target) in str(info.value) and NO_SPACE in str(info.value)
    assert json.loads(target.read_text()) == {"old": True}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]


def test_disk_full_at_close(tmp_path, monkeypatch):
    """Delayed allocation / network file systems report ENOSPC only when the file is closed."""

    class LateFailure:
        def __init__(self, real):
            self._real = real

        def __getattr__(self, name):
            return getattr(self._real, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self._real.close()
            raise enospc()

    monkeypatch.setattr(export, "open", lambda *a, **k: LateFailure(builtins.open(*a, **k)), raising=False)
    target = tmp_path / "probabilities.csv"
    with pytest.raises(OutputError) as info:
        export.write_csv(target, ["a"], [{"a": 1}])
    assert str(target) in str(info.value)
    assert list(tmp_path.iterdir()) == []


def test_disk_full_when_creating_the_temp_file(tmp_path, monkeypatch):
    target = tmp_path / "regions.geojson"
    export.write_json(target, {"type": "FeatureCollection", "features": []})
    old = target.read_bytes()

    def no_inode(*args, **kwargs):
        raise enospc()

    monkeypatch.setattr(export.tempfile, "mkstemp", no_inode)
    with pytest.raises(OutputError) as info:
        export.write_json(target, {"new": 1})
    assert str(target) in str(info.value) and NO_SPACE in str(info.value)
    assert target.read_bytes() == old
    assert sorted(p.name for p in tmp_path.iterdir()) == ["regions.geojson"]


# ----------------------------------------------------------------------------------------------
# (c): render


def _options(weights, **overrides):
    return RenderOptions(model=MODEL_NAME, weights=weights, device="cpu", backend="torch", progress=False,
                         **overrides)


def _patient(root: Path, name: str = "P", seed: int = 0) -> Path:
    return make_patient(root, name, grid_patches(3, 4, label_of=lambda r, c: int(c >= 2),
                                                 pixels_of=lambda r, c: textured(seed * 50 + r * 4 + c)))


@pytest.mark.parametrize("fail_at, room", [(1, 0), (3, 25), (6, 40)])
def test_render_with_the_disk_filling_leaves_nothing(tmp_path, tiny_weights, monkeypatch, fail_at, room):
    folder = _patient(tmp_path / "in")
    out = tmp_path / "out"
    disk = FullDisk(fail_at=fail_at, room=room).install(monkeypatch)
    with pytest.raises(OutputError) as info:
        render_folder(folder, out, _options(tiny_weights))
    assert disk.full
    failed = PATIENT_FILES[fail_at - 1]  # the outputs are written in PATIENT_FILES' order
    assert disk.opened[fail_at - 1].name.startswith(f".{failed}.")
    assert failed in str(info.value) and NO_SPACE in str(info.value)
    assert not (out / "P").exists()
    assert not out.exists() or sorted(p.name for p in out.iterdir()) == []  # no staging folder, no summary.csv
    assert all(not p.exists() for p in disk.opened)  # every temp file is gone


def test_disk_full_keeps_an_earlier_render_intact(tmp_path, tiny_weights, monkeypatch):
    folder = _patient(tmp_path / "in")
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights, threshold=0.0))
    before = _everything(out)
    assert sorted(before) == sorted(["summary.csv", "summary.html", *(f"P/{name}" for name in PATIENT_FILES)])
    disk = FullDisk(fail_at=3, room=100).install(monkeypatch)
    with pytest.raises(OutputError):
        render_folder(folder, out, _options(tiny_weights, threshold=1.0))  # would change every file
    assert disk.full
    assert _everything(out) == before
    assert _hidden(out) == []


def test_disk_full_in_the_second_patient(tmp_path, tiny_weights, monkeypatch):
    root = tmp_path / "in"
    _patient(root, "A", seed=1)
    _patient(root, "B", seed=2)
    out = tmp_path / "out"
    disk = FullDisk(fail_at=len(PATIENT_FILES) + 2, room=5).install(monkeypatch)
    with pytest.raises(OutputError) as info:
        render_folder(root, out, _options(tiny_weights))
    assert disk.full and "overlay.png" in str(info.value)
    assert sorted(p.name for p in (out / "A").iterdir()) == sorted(PATIENT_FILES)  # finished before the disk filled
    assert json.loads((out / "A" / "summary.json").read_text())["status"] == "ok"
    assert not (out / "B").exists()
    assert _hidden(out) == []


@pytest.mark.parametrize("full_at, name", [(1, "summary.csv"), (2, "summary.html")])
def test_disk_full_while_writing_the_run_summary(tmp_path, tiny_weights, monkeypatch, full_at, name):
    """The disk fills at the summary CSV, or at the overview page written after it: the file it
    fills at keeps its old content whole, and the patient itself is complete."""
    folder = _patient(tmp_path / "in")
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights))
    old = (out / name).read_bytes()
    FullDisk(fail_at=len(PATIENT_FILES) + full_at, room=30).install(monkeypatch)
    with pytest.raises(OutputError) as info:
        render_folder(folder, out, _options(tiny_weights, threshold=0.25))
    assert str(out / name) in str(info.value)
    assert (out / name).read_bytes() == old
    assert (",0.25," in (out / "summary.csv").read_text()) is (name == "summary.html")  # the CSV comes first
    assert json.loads((out / "P" / "summary.json").read_text())["threshold"] == 0.25  # the patient is complete
    assert sorted(p.name for p in (out / "P").iterdir()) == sorted(PATIENT_FILES)
    assert _hidden(out) == []


def test_disk_full_creating_the_staging_folder(tmp_path, tiny_weights, monkeypatch):
    folder = _patient(tmp_path / "in")
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights))
    before = _everything(out)
    real_mkdir = Path.mkdir

    def mkdir(self, *args, **kwargs):
        if self.name.startswith(".P."):
            raise enospc()
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", mkdir)
    with pytest.raises(OutputError) as info:
        render_folder(folder, out, _options(tiny_weights, threshold=1.0))
    assert NO_SPACE in str(info.value) and str(out) in str(info.value)
    assert _everything(out) == before
    assert _hidden(out) == []


def test_disk_full_at_the_final_rename_keeps_the_earlier_render(tmp_path, tiny_weights, monkeypatch):
    folder = _patient(tmp_path / "in")
    out = tmp_path / "out"
    render_folder(folder, out, _options(tiny_weights))
    before = _everything(out)
    real_rename = Path.rename
    refused = []

    def rename(self, target):
        if self.name.startswith(".P.") and self.name.endswith(".tmp"):  # the staging folder moving into place
            refused.append(self)
            raise enospc()
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", rename)
    with pytest.raises(OutputError):
        render_folder(folder, out, _options(tiny_weights, threshold=1.0))
    assert refused
    assert _everything(out) == before
    assert _hidden(out) == []


# ----------------------------------------------------------------------------------------------
# the command




def test_cli_disk_full_exits_2_with_one_line(tmp_path, tiny_weights, monkeypatch):
    folder = _patient(tmp_path / "in")
    out = tmp_path / "out"
    disk = FullDisk(fail_at=3, room=25).install(monkeypatch)
    code, stdout, stderr = run_main(["-q", "render", str(folder), "-o", str(out), "--weights", str(tiny_weights),
                                      "--device", "cpu"])
    assert disk.full
    assert code == 2, stderr
    assert "Traceback" not in stderr
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("idcmap: error: ")
    assert NO_SPACE in lines[0] and "probabilities.csv" in lines[0]
    assert stdout == ""
    assert not (out / "P").exists() and (not out.exists() or _hidden(out) == [])


def test_cli_disk_full_keeps_the_earlier_render(tmp_path, tiny_weights, monkeypatch):
    folder = _patient(tmp_path / "in")
    out = tmp_path / "out"
    args = ["-q", "render", str(folder), "-o", str(out), "--weights", str(tiny_weights), "--device", "cpu"]
    assert run_main(args)[0] == 0
    before = _everything(out)
    FullDisk(fail_at=2, room=0).install(monkeypatch)
    code, stdout, stderr = run_main([*args, "--threshold", "1.0"])
    assert code == 2 and "Traceback" not in stderr and stderr.startswith("idcmap: error: ")
    assert _everything(out) == before
