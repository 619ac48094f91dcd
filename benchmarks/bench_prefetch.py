"""Rendering several patients one after another, against decoding the next patient in a worker
process while the current one is scored and written (an option tried for `render`, not adopted).

    python benchmarks/bench_prefetch.py [--patients 8] [--model cancernet] [--rounds 5] [--data ../shared/data/patients]

On the first --patients patients of --data (page cache warmed first), each
round times, alternating:
  sequential   render_patient for each patient in turn, as `idcmap render` runs (it decodes)
  prefetched   the same, but each patient's load_slide runs in a forked worker process while the
               patient before it is scored and written (the slide then pickled back)
Prints each round's seconds and patches/s.
"""
from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from unittest import mock

from common import DATA_ROOT, patient_folders, run

from idcmap import pipeline  # noqa: E402
from idcmap.loader import list_patch_files, load_slide  # noqa: E402
from idcmap.models import load_model  # noqa: E402
from idcmap.pipeline import RenderOptions, render_patient  # noqa: E402
from idcmap.scoring import Scorer  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA_ROOT / "patients", help="folder of patient folders")
    parser.add_argument("--patients", type=int, default=8)
    parser.add_argument("--model", default="cancernet")
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    folders = patient_folders(args.data, args.patients)
    files = [path for folder in folders for path in list_patch_files(folder)[0]]
    for path in files:  # warm the page cache
        path.read_bytes()
    patches = len(files)
    model = load_model(args.model)
    scorer = Scorer(model, "cpu")
    options = RenderOptions(model=args.model, progress=False)

    def sequential(out: Path) -> None:
        for folder in folders:
            render_patient(folder, out / folder.name, scorer, model.calibration, options)

    def prefetched(out: Path) -> None:
        with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("fork")) as pool:
            coming = pool.submit(load_slide, folders[0])
            for i, folder in enumerate(folders):
                slide = coming.result()
                if i + 1 < len(folders):
                    coming = pool.submit(load_slide, folders[i + 1])
                with mock.patch.object(pipeline, "load_slide", lambda *_, slide=slide, **__: slide):
                    render_patient(folder, out / folder.name, scorer, model.calibration, options)

    print(f"{len(folders)} patients, {patches:,} patches, model {args.model} ({scorer.backend})")
    for round_ in range(1, args.rounds + 1):
        for name, render_all in (("sequential", sequential), ("prefetched", prefetched)):
            with tempfile.TemporaryDirectory() as out:
                started = time.perf_counter()
                render_all(Path(out))
                seconds = time.perf_counter() - started
            print(f"round {round_}  {name:<11} {seconds:6.2f} s  {patches / seconds:6.0f} patches/s", flush=True)


if __name__ == "__main__":
    run(main)
