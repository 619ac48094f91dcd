"""A data set of patient folders, and its split by patient into train/validation/test."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from .errors import SplitError
from .export import atomic_write_text
from .loader import Slide, find_patient_folders, load_slide
from .progress import progress_bar

log = logging.getLogger(__name__)

SPLIT_SETS = ("train", "val", "test")


def patient_ids(root: str | Path) -> dict[str, Path]:
    """Patient folders below `root`, keyed by their path relative to it (e.g. `patients/8864`).
    SplitError when two folders have one name (one patient twice: a split could put it on both sides)."""
    root = Path(root)
    folders = find_patient_folders(root)
    ids = {folder.name if folder == root else folder.relative_to(root).as_posix(): folder for folder in folders}
    first: dict[str, str] = {}
    for pid in ids:
        other = first.setdefault(patient_name(pid), pid)
        if other != pid:
            raise SplitError(f"{root}: {other} and {pid} are folders of one patient ({patient_name(pid)}); a split "
                             "by patient needs each patient in one folder: remove or merge the copy")
    return ids


def patient_name(pid: str) -> str:
    """A patient id's own name, without the folders above it (`patients/8864` -> `8864`)."""
    return pid.rpartition("/")[2]


def check_unseen(ids: list[str], role: str, split_file: str | Path, weights: Path, seen_in: tuple[str, ...],
                 relation: str, consequence: str) -> None:
    """SplitError when one of `ids` (the `role` patients of `split_file`) is among the `seen_in`
    sets of the model's own split, the one stored beside `weights` (no check where there is none, or
    where `split_file` is that split); the error says the patients `relation` the model, then the
    `consequence`. Patients are compared by name, so a split written against
    another depth of the same data (`8864` against `patients/8864`) is caught too."""
    own = weights.with_suffix(".split.json")
    if not own.is_file() or own.resolve() == Path(split_file).resolve():
        return
    stored = read_split(own)
    theirs = {patient_name(pid) for name in seen_in for pid in stored[name]}
    seen = sorted(pid for pid in ids if patient_name(pid) in theirs)
    if seen:
        raise SplitError(f"{split_file}: {len(seen)} of its {role} patients {relation} {weights} (by {own}), "
                         f"e.g. {', '.join(seen[:3])}, {consequence}")


def make_split(ids: list[str], seed: int = 0, test_fraction: float = 0.2, val_fraction: float = 0.1) -> dict:
    """Split patient ids by patient, never by patch, stratified by their parent folder.

    Each group (e.g. `patients/`, `sparse/`) gives round(test_fraction * n) patients to test,
    and round(val_fraction * the rest) (at least one when the group has three or more) to val.
    """
    if not 0 < test_fraction < 1 or not 0 <= val_fraction < 1:
        raise SplitError(f"fractions must lie in (0, 1): test {test_fraction}, val {val_fraction}")
    rng = np.random.default_rng(seed)
    split: dict[str, list[str]] = {name: [] for name in SPLIT_SETS}
    groups: dict[str, list[str]] = {}
    for pid in sorted(ids):
        groups.setdefault(pid.rpartition("/")[0], []).append(pid)
    for members in groups.values():
        members = [members[i] for i in rng.permutation(len(members))]
        n_test = round(test_fraction * len(members))
        rest = members[n_test:]
        n_val = max(round(val_fraction * len(rest)), 1 if len(members) >= 3 and val_fraction > 0 else 0)
        split["test"] += members[:n_test]
        split["val"] += rest[:n_val]
        split["train"] += rest[n_val:]
    return {"seed": seed, "test_fraction": test_fraction, "val_fraction": val_fraction,
            **{name: sorted(split[name]) for name in SPLIT_SETS}}


def save_split(split: dict, path: Path) -> None:
    """Write a split as JSON, atomically."""
    atomic_write_text(path, json.dumps(split, indent=1) + "\n")


def read_split(path: str | Path) -> dict:
    """Read a split file: train, val and test lists of patient ids, the three disjoint."""
    path = Path(path)
    if not path.is_file():
        raise SplitError(f"{path}: no such split file; pass the split the weights were trained on with --split")
    try:
        split = json.loads(path.read_text())
        sets = {name: set(split[name]) for name in SPLIT_SETS}
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise SplitError(f"{path}: not a split file with train/val/test lists ({err})") from err
    for name in SPLIT_SETS:
        if not isinstance(split[name], list) or not all(isinstance(pid, str) for pid in split[name]):
            raise SplitError(f"{path}: {name!r} must be a list of patient ids such as \"patients/8864\", "
                             f"not {json.dumps(split[name])[:60]}; write it as idcmap train does")
    for name in SPLIT_SETS:
        if len(sets[name]) < len(split[name]):
            twice = sorted({pid for pid in split[name] if split[name].count(pid) > 1})
            raise SplitError(f"{path}: {twice[:3]} listed more than once in {name}; list each patient once")
    for a in SPLIT_SETS:
        for b in SPLIT_SETS:
            if a < b and sets[a] & sets[b]:
                raise SplitError(f"{path}: patients in both {a} and {b}: {sorted(sets[a] & sets[b])[:5]}")
    return split


def load_split(path: str | Path, available: dict[str, Path]) -> dict:
    """Read a split file (`read_split`) whose every patient is present under the data root."""
    split = read_split(path)
    missing = sorted(set().union(*(split[name] for name in SPLIT_SETS)) - set(available))
    if missing:
        raise SplitError(f"{path}: {len(missing)} patients not found under the data root, e.g. {missing[:3]}; "
                         "pass the data root the split was drawn from, or a split of this one (--split)")
    return split


def load_slides(ids: list[str], folders: dict[str, Path], desc: str, progress: bool = True) -> list[Slide]:
    """Load the named patients' slides, with a progress bar unless `progress` is False."""
    return [load_slide(folders[pid]) for pid in progress_bar(ids, progress, desc=desc, unit="patient")]


def load_labelled_slides(ids: list[str], folders: dict[str, Path], role: str, desc: str,
                         progress: bool = True) -> list[tuple[str, Slide]]:
    """(id, slide) of the named patients whose patches all carry labels; the others are named in a
    warning as `role` patients left out (training and evaluation need the labels)."""
    loaded = list(zip(ids, load_slides(ids, folders, desc, progress)))
    labelled = [(pid, slide) for pid, slide in loaded if slide.has_labels]
    if len(labelled) < len(loaded):
        left_out = sorted(pid for pid, slide in loaded if not slide.has_labels)
        log.warning("%d %s patients left out: not every file name carries a class (_class0/_class1, or 0/ and 1/ "
                    "folders), e.g. %s", len(left_out), role, ", ".join(left_out[:5]))
    return labelled
