"""Where a GPU scorer's time goes on slides it has not seen yet, one variant per process (GPU only).

    python benchmarks/bench_gpu_shapes.py [--data ../shared/data/patients] [pin=1] [pad=1] [fp16=1] [ieee=1]

Replays the patch-network loop of `Scorer.score` on every patient of --data, for CancerNet and
resnet18-context, with the variant's settings: pin=1 pins the slide in host memory and copies
batch by batch (otherwise one copy of the whole slide), pad=1 pads the last batch to the next
power of two from 64 (idcmap now pads to the full batch), fp16=1 runs under fp16 autocast, ieee=1
runs cuDNN convolutions in full fp32 instead of PyTorch's default TF32. Prints, per model, the
network and context-head time over slides seen for the first time, then over the same slides
again, and the largest difference from CPU PyTorch fp32 probabilities on the second slide. Run each
variant in a fresh process: cuDNN's choices are cached per process. The RESULTS.md figures of
2026-11-27 (H100) came from this script, then at .gpu/diag.py, with --data .gpu/patients.
"""
import argparse
import copy
import sys
import time
from pathlib import Path

import numpy as np
import torch

from common import DATA_ROOT, patient_folders, run

from idcmap.colour import normalise_slide  # noqa: E402
from idcmap.loader import load_slide  # noqa: E402
from idcmap.models import load_model  # noqa: E402
from idcmap.scoring import to_input  # noqa: E402

BATCH = 1024
SETTINGS = ("pin", "pad", "fp16", "ieee")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=DATA_ROOT / "patients", help="folder of patient folders")
    parser.add_argument("settings", nargs="*", help="pin=1 pad=1 fp16=1 ieee=1")
    args = parser.parse_args()
    opts = dict(setting.partition("=")[::2] for setting in args.settings)
    if set(opts) - set(SETTINGS) or set(opts.values()) - {"0", "1"}:
        parser.error(f"settings are {'=0|1 '.join(SETTINGS)}=0|1, not {' '.join(args.settings)}")
    if not torch.cuda.is_available():
        sys.exit("skipped: no CUDA GPU visible")
    pin, pad, fp16, ieee = (opts.get(k, "0") == "1" for k in SETTINGS)
    if ieee:
        torch.backends.cudnn.conv.fp32_precision = "ieee"
    dev = torch.device("cuda")
    slides = [load_slide(f) for f in patient_folders(args.data)]
    for name in ("cancernet", "resnet18-context"):
        model = load_model(name)
        cpu_net = copy.deepcopy(model.network).eval()
        net = model.network.to(dev).to(memory_format=torch.channels_last).eval()
        mean, std = torch.tensor(model.mean, device=dev), torch.tensor(model.std, device=dev)
        seen = [normalise_slide(s, model.colour_reference).pixels for s in slides]
        with torch.inference_mode():
            x = torch.zeros(BATCH, 3, 50, 50, device=dev).contiguous(memory_format=torch.channels_last)
            with torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                net.backbone(x)  # the full-batch shape warmed up, as a long run would have it
            torch.cuda.synchronize()

            def run(i: int) -> tuple[float, float, np.ndarray]:
                started = time.perf_counter()
                px = torch.from_numpy(seen[i])
                px = px.pin_memory() if pin else px.to(dev)
                fs, ls = [], []
                for s in range(0, len(px), BATCH):
                    x = to_input(px[s : s + BATCH].to(dev, non_blocking=True), mean, std)
                    x = x.contiguous(memory_format=torch.channels_last)
                    n = len(x)
                    if pad:
                        size = 64
                        while size < n:
                            size *= 2
                        size = min(size, BATCH)
                        if size > n:
                            x = torch.cat([x, x.new_zeros((size - n, 3, 50, 50))]).contiguous(
                                memory_format=torch.channels_last)
                    with torch.autocast("cuda", dtype=torch.float16, enabled=fp16):
                        f, logit = net.backbone(x)
                    fs.append(f[:n].float())
                    ls.append(logit[:n].float())
                f, logit = torch.cat(fs), torch.cat(ls)
                torch.cuda.synchronize()
                network_done = time.perf_counter()
                if net.context is not None:
                    cells = torch.from_numpy(slides[i].cells).to(dev)
                    index = torch.cat([torch.zeros_like(cells[:, :1]), cells], dim=1)
                    net.context(f, logit, index, (1, *slides[i].grid_shape))
                torch.cuda.synchronize()
                return network_done - started, time.perf_counter() - network_done, torch.sigmoid(logit).cpu().numpy()

            first = [run(i) for i in range(len(slides))]
            again = [run(i) for i in range(len(slides))]
            check = min(1, len(slides) - 1)
            ref = torch.sigmoid(cpu_net.backbone(to_input(torch.from_numpy(seen[check]), torch.tensor(model.mean),
                                                          torch.tensor(model.std)))[1]).numpy()
        n = sum(len(s) for s in slides)
        fb, fc = sum(r[0] for r in first), sum(r[1] for r in first)
        ab, ac = sum(r[0] for r in again), sum(r[1] for r in again)
        print(f"{name:17s} {str(opts):40s} new slides: net {1000 * fb:7.1f} ms ctx {1000 * fc:6.1f} ms "
              f"({n / (fb + fc):8.0f}/s) | again: net {1000 * ab:6.1f} ctx {1000 * ac:5.1f} ({n / (ab + ac):8.0f}/s) | "
              f"max|p-cpu| {np.abs(first[check][2] - ref).max():.1e} | per slide net ms {[round(1000 * r[0]) for r in first]}")


if __name__ == "__main__":
    run(main)
