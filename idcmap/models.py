"""Networks, the registry that names them, and loading/saving of shipped weights.

Every model maps a batch of patches to (features, patch logit). A slide-aware model adds a
`ContextHead` that refines each patch's logit from the features of its grid neighbours.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from .colour import ColourReference
from .errors import WeightsError
from .export import atomic_write_bytes

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
DEFAULT_MODEL = "resnet18-context"


class SeparableConv2d(nn.Sequential):
    """Depthwise 3x3 then pointwise 1x1 convolution (Keras' SeparableConv2D)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__(
            nn.Conv2d(cin, cin, 3, padding=1, groups=cin, bias=False),
            nn.Conv2d(cin, cout, 1),
        )


def _sep_block(cin: int, cout: int, repeats: int) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for i in range(repeats):
        layers += [SeparableConv2d(cin if i == 0 else cout, cout), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]
    return layers + [nn.MaxPool2d(2)]


class CancerNet(nn.Module):
    """The tutorials' CancerNet (separable convolutions 32, 64x2, 128x3; dense 256) for 50x50 RGB.

    Two changes from the tutorials, both measured: batch norm sits before the ReLU, and the
    spatial dropouts between blocks are gone. With dropout feeding ReLU + batch norm, the
    running statistics learnt in training did not fit evaluation (eval-mode logits averaged
    -13 to -31 where training-mode ones averaged -1.6). Dropout stays before the classifier.
    """

    feature_dim = 256

    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(
            *_sep_block(3, 32, 1),
            *_sep_block(32, 64, 2),
            *_sep_block(64, 128, 3),
            nn.Flatten(),
            nn.Linear(128 * 6 * 6, self.feature_dim),
            nn.BatchNorm1d(self.feature_dim),
            nn.ReLU(inplace=True),
        )
        self.dropout = nn.Dropout(0.5)
        self.classifier = nn.Linear(self.feature_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        return features, self.classifier(self.dropout(features)).squeeze(1)


class ResNet18(nn.Module):
    """torchvision's ResNet-18, its stem adapted to 50x50 input: one 3x3 stride-2 convolution and
    no max-pool, so layer1 sees 25x25 (the ImageNet stem would leave 13x13; a stride-1 stem costs
    4.5x the compute, 37 training patches/s on the 2-core CPU against 167)."""

    feature_dim = 512

    def __init__(self) -> None:
        super().__init__()
        net = torchvision.models.resnet18(weights=None, num_classes=1)
        net.conv1 = nn.Conv2d(3, 64, 3, stride=2, padding=1, bias=False)
        net.maxpool = nn.Identity()
        net.fc = nn.Identity()
        self.trunk = net
        self.classifier = nn.Linear(self.feature_dim, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.trunk(x)
        return features, self.classifier(features).squeeze(1)


class ContextHead(nn.Module):
    """Refines patch logits from the neighbours' features on the slide grid.

    3x3 convolutions with the given dilations see `reach = sum(dilations)` cells on each side.
    Inputs are only pixel-derived features and the presence mask: labels never enter.
    A cell with no neighbour within reach keeps its patch logit exactly (isolated patches,
    sparse folders).
    """

    def __init__(self, feature_dim: int, dilations: tuple[int, ...] = (1, 1, 1), width: int = 32,
                 projected: int = 24) -> None:
        super().__init__()
        self.reach = sum(dilations)
        self.project = nn.Linear(feature_dim, projected)
        layers: list[nn.Module] = []
        channels = projected + 2
        for i, dilation in enumerate(dilations):
            last = i == len(dilations) - 1
            layers.append(nn.Conv2d(channels, 1 if last else width, 3, padding=dilation, dilation=dilation))
            if not last:
                layers.append(nn.ReLU(inplace=True))
            channels = width
        self.refine = nn.Sequential(*layers)

    def _occupancy(self, index: torch.Tensor, grid_shape: tuple[int, int, int], like: torch.Tensor) -> torch.Tensor:
        """(K, 1, rows + 2 reach, cols + 2 reach) presence mask of the patches at `index`."""
        k, rows, cols = grid_shape
        mask = like.new_zeros((k, 1, rows + 2 * self.reach, cols + 2 * self.reach))
        mask[index[:, 0], 0, index[:, 1] + self.reach, index[:, 2] + self.reach] = 1
        return mask

    def has_neighbours(self, index: torch.Tensor, grid_shape: tuple[int, int, int]) -> torch.Tensor:
        """(N,) bool: patches with another patch within reach, the ones whose logit context refines."""
        mask = self._occupancy(index, grid_shape, torch.zeros((), device=index.device))
        size = 2 * self.reach + 1
        counts = F.conv2d(mask, mask.new_ones((1, 1, size, size)), padding=self.reach)[:, 0] - mask[:, 0]
        return counts[index[:, 0], index[:, 1] + self.reach, index[:, 2] + self.reach] > 0.5

    def forward(
        self, features: torch.Tensor, patch_logits: torch.Tensor, index: torch.Tensor, grid_shape: tuple[int, int, int]
    ) -> torch.Tensor:
        """Context logits for N patches placed at `index` = (window, row, col) on K grids."""
        k, rows, cols = grid_shape
        margin = self.reach  # empty cells around the grid: a cell's score never depends on the grid's extent
        projected = F.relu(self.project(features))
        grid = features.new_zeros((k, rows + 2 * margin, cols + 2 * margin, projected.shape[1] + 2))
        cell_values = torch.cat([projected, torch.ones_like(patch_logits)[:, None], patch_logits[:, None]], dim=1)
        where = (index[:, 0], index[:, 1] + margin, index[:, 2] + margin)
        grid[where] = cell_values.to(grid.dtype)
        delta = self.refine(grid.permute(0, 3, 1, 2))[:, 0][where]
        gate = self.has_neighbours(index, grid_shape).to(delta.dtype)
        return patch_logits + (delta * gate).to(patch_logits.dtype)


class PatchClassifier(nn.Module):
    """A patch network, with an optional slide-aware context head."""

    def __init__(self, backbone: nn.Module, context_dilations: tuple[int, ...] | None) -> None:
        super().__init__()
        self.backbone = backbone
        self.context = ContextHead(backbone.feature_dim, context_dilations) if context_dilations else None

    @property
    def context_reach(self) -> int:
        """Grid cells on each side that the context head sees (0 for a patch-only model)."""
        return self.context.reach if self.context is not None else 0

    def forward(
        self, x: torch.Tensor, index: torch.Tensor | None = None, grid_shape: tuple[int, int, int] | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(patch logits, context logits); the two are equal without a context head or grid."""
        features, patch_logits = self.backbone(x)
        if self.context is None or index is None or grid_shape is None:
            return patch_logits, patch_logits
        return patch_logits, self.context(features, patch_logits, index, grid_shape)


@dataclass(frozen=True)
class ModelSpec:
    """A registry entry: how to build a network and where its shipped weights live."""

    name: str
    build: Callable[[], nn.Module]
    context_dilations: tuple[int, ...] | None
    smoothing: bool
    description: str

    @property
    def context(self) -> bool:
        """True for a slide-aware model: a learned context head, or smoothing over the slide grid."""
        return self.context_dilations is not None or self.smoothing

    @property
    def weights_path(self) -> Path:
        return WEIGHTS_DIR / f"{self.name}.pt"


REGISTRY: dict[str, ModelSpec] = {
    spec.name: spec
    for spec in [
        ModelSpec("cancernet", CancerNet, None, False, "CancerNet, patch only"),
        ModelSpec("cancernet-smooth", CancerNet, None, True,
                  "CancerNet + Gaussian smoothing of its logits over the slide grid, sigma fitted on validation"),
        ModelSpec("cancernet-context", CancerNet, (1, 1, 1), True,
                  "CancerNet + context head over 7x7 grid cells + fitted grid smoothing"),
        ModelSpec("cancernet-context-wide", CancerNet, (1, 2, 2, 1), True,
                  "CancerNet + dilated context head over 13x13 grid cells + fitted grid smoothing"),
        ModelSpec("resnet18", ResNet18, None, False, "ResNet-18 adapted to 50x50, patch only"),
        ModelSpec("resnet18-context", ResNet18, (1, 1, 1), True,
                  "ResNet-18 + context head over 7x7 grid cells + fitted grid smoothing"),
        ModelSpec("resnet18-context-wide", ResNet18, (1, 2, 2, 1), True,
                  "ResNet-18 + dilated context head over 13x13 grid cells + fitted grid smoothing"),
    ]
}


def get_spec(name: str) -> ModelSpec:
    """Registry entry by name; WeightsError listing the known names otherwise."""
    try:
        return REGISTRY[name]
    except KeyError:
        raise WeightsError(f"unknown model {name!r}; choose one of {', '.join(sorted(REGISTRY))}") from None


def build_model(name: str) -> PatchClassifier:
    """A freshly initialised network of the named registry entry."""
    spec = get_spec(name)
    return PatchClassifier(spec.build(), spec.context_dilations)


THRESHOLD_RULES = ("fixed", "otsu")


@dataclass
class Calibration:
    """What turns logits into decisions: fitted on validation patients, stored with the weights."""

    temperature: float = 1.0
    patch_temperature: float = 1.0
    smoothing_sigma: float = 0.0  # Gaussian over the slide grid (cells) applied to the final logits
    threshold: float = 0.5
    min_region_cells: int = 0
    max_hole_cells: int = 0
    threshold_rule: str = "fixed"  # or "otsu": each whole slide's own Otsu threshold
    scattered_threshold: float | None = None  # for scattered samples (not a whole slide); None: `threshold`

    def problem(self) -> str | None:
        """What makes this calibration unusable (None when it is usable): every value finite,
        temperatures above 0, the thresholds within [0, 1], the rest not negative, a known rule."""
        if self.threshold_rule not in THRESHOLD_RULES:
            return f"its calibration threshold rule {self.threshold_rule!r} is none of {', '.join(THRESHOLD_RULES)}"
        values = {k: v for k, v in asdict(self).items()
                  if k != "threshold_rule" and not (k == "scattered_threshold" and v is None)}
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values.values()):
            return f"its calibration holds a value that is not a finite number ({values})"
        if self.temperature <= 0 or self.patch_temperature <= 0:
            return f"its calibration temperatures must be above 0 ({self.temperature}, {self.patch_temperature})"
        for name in ("threshold", "scattered_threshold"):
            if not 0 <= values.get(name, 0) <= 1:
                return f"its calibration {name.replace('_', ' ')} {values[name]} lies outside [0, 1]"
        if min(self.smoothing_sigma, self.min_region_cells, self.max_hole_cells) < 0:
            return "its calibration smoothing or region sizes are negative"
        if not all(isinstance(v, int) for v in (self.min_region_cells, self.max_hole_cells)):
            return (f"its calibration region sizes must be whole numbers of cells ({self.min_region_cells}, "
                    f"{self.max_hole_cells})")
        return None


@dataclass
class LoadedModel:
    """A network ready to score, with its input normalisation, calibration and card."""

    name: str
    network: PatchClassifier
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    calibration: Calibration
    sha256: str
    card: dict = field(default_factory=dict)
    path: Path | None = None  # the weights file it was loaded from
    colour_reference: ColourReference | None = None  # slides normalised onto it before scoring

    @property
    def int8_path(self) -> Path | None:
        """The int8 ONNX patch network beside the weights (`idcmap quantize` writes it)."""
        return self.path.with_suffix(".int8.onnx") if self.path is not None else None


def sha256_of(path: Path) -> str:
    """Hex sha256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def card_path(weights: Path) -> Path:
    """The JSON model card beside a weights file."""
    return weights.with_suffix(".json")


COMPACT_WEIGHTS_MAGIC = b"idcmap weights: bfloat16, zlib\n"


def _floats_as(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """`state_dict` with its floating-point tensors in `dtype` (integer buffers unchanged)."""
    return {k: v.to(dtype) if v.is_floating_point() else v for k, v in state_dict.items()}


def stored_precision(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The float tensors rounded as `save_weights` stores them (bfloat16), back in float32."""
    return _floats_as(_floats_as(state_dict, torch.bfloat16), torch.float32)


def _torch_bytes(payload: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    return buffer.getvalue()


def save_weights(path: Path, payload: dict) -> None:
    """Write shipped weights atomically: float tensors in bfloat16, the whole zlib-compressed
    (a ResNet-18 in 18 MB instead of 45 MB). `read_weights` gives them back in float32."""
    state = _floats_as(payload["state_dict"], torch.bfloat16)
    atomic_write_bytes(path, COMPACT_WEIGHTS_MAGIC + zlib.compress(_torch_bytes({**payload, "state_dict": state}), 9))


def _why_unloadable(err: Exception) -> str:
    """A short reason why `load_torch_file` failed (torch's own messages run to ten lines)."""
    if isinstance(err, OSError):
        return err.strerror or str(err)
    if isinstance(err, zlib.error):
        return "its compressed data is corrupt or cut short"
    if isinstance(err, EOFError):
        return "empty or cut short"
    if isinstance(err, pickle.UnpicklingError):
        return "not PyTorch data, or it holds objects other than tensors and plain values"
    return "not a readable PyTorch file, or a damaged one"


def load_torch_file(path: Path, what: str, remedy: str, data: bytes | None = None) -> dict:
    """The dict a `torch.save` file holds (zlib-compressed as `save_weights` writes it, or plain),
    loaded with weights_only=True so that no code in it can run; from `data` when the caller has
    already read the file. WeightsError naming `path`, `what` it should be and the `remedy` when it
    is not such a file."""
    try:
        data = path.read_bytes() if data is None else data
        if data.startswith(COMPACT_WEIGHTS_MAGIC):
            data = zlib.decompress(data[len(COMPACT_WEIGHTS_MAGIC):])
        payload = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a file it cannot read
        raise WeightsError(f"{path}: not {what} ({_why_unloadable(err)}); {remedy}") from err
    if not isinstance(payload, dict):
        raise WeightsError(f"{path}: not {what} (it holds a {type(payload).__name__}, not a dict); {remedy}")
    return payload


WEIGHTS_REMEDY = "restore it, or pass a file written by `idcmap train`"


def read_weights(path: Path, data: bytes | None = None) -> dict:
    """A weights file's payload, float tensors in float32: compact files of `save_weights` and
    plain `torch.save` checkpoints alike (`data`: the file's bytes, if already read). WeightsError
    for any other file."""
    payload = load_torch_file(path, "an idcmap weights file", WEIGHTS_REMEDY, data)
    if not isinstance(payload.get("state_dict"), dict):
        raise WeightsError(f"{path}: not an idcmap weights file (it has no state_dict); {WEIGHTS_REMEDY}")
    payload["state_dict"] = _floats_as(payload["state_dict"], torch.float32)
    return payload


# The fields of a model card that idcmap reads, with their JSON types (other fields are kept as they are).
CARD_FIELDS: dict[str, type] = {
    "model": str, "architecture": str, "parameters": int, "input": str, "mean": list, "std": list,
    "calibration": dict, "calibration_fit": dict, "training": dict, "history": list, "sha256": str,
    "test": dict, "int8": dict, "weights_format": str,
}
JSON_TYPE_NAMES = {dict: "an object", list: "a list", str: "a string", int: "an integer", float: "a number",
                   bool: "a boolean", type(None): "null"}


def _card_error(path: Path, problem: str) -> WeightsError:
    """The error for a model card with `problem`, and how to get a good card back."""
    return WeightsError(f"{path}: {problem}; restore the card (e.g. from git), or delete it and "
                        "re-run `idcmap calibrate` or `idcmap train` to write a new one")


def read_card(path: Path) -> dict:
    """The model card at `path` ({} when there is none): a JSON object whose CARD_FIELDS have their
    types. WeightsError naming the card otherwise."""
    if not path.is_file():
        return {}
    try:
        card = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise _card_error(path, f"unreadable model card ({err.strerror if isinstance(err, OSError) else err})") from err
    if not isinstance(card, dict):
        raise _card_error(path, f"a model card must be a JSON object, not {JSON_TYPE_NAMES[type(card)]}")
    for key, kind in CARD_FIELDS.items():
        if key in card and type(card[key]) is not kind:
            raise _card_error(path, f"model card field {key!r} is {JSON_TYPE_NAMES[type(card[key])]}, "
                                    f"not {JSON_TYPE_NAMES[kind]}")
    return card


def save_checkpoint(path: Path, payload: dict) -> None:
    """Write a checkpoint (`torch.save`, full precision) atomically."""
    atomic_write_bytes(path, _torch_bytes(payload))


def _channel_statistics(payload: dict, key: str) -> tuple[float, float, float]:
    """The three finite per-channel numbers stored under `key` ("mean", "std"); ValueError otherwise."""
    values = payload[key]
    if isinstance(values, (str, bytes)) or len(values) != 3:
        raise ValueError(f"its {key} is {str(values)[:40]!r}, not three numbers (R, G, B)")
    values = tuple(float(v) for v in values)
    if not all(math.isfinite(v) for v in values):
        raise ValueError(f"its {key} {values} is not finite")
    return values


def load_model(name: str | None = None, weights: str | Path | None = None) -> LoadedModel:
    """Load a registry model with its weights (default `weights/<name>.pt`), checking the sha256
    recorded in its model card. Without a name: the model the `weights` file holds, or
    DEFAULT_MODEL when no file is given either."""
    if name is None and weights is None:
        name = DEFAULT_MODEL
    path = Path(weights) if weights is not None else get_spec(name).weights_path
    if path.is_dir():
        raise WeightsError(f"{path}: is a folder, not a weights file; pass the .pt file written by `idcmap train`")
    if not path.is_file():
        raise WeightsError(f"{path}: no such weights file; check the --weights path" if weights is not None else
                           f"{path}: no weights for model {name!r}; train them with "
                           f"`idcmap train DATA_ROOT --model {name} -o {path}`")
    if path.name.endswith((".json", ".onnx")):
        what = "the int8 patch network" if path.suffix == ".onnx" else "a model card or split (JSON)"
        stem = path.name.removesuffix(".int8.onnx").removesuffix(".split.json").removesuffix(".json")
        beside = path.parent / (stem.removesuffix(".onnx") + ".pt")
        raise WeightsError(f"{path}: {what}, not a weights file; pass the .pt file beside it ({beside})")
    try:
        data = path.read_bytes()  # read once: hashed here, loaded below
    except OSError as err:
        raise WeightsError(f"{path}: cannot read weights ({err.strerror or err}); {WEIGHTS_REMEDY}") from err
    digest = hashlib.sha256(data).hexdigest()
    card_file = card_path(path)
    card = read_card(card_file)
    if card.get("sha256") not in (None, digest):
        raise WeightsError(
            f"{path}: sha256 {digest[:12]}… differs from its card {card_file.name} "
            f"({card['sha256'][:12]}…); the file is corrupt or was replaced, restore it"
        )
    try:
        payload = read_weights(path, data)
        name = payload.get("model") if name is None else name
        if payload.get("model") not in REGISTRY:
            raise WeightsError(f"{path}: names model {payload.get('model')!r}, which idcmap does not know "
                               f"({', '.join(sorted(REGISTRY))}); pass weights written by `idcmap train`")
        if payload.get("model") != name:
            raise WeightsError(f"{path}: holds model {payload.get('model')!r}, not {name!r}; pick --model accordingly")
        network = build_model(name)
        try:
            network.load_state_dict(payload["state_dict"])
        except RuntimeError as err:
            raise WeightsError(f"{path}: its tensors do not fit the {name!r} architecture "
                               "(made by another idcmap version?); retrain or restore the file") from err
        mean, std = _channel_statistics(payload, "mean"), _channel_statistics(payload, "std")
        if min(std) <= 0:
            raise ValueError(f"its std {std} must be above 0")
        calibration = Calibration(**payload.get("calibration", {}))
        unusable = calibration.problem()
        if unusable:
            raise WeightsError(f"{path}: {unusable}; restore the file, or retrain the model")
        colour = payload.get("colour_reference")
        try:
            colour = ColourReference.from_stored(colour) if colour is not None else None
        except ValueError as err:
            raise WeightsError(f"{path}: {err}; restore the file, or retrain the model") from err
    except WeightsError:
        raise
    except Exception as err:  # torch raises many types for a bad file
        raise WeightsError(f"{path}: cannot load weights ({err}); restore the file") from err
    network.eval()
    return LoadedModel(
        name=name,
        network=network,
        mean=mean,
        std=std,
        calibration=calibration,
        sha256=digest,
        card=card,
        path=path,
        colour_reference=colour,
    )
