"""The benchmark scripts run end to end on a small synthetic data set (their figures are not checked:
timing belongs in the scripts' output, not in tests). This catches a library change that breaks them."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from conftest import DATA_ROOT, MODEL_NAME, REPO_ROOT, grid_patches, make_patient, textured


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    """root/patients/A (in 0/ and 1/) and B (flat, as idcmap also reads): 3 x 4 patches each, both classes."""
    root = tmp_path_factory.mktemp("bench") / "data"
    for i, (name, layout) in enumerate([("A", "class"), ("B", "flat")]):
        make_patient(root / "patients", name, grid_patches(3, 4, label_of=lambda r, c: int(c >= 2),
                                                           pixels_of=lambda r, c, i=i: textured(i * 50 + r * 4 + c)),
                     layout=layout)
    return root


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), *args], capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_bench_render(data_root, tiny_weights):
    out = _run("bench_render.py", "--data", str(data_root / "patients"), "--patients", "2", "--naive-patches", "8",
               "--model", MODEL_NAME, "--weights", str(tiny_weights), "--device", "cpu", "--repeat-largest", "1")
    for line in ("decode (floor)", "idcmap render end-to-end", "score / naive", "peak RSS"):
        assert line in out
    assert "naive loop on 8 patches" in out  # 4 of each patient, the flat one's too
    assert re.search(r"^A +12 ", out, re.M) and re.search(r"^B +12 ", out, re.M)  # the per-patient table


def test_bench_decode(data_root):
    out = _run("bench_decode.py", "--data", str(data_root / "patients"), "--patients", "2", "--rounds", "1")
    assert out.startswith("24 patches of 2 patients") and "processes, chunks" in out


def test_bench_render_stages(data_root):
    out = _run("bench_render_stages.py", "--patient", str(data_root / "patients" / "A"), "--model", "cancernet",
               "--rounds", "1")
    rows = {line.split()[0] for line in out.splitlines()[2:]}
    assert {"decode", "score", "render"} <= rows and "outputs, serial" in out


def test_bench_prefetch(data_root):
    out = _run("bench_prefetch.py", "--data", str(data_root / "patients"), "--patients", "2", "--model", "cancernet",
               "--rounds", "1")
    assert out.startswith("2 patients, 24 patches") and "sequential" in out and "prefetched" in out


@pytest.mark.parametrize("script, option", [
    ("bench_render.py", "--data"), ("bench_decode.py", "--data"), ("bench_prefetch.py", "--data"),
    ("bench_render_stages.py", "--patient"), ("bench_int8_agreement.py", "--data"),
    ("validation_experiments.py", "--data"), ("bench_gpu_shapes.py", "--data")])
@pytest.mark.parametrize("folder", ["absent", "empty"])
def test_benchmarks_without_data_say_so_in_one_line(tmp_path, script, option, folder):
    if folder == "empty":
        (tmp_path / folder).mkdir()
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / script), option, str(tmp_path / folder)],
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 1 and done.stdout == ""
    assert len(done.stderr.strip().splitlines()) == 1 and str(tmp_path / folder) in done.stderr or \
        (script == "bench_gpu_shapes.py" and done.stderr == "skipped: no CUDA GPU visible\n"), done.stderr


def test_bench_train_step():
    out = _run("bench_train_step.py", "--model", "cancernet", "--steps", "1", "--rounds", "1", "--device", "cpu",
               "--epochs", "2", "--epoch-patches", "513")
    assert "per step" in out and "2 epochs of 513 patches (at least 6 steps" in out


@pytest.mark.skipif(not (DATA_ROOT / "patients").is_dir(), reason="../shared/data (the real patches) is absent")
def test_validation_experiments_runs_on_the_shipped_split():
    out = _run("validation_experiments.py", "--data", str(DATA_ROOT), "--only", "4")
    assert "24 validation patients (6 whole slides)" in out and "thresholded regions: MAE" in out
