"""Speed of idcmap against the decode floor and a naive per-patch loop, side by side in one run.

    python benchmarks/bench_render.py [--patients N] [--naive-patches 600] [--device auto] [--model NAME]
                                      [--weights FILE]
                                      [--repeat-largest N]

Stages, each over the same real patients of ../shared/data/patients:
  1. decode        load_slide: read + decode every PNG (one thread) and place it (the floor); every
                   file is read once before timing, so all stages read from the page cache
  2. naive         the tutorials' loop: PIL open -> torchvision transforms -> model on one patch
                   -> sigmoid().item(), on --naive-patches patches in all: the first ones of each
                   patient in equal shares, timed between its other stages so that all stages
                   see the same machine state
  3. score         idcmap's Scorer on the decoded slides, as render runs it (batched,
                   inference_mode; ONNX Runtime on the CPU, in int8 where the model has an int8
                   network, PyTorch on the GPU), and beside it on the same slides: on the CPU
                   PyTorch eager channels_last, PyTorch under bfloat16 autocast and, for an int8
                   model, fp32 ONNX Runtime; on the GPU fp16 autocast (--mixed-precision)
  4. render        render_patient end to end: decode, score, mosaic/overlay PNGs, CSV/NPY/GeoJSON/JSON
Prints patches/s, the ratios score/naive, score/decode and render/decode, peak RSS, and per-patient
time and RSS as patients accumulate (time per patch should stay flat, RSS should not grow).
"""
from __future__ import annotations

import argparse
import copy
import gc
import math
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from common import DATA_ROOT, patient_folders, run

from idcmap.colour import normalise_slide  # noqa: E402
from idcmap.loader import list_patch_files, load_slide  # noqa: E402
from idcmap.models import DEFAULT_MODEL, load_model  # noqa: E402
from idcmap.pipeline import RenderOptions, completed_summary, effective_calibration, render_patient  # noqa: E402
from idcmap.scoring import Scorer, calibrated_scores  # noqa: E402


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, in MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
    """Resident set size of this process now, in MB."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * resource.getpagesize() / 2**20


def naive_loop(model) -> Callable[[list[Path]], float]:
    """The per-patch loop of the tutorials, on the CPU with its own copy of the network: open,
    resize, to tensor, normalise, model on one patch, read the probability back. The returned
    function runs it over `paths` and returns the seconds it took."""
    network = copy.deepcopy(model.network).cpu().eval().to(memory_format=torch.contiguous_format)  # as built
    transform = transforms.Compose([transforms.Resize((50, 50)), transforms.ToTensor(),
                                    transforms.Normalize(model.mean, model.std)])

    def run(paths: list[Path]) -> float:
        started = time.perf_counter()
        with torch.no_grad():
            for path in paths:
                x = transform(Image.open(path).convert("RGB")).unsqueeze(0)
                torch.sigmoid(network(x)[1]).item()
        return time.perf_counter() - started
    return run


def context_stage_share(model, scorer: Scorer, slide) -> tuple[float, float, float]:
    """Seconds of the colour normalisation (0 for a model without a colour reference), of the
    patch network and of the other slide-aware stages (context head, grid smoothing, calibration)
    on one slide, each as `Scorer.score` runs it, timed apart on the scorer's device."""
    started = time.perf_counter()
    pixels = normalise_slide(slide, model.colour_reference).pixels
    colour_s = time.perf_counter() - started
    started = time.perf_counter()
    features, logits = scorer.patch_outputs(pixels)
    sync(scorer.device)
    network_s = time.perf_counter() - started
    started = time.perf_counter()
    context = scorer.context_logits(slide, features, logits)
    calibrated_scores(slide, logits.cpu().numpy(), context.cpu().numpy(), model.network.context_reach,
                      model.calibration)
    return colour_s, network_s, time.perf_counter() - started


def under_bf16_autocast(backbone):
    """`backbone` run under CPU bfloat16 autocast, its outputs back in float32."""
    def run(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            features, logits = backbone(x)
        return features.float(), logits.float()
    return run


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=8, help="number of real patients (0 = all)")
    parser.add_argument("--naive-patches", type=int, default=600)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--weights", type=Path, default=None, help="weights file [default: the model's shipped weights]")
    parser.add_argument("--data", type=Path, default=DATA_ROOT / "patients", help="folder of patient folders")
    parser.add_argument("--repeat-largest", type=int, default=0, metavar="N",
                        help="then render the largest patient N more times, printing RSS after each")
    args = parser.parse_args()
    folders = patient_folders(args.data, args.patients)
    model = load_model(args.model, args.weights)
    scorer = Scorer(model, args.device, args.batch_size)
    others = {}  # on a GPU the scorer itself is PyTorch eager
    if scorer.backend != "torch":
        others["torch eager"] = Scorer(model, args.device, args.batch_size, backend="torch")
    if scorer.device.type == "cpu":
        others["torch bf16"] = Scorer(model, args.device, args.batch_size, backend="torch")
        others["torch bf16"].backbone = under_bf16_autocast(others["torch bf16"].backbone)
    else:
        others["torch fp16"] = Scorer(model, args.device, args.batch_size, mixed_precision=True)
    if scorer.backend == "onnx-int8":
        others["onnx fp32"] = Scorer(model, args.device, args.batch_size, backend="onnx")
    calibration = effective_calibration(model.calibration, RenderOptions())
    options = RenderOptions(model=args.model, weights=args.weights, device=args.device, progress=False)
    for folder in folders:  # every stage reads from the page cache, so decode is timed, not the disk
        for path in list_patch_files(folder)[0]:
            path.read_bytes()
    warm = load_slide(folders[0])
    for warming in (scorer, *others.values()):  # warm-up: first-call allocations and kernels
        warming.score(warm)
    naive = naive_loop(model)
    naive(list_patch_files(folders[0])[0][:8])
    eager = others.get("torch eager", scorer)
    reference = eager.score(warm).probability
    differences = {name: float(np.abs(other.score(warm).probability - reference).max())
                   for name, other in [(scorer.backend, scorer), *others.items()] if other is not eager}
    del warm

    print(f"device {scorer.device}, backend {scorer.backend}, batch {scorer.batch_size}, "
          f"torch threads {torch.get_num_threads()}, {len(folders)} patients, model {model.name}")
    decode_s = score_s = render_s = 0.0
    other_s = dict.fromkeys(others, 0.0)
    patches = 0
    per_patient = []
    naive_share = math.ceil(args.naive_patches / len(folders))
    naive_s, naive_patches = 0.0, 0
    with tempfile.TemporaryDirectory() as out:
        for folder in folders:
            started = time.perf_counter()
            slide = load_slide(folder)
            decode_s += time.perf_counter() - started
            started = time.perf_counter()
            scorer.score(slide)
            sync(scorer.device)
            score_s += time.perf_counter() - started
            for name, other in others.items():
                started = time.perf_counter()
                other.score(slide)
                sync(other.device)
                other_s[name] += time.perf_counter() - started
            naive_paths = list_patch_files(folder)[0][:naive_share]
            naive_s += naive(naive_paths)
            naive_patches += len(naive_paths)
            started = time.perf_counter()
            render_patient(folder, Path(out) / folder.name, scorer, calibration, options)
            seconds = time.perf_counter() - started
            render_s += seconds
            n = len(slide)
            patches += n
            del slide
            gc.collect()
            per_patient.append((folder.name, n, seconds, rss_mb(), peak_rss_mb()))
    rate = {"decode (floor)": patches / decode_s, "naive per-patch loop": naive_patches / naive_s,
            f"idcmap score ({scorer.backend})": patches / score_s,
            **{f"idcmap score ({name})": patches / seconds for name, seconds in other_s.items()},
            "idcmap render end-to-end": patches / render_s}
    score = patches / score_s
    print(f"\n{'stage':28s} {'patches/s':>10s}")
    for name, value in rate.items():
        print(f"{name:28s} {value:10.0f}")
    print(f"\nscore / naive             {score / rate['naive per-patch loop']:.1f}x  (target >= 10x; naive loop "
          f"on {naive_patches} patches)")
    print(f"(decode + score) / naive  {naive_s / naive_patches * patches / (decode_s + score_s):.1f}x  (the naive "
          "loop decodes too; idcmap's decode and scoring together, against it)")
    print(f"score / decode            {score / rate['decode (floor)']:.2f}x")
    for name in others:
        print(f"{scorer.backend} / {name:14s} {score / rate[f'idcmap score ({name})']:.2f}x")
    for name, difference in differences.items():
        print(f"{name}: probabilities within {difference:.4f} of torch eager fp32 (first patient)")
    print(f"render time / decode time {render_s / decode_s:.1f}x  (target <= 2x)")
    print(f"peak RSS {peak_rss_mb():.0f} MB")
    print(f"\n{'patient':10s} {'patches':>8s} {'render s':>9s} {'ms/patch':>9s} {'RSS after MB':>13s} {'peak RSS MB':>12s}")
    for name, n, seconds, rss, peak in per_patient:
        print(f"{name:10s} {n:8d} {seconds:9.2f} {1000 * seconds / n:9.2f} {rss:13.0f} {peak:12.0f}")
    largest = max(per_patient, key=lambda row: row[1])[0]
    folder = next(f for f in folders if f.name == largest)
    colour_s, network_s, stages_s = context_stage_share(model, scorer, load_slide(folder))
    print(f"\nslide-aware stages on {largest}: colour normalisation {1000 * colour_s:.1f} ms, context head, "
          f"smoothing and calibration {1000 * stages_s:.1f} ms, against {network_s:.2f} s for the patch network "
          f"({100 * colour_s / network_s:.1f}% and {100 * stages_s / network_s:.1f}%)")
    with tempfile.TemporaryDirectory() as out:
        started = time.perf_counter()
        render_patient(folder, Path(out) / largest, scorer, calibration, options)
        render_largest_s = time.perf_counter() - started
        started = time.perf_counter()
        recognised = completed_summary(Path(out) / largest, folder, model.sha256, calibration, scorer.runtime)
        check_s = time.perf_counter() - started
    if recognised is None:
        sys.exit(f"--resume did not recognise the render of {largest} it had just made")
    print(f"--resume check on {largest} (input fingerprint, sha256 of the outputs; rendering does the same work "
          f"once): {1000 * check_s:.0f} ms against {render_largest_s:.2f} s to render it "
          f"({100 * check_s / render_largest_s:.1f}%)")
    if args.repeat_largest:
        print(f"\n{largest} rendered again {args.repeat_largest} times; RSS after each (MB):", end="")
        with tempfile.TemporaryDirectory() as out:
            for _ in range(args.repeat_largest):
                render_patient(folder, Path(out) / largest, scorer, calibration, options)
                gc.collect()
                print(f" {rss_mb():.0f}", end="", flush=True)
        print()
    print(f"\nextrapolated to the whole data set (277,524 patches, from these {patches:,}): "
          f"scored in {277_524 / score:.0f} s, rendered end to end in {277_524 / rate['idcmap render end-to-end']:.0f} s")


if __name__ == "__main__":
    run(main)
