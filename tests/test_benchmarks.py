"""The benchmark scripts run end to end on a small synthetic data set (their figures are not checked:
timing belongs in the scripts' output, not in tests). This catches a library change that breaks them."""
from __future__ import annotations

import subprocess
import sys

import pytest

from conftest import DATA_ROOT, MODEL_NAME, REPO_ROOT, grid_patches, make_patient, textured


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """root/patients/A and B: 3 x 4 patches each, both classes."""
    root = tmp_path_factory.mktemp("bench") / "data"
    for i, name in enumerate(["A", "B"]):
        make_patient(root / "patients", name, grid_patches(3, 4, label_of=lambda r, c: int(c >= 2),
                                                           pixels_of=lambda r, c, i=i: textured(i * 50 + r * 4 + c)))
    return root


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_render(data_root, tiny_weights):
    out = _run("bench_render.py", "--data", str(data_root / "patients"), "--patients", "2", "--naive-patches", "8",
               "--model", MODEL_NAME, "--weights", str(tiny_weights), "--device", "cpu", "--repeat-largest", "1")
    for line in ("decode (floor)", "naive per-patch loop", "idcmap render end-to-end", "score / naive", "peak RSS"):
        assert line in out


def test_bench_render_stages(data_root):
    out = _run("bench_render_stages.py", "--patient", str(data_root / "patients" / "A"), "--model", "cancernet",
               "--rounds", "1")
    assert "render" in out and "outputs, serial" in out


def test_bench_prefetch(data_root):
    out = _run("bench_prefetch.py", "--data", str(data_root), "--patients", "2", "--model", "cancernet", "--rounds", "1")
    assert "sequential" in out and "prefetched" in out


def test_bench_train_step():
    out = _run("bench_train_step.py", "--model", "cancernet", "--steps", "1", "--rounds", "1", "--device", "cpu")
    assert "per step" in out


@pytest.mark.skipif(not (DATA_ROOT / "patients").is_dir(), reason="../shared/data (the real patches) is absent")
def test_validation_experiments_runs_on_the_shipped_split():
    out = _run("validation_experiments.py", "--data", str(DATA_ROOT), "--only", "4")
    assert "24 validation patients (6 whole slides)" in out and "thresholded regions: MAE" in out
