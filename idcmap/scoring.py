"""Score a slide's patches: batched inference on the CPU or the GPU, then the slide-grid context."""
from __future__ import annotations

import hashlib
import io
import logging
import os
import re
import tempfile
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from .colour import normalise_slide
from .errors import OptionError, WeightsError
from .loader import Slide
from .models import Calibration, LoadedModel, get_spec
from .progress import progress_bar

log = logging.getLogger(__name__)

DEFAULT_BATCH_SIZE = {"cpu": 512, "cuda": 1024}
BACKENDS = ("auto", "torch", "onnx", "onnx-int8")


def export_onnx(backbone: torch.nn.Module) -> bytes:
    """The patch network as ONNX bytes: input `x` (N, 3, 50, 50), outputs `features` and `logit`."""
    buffer = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(backbone.cpu().eval(), (torch.zeros(2, 3, 50, 50),), buffer, input_names=["x"],
                          output_names=["features", "logit"], dynamic_axes={"x": {0: "n"}}, dynamo=False)
    return buffer.getvalue()


def quantize_backbone(backbone: torch.nn.Module, inputs: np.ndarray) -> bytes:
    """The patch network quantised to int8 by ONNX Runtime (static, QDQ, per-channel weights),
    activation ranges calibrated on `inputs`: normalised (N, 3, 50, 50) float32 patches."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Batches(CalibrationDataReader):
        def __init__(self) -> None:
            self.batches = iter([{"x": inputs[i : i + 64]} for i in range(0, len(inputs), 64)])

        def get_next(self) -> dict | None:
            return next(self.batches, None)

    with tempfile.TemporaryDirectory() as folder:
        plain, prepared, quantised = (Path(folder) / name for name in ("plain.onnx", "prepared.onnx", "int8.onnx"))
        plain.write_bytes(export_onnx(backbone))
        quant_pre_process(str(plain), str(prepared))
        quantize_static(str(prepared), str(quantised), Batches(), quant_format=QuantFormat.QDQ, per_channel=True,
                        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, reduce_range=True)
        return quantised.read_bytes()


class OnnxBackbone:
    """A patch network in ONNX Runtime: 1.8-4.4x PyTorch eager (channels_last) on the 2-core CPU
    for CancerNet, 1.3x for ResNet-18, and 3.4x more for ResNet-18 in int8 (benchmarks/RESULTS.md).
    Returns (features, logits) like the torch module."""

    def __init__(self, onnx_model: bytes, threads: int | None = None, source: str = "the ONNX patch network",
                 remedy: str = "use --backend torch") -> None:
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = threads or usable_cores()
        options.log_severity_level = 3
        try:
            self.session = onnxruntime.InferenceSession(onnx_model, options, providers=["CPUExecutionProvider"])
        except Exception as error:  # onnxruntime's own classes (InvalidProtobuf, Fail, ...) derive from Exception
            reason = str(error).strip().splitlines()[0][:200] if str(error).strip() else type(error).__name__
            raise WeightsError(f"{source}: ONNX Runtime {onnxruntime.__version__} cannot load it ({reason}); "
                               f"{remedy}") from error

    def __call__(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features, logits = self.session.run(None, {"x": x.contiguous().numpy()})
        return torch.from_numpy(features), torch.from_numpy(logits)


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity, e.g. under taskset or a container's
    cpuset), not every core of the machine."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


@contextmanager
def torch_threads(threads: int | None) -> Iterator[None]:
    """PyTorch's CPU threads set to `threads` (None: left as they are) while inside, then restored:
    one scorer's --jobs does not stay behind for the rest of the process."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        if threads is not None:
            torch.set_num_threads(before)


def onnx_available() -> bool:
    """True when ONNX Runtime and the ONNX exporter can be imported."""
    try:
        import onnx  # noqa: F401
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def resolve_device(device: str = "auto") -> torch.device:
    """`auto` is cuda when a GPU is visible, else cpu; asking for cuda without one is an error."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device != "cpu" and not re.fullmatch(r"cuda(:\d+)?", device):
        raise OptionError(f"--device {device}: choose auto, cpu, cuda or cuda:N")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise OptionError(f"--device {device}: no CUDA GPU is visible here; use --device cpu or auto")
    if device.startswith("cuda:") and int(device[5:]) >= (count := torch.cuda.device_count()):
        raise OptionError(f"--device {device}: only {count} CUDA GPU(s) are visible (cuda:0 to cuda:{count - 1})")
    return torch.device(device)


def padded_batch(x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """`x` with zero patches appended up to `batch_size` (channels_last). On a GPU each new batch
    shape costs a kernel choice (about 1 s for CancerNet on an H100, benchmarks/RESULTS.md), and
    every slide's last batch would be a new shape; padded, a run sees one shape."""
    if len(x) >= batch_size:
        return x
    return torch.cat([x, x.new_zeros((batch_size - len(x), *x.shape[1:]))]).contiguous(memory_format=torch.channels_last)


@contextmanager
def ieee_fp32_convolutions(enabled: bool) -> Iterator[None]:
    """cuDNN convolutions in full fp32 while `enabled`. PyTorch runs them in TF32 by default, which
    put an H100's probabilities 1.2e-4 from CPU PyTorch fp32 (5e-7 in full fp32; benchmarks/RESULTS.md)."""
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    if enabled:
        conv.fp32_precision = "ieee"
    try:
        yield
    finally:
        conv.fp32_precision = before


def to_input(pixels: torch.Tensor, mean: torch.Tensor, std: torch.Tensor, channels_last: bool = True) -> torch.Tensor:
    """uint8 NHWC patches -> normalised float NCHW: in channels_last memory (the NHWC memory order)
    or, with `channels_last=False`, contiguous NCHW as ONNX Runtime takes it (the uint8 bytes are
    transposed before the conversion, a quarter of the bytes a float transpose moves)."""
    x = pixels.permute(0, 3, 1, 2)
    if not channels_last:
        x = x.contiguous()
    x = x.float().div_(255.0)
    return x.sub_(mean.view(1, 3, 1, 1)).div_(std.view(1, 3, 1, 1))


@dataclass
class SlideScores:
    """IDC logits and calibrated probabilities per patch: from the patch alone and with slide context."""

    patch_logit: np.ndarray  # (N,) float32, the patch network's output
    context_logit: np.ndarray  # (N,) float32, after the context head (= patch_logit without one)
    logit: np.ndarray  # (N,) float32, final: context_logit smoothed over the slide grid
    patch_probability: np.ndarray  # (N,) float32, patch network alone, calibrated
    probability: np.ndarray  # (N,) float32, the model's calibrated final score
    refined: np.ndarray  # (N,) bool, patches with a neighbour within the context head's or the smoothing's reach
    colour_normalised: bool = False  # the patch network saw the slide's colour-normalised pixels


SMOOTHING_TRUNCATE = 2.5
"""The Gaussian smoothing reaches round(2.5 sigma) cells; patches with no neighbour that near keep their own logit."""


def smoothing_reach(sigma: float) -> int:
    """Cells on each side that a Gaussian of `sigma` cells reaches (0 for no smoothing)."""
    return int(SMOOTHING_TRUNCATE * sigma + 0.5) if sigma > 0 else 0


def _box_sum(grid: np.ndarray, radius: int) -> np.ndarray:
    """Sum of `grid` over the (2 radius + 1)^2 square around each cell, zero beyond the edges."""
    table = np.pad(grid, radius + 1).cumsum(0).cumsum(1)
    size = 2 * radius + 1
    rows, cols = grid.shape
    window = table[size:, size:] - table[:-size, size:] - table[size:, :-size] + table[:-size, :-size]
    return window[:rows, :cols]


def has_neighbours(slide: Slide, reach: int) -> np.ndarray:
    """(N,) bool: patches with another patch within `reach` cells (square neighbourhood)."""
    if reach <= 0 or len(slide) == 0:
        return np.zeros(len(slide), dtype=bool)
    counts = _box_sum(slide.grid_values(np.ones(len(slide)), fill=0.0), reach)
    rc = slide.cells
    return counts[rc[:, 0], rc[:, 1]] > 1.5


def smooth_on_grid(slide: Slide, values: np.ndarray, sigma: float) -> np.ndarray:
    """Mean of `values` over the slide grid weighted by a Gaussian of `sigma` cells, over the
    patches that exist (gaps and the slide's outside do not pull values towards anything)."""
    if sigma <= 0:
        return values.astype(np.float32)
    from scipy.ndimage import gaussian_filter

    options = {"sigma": sigma, "mode": "constant", "truncate": SMOOTHING_TRUNCATE}
    weighted = gaussian_filter(slide.grid_values(values.astype(np.float64), fill=0.0), **options)
    weight = gaussian_filter(slide.grid_values(np.ones(len(slide)), fill=0.0), **options)
    rc = slide.cells
    return (weighted[rc[:, 0], rc[:, 1]] / weight[rc[:, 0], rc[:, 1]]).astype(np.float32)


def calibrated_scores(slide: Slide, patch_logit: np.ndarray, context_logit: np.ndarray, context_reach: int,
                      calibration: Calibration) -> SlideScores:
    """Final logits and calibrated probabilities: the context logits smoothed over the grid, each
    over its temperature. A patch with no neighbour within the context head's reach or the
    smoothing's falls back to the patch network's calibrated probability (sparse samples)."""
    patch_logit = patch_logit.astype(np.float32)
    logit = smooth_on_grid(slide, context_logit, calibration.smoothing_sigma)
    refined = has_neighbours(slide, max(context_reach, smoothing_reach(calibration.smoothing_sigma)))
    patch_probability = _sigmoid(patch_logit / calibration.patch_temperature)
    probability = np.where(refined, _sigmoid(logit / calibration.temperature), patch_probability)
    return SlideScores(patch_logit, context_logit.astype(np.float32), logit, patch_probability,
                       probability.astype(np.float32), refined)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return np.exp(-np.logaddexp(0.0, -z.astype(np.float64))).astype(np.float32)


def stored_int8_model(model: LoadedModel) -> tuple[bytes | None, str]:
    """(the int8 ONNX patch network stored beside `model`'s weights, "") when its model card lists
    it for these very weights; (None, why not) otherwise."""
    path = model.int8_path
    weights = f" --weights {model.path}" if model.path is not None and model.path != get_spec(model.name).weights_path else ""
    remedy = f"run `idcmap quantize DATA_ROOT --model {model.name}{weights}` or use --backend onnx"
    if path is None or not path.is_file():
        return None, f"{path or model.name}: no int8 patch network for {model.name}; {remedy}"
    try:
        data = path.read_bytes()
    except OSError as err:
        return None, f"{path}: unreadable ({err.strerror}); {remedy}"
    record = model.card.get("int8", {})
    if record.get("weights_sha256") != model.sha256 or record.get("sha256") != hashlib.sha256(data).hexdigest():
        return None, f"{path}: not made from these weights (its model card does not list it for them); {remedy}"
    return data, ""


class Scorer:
    """Holds one model on one device; scores slide after slide without reloading.

    backend `auto` runs the patch network in ONNX Runtime on the CPU (when installed): in int8
    when `idcmap quantize` stored an int8 network for these weights (`onnx-int8`), else in fp32
    (`onnx`); on the GPU in PyTorch. The context head always runs in PyTorch. `threads` caps the
    CPU threads of either runtime (default: every core). `int8_network` (ONNX bytes) replaces the
    stored int8 network, for checking a new one before it is stored. `mixed_precision` (GPU only) runs the
    patch network under fp16 autocast; the default fp32 keeps GPU and CPU probabilities within
    1e-4 of each other.
    """

    def __init__(self, model: LoadedModel, device: str = "auto", batch_size: int | None = None,
                 mixed_precision: bool = False, backend: str = "auto", threads: int | None = None,
                 int8_network: bytes | None = None) -> None:
        self.model = model
        self.device = resolve_device(device)
        if backend not in BACKENDS:
            raise OptionError(f"--backend {backend}: choose one of {', '.join(BACKENDS)}")
        if backend.startswith("onnx") and (self.device.type != "cpu" or not onnx_available()):
            raise OptionError(f"--backend {backend} needs --device cpu and the onnxruntime package (pip install onnxruntime)")
        int8 = int8_network
        if int8 is None and backend in ("auto", "onnx-int8") and self.device.type == "cpu" and onnx_available():
            int8, why_not = stored_int8_model(model)
            if int8 is None and backend == "onnx-int8":
                raise WeightsError(why_not)
            if int8 is None and model.int8_path is not None and model.int8_path.is_file():
                log.warning("%s; scoring in fp32", why_not)
        if backend == "auto":
            backend = "torch" if self.device.type != "cpu" or not onnx_available() else "onnx-int8" if int8 else "onnx"
        self.backend = backend
        self.int8_sha256 = hashlib.sha256(int8).hexdigest() if backend == "onnx-int8" else None
        self.batch_size = DEFAULT_BATCH_SIZE[self.device.type] if batch_size is None else batch_size
        if self.batch_size < 1:
            raise OptionError(f"--batch-size {self.batch_size}: must be at least 1")
        self.autocast = mixed_precision and self.device.type == "cuda"
        if mixed_precision and not self.autocast:
            log.warning("--mixed-precision applies on a GPU only; scoring on the %s in fp32", self.device.type)
        self.network = model.network.to(self.device).to(memory_format=torch.channels_last).eval()
        if threads is not None and threads < 1:
            raise OptionError(f"--jobs {threads}: must be at least 1")
        self.threads = threads
        if backend == "onnx":
            self.backbone = OnnxBackbone(export_onnx(self.network.backbone), threads, f"{model.name} exported to ONNX",
                                         "use --backend torch")
        elif backend == "onnx-int8":
            self.backbone = OnnxBackbone(int8, threads, str(model.int8_path or "the int8 network"),
                                         "run `idcmap quantize` again with this ONNX Runtime, or use --backend onnx")
        else:
            self.backbone = self.network.backbone
        self.mean = torch.tensor(model.mean, device=self.device)
        self.std = torch.tensor(model.std, device=self.device)
        self.fixed_batch_shape = self.device.type == "cuda"  # pad every slide's last batch (see padded_batch)

    @property
    def runtime(self) -> dict:
        """How the patch network runs: what a render records beside its outputs."""
        return {"backend": self.backend, "int8_sha256": self.int8_sha256, "mixed_precision": self.autocast}

    @torch.inference_mode()
    def patch_outputs(self, pixels: np.ndarray, progress_label: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of the patch network for (N, 50, 50, 3) uint8 patches, on the scorer's
        device, in batches. On a GPU the patches go over in one copy, the last batch is padded to
        the batch size (`padded_batch`) and fp32 convolutions run in full fp32."""
        patches = torch.from_numpy(pixels).to(self.device)
        features, logits = [], []
        starts = range(0, len(patches), self.batch_size)
        with ieee_fp32_convolutions(self.device.type == "cuda" and not self.autocast), torch_threads(self.threads):
            for start in progress_bar(starts, progress_label is not None, desc=f"score {progress_label}", unit="batch",
                                      leave=False):
                x = to_input(patches[start : start + self.batch_size], self.mean, self.std,
                             channels_last=self.backend == "torch")
                n = len(x)
                if self.fixed_batch_shape:
                    x = padded_batch(x, self.batch_size)
                with torch.autocast(self.device.type, dtype=torch.float16, enabled=self.autocast):
                    f, logit = self.backbone(x)
                features.append(f[:n].float())
                logits.append(logit[:n].float())
        return torch.cat(features), torch.cat(logits)

    @torch.inference_mode()
    def context_logits(self, slide: Slide, features: torch.Tensor, patch_logits: torch.Tensor) -> torch.Tensor:
        """The context head's logits over `slide`'s grid (the patch logits for a model without one)."""
        if self.network.context is None:
            return patch_logits
        cells = torch.from_numpy(slide.cells).to(self.device)
        index = torch.cat([torch.zeros_like(cells[:, :1]), cells], dim=1)
        with ieee_fp32_convolutions(self.device.type == "cuda"), torch_threads(self.threads):
            return self.network.context(features, patch_logits, index, (1, *slide.grid_shape))

    def score(self, slide: Slide, progress: bool = False) -> SlideScores:
        """Score every patch of `slide`; deterministic for a given device and batch size. A model
        with a colour reference scores the slide's colour-normalised pixels."""
        seen = normalise_slide(slide, self.model.colour_reference).pixels
        features, patch_logit = self.patch_outputs(seen, slide.patient if progress else None)
        context_logit = self.context_logits(slide, features, patch_logit)
        if not (torch.isfinite(patch_logit).all() and torch.isfinite(context_logit).all()):
            raise WeightsError(f"{self.model.path or self.model.name}: gives NaN or infinite scores on {slide.patient}, "
                               "so its weights are broken (from a training run that diverged?); train it again, "
                               "or use other weights")
        scores = calibrated_scores(slide, patch_logit.cpu().numpy(), context_logit.cpu().numpy(),
                                   self.network.context_reach, self.model.calibration)
        scores.colour_normalised = seen is not slide.pixels
        return scores
