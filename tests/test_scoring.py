"""idcmap.scoring: shapes and ranges, determinism, batch and backend independence, no label leak,
and the context model's fallback for isolated patches."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import MODEL_NAME, grid_patches, make_patient, textured, write_tiny_weights
from idcmap.errors import IdcmapError, OptionError, WeightsError
from idcmap.loader import load_slide
from idcmap.models import REGISTRY, load_model
from idcmap.scoring import (Scorer, ieee_fp32_convolutions, onnx_available, padded_batch, resolve_device,
                            smooth_on_grid, smoothing_reach, to_input)


def _block(rows=5, cols=6, label_of=lambda r, c: (r + c) % 2, offset=(0, 0)):
    patches = grid_patches(rows, cols, label_of=label_of, pixels_of=lambda r, c: textured(r * 31 + c, base=90 + 10 * c))
    moved = {(x + offset[0], y + offset[1]): value for (x, y), value in patches.items()}
    # an edge patch on the right
    moved[(cols * 50 + 1 + offset[0], 1 + offset[1])] = (1, textured(999, width=34))
    return moved


@pytest.fixture
def slide(tmp_path):
    return load_slide(make_patient(tmp_path, "P", _block()))


TRAINED = "cancernet-context-wide"  # shipped weights: a tiny random network scores all patches nearly alike


def _trained(**options) -> Scorer:
    """A CPU scorer of the shipped, trained `TRAINED` weights, whose scores tell `_block`'s patches
    apart (a spread of about 0.2 in probability), so that a mix-up of patches shows."""
    return Scorer(load_model(TRAINED), device="cpu", **options)


def _assert_same_scores(got, expected, atol=1e-5):
    assert np.ptp(expected.patch_probability) > 0.1 and np.ptp(expected.probability) > 0.05
    np.testing.assert_allclose(got.probability, expected.probability, atol=atol, rtol=0)
    np.testing.assert_allclose(got.patch_probability, expected.patch_probability, atol=atol, rtol=0)


def test_scores_shapes_and_ranges(cpu_scorer, slide):
    scores = cpu_scorer.score(slide)
    n = len(slide)
    for name in ("patch_logit", "logit", "patch_probability", "probability"):
        value = getattr(scores, name)
        assert value.shape == (n,), name
        assert value.dtype == np.float32, name
        assert np.isfinite(value).all(), name
    assert ((scores.probability >= 0) & (scores.probability <= 1)).all()
    assert ((scores.patch_probability >= 0) & (scores.patch_probability <= 1)).all()
    np.testing.assert_allclose(scores.probability, 1 / (1 + np.exp(-scores.logit.astype(np.float64))), atol=1e-6)
    np.testing.assert_allclose(scores.patch_probability, 1 / (1 + np.exp(-scores.patch_logit.astype(np.float64))),
                               atol=1e-6)
    assert np.ptp(scores.probability) > 0  # different patches, different scores


def test_scoring_is_deterministic(cpu_scorer, slide):
    first = cpu_scorer.score(slide)
    second = cpu_scorer.score(slide)
    np.testing.assert_array_equal(first.probability, second.probability)
    np.testing.assert_array_equal(first.patch_probability, second.patch_probability)


def test_fresh_scorer_gives_same_scores(tiny_weights, cpu_scorer, slide):
    other = Scorer(load_model(MODEL_NAME, tiny_weights), device="cpu", backend=cpu_scorer.backend)
    np.testing.assert_array_equal(other.score(slide).probability, cpu_scorer.score(slide).probability)


@pytest.mark.parametrize("batch_size", [1, 7])
def test_batch_size_does_not_change_scores(slide, batch_size):
    _assert_same_scores(_trained(batch_size=batch_size).score(slide), _trained().score(slide))


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_onnx_and_torch_backends_agree(slide):
    _assert_same_scores(_trained(backend="onnx").score(slide), _trained(backend="torch").score(slide))


def test_labels_cannot_reach_the_inputs(cpu_scorer, tmp_path):
    patches = _block()
    flipped = {xy: (1 - label, pixels) for xy, (label, pixels) in patches.items()}
    unlabelled = {xy: (None, pixels) for xy, (_, pixels) in patches.items()}
    a = load_slide(make_patient(tmp_path / "a", "P", patches))
    b = load_slide(make_patient(tmp_path / "b", "P", flipped))
    c = load_slide(make_patient(tmp_path / "c", "P", unlabelled, layout="flat"))
    assert (a.labels != b.labels).all() and not c.has_labels
    sa, sb, sc = cpu_scorer.score(a), cpu_scorer.score(b), cpu_scorer.score(c)
    np.testing.assert_array_equal(sa.probability, sb.probability)
    np.testing.assert_array_equal(sa.probability, sc.probability)
    np.testing.assert_array_equal(sa.patch_probability, sb.patch_probability)


def test_scores_do_not_depend_on_where_the_slide_sits(cpu_scorer, tmp_path):
    here = load_slide(make_patient(tmp_path / "a", "P", _block()))
    there = load_slide(make_patient(tmp_path / "b", "P", _block(offset=(1000, 500))))
    np.testing.assert_allclose(cpu_scorer.score(here).probability, cpu_scorer.score(there).probability,
                               atol=1e-6, rtol=0)


def test_isolated_patches_keep_their_patch_probability(cpu_scorer, tmp_path):
    assert cpu_scorer.network.context is not None
    # cells (0,0), (0,4), (4,0), (4,4), (8,9): no other patch within 3 cells
    cells = [(0, 0), (0, 4), (4, 0), (4, 4), (8, 9)]
    patches = {(c * 50 + 1, r * 50 + 1): (i % 2, textured(50 + i)) for i, (r, c) in enumerate(cells)}
    slide = load_slide(make_patient(tmp_path, "P", patches))
    scores = cpu_scorer.score(slide)
    np.testing.assert_array_equal(scores.logit, scores.patch_logit)
    np.testing.assert_array_equal(scores.probability, scores.patch_probability)


def test_neighbours_within_reach_do_change_the_score(cpu_scorer, tmp_path):
    # two patches 3 cells apart (within reach) and one far away
    cells = [(0, 0), (0, 3), (9, 9)]
    patches = {(c * 50 + 1, r * 50 + 1): (0, textured(70 + i)) for i, (r, c) in enumerate(cells)}
    slide = load_slide(make_patient(tmp_path, "P", patches))
    scores = cpu_scorer.score(slide)
    order = [tuple(rc) for rc in slide.cells.tolist()]
    near = [order.index((0, 0)), order.index((0, 3))]
    far = order.index((9, 9))
    assert (scores.logit[near] != scores.patch_logit[near]).all()
    assert scores.logit[far] == scores.patch_logit[far]


def test_patch_scores_do_not_depend_on_other_patches(tmp_path):
    patches = _block()
    full = load_slide(make_patient(tmp_path / "a", "P", patches))
    keep = dict(list(patches.items())[:5])
    part = load_slide(make_patient(tmp_path / "b", "P", keep))
    scorer = _trained()
    full_scores, part_scores = scorer.score(full), scorer.score(part)
    assert np.ptp(part_scores.patch_logit) > 0.1
    index = {tuple(xy): i for i, xy in enumerate(full.xy.tolist())}
    for j, xy in enumerate(part.xy.tolist()):
        assert part_scores.patch_logit[j] == pytest.approx(full_scores.patch_logit[index[tuple(xy)]], abs=1e-5)


def test_temperatures_are_applied(tmp_path, slide):
    path = write_tiny_weights(tmp_path / "t.pt", calibration={"temperature": 2.0, "patch_temperature": 3.0})
    scores = Scorer(load_model(MODEL_NAME, path), device="cpu").score(slide)
    logit, patch_logit = scores.logit.astype(np.float64), scores.patch_logit.astype(np.float64)
    assert scores.refined.all()  # a 5 x 6 block: every patch has neighbours
    np.testing.assert_allclose(scores.probability, 1 / (1 + np.exp(-logit / 2.0)), atol=1e-6)
    np.testing.assert_allclose(scores.patch_probability, 1 / (1 + np.exp(-patch_logit / 3.0)), atol=1e-6)


def test_isolated_patches_use_the_patch_temperature(tmp_path):
    path = write_tiny_weights(tmp_path / "t.pt", calibration={"temperature": 2.0, "patch_temperature": 3.0})
    # a 2 x 2 block and one patch far from it
    patches = grid_patches(2, 2)
    patches[(20 * 50 + 1, 20 * 50 + 1)] = (0, textured(7))
    slide = load_slide(make_patient(tmp_path, "P", patches))
    scores = Scorer(load_model(MODEL_NAME, path), device="cpu").score(slide)
    far = np.flatnonzero(slide.xy[:, 0] == 20 * 50 + 1)
    assert scores.refined.tolist() == [i not in far for i in range(len(slide))]
    np.testing.assert_allclose(scores.probability[far], scores.patch_probability[far])
    np.testing.assert_allclose(scores.patch_probability[far], 1 / (1 + np.exp(-scores.patch_logit[far] / 3.0)),
                               atol=1e-6)


def test_patch_only_model_has_equal_outputs(tmp_path, slide):
    path = write_tiny_weights(tmp_path / "c.pt", model="cancernet")
    scores = Scorer(load_model("cancernet", path), device="cpu").score(slide)
    np.testing.assert_array_equal(scores.logit, scores.patch_logit)
    np.testing.assert_array_equal(scores.probability, scores.patch_probability)


def test_scorer_refusals(tiny_weights):
    model = load_model(MODEL_NAME, tiny_weights)
    with pytest.raises(IdcmapError):
        Scorer(model, device="cpu", backend="tensorrt")
    with pytest.raises(IdcmapError):
        Scorer(model, device="tpu")
    with pytest.raises(IdcmapError):
        Scorer(model, device="cpu", batch_size=-1, backend="torch")
    if not torch.cuda.is_available():
        with pytest.raises(IdcmapError):
            resolve_device("cuda")
        with pytest.raises(IdcmapError):
            Scorer(model, device="cuda")
    if not onnx_available():
        with pytest.raises(IdcmapError):
            Scorer(model, device="cpu", backend="onnx")
    assert resolve_device("cpu") == torch.device("cpu")


def test_batch_size_zero_is_refused(tiny_weights):
    with pytest.raises(IdcmapError):
        Scorer(load_model(MODEL_NAME, tiny_weights), device="cpu", batch_size=0, backend="torch")


CONTEXT_MODELS = sorted(name for name, spec in REGISTRY.items() if spec.context_dilations is not None)


def _cells_slide(root, cells, seed=0):
    patches = {(c * 50 + 1, r * 50 + 1): (0, textured(seed + i)) for i, (r, c) in enumerate(cells)}
    return load_slide(make_patient(root, "P", patches))


@pytest.mark.parametrize("name", CONTEXT_MODELS)
def test_context_reach_of_each_context_model(name, tmp_path):
    model = load_model(name, write_tiny_weights(tmp_path / "m.pt", model=name))
    reach = model.network.context.reach
    assert reach >= 1
    scorer = Scorer(model, device="cpu", backend="torch")
    step = reach + 1
    # isolated: every other patch more than `reach` cells away -> exactly the patch score
    isolated = _cells_slide(tmp_path / "a", [(0, 0), (0, step), (step, 0), (step, step)])
    scores = scorer.score(isolated)
    np.testing.assert_array_equal(scores.logit, scores.patch_logit)
    np.testing.assert_array_equal(scores.probability, scores.patch_probability)
    # exactly `reach` cells apart: the context applies
    near = scorer.score(_cells_slide(tmp_path / "b", [(0, 0), (0, reach)]))
    assert (near.logit != near.patch_logit).all()


@pytest.mark.parametrize("name", CONTEXT_MODELS)
def test_patches_beyond_reach_do_not_change_context_scores(name, tmp_path):
    model = load_model(name, write_tiny_weights(tmp_path / "m.pt", model=name))
    step = model.network.context.reach + 1
    scorer = Scorer(model, device="cpu", backend="torch")
    pair = [(0, 0), (1, 1)]
    alone = scorer.score(_cells_slide(tmp_path / "c", pair))
    with_far = scorer.score(_cells_slide(tmp_path / "d", pair + [(1, 1 + step)]))
    np.testing.assert_allclose(with_far.logit[:2], alone.logit, atol=1e-5, rtol=0)


# ----------------------------------------------------------------------------------------------
# smoothing over the slide grid (the fitted second stage)


def test_has_neighbours_matches_brute_force(tmp_path):
    from idcmap.scoring import has_neighbours

    cells = [(0, 0), (0, 1), (3, 3), (5, 7), (7, 7), (9, 0)]
    slide = load_slide(make_patient(tmp_path, "P", {(c * 50 + 1, r * 50 + 1): (0, textured(i)) for i, (r, c) in
                                                    enumerate(cells)}))
    rc = slide.cells.tolist()
    for reach in (0, 1, 2, 3):
        expected = [any(max(abs(a - c), abs(b - d)) <= reach and (a, b) != (c, d) for c, d in rc) for a, b in rc]
        assert has_neighbours(slide, reach).tolist() == expected, reach


def test_smoothing_keeps_constant_fields_and_ignores_gaps(tmp_path):
    from idcmap.scoring import smooth_on_grid

    slide = load_slide(make_patient(tmp_path, "P", grid_patches(6, 7, skip={(2, 3), (0, 0), (5, 6)})))
    constant = np.full(len(slide), -1.25, dtype=np.float32)
    np.testing.assert_allclose(smooth_on_grid(slide, constant, 1.5), constant, atol=1e-6)
    values = np.random.default_rng(0).normal(size=len(slide)).astype(np.float32)
    np.testing.assert_array_equal(smooth_on_grid(slide, values, 0.0), values)
    smoothed = smooth_on_grid(slide, values, 1.0)
    assert smoothed.std() < values.std()
    assert values.min() <= smoothed.min() and smoothed.max() <= values.max()  # a weighted mean of real patches


def test_smoothing_refines_and_falls_back(tmp_path):
    from idcmap.models import Calibration
    from idcmap.scoring import calibrated_scores, smoothing_reach

    patches = grid_patches(3, 3)
    patches[(30 * 50 + 1, 30 * 50 + 1)] = (0, textured(5))  # far from the block
    slide = load_slide(make_patient(tmp_path, "P", patches))
    rng = np.random.default_rng(1)
    patch_logit = rng.normal(size=len(slide)).astype(np.float32)
    calibration = Calibration(temperature=2.0, patch_temperature=3.0, smoothing_sigma=1.0)
    assert smoothing_reach(1.0) == 3 and smoothing_reach(0.0) == 0
    scores = calibrated_scores(slide, patch_logit, patch_logit, 0, calibration)
    far = slide.xy[:, 0] == 30 * 50 + 1
    assert scores.refined.tolist() == (~far).tolist()
    assert scores.logit[far] == pytest.approx(patch_logit[far])
    assert ((scores.probability >= 0) & (scores.probability <= 1)).all()
    np.testing.assert_allclose(scores.probability[far], 1 / (1 + np.exp(-patch_logit[far] / 3.0)), atol=1e-6)
    np.testing.assert_allclose(scores.probability[~far], 1 / (1 + np.exp(-scores.logit[~far] / 2.0)), atol=1e-6)


def test_padded_batch_keeps_the_patches_and_adds_zero_ones():
    x = torch.rand(5, 3, 50, 50).contiguous(memory_format=torch.channels_last)
    padded = padded_batch(x, 8)
    assert padded.shape == (8, 3, 50, 50)
    assert padded.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded[:5], x) and not padded[5:].any()
    full = torch.rand(8, 3, 50, 50)
    assert padded_batch(full, 8) is full


@pytest.mark.parametrize("batch_size", [4, 7, 512])
def test_padded_last_batch_gives_the_same_scores(slide, batch_size):
    """The GPU path pads each slide's last batch to the batch size; the real patches' scores stay
    as they were (the network scores each patch on its own in eval mode)."""
    plain = _trained(batch_size=batch_size, backend="torch")
    padded = _trained(batch_size=batch_size, backend="torch")
    padded.fixed_batch_shape = True
    assert len(slide) % batch_size or batch_size == 512  # a short last batch to pad
    _assert_same_scores(padded.score(slide), plain.score(slide))


def test_ieee_fp32_convolutions_restores_the_setting():
    conv = torch.backends.cudnn.conv
    before = conv.fp32_precision
    with ieee_fp32_convolutions(True):
        assert conv.fp32_precision == "ieee"
    assert conv.fp32_precision == before
    with ieee_fp32_convolutions(False):
        assert conv.fp32_precision == before
    with pytest.raises(RuntimeError), ieee_fp32_convolutions(True):
        raise RuntimeError("scoring failed")
    assert conv.fp32_precision == before


@pytest.mark.parametrize("device, message", [
    ("cuda:x", "choose auto, cpu, cuda or cuda:N"),
    ("gpu", "choose auto, cpu, cuda or cuda:N"),
    ("cuda:99", "cuda:99: "),  # named as given, whether or not a GPU is visible
])
def test_device_errors_name_the_device_as_given(device, message):
    with pytest.raises(OptionError) as err:
        resolve_device(device)
    assert message in str(err.value)


def test_jobs_set_torch_threads_while_scoring_only(tiny_weights, slide):
    """--jobs N runs PyTorch on N threads while the scorer scores, and leaves the process's setting
    as it was: a later scorer without --jobs gets every thread again."""
    before = torch.get_num_threads()
    seen = []
    one = Scorer(load_model(MODEL_NAME, tiny_weights), "cpu", backend="torch", threads=1)
    backbone = one.backbone
    one.backbone = lambda x: (seen.append(torch.get_num_threads()), backbone(x))[1]
    one.score(slide)
    assert seen == [1] and torch.get_num_threads() == before
    every = Scorer(load_model(MODEL_NAME, tiny_weights), "cpu", backend="torch")
    every.backbone = lambda x: (seen.append(torch.get_num_threads()), backbone(x))[1]
    every.score(slide)
    assert seen == [1, before]


@pytest.mark.skipif(not onnx_available(), reason="onnxruntime not installed")
def test_int8_network_onnx_runtime_cannot_load_is_one_clear_error(tiny_weights):
    with pytest.raises(WeightsError, match=r"int8\.onnx: ONNX Runtime .* cannot load it .*idcmap quantize"):
        Scorer(load_model(MODEL_NAME, tiny_weights), "cpu", backend="onnx-int8", int8_network=b"not an onnx model")


def test_to_input_normalises_each_channel_by_its_own_statistics_in_nchw_order():
    """S12 (mean channel order reversed) and S13 (height and width swapped)."""
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(3, 50, 50, 3), dtype=np.uint8)
    mean, std = torch.tensor([0.8, 0.6, 0.7]), torch.tensor([0.15, 0.22, 0.31])
    expected = (pixels.astype(np.float64) / 255.0 - mean.numpy()) / std.numpy()  # NHWC
    expected = expected.transpose(0, 3, 1, 2)  # NCHW: [n, channel, row, column]
    for channels_last in (True, False):
        got = to_input(torch.from_numpy(pixels), mean, std, channels_last=channels_last).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("backend", ["torch", "onnx"])
def test_scorer_feeds_the_network_the_normalised_patches(tmp_path, backend):
    """The patch logits are the network's output on (pixels/255 - mean) / std, channel by channel,
    patches upright: S12, S13 through the Scorer, for each backend."""
    if backend == "onnx" and not onnx_available():
        pytest.skip("onnxruntime not installed")
    model = load_model("cancernet-context-wide")  # shipped, trained: its patch scores spread out
    mean, std = list(model.mean), list(model.std)
    assert len(set(mean)) == 3 and len(set(std)) == 3  # a channel mix-up shows
    slide = load_slide(make_patient(tmp_path / "in", "P", grid_patches(2, 3, pixels_of=lambda r, c: textured(
        r * 3 + c, base=100 + 30 * c))))
    scores = Scorer(model, device="cpu", backend=backend).score(slide)
    x = (torch.from_numpy(slide.pixels).double() / 255 - torch.tensor(mean, dtype=torch.float64)) / torch.tensor(
        std, dtype=torch.float64)
    with torch.inference_mode():
        _, logit = model.network.backbone.float().eval()(x.permute(0, 3, 1, 2).float().contiguous())
    assert np.ptp(scores.patch_logit) > 0.1
    np.testing.assert_allclose(scores.patch_logit, logit.numpy(), atol=2e-4, rtol=0)


def test_smoothing_is_a_gaussian_mean_over_existing_patches_up_to_the_grid_edges(tmp_path):
    """S10 (mode "nearest"): cells on the grid's edge are weighted like any other."""
    cells = [(r, c) for r in range(4) for c in range(5) if (r, c) not in {(1, 2), (3, 0)}]
    slide = _cells_slide(tmp_path, cells)
    values = np.random.default_rng(3).normal(size=len(slide)).astype(np.float32)
    sigma = 1.0
    reach = smoothing_reach(sigma)
    rc = slide.cells
    expected = []
    for r, c in rc:
        d = np.abs(rc - [r, c])
        near = (d <= reach).all(axis=1)
        w = np.exp(-((d[near] ** 2).sum(axis=1)) / (2 * sigma ** 2))
        expected.append((w * values[near]).sum() / w.sum())
    np.testing.assert_allclose(smooth_on_grid(slide, values, sigma), expected, atol=1e-5, rtol=0)
