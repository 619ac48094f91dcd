"""Load a patient folder: parse patch names, decode the PNGs, place them on the slide grid.

A patient folder is either `<patient>/<0|1>/*.png` (the data set's layout) or a flat folder of
PNGs. Every patch is decoded once into a padded `(N, 50, 50, 3)` uint8 array that serves both
the mosaic and the model.
"""
from __future__ import annotations

import logging
import os
import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import (
    DuplicatePatchError,
    EmptyFolderError,
    MosaicTooLargeError,
    PatchImageError,
    PatchNameError,
    PatientMismatchError,
)

log = logging.getLogger(__name__)

PATCH_SIZE = 50
"""Grid spacing and the largest patch side, in slide pixels."""
BACKGROUND = 255
"""Value of every mosaic/patch pixel that no patch covers (white, like bare glass)."""
DEFAULT_MAX_MOSAIC_PIXELS = 250_000_000
"""Refuse slides whose mosaic would exceed this many pixels (750 MB of RGB)."""
MAX_COORDINATE = 10**12
"""Largest x or y a patch name may carry (keeps every pixel computation inside int64)."""

PATCH_NAME = re.compile(
    r"^(?P<patient>.+?)_idx5_x(?P<x>\d+)_y(?P<y>\d+)(?:_class(?P<label>[01]))?\.png$"
)


@dataclass(frozen=True)
class PatchName:
    """What a patch file name says: patient id, top-left slide pixel and (maybe) label."""

    patient: str
    x: int
    y: int
    label: int | None


def parse_patch_name(name: str) -> PatchName:
    """Parse `<patient>_idx5_x<X>_y<Y>[_class<C>].png`; raise PatchNameError otherwise."""
    match = PATCH_NAME.match(name)
    if match is None:
        raise PatchNameError(
            f"{name}: not a patch name; expected <patient>_idx5_x<X>_y<Y>_class<0|1>.png"
        )
    label = match.group("label")
    x, y = int(match.group("x")), int(match.group("y"))
    if max(x, y) > MAX_COORDINATE:
        raise PatchNameError(
            f"{name}: x/y beyond {MAX_COORDINATE:.0e} px, larger than any slide; check the file name"
        )
    return PatchName(patient=match.group("patient"), x=x, y=y, label=None if label is None else int(label))


@dataclass
class Slide:
    """One patient's patches, decoded and placed on the slide's 50 px grid.

    `pixels[i]` is patch i padded with BACKGROUND to 50x50; its real size is `sizes[i]`
    (height, width). Patches are sorted by (y, x). `labels[i]` is -1 where unknown.
    """

    patient: str
    paths: list[Path]
    xy: np.ndarray  # (N, 2) int64, top-left slide pixel (x, y)
    sizes: np.ndarray  # (N, 2) int64, (height, width)
    labels: np.ndarray  # (N,) int8: 0, 1, or -1 (unlabelled)
    pixels: np.ndarray  # (N, 50, 50, 3) uint8
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        """True when every patch carries a label."""
        return len(self) > 0 and bool((self.labels >= 0).all())

    @property
    def cells(self) -> np.ndarray:
        """(N, 2) grid cell (row, col) of each patch, relative to the slide's origin cell."""
        rc = self.xy[:, ::-1] // PATCH_SIZE
        return rc - self.origin_cell

    @property
    def origin_cell(self) -> np.ndarray:
        """(row, col) of the top-left grid cell that holds a patch."""
        return (self.xy[:, ::-1] // PATCH_SIZE).min(axis=0)

    @property
    def origin_xy(self) -> tuple[int, int]:
        """Slide pixel (x, y) of the mosaic's top-left corner."""
        row, col = self.origin_cell
        return int(col * PATCH_SIZE), int(row * PATCH_SIZE)

    @property
    def grid_shape(self) -> tuple[int, int]:
        """(rows, cols) of the patch grid covering every patch."""
        rc = self.cells
        return int(rc[:, 0].max()) + 1, int(rc[:, 1].max()) + 1

    @property
    def areas(self) -> np.ndarray:
        """(N,) tissue area of each patch in pixels (edge patches count their real size)."""
        return self.sizes[:, 0] * self.sizes[:, 1]

    @property
    def is_whole(self) -> bool:
        """True for a whole slide (most patches have a grid neighbour), False for scattered samples
        such as the `sparse/` folders."""
        occupied = self.grid_values(np.ones(len(self)), fill=0.0) > 0
        padded = np.pad(occupied, 1)
        neighbours = padded[:-2, 1:-1] | padded[2:, 1:-1] | padded[1:-1, :-2] | padded[1:-1, 2:]
        rc = self.cells
        return bool(neighbours[rc[:, 0], rc[:, 1]].mean() >= 0.5)

    def mosaic_shape(self) -> tuple[int, int]:
        """(height, width) in pixels of the mosaic, from its origin to the far patch edges."""
        x0, y0 = self.origin_xy
        height = int((self.xy[:, 1] + self.sizes[:, 0]).max()) - y0
        width = int((self.xy[:, 0] + self.sizes[:, 1]).max()) - x0
        return height, width

    def mosaic(self) -> np.ndarray:
        """The slide reassembled: (H, W, 3) uint8, BACKGROUND where no patch lies."""
        height, width = self.mosaic_shape()
        image = np.full((height, width, 3), BACKGROUND, dtype=np.uint8)
        x0, y0 = self.origin_xy
        for (x, y), (h, w), patch in zip(self.xy, self.sizes, self.pixels):
            image[y - y0 : y - y0 + h, x - x0 : x - x0 + w] = patch[:h, :w]
        return image

    def grid_values(self, values: np.ndarray, fill: float = np.nan) -> np.ndarray:
        """Scatter one value per patch into a (rows, cols) float grid; `fill` elsewhere."""
        grid = np.full(self.grid_shape, fill, dtype=np.float64)
        rc = self.cells
        grid[rc[:, 0], rc[:, 1]] = values
        return grid


def _label_from_folder(path: Path, patient_folder: Path) -> int | None:
    """0 or 1 for a patch inside the patient's `0/` or `1/` class folder, None for a flat folder."""
    if path.parent == patient_folder or path.parent.name not in ("0", "1"):
        return None
    return int(path.parent.name)


def list_patch_files(folder: Path) -> tuple[list[Path], list[str]]:
    """PNG files of a patient folder (flat, or in 0/ and 1/), and what was not a PNG."""
    files: list[Path] = []
    skipped: list[str] = []
    for sub in [folder, folder / "0", folder / "1"]:
        if not sub.is_dir():
            continue
        for entry in sorted(os.scandir(sub), key=lambda e: e.name):
            if entry.is_dir():
                continue
            if entry.name.lower().endswith(".png"):
                files.append(Path(entry.path))
            elif not entry.name.startswith("."):
                skipped.append(f"{entry.path}: not a .png file")
    return files, skipped


def _decode(path: Path) -> np.ndarray:
    """Decode one patch into an (h, w, 3) uint8 array, or raise PatchImageError."""
    try:
        with Image.open(path) as image:
            image.load()
            if image.mode in ("I;16", "I;16B", "I;16L", "I", "F") or image.mode.startswith("I;"):
                raise PatchImageError(
                    f"{path}: {image.mode} (16/32-bit) images are not supported; "
                    "save the patch as 8-bit RGB"
                )
            if image.format != "PNG":
                raise PatchImageError(f"{path}: a {image.format} image with a .png name; save it as PNG")
            if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
                rgba = image.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, (BACKGROUND,) * 4)
                image = Image.alpha_composite(flat, rgba)
            array = np.asarray(image.convert("RGB"))
    except PatchImageError:
        raise
    except FileNotFoundError as err:
        raise PatchImageError(f"{path}: file vanished while reading") from err
    except PermissionError as err:
        raise PatchImageError(f"{path}: not readable (permission denied); fix its permissions") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise PatchImageError(
            f"{path}: cannot decode ({err}); the file is corrupt or truncated, replace or delete it"
        ) from err
    h, w = array.shape[:2]
    if h > PATCH_SIZE or w > PATCH_SIZE or h == 0 or w == 0:
        raise PatchImageError(
            f"{path}: {w}x{h} px; patches must be at most {PATCH_SIZE}x{PATCH_SIZE}"
        )
    return array


def decode_patches(paths: list[Path], threads: int | None = None) -> list[np.ndarray]:
    """Decode PNGs in a thread pool (pillow releases the GIL while decoding)."""
    threads = threads or min(8, os.cpu_count() or 1)
    if threads <= 1 or len(paths) < 64:
        return [_decode(p) for p in paths]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(_decode, paths, chunksize=64))


def load_slide(
    folder: str | Path,
    max_mosaic_pixels: int = DEFAULT_MAX_MOSAIC_PIXELS,
    threads: int | None = None,
) -> Slide:
    """Load every patch of one patient folder into a Slide.

    Files whose names do not parse are reported in `Slide.skipped` (and logged), not used.
    Raises EmptyFolderError, PatientMismatchError, DuplicatePatchError, MosaicTooLargeError,
    PatchImageError with the offending file named.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EmptyFolderError(f"{folder}: {_not_a_folder(folder)}")
    patient = folder.name
    files, skipped = list_patch_files(folder)
    parsed: list[tuple[Path, PatchName]] = []
    for path in files:
        try:
            name = parse_patch_name(path.name)
        except PatchNameError as err:
            skipped.append(f"{path}: {err}".replace(f"{path.name}: ", "", 1))
            continue
        if name.patient != patient:
            raise PatientMismatchError(
                f"{path}: names patient {name.patient!r} but lies in folder {patient!r}; "
                "move it to its own patient folder"
            )
        folder_label = _label_from_folder(path, folder)
        if name.label is not None and folder_label is not None and name.label != folder_label:
            raise PatientMismatchError(
                f"{path}: named class{name.label} but lies in folder {folder_label}/; "
                "move it to the folder of its class"
            )
        label = name.label if name.label is not None else folder_label
        parsed.append((path, PatchName(name.patient, name.x, name.y, label)))
    for reason in skipped:
        log.warning("skipped %s", reason)
    if not parsed:
        raise EmptyFolderError(
            f"{folder}: no patch PNGs named <patient>_idx5_x<X>_y<Y>_class<C>.png "
            f"({len(skipped)} other files{', e.g. ' + skipped[0] if skipped else ''}); point idcmap at a patient folder"
        )
    parsed.sort(key=lambda item: (item[1].y, item[1].x, str(item[0])))
    xy = np.array([[n.x, n.y] for _, n in parsed], dtype=np.int64)
    _check_mosaic_size(folder, xy, max_mosaic_pixels)
    paths = [p for p, _ in parsed]
    decoded = decode_patches(paths, threads)
    keep = _drop_duplicates(paths, xy, [n.label for _, n in parsed], decoded)
    paths = [paths[i] for i in keep]
    decoded = [decoded[i] for i in keep]
    xy = xy[keep]
    labels = np.array(
        [-1 if n.label is None else n.label for _, n in (parsed[i] for i in keep)], dtype=np.int8
    )
    pixels = np.full((len(paths), PATCH_SIZE, PATCH_SIZE, 3), BACKGROUND, dtype=np.uint8)
    sizes = np.empty((len(paths), 2), dtype=np.int64)
    for i, array in enumerate(decoded):
        h, w = array.shape[:2]
        pixels[i, :h, :w] = array
        sizes[i] = (h, w)
    return Slide(patient, paths, xy, sizes, labels, pixels, skipped)


def _check_mosaic_size(folder: Path, xy: np.ndarray, max_pixels: int) -> None:
    span = xy.max(axis=0) - (xy.min(axis=0) // PATCH_SIZE) * PATCH_SIZE + PATCH_SIZE
    pixels = int(span[0]) * int(span[1])
    if pixels > max_pixels:
        raise MosaicTooLargeError(
            f"{folder}: patch coordinates span {span[0]}x{span[1]} px ({pixels:,} pixels), above the "
            f"limit of {max_pixels:,}; check the x/y in the file names or raise --max-mosaic-pixels"
        )


def _drop_duplicates(paths: list[Path], xy: np.ndarray, labels: list[int | None],
                     decoded: list[np.ndarray]) -> list[int]:
    """Indices to keep. Patches share a 50 px grid cell only as exact copies (same x/y and pixels,
    no conflicting labels): kept once, with a warning. Anything else sharing a cell raises."""
    keep: list[int] = []
    seen: dict[tuple[int, int], int] = {}
    for i, (x, y) in enumerate(xy.tolist()):
        first = seen.setdefault((x // PATCH_SIZE, y // PATCH_SIZE), i)
        if first == i:
            keep.append(i)
            continue
        other = f"{paths[i]}: {paths[first].name} already lies"
        if (x, y) != tuple(xy[first].tolist()):
            raise DuplicatePatchError(f"{other} in the same 50 px grid cell (x={xy[first][0]} y={xy[first][1]} vs "
                                      f"x={x} y={y}); patches must lie on the 50 px grid, remove one")
        if None not in (labels[i], labels[first]) and labels[i] != labels[first]:
            raise DuplicatePatchError(f"{other} at x={x} y={y} with label {labels[first]}, this one says "
                                      f"{labels[i]}; remove the wrong one")
        if not np.array_equal(decoded[first], decoded[i]):
            raise DuplicatePatchError(f"{other} at x={x} y={y} with different pixels; remove one of them")
        log.warning("%s: same pixels as %s at x=%d y=%d; using one", paths[i], paths[first], x, y)
    return keep


def _not_a_folder(path: Path) -> str:
    what = "a file, not a folder" if path.is_file() else "no such folder"
    return f"{what}; pass a patient folder (<patient>/0|1/*.png, or flat) or a folder of patient folders"


def find_patient_folders(root: str | Path) -> list[Path]:
    """Patient folders at or below `root`, sorted: folders with PNGs directly or in 0/ or 1/.

    Symbolic links to folders are followed once each, so link loops cannot trap the walk.
    """
    root = Path(root)
    if not root.is_dir():
        raise EmptyFolderError(f"{root}: {_not_a_folder(root)}")
    found: list[Path] = []
    visited: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in visited:
            dirnames.clear()
            continue
        visited.add(real)
        if any(f.lower().endswith(".png") for f in filenames) or any(d in ("0", "1") for d in dirnames):
            found.append(here)
            dirnames.clear()
        else:
            dirnames.sort()
    if not found:
        raise EmptyFolderError(
            f"{root}: no patient folder below (a patient folder holds patch PNGs, or 0/ and 1/)"
        )
    return sorted(found)
