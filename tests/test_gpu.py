"""The GPU path against the CPU: same probabilities within 1e-4 in fp32, 1e-3 with fp16 autocast.

Runs only where a CUDA GPU is visible (skipped, saying so, elsewhere)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import grid_patches, make_patient, textured, write_tiny_weights
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
def test_gpu_matches_cpu(tmp_path, slide, model):
    weights = write_tiny_weights(tmp_path / f"{model}.pt", model=model,
                                 calibration={"threshold": 0.5, "smoothing_sigma": 1.0})
    cpu = Scorer(load_model(model, weights), device="cpu").score(slide)
    gpu = Scorer(load_model(model, weights), device="cuda").score(slide)
    half = Scorer(load_model(model, weights), device="cuda", mixed_precision=True).score(slide)
    np.testing.assert_allclose(gpu.probability, cpu.probability, atol=1e-4)
    np.testing.assert_allclose(gpu.patch_probability, cpu.patch_probability, atol=1e-4)
    np.testing.assert_allclose(half.probability, cpu.probability, atol=1e-3)
    assert (gpu.refined == cpu.refined).all()


def test_gpu_batches_and_precision_setting(tmp_path, slide):
    """Several batches with a padded last one give the CPU's scores, and scoring leaves the cuDNN
    fp32 precision setting as it found it."""
    weights = write_tiny_weights(tmp_path / "resnet18-context.pt", model="resnet18-context",
                                 calibration={"threshold": 0.5, "smoothing_sigma": 1.0})
    before = torch.backends.cudnn.conv.fp32_precision
    cpu = Scorer(load_model("resnet18-context", weights), device="cpu").score(slide)
    gpu = Scorer(load_model("resnet18-context", weights), device="cuda", batch_size=64).score(slide)
    assert len(slide) % 64
    np.testing.assert_allclose(gpu.probability, cpu.probability, atol=1e-4)
    assert torch.backends.cudnn.conv.fp32_precision == before
