"""Load a patient folder: parse patch names, decode the PNGs, place them on the slide grid.

A patient folder is either `<patient>/<0|1>/*.png` (the data set's layout) or a flat folder of
PNGs. Every patch is decoded once into a padded `(N, 50, 50, 3)` uint8 array that serves both
the mosaic and the model.
"""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import (
    DuplicatePatchError,
    EmptyFolderError,
    FolderLayoutError,
    IdcmapError,
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

PATCH_NAME = re.compile(r"(?P<patient>.+?)_idx5_x(?P<x>[0-9]+)_y(?P<y>[0-9]+)(?:_class(?P<label>[01]))?\.(?i:png)")
"""A patch file name (matched whole); the extension in any case (`.png`, `.PNG`)."""
CLASS_FOLDERS = ("0", "1")
"""Subfolders of a patient folder that hold its patches by class; patches elsewhere are not read."""
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
"""The first 8 bytes of every PNG file; its IHDR chunk follows, with the bit depth at byte 24."""


@dataclass(frozen=True)
class PatchName:
    """What a patch file name says: patient id, top-left slide pixel and (maybe) label."""

    patient: str
    x: int
    y: int
    label: int | None


def parse_patch_name(name: str) -> PatchName:
    """Parse `<patient>_idx5_x<X>_y<Y>[_class<C>].png`; raise PatchNameError otherwise."""
    match = PATCH_NAME.fullmatch(name)
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
    inputs_sha256: str  # fingerprint of the patch files as read and the files skipped (`inputs_fingerprint`)
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def has_labels(self) -> bool:
        """True when every patch carries a label."""
        return len(self) > 0 and bool((self.labels >= 0).all())

    @property
    def cells(self) -> np.ndarray:
        """(N, 2) grid cell (row, col) of each patch: cell [r, c] covers slide pixels from
        x = origin_x + 50c, y = origin_y + 50r (see `grid_cells`)."""
        return grid_cells(self.xy)

    @property
    def origin_xy(self) -> tuple[int, int]:
        """Slide pixel (x, y) of the mosaic's top-left corner and of grid cell (0, 0) (`grid_origin`):
        the smallest x and the smallest y of any patch when all lie on one 50 px grid, as the data
        set's do (at 1 mod 50), so the mosaic starts with the first patch pixel, not a blank margin."""
        x, y = grid_origin(self.xy)
        return int(x), int(y)

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
        """True for a whole slide (at least half its patches have a grid neighbour), False for
        scattered samples such as the `sparse/` folders."""
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


def grid_origin(xy: np.ndarray) -> np.ndarray:
    """(x, y) of grid cell (0, 0) for patches at top-left slide pixels `xy` (N, 2): the 50 px grid
    whose phase (x mod 50, y mod 50) most patches share, from its line at or before the smallest x
    and y. So a patch off that phase does not move the grid of the others, wherever it lies. On a
    tie, the phase whose origin lies nearest the smallest x and y (the first patch's, usually)."""
    phase = xy % PATCH_SIZE
    counts = np.bincount(phase[:, 0] * PATCH_SIZE + phase[:, 1], minlength=PATCH_SIZE * PATCH_SIZE)
    tied = np.flatnonzero(counts == counts.max())  # called for every look at a slide's cells: no sort
    phases = np.stack([tied // PATCH_SIZE, tied % PATCH_SIZE], axis=1)
    origins = phases + (xy.min(axis=0) - phases) // PATCH_SIZE * PATCH_SIZE
    return origins[origins.sum(axis=1).argmax()]


def grid_cells(xy: np.ndarray) -> np.ndarray:
    """(N, 2) grid cell (row, col) of patches at top-left slide pixels `xy` (N, 2): whole 50 px
    steps from `grid_origin`. A patch off the grid's phase is rounded down into the cell it
    starts in (never negative); two patches in one cell are refused by `load_slide`."""
    return (xy - grid_origin(xy))[:, ::-1] // PATCH_SIZE


def _label_from_folder(path: Path, patient_folder: Path) -> int | None:
    """0 or 1 for a patch inside the patient's `0/` or `1/` class folder, None for a flat folder."""
    if path.parent == patient_folder or path.parent.name not in CLASS_FOLDERS:
        return None
    return int(path.parent.name)


def _looks_like_patch(name: str) -> bool:
    """True for a file name that reads as a patch name; hidden names (starting with '.', such as
    macOS `._*` AppleDouble files, which copy the name of the file they describe) never do."""
    return not name.startswith(".") and PATCH_NAME.fullmatch(name) is not None


def _entries(folder: Path) -> list[os.DirEntry]:
    """The entries of `folder`, sorted by name; FolderLayoutError naming it if it cannot be listed."""
    try:
        with os.scandir(folder) as entries:
            return sorted(entries, key=lambda entry: entry.name)
    except OSError as err:
        raise FolderLayoutError(f"{folder}: cannot list this folder ({err.strerror}); fix its permissions") from err


def list_patch_files(folder: Path) -> tuple[list[Path], list[str]]:
    """Patch files of a patient folder (directly in it, or in 0/ and 1/), and why other files were skipped.

    Skipped, each as "<path>: <reason>": files that are not PNGs, PNGs whose names are not patch
    names, hidden PNGs (names starting with '.', e.g. macOS `._*` files), pipes and other special
    files named like PNGs, and patch PNGs in any
    other subfolder (one level down, e.g. `2/`, `extra/`), which idcmap does not read. Other
    hidden files (.DS_Store) are ignored without a note.
    """
    files: list[Path] = []
    skipped: list[str] = []
    for sub in [folder, *(folder / name for name in CLASS_FOLDERS)]:
        if not sub.is_dir():
            continue
        for entry in _entries(sub):
            png = entry.name.lower().endswith(".png")
            if entry.is_dir():
                if not entry.name.startswith(".") and not (sub == folder and entry.name in CLASS_FOLDERS):
                    skipped += _misplaced_patches(Path(entry.path), folder)
            elif entry.name.startswith("."):
                if png:
                    skipped.append(f"{entry.path}: hidden file (its name starts with '.', like the `._*` metadata "
                                   "files macOS leaves beside copies), not a patch; ignored, delete it to silence this")
            elif not png:
                skipped.append(f"{entry.path}: not a .png file")
            elif not entry.is_file() and os.path.exists(entry.path):  # reading a pipe would wait for ever
                skipped.append(f"{entry.path}: not a regular file (a pipe, socket or device), not a patch")
            else:
                try:
                    parse_patch_name(entry.name)
                except PatchNameError as err:
                    skipped.append(f"{entry.path}: {str(err).removeprefix(f'{entry.name}: ')}")
                    continue
                files.append(Path(entry.path))
    return files, skipped


def _misplaced_patches(sub: Path, folder: Path) -> list[str]:
    """Skip reasons for the patch PNGs in `sub`, a subfolder of `folder` idcmap does not read, and in
    the (not hidden) folders below it; links to folders are not followed (a link loop would not end)."""
    try:
        entries = _entries(sub)
    except FolderLayoutError as err:
        return [f"{err}; patches in it, if any, are not read"]
    where = sub.relative_to(folder).as_posix()
    reasons = []
    for entry in entries:
        if entry.is_dir():
            if not entry.name.startswith(".") and not entry.is_symlink():
                reasons += _misplaced_patches(Path(entry.path), folder)
        elif _looks_like_patch(entry.name):
            reasons.append(f"{entry.path}: patch in {where}/, a subfolder idcmap does not read (only the patient "
                           "folder itself and its 0/ and 1/); move it into 0/ or 1/ by its class, or delete it")
    return reasons


def _missing_file(path: Path) -> str:
    """Why a listed patch file could not be opened: a broken symbolic link, or gone meanwhile."""
    if path.is_symlink():
        return f"{path}: broken symbolic link (its target {os.readlink(path)} does not exist); fix or delete the link"
    return f"{path}: file vanished while reading; was the folder changed during the run? run again"


def _decode(path: Path) -> tuple[np.ndarray, os.stat_result]:
    """Decode one patch into an (h, w, 3) uint8 array, with the file's stat as it was read; or
    raise PatchImageError.

    16-bit PNGs are refused whatever their colour type: pillow would open 16-bit grey as an
    integer image but 16-bit RGB/RGBA silently reduced to 8 bits, so the bit depth is read from
    the PNG header itself (IHDR, byte 24 of the file).
    """
    try:
        with open(path, "rb") as handle:
            stat = os.fstat(handle.fileno())
            data = handle.read()
        if not data:
            raise PatchImageError(f"{path}: an empty file (0 bytes), not an image; replace or delete it")
        if data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR" and data[24:25] == b"\x10":
            raise PatchImageError(
                f"{path}: a 16-bit PNG (16 bits per channel); idcmap reads 8-bit patches only, "
                "save the patch as 8-bit RGB"
            )
        with Image.open(io.BytesIO(data)) as image:
            if image.width > PATCH_SIZE or image.height > PATCH_SIZE:  # from the header, before decoding
                raise PatchImageError(f"{path}: {image.width}x{image.height} px; patches must be at most "
                                      f"{PATCH_SIZE}x{PATCH_SIZE}")
            image.load()
            if image.format != "PNG":
                raise PatchImageError(f"{path}: a {image.format} image with a .png name; save it as PNG")
            if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:  # alpha, or a tRNS key
                rgba = image.convert("RGBA")
                flat = Image.new("RGBA", rgba.size, (BACKGROUND,) * 4)
                image = Image.alpha_composite(flat, rgba)
            array = np.asarray(image.convert("RGB"))
    except PatchImageError:
        raise
    except FileNotFoundError as err:
        raise PatchImageError(_missing_file(path)) from err
    except PermissionError as err:
        raise PatchImageError(f"{path}: not readable (permission denied); fix its permissions") from err
    except UnidentifiedImageError as err:
        raise PatchImageError(
            f"{path}: cannot decode (not an image format pillow knows); the file is corrupt or truncated, "
            "replace or delete it"
        ) from err
    except Image.DecompressionBombError as err:
        raise PatchImageError(f"{path}: its header claims an image far larger than a patch ({err}); "
                              "replace or delete it") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise PatchImageError(
            f"{path}: cannot decode ({err}); the file is corrupt or truncated, replace or delete it"
        ) from err
    h, w = array.shape[:2]
    if h > PATCH_SIZE or w > PATCH_SIZE or h == 0 or w == 0:
        raise PatchImageError(
            f"{path}: {w}x{h} px; patches must be at most {PATCH_SIZE}x{PATCH_SIZE}"
        )
    return array, stat


def decode_patches(paths: list[Path]) -> list[tuple[np.ndarray, os.stat_result]]:
    """Decode PNGs one after another in this thread, each with its file's stat as read. A 50 x 50
    PNG is mostly Python-level parsing that holds the GIL, so a thread pool decoded at about 0.6
    of this rate (benchmarks/bench_decode.py)."""
    return [_decode(p) for p in paths]


def inputs_fingerprint(folder: Path, stats: list[tuple[Path, os.stat_result]], skipped: list[str]) -> str:
    """sha256 over the patch files of `folder` (relative paths, byte sizes, modification times) and
    the files skipped beside them (`list_patch_files`'s reasons, which a summary lists): what
    `render --resume` compares to tell whether a patient's inputs changed since its render."""
    listing = [f"{path.relative_to(folder).as_posix()}\t{stat.st_size}\t{stat.st_mtime_ns}"
               for path, stat in sorted(stats, key=lambda item: item[0])]
    reasons = sorted(reason.removeprefix(str(folder)) for reason in skipped)  # the same however the folder is named
    return hashlib.sha256("\n".join([*listing, "skipped:", *reasons]).encode("utf-8", "surrogateescape")).hexdigest()


def inputs_sha256(folder: Path) -> str:
    """The fingerprint (`inputs_fingerprint`) of a patient folder's patch files as they are now,
    to compare with the one a render recorded from the files it read (`Slide.inputs_sha256`)."""
    files, skipped = list_patch_files(folder)
    return inputs_fingerprint(folder, [(f, f.stat()) for f in files], skipped)


def folder_name(folder: Path) -> str:
    """A folder's own name, from its absolute path (so `.` and `..` work; a link keeps its own name)."""
    return Path(os.path.abspath(folder)).name


def _patient_id(folder: Path, files: list[Path], names: list[PatchName]) -> str:
    """The patient of a folder's patches, from the ids in their file names.

    When the folder's name is one of the ids, it is the patient and a file naming another
    patient is an error. Otherwise, when every file names one and the same patient, that id is
    used: the file names are the data set's own record of the patient, while a folder's name
    can differ for harmless reasons (`patient_8916_copy/`, a class folder passed on its own),
    and nothing is ambiguous when all files agree. Files naming several patients, none of them
    the folder's name, are an error. The folder's name comes from its absolute path, so `.` and
    `..` work (symbolic links are not resolved: a link's own name counts).
    """
    own_name = folder_name(folder)
    ids = sorted({name.patient for name in names})
    if own_name in ids:
        for path, name in zip(files, names):
            if name.patient != own_name:
                raise PatientMismatchError(
                    f"{path}: names patient {name.patient!r} but lies in folder {own_name!r}, whose other "
                    "files name that patient; move it to its own patient folder"
                )
    if len(ids) > 1:
        first = {name.patient: path for path, name in reversed(list(zip(files, names)))}
        raise PatientMismatchError(
            f"{folder}: its files name {len(ids)} patients ({', '.join(map(repr, ids[:5]))}), none of them the "
            f"folder's name {own_name!r}, e.g. {first[ids[0]]} and {first[ids[1]]}; a patient folder holds "
            "one patient's patches: move each patient's files into a folder named after it"
        )
    if ids[0] != own_name:
        log.warning("%s: folder name %r differs from the patient id %r in its file names; using %r",
                    folder, own_name, ids[0], ids[0])
    return ids[0]


def load_slide(
    folder: str | Path,
    max_mosaic_pixels: int = DEFAULT_MAX_MOSAIC_PIXELS,
) -> Slide:
    """Load every patch of one patient folder into a Slide.

    Files that are not patches are reported in `Slide.skipped` (and logged), not used (see
    `list_patch_files`). The patient id comes from the file names (see `_patient_id`).
    Raises EmptyFolderError, PatientMismatchError, DuplicatePatchError, MosaicTooLargeError,
    PatchImageError with the offending file named.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise EmptyFolderError(f"{folder}: {_not_a_folder(folder)}")
    files, skipped = list_patch_files(folder)
    for reason in skipped:
        log.warning("skipped %s", reason)
    if not files:
        raise EmptyFolderError(
            f"{folder}: no patch PNGs named <patient>_idx5_x<X>_y<Y>_class<C>.png "
            f"({len(skipped)} other files{', e.g. ' + skipped[0] if skipped else ''}); point idcmap at a patient folder"
        )
    names = [parse_patch_name(path.name) for path in files]
    patient = _patient_id(folder, files, names)
    parsed: list[tuple[Path, PatchName]] = []
    for path, name in zip(files, names):
        folder_label = _label_from_folder(path, folder)
        if name.label is not None and folder_label is not None and name.label != folder_label:
            raise PatientMismatchError(
                f"{path}: named class{name.label} but lies in folder {folder_label}/; "
                "move it to the folder of its class"
            )
        label = name.label if name.label is not None else folder_label
        parsed.append((path, PatchName(name.patient, name.x, name.y, label)))
    parsed.sort(key=lambda item: (item[1].y, item[1].x, str(item[0])))
    xy = np.array([[n.x, n.y] for _, n in parsed], dtype=np.int64)
    _check_mosaic_size(folder, xy, max_mosaic_pixels)
    paths = [p for p, _ in parsed]
    _warn_off_grid(paths, xy)
    decoded, stats = zip(*decode_patches(paths))
    fingerprint = inputs_fingerprint(folder, list(zip(paths, stats)), skipped)
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
    return Slide(patient, paths, xy, sizes, labels, pixels, fingerprint, skipped)


def _check_mosaic_size(folder: Path, xy: np.ndarray, max_pixels: int) -> None:
    """MosaicTooLargeError when the mosaic, from the smallest x/y to the far patch edges, could exceed `max_pixels`."""
    span = xy.max(axis=0) - xy.min(axis=0) + PATCH_SIZE
    pixels = int(span[0]) * int(span[1])
    if pixels > max_pixels:
        raise MosaicTooLargeError(
            f"{folder}: patch coordinates span {span[0]}x{span[1]} px ({pixels:,} pixels), above the "
            f"limit of {max_pixels:,}; check the x/y in the file names or raise --max-mosaic-pixels"
        )


def _warn_off_grid(paths: list[Path], xy: np.ndarray) -> None:
    """Warn, naming the first, of patches whose x/y lie off the 50 px grid most patches lie on
    (the data set's at 1 mod 50): they are kept at their own pixels, in the grid cell their
    top-left corner falls in, so their cell's pixel span in the exports is off by up to 49 px."""
    phase = xy % PATCH_SIZE
    common = grid_origin(xy) % PATCH_SIZE
    odd = np.flatnonzero((phase != common).any(axis=1))
    if len(odd):
        log.warning("%s: x/y lie off the 50 px grid of the other patches (x, y at %d, %d mod 50, not %d, %d; %d such "
                    "patches); kept at its pixels, in the grid cell its corner falls in: check its name",
                    paths[odd[0]], *phase[odd[0]], *common, len(odd))


def _drop_duplicates(paths: list[Path], xy: np.ndarray, labels: list[int | None],
                     decoded: list[np.ndarray]) -> list[int]:
    """Indices to keep. Patches share a 50 px grid cell (`grid_cells`) only as exact copies (same
    x/y and pixels, no conflicting labels): kept once, with a warning. Anything else sharing a cell raises."""
    keep: list[int] = []
    seen: dict[tuple[int, int], int] = {}
    for i, ((x, y), cell) in enumerate(zip(xy.tolist(), grid_cells(xy).tolist())):
        first = seen.setdefault(tuple(cell), i)
        if first == i:
            keep.append(i)
            continue
        other = f"{paths[i]}: {paths[first].name} already lies"
        if (x, y) != tuple(xy[first].tolist()):
            raise DuplicatePatchError(f"{other} in the same 50 px grid cell (x={xy[first][0]} y={xy[first][1]} vs "
                                      f"x={x} y={y}); patches must lie on one 50 px grid, remove one")
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


def _holds_patches(folder: Path, filenames: list[str], dirnames: list[str]) -> bool:
    """True when `folder` holds files named like patches directly (`filenames`) or in its 0/ or 1/."""
    if any(_looks_like_patch(name) for name in filenames):
        return True
    for name in CLASS_FOLDERS:
        if name not in dirnames:
            continue
        try:
            entries = _entries(folder / name)
        except FolderLayoutError:
            return True  # unreadable class folder: a patient whose load will say so
        if any(not entry.is_dir() and _looks_like_patch(entry.name) for entry in entries):
            return True
    return False


def _patients_named(folder: Path) -> tuple[set[str], list[Path]]:
    """The patient ids that `folder`'s patch files (directly in it, or in its 0/ and 1/) name, and those files."""
    files, _ = list_patch_files(folder)
    return {parse_patch_name(path.name).patient for path in files}, files


def _refuse_patients_beside_patches(folder: Path, dirnames: list[str]) -> None:
    """FolderLayoutError when `folder` holds patch files (directly or in its 0/ and 1/) and, in its
    other subfolders, a patient folder that `folder`, taken as one patient, would hide: one naming
    another patient, or one of `folder`'s own patient with more patches, or named after it (a
    patch copied into a dataset root beside its patient's folder). A collection, no larger, of
    `folder`'s own patches below it (a backup/ or extra/) is the loader's to skip and list."""
    others = [name for name in sorted(dirnames) if name not in CLASS_FOLDERS and not name.startswith(".")]
    if not others:
        return
    try:
        own, files = _patients_named(folder)
    except FolderLayoutError:
        return  # an unreadable 0/ or 1/: loading this patient will say so
    for name in others:
        try:
            below = find_patient_folders(folder / name)
        except (EmptyFolderError, FolderLayoutError):
            continue
        for patient in below:
            try:
                named, theirs = _patients_named(patient)
            except FolderLayoutError:
                named, theirs = set(), []
            if not named or not named <= own:
                raise FolderLayoutError(
                    f"{folder}: holds patch files itself (e.g. {files[0].relative_to(folder)}) and patient folders "
                    f"below (e.g. {patient}); move the stray patch files into their patient folder, or pass one "
                    "patient folder")
            if len(theirs) > len(files) or patient.name in own:
                raise FolderLayoutError(
                    f"{folder}: holds {len(files)} patch file(s) itself (e.g. {files[0].relative_to(folder)}) and, "
                    f"below, {patient} with {len(theirs)} of the same patient: patches copied beside their patient's "
                    f"folder? move or delete those in {folder} (and its 0/ and 1/), or pass {patient}")


def find_patient_folders(root: str | Path) -> list[Path]:
    """Patient folders at or below `root`, sorted: folders holding files named like patches
    (`<patient>_idx5_x<X>_y<Y>…png`, not hidden) directly or in 0/ or 1/. Other PNGs (a stray
    preview.png, idcmap's own mosaic.png and overlay.png) do not make a patient folder.

    A folder with patch files (directly in it, or in its 0/ and 1/) and, in its other subfolders,
    patient folders of other patients is a FolderLayoutError: taken as one patient, it would hide
    them (a patch copied into a dataset root). More patches of its own patient in other subfolders
    are the loader's to skip.
    Hidden folders below `root` (names starting with '.': .git, idcmap's staging folders) are not
    searched; `export` would not find their outputs either. Symbolic links to folders are followed
    once each, so link loops cannot trap the walk. A folder that cannot be listed is named in a
    warning, or, where no patient folder is found, in the error.
    """
    root = Path(root)
    if not root.is_dir():
        raise EmptyFolderError(f"{root}: {_not_a_folder(root)}")
    found: list[Path] = []
    unrecognised: list[str] = []  # "<folder>: N image files, e.g. <name>" for folders of images none named like patches
    visited: set[str] = set()
    unreadable: list[str] = []  # folders that could not be listed (permissions): patients there are not found

    def note_unreadable(err: OSError) -> None:
        unreadable.append(f"{err.filename}: cannot list this folder ({err.strerror})")

    for dirpath, dirnames, filenames in os.walk(root, followlinks=True, onerror=note_unreadable):
        here = Path(dirpath)
        real = os.path.realpath(here)
        if real in visited:
            dirnames.clear()
            continue
        visited.add(real)
        dirnames[:] = [name for name in dirnames if not name.startswith(".")]  # .git, .Trash, idcmap's staging
        if _holds_patches(here, filenames, dirnames):
            _refuse_patients_beside_patches(here, dirnames)
            found.append(here)
            dirnames.clear()
        else:
            dirnames.sort()
            images = sorted(name for name in filenames if _is_foreign_image(name))
            if images:
                unrecognised.append(f"{here}: {len(images)} image file{'s' if len(images) > 1 else ''}, e.g. {images[0]}")
    expected = "<patient>_idx5_x<X>_y<Y>_class<C>.png, directly or in 0/ and 1/"
    if not found and unreadable:
        raise EmptyFolderError(f"{root}: no patient folder found; {unreadable[0]}; fix its permissions")
    if not found:
        hint = f"; found {unrecognised[0]}, not named like a patch" if unrecognised else ""
        raise EmptyFolderError(f"{root}: no patient folder at or below it: no file is named like a patch "
                               f"({expected}, e.g. 9035_idx5_x1001_y401_class0.png){hint}; point idcmap at the "
                               "data set, or rename the patches to that pattern")
    for what in unrecognised:
        log.warning("%s, none named like a patch (%s): not rendered; rename them to render it", what, expected)
    for what in unreadable:
        log.warning("%s: patient folders in it, if any, are not found; fix its permissions", what)
    return sorted(found)


IMAGE_SUFFIXES = (".png", ".tif", ".tiff", ".jpg", ".jpeg")
OUTPUT_PNGS = ("mosaic.png", "overlay.png")


def _is_foreign_image(name: str) -> bool:
    """An image file that is not hidden, not named like a patch and not one of idcmap's own outputs."""
    return (name.lower().endswith(IMAGE_SUFFIXES) and not name.startswith(".") and name not in OUTPUT_PNGS
            and not _looks_like_patch(name))


def named_patient(folder: Path) -> str:
    """The patient id that a folder's patch file names agree on, else the folder's own name: the
    id a summary gives a patient that failed to load, as `load_slide` would have given it."""
    try:
        files, _ = list_patch_files(folder)
    except IdcmapError:
        files = []
    ids = {parse_patch_name(path.name).patient for path in files}
    return ids.pop() if len(ids) == 1 else folder_name(folder)
