"""Step functions of omniseg.steps.rois find what a file is from its contents, not its path."""

from __future__ import annotations

import h5py
import pandas as pd
import pytest
import torch

from omniseg.checkpoint import save_model
from omniseg.models import build_model
from omniseg.steps.rois import _method_of, deployed_parameters, model_map


def _model(path, tissues, method, select):
    torch.manual_seed(0)
    model = build_model("unet", width=4)
    save_model(path, model, tissues, extra={"method": method, "select": select})
    return path


def test_model_map_reads_which_tissues_each_file_serves(tmp_path, tissues):
    """Folder names mean nothing: files in one folder with misleading names still map to the
    tissues they were trained on."""
    a = _model(tmp_path / "all" / "x.pt", tissues, "multi_unet", ["cap"])
    b = _model(tmp_path / "all" / "y.pt", tissues, "multi_unet", ["dt"])
    assert model_map([a, b], tissues) == {"dt": b, "cap": a}  # registry order
    single = _model(tmp_path / "dt" / "model.pt", tissues, "omniseg", None)
    assert model_map([single], tissues) == {k: single for k in tissues.keys}
    with pytest.raises(ValueError, match="every tissue"):
        model_map([single, a], tissues)
    dup = _model(tmp_path / "z.pt", tissues, "multi_unet", ["cap"])
    with pytest.raises(ValueError, match="two model files for tissue cap"):
        model_map([a, dup], tissues)
    assert deployed_parameters([a, b, single]).keys() == {"multi_unet", "omniseg"}


def test_method_of_result_files_is_what_they_record(tmp_path):
    csv = tmp_path / "eval" / "wrong_name" / "summary.csv"
    csv.parent.mkdir(parents=True)
    pd.DataFrame({"method": ["tal", "tal"], "tissue": ["dt", "average"]}).to_csv(csv, index=False)
    assert _method_of(csv) == "tal"
    h5 = tmp_path / "predictions.h5"
    with h5py.File(h5, "w") as fh:
        fh.attrs["method"] = "med3d"
    assert _method_of(h5) == "med3d"
    pd.DataFrame({"method": ["a", "b"]}).to_csv(tmp_path / "mixed.csv", index=False)
    with pytest.raises(ValueError, match="does not record one method"):
        _method_of(tmp_path / "mixed.csv")
