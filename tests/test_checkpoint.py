"""Model files: round trip, weights_only loading, and the errors for foreign or broken files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from omniseg.checkpoint import FORMAT, load_model, read_checkpoint, save_model
from omniseg.models import build_model
from omniseg.tissues import TissueTable


@pytest.fixture
def model(tissues):
    torch.manual_seed(0)
    return build_model("omniseg", num_tissues=len(tissues), width=4)


@pytest.fixture
def saved(tmp_path, model, tissues) -> Path:
    path = tmp_path / "model.pt"
    save_model(path, model, tissues, extra={"method": "omniseg", "val_dice": {"dt": 71.5}})
    return path


def test_round_trip_same_outputs(saved, model, tissues, tmp_path, monkeypatch):
    monkeypatch.setenv("OMNISEG_CHANNELS_LAST", "0")  # the layout of `model`: bitwise equal
    loaded, meta = load_model(saved, tissues)
    assert not loaded.training
    assert loaded.config() == model.config()
    x = torch.rand(2, 3, 32, 32)
    tissue = torch.tensor([0, 5])
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(x, tissue), model(x, tissue))
    assert meta["format"] == FORMAT
    assert meta["method"] == "omniseg"
    assert meta["val_dice"] == {"dt": 71.5}
    assert meta["tissue_fingerprint"] == tissues.fingerprint()
    assert TissueTable.from_records(meta["tissues"]) == tissues
    assert "state_dict" not in meta
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # no temp file left


@pytest.mark.parametrize(("env", "channels_last"), [(None, True), ("1", True), ("0", False)])
def test_a_loaded_model_takes_the_layout_the_device_runs_fastest(
    saved, model, tissues, monkeypatch, env, channels_last
):
    """On the CPU a model is loaded channels-last unless ``OMNISEG_CHANNELS_LAST=0``; the
    layout changes the order of sums only."""
    if env is None:
        monkeypatch.delenv("OMNISEG_CHANNELS_LAST", raising=False)
    else:
        monkeypatch.setenv("OMNISEG_CHANNELS_LAST", env)
    loaded, _ = load_model(saved, tissues)
    convs = [m.weight for m in loaded.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs
    assert all(
        w.is_contiguous(memory_format=torch.channels_last) == channels_last
        or w.shape[2:] == (1, 1)  # a 1x1 kernel's strides fit both layouts
        for w in convs
    )
    assert any(not w.is_contiguous() for w in convs) == channels_last
    x = torch.rand(2, 3, 32, 32)
    tissue = torch.tensor([0, 5])
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x, tissue), model(x, tissue), rtol=1e-4, atol=1e-5)


def test_plain_weights_only_load(saved, model, tissues):
    data = torch.load(saved, weights_only=True)
    assert data["format"] == FORMAT
    assert data["model"] == {"name": "omniseg", "kwargs": model.config()["kwargs"]}
    assert data["model"]["kwargs"]["num_tissues"] == len(tissues)
    assert set(data["state_dict"]) == set(model.state_dict())
    assert all(v.device.type == "cpu" for v in data["state_dict"].values())


def test_numpy_scalars_are_stored_as_python_numbers(tmp_path, model, tissues):
    path = tmp_path / "m.pt"
    save_model(path, model, tissues, extra={"best": np.float64(3.5), "n": [np.int64(2)]})
    meta = read_checkpoint(path)
    assert meta["best"] == 3.5 and type(meta["best"]) is float
    assert meta["n"] == [2] and type(meta["n"][0]) is int


def test_bad_extra(tmp_path, model, tissues):
    with pytest.raises(ValueError, match="reserved key"):
        save_model(tmp_path / "m.pt", model, tissues, extra={"state_dict": 1})
    with pytest.raises(ValueError, match=r"extra\['cfg'\]\['path'\] holds a PosixPath"):
        save_model(tmp_path / "m.pt", model, tissues, extra={"cfg": {"path": Path("/x")}})
    assert not list(tmp_path.iterdir())


def test_mismatched_tissue_table(saved, tissues):
    records = tissues.to_records()[:3]
    other = TissueTable.from_records(records)
    with pytest.raises(ValueError) as err:
        load_model(saved, other)
    msg = str(err.value)
    assert str(saved) in msg
    assert "[dt, pt, cap, tuft, ves, ptc]" in msg and "[dt, pt, cap]" in msg


def test_not_a_checkpoint(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"this is not a torch file" * 10)
    with pytest.raises(ValueError, match=f"checkpoint {junk} cannot be read"):
        load_model(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(2)}, foreign)
    with pytest.raises(ValueError, match=f"{foreign} is not an omniseg model file"):
        load_model(foreign)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.pt")


def test_truncated_file(saved, tmp_path):
    cut = tmp_path / "cut.pt"
    data = saved.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=f"checkpoint {cut} cannot be read"):
        load_model(cut)


def test_unknown_architecture(saved, tmp_path):
    data = torch.load(saved, weights_only=True)
    data["model"] = {"name": "no_such_net", "kwargs": {}}
    path = tmp_path / "other.pt"
    torch.save(data, path)
    with pytest.raises(ValueError, match=f"{path}: cannot build model 'no_such_net'"):
        load_model(path)


def test_weights_that_do_not_fit(saved, tmp_path):
    data = torch.load(saved, weights_only=True)
    data["model"]["kwargs"]["width"] = 8
    path = tmp_path / "wider.pt"
    torch.save(data, path)
    with pytest.raises(ValueError, match=f"{path}: weights do not fit model 'omniseg'"):
        load_model(path)


def test_an_omniseg_with_a_presence_gate_round_trips_with_its_gate(tmp_path, tissues):
    torch.manual_seed(0)
    gated = build_model("omniseg", width=8, norm="batch", presence=True, feature_scale=0.25)
    gated.eval()
    save_model(tmp_path / "gated.pt", gated, tissues)
    loaded, _ = load_model(tmp_path / "gated.pt", tissues)
    assert loaded.presence is not None and loaded.feature_scale == 0.25
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded.predict_proba(x, [1, 4]), gated.predict_proba(x, [1, 4]))


def test_a_loaded_model_pools_the_window_of_its_training_patch_size(tmp_path, model, tissues):
    """Slide tiles of any size: the loaded network pools a training-patch-sized window."""
    path = tmp_path / "m.pt"
    save_model(path, model, tissues, extra={"patch_size": 64})
    assert load_model(path, tissues)[0].context == 64
    save_model(path, model, tissues)  # an old checkpoint: no size, the whole input as before
    assert load_model(path, tissues)[0].context is None
