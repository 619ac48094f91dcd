"""Time of one training step in fp32 and under bfloat16 autocast, side by side in one run.

    python benchmarks/bench_train_step.py [--model resnet18-context] [--steps 4] [--rounds 2] [--device auto]

One step as `idcmap train` runs it (`idcmap.training.training_step`): a 16 x 16-cell grid window of 256 patches (50 x 50 px, channels_last)
through the patch network and its context head, both losses, backward, AdamW. Random pixels: the
time of a step does not depend on what the patches show. Prints seconds per step (best and mean of
--steps after one warm-up) for each precision, alternating them --rounds times, and the ratio, then
an approximate time of the training steps of a whole run (--epochs x at least one step per 256
patches of an epoch; decoding and validation left out). On a GPU, "fp32" runs cuDNN convolutions in PyTorch's
default TF32, as training does.
"""
from __future__ import annotations

import argparse
import math
import time

import torch

from common import run

from idcmap.models import build_model  # noqa: E402
from idcmap.scoring import resolve_device  # noqa: E402
from idcmap.training import cpu_has_bf16, training_step  # noqa: E402

WINDOW = 16


def step_seconds(model_name: str, bf16: bool, steps: int, device: torch.device) -> list[float]:
    """Seconds of each of `steps` training steps (after one warm-up step) on a fresh network."""
    torch.manual_seed(0)
    network = build_model(model_name).train().to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.AdamW(network.parameters(), lr=2e-3, weight_decay=1e-4)
    x = torch.rand(WINDOW * WINDOW, 3, 50, 50).to(device).contiguous(memory_format=torch.channels_last)
    y = (torch.rand(WINDOW * WINDOW) < 0.25).float().to(device)
    cells = torch.arange(WINDOW * WINDOW)
    index = torch.stack([torch.zeros_like(cells), cells // WINDOW, cells % WINDOW], dim=1).to(device)
    times = []
    for _ in range(steps + 1):
        started = time.perf_counter()
        training_step(network, optimizer, x, y, index, (1, WINDOW, WINDOW), bf16)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - started)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="resnet18-context")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--epochs", type=int, default=12, help="for the extrapolation (the shipped recipe: 12)")
    parser.add_argument("--epoch-patches", type=int, default=26_712 + 4 * 2_308,
                        help="for the extrapolation: patches an epoch trains on [default: the shipped default's "
                             "recipe, 26,712 of whole slides and 4 x 2,308 of scattered samples (--scattered-repeat 4)]")
    args = parser.parse_args()
    device = resolve_device(args.device)
    where = (torch.cuda.get_device_name(device) if device.type == "cuda"
             else f"{torch.get_num_threads()} CPU threads, native bf16 on this CPU: {cpu_has_bf16()}")
    print(f"{args.model}, {WINDOW * WINDOW} patches per step, {where}")
    means = {"fp32": [], "bf16": []}
    for round_ in range(args.rounds):
        for precision in ("fp32", "bf16"):
            times = step_seconds(args.model, precision == "bf16", args.steps, device)
            means[precision].append(sum(times) / len(times))
            print(f"round {round_ + 1} {precision}: best {min(times):.3f} s, mean {means[precision][-1]:.3f} s per step")
    fp32, bf16 = (sum(v) / len(v) for v in means.values())
    print(f"bf16 autocast: {fp32 / bf16:.2f}x the fp32 step rate ({fp32:.3f} s vs {bf16:.3f} s per step)")
    steps = args.epochs * math.ceil(args.epoch_patches / (WINDOW * WINDOW))
    print(f"{args.epochs} epochs of {args.epoch_patches:,} patches (at least {steps} steps, batches being whole "
          "windows): "
          f"about {steps * min(fp32, bf16) / 60:.1f} min of training steps at the faster precision "
          "(decoding and validation not included)")


if __name__ == "__main__":
    run(main)
