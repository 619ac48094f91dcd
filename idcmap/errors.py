"""Every error idcmap raises on purpose. The CLI turns them into one line and exit status 2."""
from __future__ import annotations


class IdcmapError(Exception):
    """Base class: a problem with the user's input or environment, not a bug."""


class PatchNameError(IdcmapError):
    """A file name does not follow `<patient>_idx5_x<X>_y<Y>[_class<C>].png`."""


class PatchImageError(IdcmapError):
    """A patch file cannot be decoded, or has a size or pixel format idcmap cannot use."""


class PatientMismatchError(IdcmapError):
    """A patch names another patient, or its label disagrees with its 0/1 folder."""


class DuplicatePatchError(IdcmapError):
    """Two different patches claim the same x/y on one slide."""


class EmptyFolderError(IdcmapError):
    """A folder holds no patient or no patch."""


class FolderLayoutError(IdcmapError):
    """A folder cannot be read as patients: it cannot be listed, or patch files lie beside patient folders."""


class OptionError(IdcmapError):
    """A setting (a command-line option or a library argument) that idcmap cannot use."""


class MosaicTooLargeError(IdcmapError):
    """The coordinates would need a mosaic larger than the configured limit."""


class WeightsError(IdcmapError):
    """Model weights are missing, corrupt, or do not match their model card."""


class OutputError(IdcmapError):
    """An output file or folder cannot be written."""


class TrainingError(IdcmapError):
    """Training cannot go on: its loss stopped being a finite number."""


class SplitError(IdcmapError):
    """A train/validation/test split file is invalid or does not fit the data."""
