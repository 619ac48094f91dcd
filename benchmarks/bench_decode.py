"""PNG decode rates of the ways to spread it over the cores, side by side in one run.

    python benchmarks/bench_decode.py [--patients 4] [--rounds 4] [--workers 2] [--data ../shared/data/patients]

On the first --patients patients of --data (files read once before timing,
so the page cache serves every round), decode every patch with idcmap's own per-file decoder
(`loader._decode`: open, check, to an RGB array):
  one thread       `loader.decode_patches`, what `load_slide` runs
  pool, per patch  a thread pool, one task per file (what idcmap did before)
  pool, chunks     a thread pool, one task per 256 files
  processes        a process pool, one task per 256 files (arrays sent back by pickling)
Prints patches/s per round and the median of each.
"""
from __future__ import annotations

import argparse
import statistics
import time
from concurrent.futures import Executor, ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path

from common import DATA_ROOT, patient_folders, run

from idcmap import loader  # noqa: E402
CHUNK = 256


def in_chunks(pool: Executor, paths: list[Path]) -> list:
    """Decode `paths` in tasks of CHUNK files on `pool`."""
    chunks = [paths[i : i + CHUNK] for i in range(0, len(paths), CHUNK)]
    return [decoded for part in pool.map(loader.decode_patches, chunks) for decoded in part]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--patients", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--data", type=Path, default=DATA_ROOT / "patients", help="folder of patient folders")
    args = parser.parse_args()
    folders = patient_folders(args.data, args.patients)
    paths = [path for folder in folders for path in loader.list_patch_files(folder)[0]]
    for path in paths:
        path.read_bytes()
    with ThreadPoolExecutor(args.workers) as threads, ProcessPoolExecutor(args.workers) as processes:
        in_chunks(processes, paths[:CHUNK * args.workers])  # start the workers before timing
        ways = {
            "one thread": lambda: loader.decode_patches(paths),
            f"{args.workers} threads, per patch": lambda: list(threads.map(loader._decode, paths)),
            f"{args.workers} threads, chunks": lambda: in_chunks(threads, paths),
            f"{args.workers} processes, chunks": lambda: in_chunks(processes, paths),
        }
        rates: dict[str, list[float]] = {name: [] for name in ways}
        for _ in range(args.rounds):
            for name, decode in ways.items():
                started = time.perf_counter()
                decoded = decode()
                rates[name].append(len(paths) / (time.perf_counter() - started))
                assert len(decoded) == len(paths)
    print(f"{len(paths)} patches of {len(folders)} patients, patches/s per round, then the median")
    for name, values in rates.items():
        print(f"{name:24s} {' '.join(f'{v:7.0f}' for v in values)}   median {statistics.median(values):7.0f}")


if __name__ == "__main__":
    run(main)
