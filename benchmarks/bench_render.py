"""Speed of idcmap against the decode floor and a naive per-patch loop, side by side in one run.

    python benchmarks/bench_render.py [--patients N] [--naive-patches 300] [--device auto]

Stages, each over the same real patients of ../shared/data/patients:
  1. decode      load_slide: read + decode every PNG (thread pool) and place it (the floor)
  2. naive       PIL open -> per-patch tensor -> model on one patch (first --naive-patches only)
  3. score       idcmap's Scorer on the decoded slides (batched, inference_mode, channels_last)
  4. render      render_patient end to end: decode, score, mosaic/overlay PNGs, CSV/NPY/GeoJSON/JSON
Prints patches/s, the ratios score/naive and render/decode, peak RSS, and per-patient time
and RSS as patients accumulate (time per patch should stay flat, RSS should not grow).
"""
from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from idcmap.loader import find_patient_folders, load_slide  # noqa: E402
from idcmap.models import DEFAULT_MODEL, load_model  # noqa: E402
from idcmap.pipeline import RenderOptions, effective_calibration, render_patient  # noqa: E402
from idcmap.scoring import Scorer  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "patients"


def rss_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def naive_loop(model, paths: list[Path]) -> float:
    """The per-patch loop users run today: open, resize, tensor, model on one patch. Returns s."""
    network = model.network.cpu().eval()
    mean = torch.tensor(model.mean).view(1, 3, 1, 1)
    std = torch.tensor(model.std).view(1, 3, 1, 1)
    started = time.perf_counter()
    with torch.no_grad():
        for path in paths:
            image = Image.open(path).convert("RGB").resize((50, 50))
            x = torch.from_numpy(np.asarray(image)).permute(2, 0, 1)[None].float() / 255
            torch.sigmoid(network.backbone((x - mean) / std)[1])
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=8, help="number of real patients (0 = all)")
    parser.add_argument("--naive-patches", type=int, default=300)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    args = parser.parse_args()
    if not DATA.is_dir():
        sys.exit(f"skipped: {DATA} is absent (the real patches live in ../shared/data)")
    folders = find_patient_folders(DATA)
    folders = folders[: args.patients] if args.patients else folders
    model = load_model(args.model)
    scorer = Scorer(model, args.device, args.batch_size)
    calibration = effective_calibration(model.calibration, RenderOptions())
    options = RenderOptions(model=args.model, device=args.device, progress=False)
    scorer.score(load_slide(folders[0]))  # warm-up: first-call allocations and kernels

    print(f"device {scorer.device}, batch {scorer.batch_size}, torch threads {torch.get_num_threads()}, "
          f"{len(folders)} patients, model {model.name}")
    decode_s = score_s = render_s = 0.0
    patches = 0
    per_patient = []
    with tempfile.TemporaryDirectory() as out:
        for folder in folders:
            started = time.perf_counter()
            slide = load_slide(folder)
            decode_s += time.perf_counter() - started
            started = time.perf_counter()
            scorer.score(slide)
            if scorer.device.type == "cuda":
                torch.cuda.synchronize()
            score_s += time.perf_counter() - started
            started = time.perf_counter()
            render_patient(folder, Path(out) / folder.name, scorer, calibration, options)
            seconds = time.perf_counter() - started
            render_s += seconds
            patches += len(slide)
            per_patient.append((folder.name, len(slide), seconds, rss_mb()))
            del slide
    paths = sorted(p for folder in folders for p in folder.glob("*/*.png"))[: args.naive_patches]
    naive_s = naive_loop(model, paths) / len(paths)

    rate = {"decode (floor)": patches / decode_s, "naive per-patch loop": 1 / naive_s,
            "idcmap score": patches / score_s, "idcmap render end-to-end": patches / render_s}
    print(f"\n{'stage':28s} {'patches/s':>10s}")
    for name, value in rate.items():
        print(f"{name:28s} {value:10.0f}")
    print(f"\nscore / naive            {rate['idcmap score'] / rate['naive per-patch loop']:.1f}x")
    print(f"score / decode           {rate['idcmap score'] / rate['decode (floor)']:.2f}x")
    print(f"render time / decode time {render_s / decode_s:.1f}x  (target <= 2x)")
    print(f"peak RSS {rss_mb():.0f} MB")
    print(f"\n{'patient':10s} {'patches':>8s} {'render s':>9s} {'ms/patch':>9s} {'peak RSS MB':>12s}")
    for name, n, seconds, rss in per_patient:
        print(f"{name:10s} {n:8d} {seconds:9.2f} {1000 * seconds / n:9.2f} {rss:12.0f}")
    if scorer.device.type == "cuda":
        print(f"\nextrapolated: 277,524 patches scored in {277_524 / rate['idcmap score']:.1f} s, "
              f"rendered end-to-end in {277_524 / rate['idcmap render end-to-end']:.1f} s")


if __name__ == "__main__":
    main()
