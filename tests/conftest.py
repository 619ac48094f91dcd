"""Shared helpers: synthetic patient folders with known pixels, a tiny deterministic model, the real data."""
from __future__ import annotations

import io
import sys
from contextlib import redirect_stderr, redirect_stdout
from pathlib import Path
from unittest import mock

import numpy as np
import pytest
from PIL import Image

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_ROOT = REPO_ROOT.parent / "shared" / "data"
MODEL_NAME = "cancernet-context"


# ----------------------------------------------------------------------------------------------
# synthetic patches


def solid(rgb, height: int = 50, width: int = 50) -> np.ndarray:
    """(height, width, 3) uint8 patch of one colour."""
    return np.broadcast_to(np.asarray(rgb, dtype=np.uint8), (height, width, 3)).copy()


def textured(seed: int, height: int = 50, width: int = 50, base: int = 128, spread: int = 100) -> np.ndarray:
    """(height, width, 3) uint8 patch of reproducible noise around `base`."""
    rng = np.random.default_rng(seed)
    values = base + rng.integers(-spread, spread + 1, size=(height, width, 3))
    return np.clip(values, 0, 255).astype(np.uint8)


def write_png(path: Path, array: np.ndarray, mode: str | None = None, **save_kwargs) -> Path:
    """Write an array as a PNG file (parents created)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(array) if mode is None else Image.fromarray(array, mode)
    image.save(path, format=save_kwargs.pop("format", "PNG"), **save_kwargs)
    return path


def patch_name(patient: str, x: int, y: int, label: int | None) -> str:
    suffix = "" if label is None else f"_class{label}"
    return f"{patient}_idx5_x{x}_y{y}{suffix}.png"


def make_patient(
    root: Path,
    patient: str,
    patches: dict[tuple[int, int], tuple[int | None, np.ndarray]],
    layout: str = "class",
) -> Path:
    """Write a patient folder `root/patient` from {(x, y): (label, array)}.

    layout "class": `<patient>/<label>/<patient>_idx5_x<X>_y<Y>_class<label>.png` (the data set's);
    layout "flat":  `<patient>/<patient>_idx5_x<X>_y<Y>[_class<label>].png` (label None: no _class).
    """
    folder = root / patient
    folder.mkdir(parents=True, exist_ok=True)
    for (x, y), (label, array) in patches.items():
        name = patch_name(patient, x, y, label)
        if layout == "class":
            assert label in (0, 1)
            path = folder / str(label) / name
        elif layout == "flat":
            path = folder / name
        else:
            raise ValueError(layout)
        write_png(path, array)
    return folder


def grid_patches(rows: int, cols: int, label_of=lambda r, c: 0, pixels_of=None, skip=()) -> dict:
    """{(x, y): (label, array)} for a rows x cols block of full patches on the data set's grid."""
    patches = {}
    for r in range(rows):
        for c in range(cols):
            if (r, c) in skip:
                continue
            array = pixels_of(r, c) if pixels_of else textured(1000 + r * cols + c)
            patches[(c * 50 + 1, r * 50 + 1)] = (label_of(r, c), array)
    return patches


@pytest.fixture(autouse=True)
def idcmap_log_level():
    """Each test starts with the root and idcmap loggers' levels as they were: the CLI's -q and -v set
    them, for the process."""
    import logging

    loggers = [logging.getLogger(), logging.getLogger("idcmap")]
    levels = [logger.level for logger in loggers]
    yield
    for logger, level in zip(loggers, levels):
        logger.setLevel(level)


@pytest.fixture
def patient_factory(tmp_path):
    """make_patient bound to a fresh tmp folder: factory(patient, patches, layout="class")."""

    def factory(patient, patches, layout="class", root=None):
        return make_patient(root or tmp_path, patient, patches, layout)

    return factory


# ----------------------------------------------------------------------------------------------
# a tiny deterministic model


def write_tiny_weights(path: Path, model: str = MODEL_NAME, seed: int = 0, calibration: dict | None = None) -> Path:
    """Randomly initialised (seeded) weights in idcmap's checkpoint format; no card."""
    import torch

    from idcmap.models import build_model, save_checkpoint

    torch.manual_seed(seed)
    net = build_model(model)
    save_checkpoint(path, {
        "model": model,
        "state_dict": net.state_dict(),
        "mean": [0.5] * 3,
        "std": [0.25] * 3,
        "calibration": {"threshold": 0.5} if calibration is None else calibration,
    })
    return path


@pytest.fixture(scope="session")
def tiny_weights(tmp_path_factory) -> Path:
    """A weights file for `cancernet-context`, written once per session (treat as read-only)."""
    return write_tiny_weights(tmp_path_factory.mktemp("weights") / f"{MODEL_NAME}.pt")


@pytest.fixture(scope="session")
def cpu_scorer(tiny_weights):
    """A CPU Scorer (default backend) of the tiny model, shared by the session."""
    from idcmap.models import load_model
    from idcmap.scoring import Scorer

    return Scorer(load_model(MODEL_NAME, tiny_weights), device="cpu")


# ----------------------------------------------------------------------------------------------
# the command


def run_main(args: list[str]) -> tuple[int, str, str]:
    """idcmap.cli.main() with ARGS in this process: (exit status, stdout, stderr).

    Any exception other than SystemExit escapes (that is the traceback a user would see)."""
    from idcmap import cli

    out, err = io.StringIO(), io.StringIO()
    with mock.patch.object(sys, "argv", ["idcmap", *args]), redirect_stdout(out), redirect_stderr(err):
        try:
            cli.main()
            code = 0
        except SystemExit as done:
            code = 0 if done.code is None else done.code
    return code, out.getvalue(), err.getvalue()


# ----------------------------------------------------------------------------------------------
# the real data


def real_patient_folder(patient: str, group: str = "patients") -> Path:
    """A real patient folder of ../shared/data, or skip the test with the reason."""
    folder = DATA_ROOT / group / patient
    if not folder.is_dir():
        pytest.skip(f"real data not available: {folder} is absent (the project reads ../shared/data)")
    return folder


def read_png_rgb(path: Path) -> np.ndarray:
    """A file's pixels read straight with pillow (the data set's PNGs are 8-bit RGB)."""
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))
