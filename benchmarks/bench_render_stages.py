"""Where one patient's `render` spends its time, stage by stage, side by side in one run.

    python benchmarks/bench_render_stages.py [--patient 10262] [--model cancernet] [--rounds 4]

On one real patient of ../shared/data/patients (page cache warmed first), each round times:
  decode            load_slide (read + decode every PNG, one thread)
  score             Scorer.score on the decoded slide (as render runs it)
  mosaic PNG        encode_png of the reassembled mosaic
  overlay PNG       overlay_png
  tables, GeoJSON   the probabilities.csv rows and regions.geojson text
  folder listing    inputs_sha256: listing and stat-ing the folder again (render no longer does
                    this; `--resume` does it once per patient)
  render            render_patient end to end
and, alternating, the output stage's mosaic + overlay + tables serially against the mosaic PNG
encoded in a second thread beside the overlay and tables (zlib releases the GIL). Prints the
median seconds of each over the rounds.
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable

from common import DATA_ROOT, require_folder, run

from idcmap.export import encode_png, json_text  # noqa: E402
from idcmap.loader import inputs_sha256, load_slide  # noqa: E402
from idcmap.models import load_model  # noqa: E402
from idcmap.pipeline import RenderOptions, _probability_rows, effective_calibration, regions_geojson, render_patient  # noqa: E402
from idcmap.regions import predicted_mask  # noqa: E402
from idcmap.render import overlay_png  # noqa: E402
from idcmap.scoring import Scorer  # noqa: E402


def timed(fn: Callable[[], object]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patient", default="10262",
                        help="a patient of ../shared/data/patients, or the path of a patient folder")
    parser.add_argument("--model", default="cancernet")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    folder = Path(args.patient) if Path(args.patient).is_dir() else DATA_ROOT / "patients" / args.patient
    require_folder(folder)

    model = load_model(args.model)
    scorer = Scorer(model)
    options = RenderOptions(progress=False)
    calibration = effective_calibration(model.calibration, options)
    slide = load_slide(folder)  # warms the page cache
    scores = scorer.score(slide)
    predicted = predicted_mask(slide, scores.probability, calibration)
    mosaic = slide.mosaic()

    def tables() -> None:
        _probability_rows(slide, scores, predicted)
        json_text(regions_geojson(slide, scores.probability, predicted))

    def overlay() -> None:
        overlay_png(slide, mosaic, scores.probability, predicted, "title", "subtitle")

    def outputs_serial() -> None:
        encode_png(mosaic)
        overlay()
        tables()

    def outputs_threaded() -> None:
        with ThreadPoolExecutor(1) as pool:
            encoded = pool.submit(encode_png, mosaic)
            overlay()
            tables()
            encoded.result()

    stages: dict[str, Callable[[], object]] = {
        "decode": lambda: load_slide(folder),
        "score": lambda: scorer.score(slide),
        "mosaic PNG": lambda: encode_png(mosaic),
        "overlay PNG": overlay,
        "tables, GeoJSON": tables,
        "folder listing": lambda: inputs_sha256(folder),
        "outputs, serial": outputs_serial,
        "outputs, mosaic in a thread": outputs_threaded,
    }
    seconds: dict[str, list[float]] = {name: [] for name in [*stages, "render"]}
    with tempfile.TemporaryDirectory() as out:
        for round_ in range(args.rounds):
            for name, fn in stages.items():
                seconds[name].append(timed(fn))
            seconds["render"].append(timed(lambda: render_patient(folder, Path(out) / str(round_), scorer,
                                                                  calibration, options)))
    render = statistics.median(seconds["render"])
    print(f"patient {args.patient} ({len(slide)} patches), model {args.model} ({scorer.backend}), "
          f"{args.rounds} rounds, medians")
    print(f"{'stage':30s} {'seconds':>8s} {'of render':>10s}")
    for name, values in seconds.items():
        median = statistics.median(values)
        print(f"{name:30s} {median:8.3f} {median / render:10.1%}")


if __name__ == "__main__":
    run(main)
