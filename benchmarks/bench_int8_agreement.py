"""How far a model's stored int8 patch network stays from fp32 on its validation patients, on this CPU.

    python benchmarks/bench_int8_agreement.py [--model resnet18-context] [--weights FILE] [--data ../shared/data]

The comparison `idcmap quantize` records in the card (`int8.validation`), computed again here with
the int8 file as shipped, and printed beside the card's figures: int8 arithmetic differs between
CPUs (AVX2, AVX-512 VNNI), so equal figures show that the shipped network decides the same on this
one. Also prints the seconds the comparison took (both runtimes set up and scoring the slides; not a
speed comparison: `bench_render.py` times the runtimes side by side).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from common import DATA_ROOT, require_folder, run

from idcmap.dataset import load_slides, load_split, patient_ids  # noqa: E402
from idcmap.models import DEFAULT_MODEL, load_model  # noqa: E402
from idcmap.training import int8_agreement  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=None, help=f"registry name [default: {DEFAULT_MODEL}]")
    parser.add_argument("--weights", type=Path, default=None, help="weights file (its .int8.onnx beside it)")
    parser.add_argument("--data", type=Path, default=DATA_ROOT, help="data root (patients/, sparse/)")
    args = parser.parse_args()
    require_folder(args.data)
    model = load_model(args.model, args.weights)
    if model.int8_path is None or not model.int8_path.is_file():
        sys.exit(f"{model.path}: no int8 network beside it; run `idcmap quantize` first")
    folders = patient_ids(args.data)
    split = load_split(model.path.with_suffix(".split.json"), folders)
    slides = [s for s in load_slides(split["val"], folders, "load val", progress=False) if s.has_labels]
    started = time.perf_counter()
    measured = int8_agreement(model, slides)
    print(json.dumps({"model": model.name, "this_cpu": measured,
                      "card": model.card.get("int8", {}).get("validation"),
                      "seconds_fp32_and_int8_scoring": round(time.perf_counter() - started, 1)}, indent=1))


if __name__ == "__main__":
    run(main)
