"""The `idcmap` command: help, exit statuses, one-line errors, render and export."""
from __future__ import annotations

import csv
import json
import re
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

from conftest import REPO_ROOT, grid_patches, make_patient, textured, write_tiny_weights
from idcmap import __version__, cli as cli_module
from idcmap.cli import cli
from idcmap.errors import EmptyFolderError, IdcmapError
from idcmap.pipeline import PATIENT_FILES
from idcmap.train_config import LIMITS, TrainConfig


def _patient(root, name="P"):
    return make_patient(root, name, grid_patches(3, 3, label_of=lambda r, c: int(r == 0),
                                                 pixels_of=lambda r, c: textured(r * 3 + c)))


def _run_module(args, cwd):
    """`python -m idcmap.cli ARGS` in a fresh process (what the console script runs)."""
    return subprocess.run([sys.executable, "-m", "idcmap.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=300)


def _run_main(args, monkeypatch, capsys):
    """cli.main() in this process with ARGS; returns (exit status, stdout, stderr)."""
    monkeypatch.setattr(sys, "argv", ["idcmap", *args])
    with pytest.raises(SystemExit) as done:
        cli_module.main()
        raise SystemExit(0)
    captured = capsys.readouterr()
    code = done.value.code
    return (0 if code is None else code), captured.out, captured.err


@pytest.mark.parametrize("command, expected", [
    ([], ["render", "export", "train", "evaluate"]),
    (["render"], ["FOLDER", "--weights", "--threshold", "--resume", "--json", "--device", "--shard"]),
    (["export"], ["OUT", "--output"]),
    (["train"], ["DATA_ROOT", "--epochs", "--batch-patches", "--split"]),
    (["evaluate"], ["DATA_ROOT", "--model", "--split", "--backend"]),
    (["quantize"], ["DATA_ROOT", "--model", "--weights", "--split", "--patches"]),
    (["calibrate"], ["DATA_ROOT", "--model", "--weights", "--split", "--device"]),
])
def test_help_of_each_command(command, expected):
    for flag in ("--help", "-h"):
        result = CliRunner().invoke(cli, [*command, flag])
        assert result.exit_code == 0, result.output
        assert "Usage:" in result.output
        for word in expected:
            assert word in result.output, word


@pytest.mark.parametrize("command", sorted(cli.commands))
def test_every_command_has_help(command):
    result = CliRunner().invoke(cli, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: cli {command}" in result.output or f"Usage: idcmap {command}" in result.output
    assert result.output.count("--help") == 1


def test_version():
    result = CliRunner().invoke(cli, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_module_help_in_a_subprocess(tmp_path):
    done = _run_module(["--help"], tmp_path)
    assert done.returncode == 0, done.stderr
    assert "Usage:" in done.stdout and "render" in done.stdout


def _one_line_error(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr
    assert lines[0].startswith("idcmap: error: ")
    return lines[0]


def test_bad_folder_in_a_subprocess(tmp_path):
    done = _run_module(["render", str(tmp_path / "no-such-folder"), "-o", str(tmp_path / "out")], tmp_path)
    assert done.returncode == 2
    assert str(tmp_path / "no-such-folder") in _one_line_error(done.stderr)
    assert done.stdout == ""
    assert not (tmp_path / "out").exists()


def test_empty_folder_via_main(tmp_path, monkeypatch, capsys):
    (tmp_path / "empty").mkdir()
    code, out, err = _run_main(["render", str(tmp_path / "empty"), "-o", str(tmp_path / "out")], monkeypatch, capsys)
    assert code == 2
    assert str(tmp_path / "empty") in _one_line_error(err)


def test_missing_weights_via_main(tmp_path, monkeypatch, capsys):
    folder = _patient(tmp_path / "in")
    code, out, err = _run_main(["render", str(folder), "-o", str(tmp_path / "out"), "--device", "cpu",
                                "--weights", str(tmp_path / "absent.pt")], monkeypatch, capsys)
    assert code == 2
    assert "absent.pt" in _one_line_error(err)


def test_bad_shard_via_main(tmp_path, monkeypatch, capsys, tiny_weights):
    folder = _patient(tmp_path / "in")
    code, out, err = _run_main(["render", str(folder), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights),
                                "--shard", "5/2"], monkeypatch, capsys)
    assert code == 2
    assert "--shard" in _one_line_error(err)


def test_int8_backend_without_an_int8_network_via_main(tmp_path, monkeypatch, capsys, tiny_weights):
    folder = _patient(tmp_path / "in")
    code, out, err = _run_main(["render", str(folder), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights),
                                "--device", "cpu", "--backend", "onnx-int8"], monkeypatch, capsys)
    assert code == 2
    line = _one_line_error(err)
    assert "no int8 patch network" in line and "idcmap quantize" in line and "--backend onnx" in line



def test_a_path_the_system_refuses_is_one_line_naming_it(tmp_path, monkeypatch, capsys, tiny_weights):
    """A path part over 255 bytes: Path.exists() itself raises (ENAMETOOLONG), in any command."""
    folder, long = _patient(tmp_path / "in"), str(tmp_path / ("a" * 300))
    assert _run_main(["render", str(folder), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights), "--device",
                      "cpu"], monkeypatch, capsys)[0] == 0
    for args in (["render", long], ["render", str(folder), "-o", long, "--weights", str(tiny_weights)],
                 ["export", str(tmp_path / "out"), "-o", long + ".csv"]):
        code, out, err = _run_main(args, monkeypatch, capsys)
        assert code == 2, args
        line = _one_line_error(err)
        assert long in line and "File name too long" in line, args


def test_an_output_below_a_file_is_named_before_any_work(tmp_path, monkeypatch, capsys, tiny_weights):
    folder = _patient(tmp_path / "in")
    (tmp_path / "afile").write_text("mine")
    render = ["render", str(folder), "--weights", str(tiny_weights), "--device", "cpu", "-o"]
    code, out, err = _run_main([*render, str(tmp_path / "afile" / "sub")], monkeypatch, capsys)
    assert code == 2 and f"lies below {tmp_path / 'afile'}, which exists and is not a folder" in _one_line_error(err)
    assert _run_main([*render, str(tmp_path / "out")], monkeypatch, capsys)[0] == 0
    for inside in (tmp_path / "out" / "P", tmp_path / "out" / "P" / "sub"):  # a rendered patient's output folder
        code, out, err = _run_main([*render, str(inside)], monkeypatch, capsys)
        assert code == 2 and f"inside {tmp_path / 'out' / 'P'}, the output folder of a rendered patient" in \
            _one_line_error(err)
    assert sorted(p.name for p in (tmp_path / "out" / "P").iterdir()) == sorted(PATIENT_FILES)
    code, out, err = _run_main(["export", str(tmp_path / "out"), "-o", str(tmp_path / "afile" / "x.csv")],
                               monkeypatch, capsys)
    assert code == 2 and f"{tmp_path / 'afile'} is a file, not a folder" in _one_line_error(err)
    assert (tmp_path / "afile").read_text() == "mine"


def test_usage_errors_exit_2(tmp_path, monkeypatch, capsys):
    code, out, err = _run_main(["render", str(tmp_path), "--threshold", "1.5"], monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and "--threshold" in err
    code, out, err = _run_main(["render"], monkeypatch, capsys)
    assert code == 2 and "FOLDER" in err
    code, out, err = _run_main(["no-such-command"], monkeypatch, capsys)
    assert code == 2


@pytest.mark.parametrize("args", [
    ["render", ".", "--threshold", "nan"], ["render", ".", "--smoothing", "nan"],
    ["render", ".", "--threshold", "inf"], ["train", ".", "-o", "w.pt", "--lr", "nan"],
    ["train", ".", "-o", "w.pt", "--lr", "-1"], ["train", ".", "-o", "w.pt", "--val-fraction", "nan"],
    ["quantize", ".", "--seed", "-1"], ["render", ".", "--jobs", "2147483648"],
])
def test_not_finite_or_out_of_range_numbers_exit_2(tmp_path, monkeypatch, capsys, args):
    monkeypatch.chdir(tmp_path)
    code, out, err = _run_main(args, monkeypatch, capsys)
    assert code == 2 and "Traceback" not in err and args[-2] in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("terminal", [True, False])
def test_progress_bars_only_on_a_terminal_and_never_with_quiet(tmp_path, tiny_weights, monkeypatch, capsys, terminal):
    root = tmp_path / "in"
    _patient(root, "A")
    _patient(root, "B")
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)  # stderr a terminal, or a log file
    args = ["render", str(root), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights), "--device", "cpu"]
    loud = _run_main(args, monkeypatch, capsys)
    quiet = _run_main(["-q", *args], monkeypatch, capsys)
    quiet_after = _run_main([*args, "-q"], monkeypatch, capsys)  # -q after the command name too
    assert loud[0] == quiet[0] == quiet_after[0] == 0
    assert ("patient/s" in loud[2]) is terminal and ("\r" in loud[2]) is terminal  # no cursor codes in a log
    assert f"2 of 2 patients rendered into {tmp_path / 'out'}; overview: {tmp_path / 'out' / 'summary.html'}" in loud[2]
    assert quiet[2] == quiet_after[2] == ""


def test_shard_env_on_a_machine_without_a_gpu_stays_on_the_cpu(tmp_path, tiny_weights, monkeypatch):
    monkeypatch.setattr(cli_module, "torch_has_cuda", lambda: False)
    for name, value in {"LOCAL_RANK": "0", "RANK": "1", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    root = tmp_path / "in"
    _patient(root, "A")
    _patient(root, "B")
    result = CliRunner().invoke(cli, ["-q", "render", str(root), "-o", str(tmp_path / "out"), "--weights",
                                      str(tiny_weights), "--shard", "env", "--json"])
    assert result.exit_code == 0, result.output
    assert [r["patient"] for r in json.loads(result.stdout)] == ["B"]


def test_cli_runner_surfaces_the_idcmap_error(tmp_path):
    """Under CliRunner (standalone mode) the library error itself comes through; main() formats it."""
    result = CliRunner().invoke(cli, ["render", str(tmp_path / "nope"), "-o", str(tmp_path / "out")])
    assert result.exit_code != 0
    assert isinstance(result.exception, EmptyFolderError)


def test_render_with_weights_and_a_threshold(tmp_path, tiny_weights):
    """--threshold reaches the regions, the area fractions, the per-patch table and the overlay."""
    folder = _patient(tmp_path / "in")
    overlays = {}
    for threshold, fraction in (("0", 1.0), ("1", 0.0)):  # every patch IDC; none (no probability reaches 1)
        out = tmp_path / f"out{threshold}"
        result = CliRunner().invoke(cli, ["render", str(folder), "-o", str(out), "--weights", str(tiny_weights),
                                          "--device", "cpu", "--threshold", threshold])
        assert result.exit_code == 0, result.output
        assert sorted(p.name for p in (out / "P").iterdir()) == sorted(PATIENT_FILES)
        with open(out / "summary.csv", newline="") as handle:
            rows = list(csv.DictReader(handle))
        assert [(r["patient"], r["status"]) for r in rows] == [("P", "ok")]
        assert float(rows[0]["threshold"]) == float(threshold)
        assert float(rows[0]["predicted_idc_area_fraction"]) == fraction
        with open(out / "P" / "probabilities.csv", newline="") as handle:
            assert {r["predicted_idc"] for r in csv.DictReader(handle)} == {str(int(fraction))}
        overlays[threshold] = (out / "P" / "overlay.png").read_bytes()
        assert "1 of 1 patients rendered" in result.stderr
        assert result.stdout == ""
    assert overlays["0"] != overlays["1"]  # the regions are drawn


def test_threshold_rule_otsu_and_a_given_threshold(tmp_path, monkeypatch):
    """Weights whose rule is otsu: each whole slide gets its own threshold, recorded in summary.csv,
    applied to probabilities.csv and named in the overlay; a --threshold given on the command line is
    one fixed threshold, or with --threshold-rule otsu sets Otsu's floor."""
    from idcmap import pipeline

    subtitles = []
    drawn = pipeline.overlay_png
    monkeypatch.setattr(pipeline, "overlay_png", lambda *args: subtitles.append(args[-1]) or drawn(*args))
    weights = write_tiny_weights(tmp_path / "w" / "cancernet-context.pt", calibration={"threshold": 0.5,
                                                                                     "threshold_rule": "otsu"})
    folder = _patient(tmp_path / "in")
    # the tiny network scores every patch 0.49-0.50: Otsu splits them; with a threshold of 1 its floor, 0.5, is above all
    for extra, rule, tag in (([], "otsu", " (Otsu)"), (["--threshold", "0.5"], "fixed", ""),
                             (["--threshold-rule", "fixed"], "fixed", ""),
                             (["--threshold", "1", "--threshold-rule", "otsu"], "otsu", " (Otsu's floor)")):
        out = tmp_path / f"out-{'-'.join(extra) or 'default'}"
        result = CliRunner().invoke(cli, ["render", str(folder), "-o", str(out), "--weights", str(weights),
                                          "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "P" / "summary.json").read_text())
        assert summary["calibration"]["threshold_rule"] == rule
        with open(out / "P" / "probabilities.csv", newline="") as handle:
            table = list(csv.DictReader(handle))
        probability = np.array([float(r["probability"]) for r in table])
        assert (summary["threshold"] == 0.5) == (tag != " (Otsu)")
        if tag == " (Otsu)":
            assert probability.min() < summary["threshold"] <= probability.max()
        assert [int(r["predicted_idc"]) for r in table] == (probability >= summary["threshold"]).astype(int).tolist()
        assert subtitles[-1].endswith(f"threshold {summary['threshold']:.2f}{tag}")


def test_scattered_samples_render_at_their_own_threshold_unless_one_is_given(tmp_path, monkeypatch):
    """Weights with a threshold for scattered samples: a scattered folder is cut there, and the
    overlay says so; --threshold sets one threshold for it too."""
    from idcmap import pipeline

    subtitles = []
    drawn = pipeline.overlay_png
    monkeypatch.setattr(pipeline, "overlay_png", lambda *args: subtitles.append(args[-1]) or drawn(*args))
    weights = write_tiny_weights(tmp_path / "w" / "cancernet-context.pt",
                                 calibration={"threshold": 0.5, "threshold_rule": "otsu", "scattered_threshold": 0.3})
    skip = {(r, c) for r in range(5) for c in range(5)} - {(0, 0), (0, 2), (2, 0), (2, 2), (4, 4)}
    folder = make_patient(tmp_path / "in", "S", grid_patches(5, 5, label_of=lambda r, c: int(r == 0), skip=skip))
    for extra, threshold, tag in (([], 0.3, " (scattered samples)"), (["--threshold", "0.6"], 0.6, "")):
        out = tmp_path / f"out{len(extra)}"
        result = CliRunner().invoke(cli, ["render", str(folder), "-o", str(out), "--weights", str(weights),
                                          "--device", "cpu", *extra])
        assert result.exit_code == 0, result.output
        summary = json.loads((out / "S" / "summary.json").read_text())
        assert summary["threshold"] == threshold
        with open(out / "S" / "probabilities.csv", newline="") as handle:
            table = list(csv.DictReader(handle))
        assert [int(r["predicted_idc"]) for r in table] == [int(float(r["probability"]) >= threshold) for r in table]
        assert subtitles[-1].endswith(f"threshold {threshold:.2f}{tag}")


def test_render_json(tmp_path, tiny_weights):
    folder = _patient(tmp_path / "in")
    result = CliRunner().invoke(cli, ["-q", "render", str(folder), "-o", str(tmp_path / "out"), "--weights",
                                      str(tiny_weights), "--device", "cpu", "--json", "--min-region", "2",
                                      "--max-hole", "1"])
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert len(rows) == 1
    assert rows[0]["patient"] == "P" and rows[0]["status"] == "ok" and rows[0]["patches"] == 9
    assert rows[0]["min_region_cells"] == 2 and rows[0]["max_hole_cells"] == 1
    assert 0.0 <= rows[0]["predicted_idc_area_fraction"] <= 1.0
    assert rows[0]["labelled_idc_area_fraction"] == pytest.approx(3 / 9, abs=1e-6)


def test_render_json_in_a_subprocess_is_pure_json(tmp_path, tiny_weights):
    folder = _patient(tmp_path / "in")
    done = _run_module(["render", str(folder), "-o", "out", "--weights", str(tiny_weights), "--device", "cpu",
                        "--json"], tmp_path)
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert [r["status"] for r in rows] == ["ok"]
    assert (tmp_path / "out" / "P" / "summary.json").is_file()  # -o relative to the working folder


def test_failed_patient_exit_status_1(tmp_path, tiny_weights):
    root = tmp_path / "in"
    _patient(root, "A")
    broken = _patient(root, "B")
    bad = next(broken.rglob("*.png"))
    bad.write_bytes(b"")
    result = CliRunner().invoke(cli, ["render", str(root), "-o", str(tmp_path / "out"), "--weights",
                                      str(tiny_weights), "--device", "cpu", "--json"])
    assert result.exit_code == 1
    assert [r["status"] for r in json.loads(result.stdout)] == ["ok", "failed"]
    assert "idcmap: failed: B:" in result.stderr and str(bad) in result.stderr
    assert "1 of 2 patients rendered" in result.stderr


def test_resume_says_ok_not_rendered_for_kept_patients(tmp_path, tiny_weights, caplog):
    folder = _patient(tmp_path / "in")
    args = ["render", str(folder), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights), "--device", "cpu",
            "--resume"]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == 0 and "1 of 1 patients ok in" in first.stderr
    assert "kept as they were" not in caplog.text
    second = CliRunner().invoke(cli, args)
    assert second.exit_code == 0 and "1 of 1 patients ok in" in second.stderr
    assert "rendered into" not in second.stderr and "1 of 1 patients were complete" in caplog.text


def test_export_merges_summaries(tmp_path, tiny_weights):
    root = tmp_path / "in"
    _patient(root, "A")
    _patient(root, "B")
    out = tmp_path / "out"
    for shard in ("0/2", "1/2"):
        result = CliRunner().invoke(cli, ["-q", "render", str(root), "-o", str(out), "--weights", str(tiny_weights),
                                          "--device", "cpu", "--shard", shard])
        assert result.exit_code == 0, result.output
    assert not (out / "summary.csv").exists()
    result = CliRunner().invoke(cli, ["export", str(out)])
    assert result.exit_code == 0, result.output
    with open(out / "summary.csv", newline="") as handle:
        assert [r["patient"] for r in csv.DictReader(handle)] == ["A", "B"]
    assert 'href="A/overlay.png"' in (out / "summary.html").read_text() and "idcmap: 2 patients" in \
        (out / "summary.html").read_text()
    result = CliRunner().invoke(cli, ["export", str(out), "-o", str(tmp_path / "merged.csv")])
    assert result.exit_code == 0, result.output
    with open(tmp_path / "merged.csv", newline="") as handle:
        assert [(r["patient"], r["folder"], r["status"]) for r in csv.DictReader(handle)] == [("A", "A", "ok"),
                                                                                              ("B", "B", "ok")]
    assert 'href="out/B/overlay.png"' in (tmp_path / "merged.html").read_text()
    result = CliRunner().invoke(cli, ["export", str(out), "-o", str(tmp_path / "merged.html")])
    assert result.exit_code != 0 and "overview page" in str(result.exception)  # main() makes it one line, exit 2
    assert 'href="out/B/overlay.png"' in (tmp_path / "merged.html").read_text()  # the page, not overwritten
    before = (out / "A" / "summary.json").read_bytes()
    for target, error in ((out / "A" / "summary.json", "inside the output folder of patient A"),
                          (out / "A" / "x" / "m.csv", "inside the output folder of patient A"),
                          ("", "not a file name")):
        result = CliRunner().invoke(cli, ["export", str(out), "-o", str(target)])
        assert result.exit_code != 0 and error in str(result.exception), target
    assert (out / "A" / "summary.json").read_bytes() == before and sorted(p.name for p in (out / "A").iterdir()) == \
        sorted(PATIENT_FILES)


def test_console_script_target_is_main():
    setup = (REPO_ROOT / "setup.cfg").read_text()
    assert "idcmap = idcmap.__main__:main" in setup


def test_python_dash_m_idcmap_runs_the_cli(tmp_path):
    done = subprocess.run([sys.executable, "-m", "idcmap", "render", str(tmp_path / "nope")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 2 and done.stderr.startswith("idcmap: error: ") and "nope" in done.stderr


def test_ctrl_c_while_the_cli_loads_is_exit_130(monkeypatch, capsys):
    import builtins

    from idcmap import __main__ as entry

    real_import = builtins.__import__

    def interrupted(name, *args, **kwargs):
        if name == "cli" or name.endswith(".cli"):
            raise KeyboardInterrupt
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", interrupted)
    with pytest.raises(SystemExit) as done:
        entry.main()
    assert done.value.code == 130 and "interrupted" in capsys.readouterr().err


def test_ctrl_c_exit_130_without_traceback(tmp_path, monkeypatch, capsys, tiny_weights):
    from idcmap import pipeline

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(pipeline, "render_folder", interrupted)
    folder = _patient(tmp_path / "in")
    code, out, err = _run_main(["render", str(folder), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights)],
                               monkeypatch, capsys)
    assert code == 130
    assert err.strip() == "idcmap: interrupted; finished files are complete, unfinished ones were not written"


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_jobs_caps_threads_without_changing_probabilities(tmp_path, tiny_weights, backend):
    import torch

    folder = _patient(tmp_path / "in")
    threads = torch.get_num_threads()
    try:
        for jobs, out in ((None, "all"), ("1", "one")):
            args = ["render", str(folder), "-o", str(tmp_path / out), "--weights", str(tiny_weights),
                    "--device", "cpu", "--backend", backend] + (["--jobs", jobs] if jobs else [])
            result = CliRunner().invoke(cli, args)
            assert result.exit_code == 0, result.output
        assert torch.get_num_threads() == threads  # --jobs holds while scoring only
    finally:
        torch.set_num_threads(threads)
    all_cores = (tmp_path / "all" / "P" / "probabilities.csv").read_text()
    assert all_cores == (tmp_path / "one" / "P" / "probabilities.csv").read_text()
    result = CliRunner().invoke(cli, ["render", str(folder), "--jobs", "0"])
    assert result.exit_code == 2 and "--jobs" in result.output


def _outside(limit):
    """Values just outside a training setting's range, below and (where it has one) above it."""
    step = 1 if limit.whole else 0.01
    values = [limit.low if limit.low_open else limit.low - step]
    if limit.high is not None:
        values.append(limit.high if limit.high_open else limit.high + step)
    return values


@pytest.mark.parametrize("name, value", [(name, value) for name, limit in LIMITS.items() if limit.label.startswith("--")
                                         for value in _outside(limit)])
def test_train_options_refuse_what_training_refuses(tmp_path, monkeypatch, capsys, name, value):
    """Each `train` option refuses, before any work, exactly the values TrainConfig.validate refuses."""
    limit = LIMITS[name]
    with pytest.raises(IdcmapError, match=f"^{re.escape(limit.label)} "):
        TrainConfig(**{name: value}).validate()
    monkeypatch.chdir(tmp_path)
    code, out, err = _run_main(["train", ".", "-o", "w.pt", limit.label, str(value)], monkeypatch, capsys)
    assert code == 2 and limit.label in err and "Traceback" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("suffix, what", [(".json", "a model card or split (JSON)"), (".int8.onnx", "the int8 patch network")])
def test_weights_option_given_the_card_or_int8_file_points_at_the_pt(tmp_path, monkeypatch, capsys, suffix, what):
    folder = _patient(tmp_path / "in")
    given = tmp_path / f"cancernet{suffix}"
    given.write_text("{}")
    code, out, err = _run_main(["render", str(folder), "-o", str(tmp_path / "out"), "--weights", str(given)],
                               monkeypatch, capsys)
    line = _one_line_error(err)
    assert code == 2 and what in line and str(tmp_path / "cancernet.pt") in line


@pytest.mark.parametrize("args", [["-q", "export", "OUT", "-v"], ["-v", "export", "OUT", "-q"],
                                  ["export", "OUT", "-v", "-q"], ["export", "OUT", "-q"]])
def test_quiet_wins_over_verbose_wherever_each_is_given(tmp_path, tiny_weights, monkeypatch, capsys, args):
    import logging

    out = tmp_path / "out"
    _run_main(["-q", "render", str(_patient(tmp_path / "in")), "-o", str(out), "--weights", str(tiny_weights)],
              monkeypatch, capsys)
    code, _, err = _run_main([str(out) if a == "OUT" else a for a in args], monkeypatch, capsys)
    assert code == 0 and err == "" and (out / "summary.html").is_file()
    assert logging.getLogger("idcmap").getEffectiveLevel() == logging.ERROR


@pytest.mark.parametrize("before_command", [True, False])
def test_verbose_shows_idcmap_debug_lines_only(tmp_path, monkeypatch, capsys, tiny_weights, before_command):
    import logging

    folder = _patient(tmp_path / "in")
    monkeypatch.setattr(logging.root, "handlers", [])  # let basicConfig install its handler afresh
    monkeypatch.setattr(logging.root, "level", logging.WARNING)
    args = ["render", str(folder), "-o", str(tmp_path / "out"), "--weights", str(tiny_weights), "--device", "cpu"]
    code, out, err = _run_main(["-v", *args] if before_command else [*args, "-v"], monkeypatch, capsys)
    assert code == 0
    assert re.search(r"idcmap: DEBUG: P: 9 patches \(0 files skipped\) loaded in [0-9.]+ s, scored in", err)
    assert "idcmap: DEBUG: 1 patient folder(s) at or below" in err
    assert logging.getLogger("idcmap").getEffectiveLevel() == logging.DEBUG
    assert logging.getLogger("PIL").getEffectiveLevel() == logging.WARNING


def test_ctrl_c_inside_click_prints_the_interrupted_line(monkeypatch, capsys):
    import click

    def aborted(*args, **kwargs):
        raise click.exceptions.Abort

    monkeypatch.setattr(cli_module.cli, "main", aborted)
    code, out, err = _run_main(["--help"], monkeypatch, capsys)
    assert code == 130 and err.strip() == ("idcmap: interrupted; finished files are complete, unfinished ones "
                                           "were not written")
