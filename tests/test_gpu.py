"""The GPU path against the CPU: same probabilities within 1e-4 in fp32, 1e-3 with fp16 autocast.

Runs only where a CUDA GPU is visible (skipped, saying so, elsewhere)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import grid_patches, make_patient, textured
from idcmap.loader import load_slide
from idcmap.models import load_model
from idcmap.scoring import Scorer

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA GPU visible: the GPU path is not checked")


@pytest.fixture(scope="module")
def slide(tmp_path_factory):
    patches = grid_patches(12, 14, label_of=lambda r, c: int(c < 5), pixels_of=lambda r, c: textured(r * 14 + c))
    patches[(14 * 50 + 1, 1)] = (0, textured(999, width=23))  # an edge patch
    return load_slide(make_patient(tmp_path_factory.mktemp("gpu"), "P", patches))


@pytest.mark.parametrize("model", ["cancernet", "cancernet-context-wide", "resnet18-context"])
def test_gpu_matches_cpu(slide, model):
    """The shipped (trained) weights: randomly initialised CancerNets give every patch nearly the
    same score, so a GPU path that mixed patches up would pass unseen."""
    cpu = Scorer(load_model(model), device="cpu", backend="torch").score(slide)
    assert np.ptp(cpu.patch_probability) > 0.05  # scores that tell patches apart
    gpu = Scorer(load_model(model), device="cuda").score(slide)
    half = Scorer(load_model(model), device="cuda", mixed_precision=True).score(slide)
    np.testing.assert_allclose(gpu.probability, cpu.probability, atol=1e-4)
    np.testing.assert_allclose(gpu.patch_probability, cpu.patch_probability, atol=1e-4)
    np.testing.assert_allclose(half.probability, cpu.probability, atol=1e-3)
    assert (gpu.refined == cpu.refined).all()


def _recording(scorer: Scorer, seen: list) -> Scorer:
    """`scorer` with its patch network noting, at each batch, cuDNN's fp32 precision and whether
    fp16 autocast is on."""
    backbone = scorer.backbone

    def run(x):
        seen.append((torch.backends.cudnn.conv.fp32_precision, torch.is_autocast_enabled("cuda")
                     and torch.get_autocast_dtype("cuda") == torch.float16))
        return backbone(x)
    scorer.backbone = run
    return scorer


def test_gpu_batches_and_precision_setting(slide):
    """Several batches with a padded last one give the CPU's scores; fp32 scoring runs cuDNN in
    full fp32 (not TF32) and --mixed-precision under fp16 autocast; scoring leaves the cuDNN fp32
    precision setting as it found it."""
    before = torch.backends.cudnn.conv.fp32_precision
    cpu = Scorer(load_model("resnet18-context"), device="cpu", backend="torch").score(slide)
    seen, seen_half = [], []
    gpu = _recording(Scorer(load_model("resnet18-context"), device="cuda", batch_size=64), seen).score(slide)
    _recording(Scorer(load_model("resnet18-context"), device="cuda", mixed_precision=True), seen_half).score(slide)
    assert len(slide) % 64 and len(seen) == -(-len(slide) // 64)
    np.testing.assert_allclose(gpu.probability, cpu.probability, atol=1e-4)
    assert set(seen) == {("ieee", False)} and set(seen_half) == {(before, True)}
    assert torch.backends.cudnn.conv.fp32_precision == before
