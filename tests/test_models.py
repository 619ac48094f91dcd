"""idcmap.models: the registry, the networks' contracts, and the refusals of load_model."""
from __future__ import annotations

import json
import shutil

import pytest
import torch

from conftest import MODEL_NAME, write_tiny_weights
from idcmap import models
from idcmap.errors import WeightsError
from idcmap.models import REGISTRY, Calibration, build_model, card_path, get_spec, load_model, sha256_of


def test_registry_names():
    assert {"cancernet", "cancernet-context", "resnet18", "resnet18-context"} <= set(REGISTRY)
    assert models.DEFAULT_MODEL in REGISTRY
    for name, spec in REGISTRY.items():
        assert spec.name == name
        assert (spec.context_dilations is not None) == ("-context" in name), name
        assert spec.context == (name.endswith(("-context", "-context-wide", "-smooth"))), name
        assert spec.smoothing == spec.context  # every slide-aware model may smooth; patch-only ones never
        assert spec.weights_path == models.WEIGHTS_DIR / f"{name}.pt"
        assert spec.description


@pytest.mark.parametrize("name", sorted(n for n in REGISTRY if n.startswith("cancernet")))
def test_registry_builds_what_it_names(name):
    net = build_model(name)
    assert (net.context is not None) == (get_spec(name).context_dilations is not None)


def test_unknown_model_name():
    with pytest.raises(WeightsError) as info:
        get_spec("vgg16")
    assert "vgg16" in str(info.value) and "cancernet" in str(info.value)
    with pytest.raises(WeightsError):
        build_model("vgg16")
    with pytest.raises(WeightsError):
        load_model("vgg16")


@pytest.mark.parametrize("name", ["cancernet", "cancernet-context"])
def test_network_outputs(name):
    torch.manual_seed(0)
    net = build_model(name).eval()
    assert (net.context is not None) == name.endswith("-context")
    x = torch.randn(5, 3, 50, 50)
    with torch.no_grad():
        patch, context = net(x)
    assert patch.shape == context.shape == (5,)
    assert torch.equal(patch, context)  # without a grid both outputs are the patch logits


def test_load_model_round_trip(tmp_path):
    path = write_tiny_weights(tmp_path / "m.pt", calibration={"threshold": 0.3, "temperature": 1.5,
                                                              "min_region_cells": 2})
    loaded = load_model(MODEL_NAME, path)
    assert loaded.name == MODEL_NAME
    assert loaded.mean == (0.5, 0.5, 0.5) and loaded.std == (0.25, 0.25, 0.25)
    assert loaded.calibration == Calibration(temperature=1.5, threshold=0.3, min_region_cells=2)
    assert loaded.sha256 == sha256_of(path)
    assert loaded.card == {}
    assert not loaded.network.training
    torch.manual_seed(0)
    reference = build_model(MODEL_NAME).state_dict()
    for key, value in loaded.network.state_dict().items():
        assert torch.equal(value, reference[key]), key


def test_load_model_with_matching_card(tmp_path):
    path = write_tiny_weights(tmp_path / "m.pt")
    card_path(path).write_text(json.dumps({"sha256": sha256_of(path), "note": "hello"}))
    assert load_model(MODEL_NAME, path).card["note"] == "hello"


def test_wrong_sha256_in_card(tmp_path):
    path = write_tiny_weights(tmp_path / "m.pt")
    assert card_path(path) == tmp_path / "m.json"
    card_path(path).write_text(json.dumps({"sha256": "0" * 64}))
    with pytest.raises(WeightsError) as info:
        load_model(MODEL_NAME, path)
    assert str(path) in str(info.value)


def test_weights_changed_after_card_was_written(tmp_path):
    path = write_tiny_weights(tmp_path / "m.pt", seed=0)
    card_path(path).write_text(json.dumps({"sha256": sha256_of(path)}))
    write_tiny_weights(path, seed=1)  # replaced behind the card's back
    with pytest.raises(WeightsError):
        load_model(MODEL_NAME, path)


def test_missing_weights(tmp_path, monkeypatch):
    with pytest.raises(WeightsError) as info:
        load_model(MODEL_NAME, tmp_path / "absent.pt")
    assert "absent.pt" in str(info.value)
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path / "empty-weights")
    with pytest.raises(WeightsError):
        load_model("cancernet")
    with pytest.raises(WeightsError):
        load_model(MODEL_NAME, tmp_path)  # a folder is not a weights file


def test_default_weights_path_is_used(tmp_path, monkeypatch):
    monkeypatch.setattr(models, "WEIGHTS_DIR", tmp_path)
    write_tiny_weights(tmp_path / "cancernet.pt", model="cancernet")
    assert load_model("cancernet").name == "cancernet"


@pytest.mark.parametrize("content", [b"", b"not a torch file", b"PK\x03\x04" + b"\x00" * 100])
def test_corrupt_weights_file(tmp_path, content):
    path = tmp_path / "m.pt"
    path.write_bytes(content)
    with pytest.raises(WeightsError) as info:
        load_model(MODEL_NAME, path)
    assert str(path) in str(info.value)


def test_weights_of_another_model(tmp_path):
    path = write_tiny_weights(tmp_path / "m.pt", model="cancernet")
    with pytest.raises(WeightsError) as info:
        load_model(MODEL_NAME, path)
    assert "cancernet" in str(info.value)


def test_tensors_that_do_not_fit_the_architecture(tmp_path):
    path = write_tiny_weights(tmp_path / "m.pt", model=MODEL_NAME)
    payload = torch.load(path, weights_only=True)
    payload["model"] = "cancernet"  # claims the patch-only model but holds the context head too
    torch.save(payload, path)
    with pytest.raises(WeightsError):
        load_model("cancernet", path)


def test_truncated_weights_file(tmp_path):
    path = write_tiny_weights(tmp_path / "m.pt")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError):
        load_model(MODEL_NAME, path)


def test_corrupt_card_is_a_weights_error(tmp_path):
    path = write_tiny_weights(tmp_path / "m.pt")
    card_path(path).write_text('{"sha256": "abc"')  # cut short
    with pytest.raises(WeightsError):
        load_model(MODEL_NAME, path)


def test_checkpoint_without_normalisation_is_a_weights_error(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    models.save_checkpoint(path, {"model": MODEL_NAME, "state_dict": build_model(MODEL_NAME).state_dict()})
    with pytest.raises(WeightsError):
        load_model(MODEL_NAME, path)


def test_save_checkpoint_leaves_no_temp(tmp_path):
    path = write_tiny_weights(tmp_path / "sub" / "m.pt")
    assert [p.name for p in path.parent.iterdir()] == ["m.pt"]
    shutil.rmtree(path.parent)


def test_model_name_is_read_from_the_weights_file(tmp_path):
    from conftest import write_tiny_weights

    path = write_tiny_weights(tmp_path / "any-name.pt", model="cancernet-smooth")
    loaded = load_model(weights=path)
    assert loaded.name == "cancernet-smooth" and loaded.network.context is None
    with pytest.raises(WeightsError, match="holds model 'cancernet-smooth', not 'cancernet'"):
        load_model("cancernet", path)


def test_shipped_weights_format_round_trips_in_bfloat16(tmp_path):
    torch.manual_seed(0)
    state = build_model("resnet18").state_dict()
    payload = {"model": "resnet18", "state_dict": state, "mean": [0.5] * 3, "std": [0.25] * 3}
    plain, compact = tmp_path / "plain.pt", tmp_path / "compact.pt"
    models.save_checkpoint(plain, payload)
    models.save_weights(compact, payload)
    assert compact.stat().st_size < plain.stat().st_size / 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["compact.pt", "plain.pt"]  # no temp file left
    read = models.read_weights(compact)["state_dict"]
    expected = models.stored_precision(state)
    assert all(read[k].dtype == state[k].dtype and torch.equal(read[k], expected[k]) for k in state)
    for k, v in state.items():
        if v.is_floating_point():
            torch.testing.assert_close(read[k], v, rtol=2 ** -8, atol=1e-30)
    loaded = load_model("resnet18", compact).network.state_dict()
    assert all(torch.equal(loaded[k], expected[k]) for k in state)


SHIPPED = sorted(name for name in REGISTRY if card_path(get_spec(name).weights_path).is_file())


def test_the_default_model_ships():
    assert models.DEFAULT_MODEL in SHIPPED


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_cards_give_the_command_that_reproduces_them(name):
    """Each shipped card's command names its model, output, precision and colour normalisation, and the README and the
    evaluation's models.md quote it (hand edits of the cards must keep them in step)."""
    card_file = card_path(get_spec(name).weights_path)
    training = json.loads(card_file.read_text())["training"]
    command = training["command"]
    assert f"--model {name} -o weights/{name}.pt " in command
    colour = " --colour-normalise" if training.get("colour_normalise") else ""
    assert command.endswith(f"--device {training['device']} --precision {training['precision']}{colour}")
    root = models.WEIGHTS_DIR.parent
    for doc in (root / "README.md", root / "docs" / "evaluation" / "models.md"):
        assert command in doc.read_text(), f"{doc.name} does not quote the command of {card_file.name}"
