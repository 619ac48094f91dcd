"""Training settings (`TrainConfig`) and their limits: one place that both `TrainConfig.validate`
and the `idcmap train` options read. A light module (no torch), so the command starts fast."""
from __future__ import annotations

import math
from dataclasses import dataclass, fields
from typing import Callable

from .errors import OptionError


@dataclass
class TrainConfig:
    """Training hyper-parameters (the CLI exposes each)."""

    epochs: int = 14
    batch_patches: int = 256
    window: int = 16
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    patience: int = 4
    seed: int = 0
    cell_dropout: float = 0.1
    stain_jitter: float = 0.08
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    device: str = "auto"
    precision: str = "auto"
    colour_normalise: bool = False  # map each slide's colours onto the training slides' mean (idcmap.colour)
    ema: float = 0.0  # 0: off; else the decay of the moving average of the weights that is validated and kept
    scattered_repeat: int = 1  # each epoch holds the windows of scattered-sample patients this many times

    def validate(self) -> None:
        """OptionError naming the first setting training cannot use (and the device, if unusable)."""
        defaults = {f.name: f.default for f in fields(self)}
        for name, label, usable, requirement in CONFIG_RULES:
            value = getattr(self, name)
            if not usable(value):
                raise OptionError(f"{label} {value!r}: must be {requirement} (default {defaults[name]!r})")
        from .scoring import resolve_device  # torch: only when a config is checked

        resolve_device(self.device)


@dataclass(frozen=True)
class Limit:
    """The range of one numeric TrainConfig setting: what `TrainConfig.validate` enforces and what
    the CLI's option type accepts (one place for both)."""

    label: str  # how the user names it
    whole: bool  # a whole number (int, not bool); else any finite number
    low: float = 0
    high: float | None = None
    low_open: bool = False
    high_open: bool = False

    def allows(self, value: object) -> bool:
        """True when `value` is of the right kind and within the range."""
        if isinstance(value, bool) or not isinstance(value, int if self.whole else (int, float)):
            return False
        if isinstance(value, float) and not math.isfinite(value):  # ints of any size compare exactly
            return False
        above = value > self.low if self.low_open else value >= self.low
        below = self.high is None or (value < self.high if self.high_open else value <= self.high)
        return above and below

    @property
    def requirement(self) -> str:
        """What the value must be, in words: "a whole number >= 1", "a number in (0, 1)"."""
        kind = "a whole number" if self.whole else "a number" if self.high is not None else "a finite number"
        low, high = (str(v) if self.whole or v is None else f"{v:g}" for v in (self.low, self.high))
        if self.high is None:
            return f"{kind} {'>' if self.low_open else '>='} {low}"
        return f"{kind} in {'(' if self.low_open else '['}{low}, {high}{')' if self.high_open else ']'}"


LIMITS: dict[str, Limit] = {
    "epochs": Limit("--epochs", whole=True, low=1),
    "batch_patches": Limit("--batch-patches", whole=True, low=8),  # batch norm needs more than 1 patch
    "window": Limit("--window", whole=True, low=1, high=256),  # cells a side; slides span some 100
    "learning_rate": Limit("--lr", whole=False, low=0, low_open=True),
    "weight_decay": Limit("--weight-decay", whole=False, low=0),
    "patience": Limit("--patience", whole=True, low=1),
    "seed": Limit("--seed", whole=True, low=0, high=2**64 - 1),
    "cell_dropout": Limit("cell dropout", whole=False, low=0, high=1, high_open=True),
    "stain_jitter": Limit("--stain-jitter", whole=False, low=0, high=0.5),
    "ema": Limit("--ema", whole=False, low=0, high=1, high_open=True),
    "scattered_repeat": Limit("--scattered-repeat", whole=True, low=1),
    "test_fraction": Limit("--test-fraction", whole=False, low=0, high=1, low_open=True, high_open=True),
    "val_fraction": Limit("--val-fraction", whole=False, low=0, high=1, low_open=True, high_open=True),
}

PRECISIONS = ("auto", "bf16", "fp32")

# (TrainConfig field, how the user names it, test, what it must be)
CONFIG_RULES: tuple[tuple[str, str, Callable[[object], bool], str], ...] = (
    *((name, limit.label, limit.allows, limit.requirement) for name, limit in LIMITS.items()),
    ("precision", "--precision", lambda v: v in PRECISIONS, "one of " + ", ".join(PRECISIONS)),
    ("colour_normalise", "--colour-normalise", lambda v: isinstance(v, bool), "True or False"),
)

# settings a resumed run may change: where it runs, how long it waits for a better epoch; the
# precision and the colour reference have checks of their own (auto may resolve to the stored one),
# and the split fractions matter only through the split, which the checkpoint stores
RESUMABLE_FREELY = ("device", "patience", "precision", "colour_normalise", "test_fraction", "val_fraction")


def number_text(value: float) -> str:
    """A setting as the user would type it, every digit kept (0.00123456789, 0.4, 0, 1e-05)."""
    return repr(value).removesuffix(".0")


def recipe_of(config: TrainConfig) -> dict:
    """The settings a checkpoint's run must be resumed with: all but `RESUMABLE_FREELY`."""
    return {f.name: getattr(config, f.name) for f in fields(config) if f.name not in RESUMABLE_FREELY}


def recipe_change(stored: dict, config: TrainConfig) -> tuple[str, str] | None:
    """The first setting of `config` that differs from the `stored` recipe of a checkpoint, as the
    user would type it now and as it was trained ("--stain-jitter 0.4", "--stain-jitter 0.08");
    None when all match (settings the checkpoint does not record are not compared)."""
    current = recipe_of(config)
    for name, value in stored.items():
        if name in current and current[name] != value:
            label = LIMITS[name].label
            return tuple(f"{label} {number_text(v)}" for v in (current[name], value))
    return None
