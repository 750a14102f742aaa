"""bench/adapt_cost.py: one slide predicted with and without wsi.adapt_norm, timed in turn."""

from __future__ import annotations

import json

import pytest
import torch

from omniseg.checkpoint import save_model
from omniseg.models import build_model
from omniseg.steps import slides as steps


def test_times_both_variants_on_a_small_run(bench, tissues, tmp_path, capsys):
    cost = bench("adapt_cost")
    results = tmp_path / "results"
    slide = steps.synth_slide(
        results / "slides" / "synth_0.tif", tissues, seed=1, height=512, width=768, strips=1,
        focus=["cap"], tile=256,
    )["slide"]  # fmt: skip
    wsi = results / "wsi" / "synth_0"
    wsi.mkdir(parents=True)
    steps.mask_slide(
        slide, wsi / "tissue_mask.png", wsi / "tissue_mask.json", um_per_px=4.0,
        min_area_um2=1000.0,
    )  # fmt: skip
    torch.manual_seed(0)
    model = build_model("omniseg", num_tissues=len(tissues), width=4, norm="batch")
    path = results / "models" / "omniseg" / "all" / "model.pt"
    path.parent.mkdir(parents=True)
    save_model(path, model, tissues, {"patch_size": 64})
    assert cost.main([str(results), "--repeats", "1", "--threads", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["adapt_norm"] == 2 and len(report["seconds"]["adapted"]) == 1
    assert report["ratio"] == pytest.approx(
        report["median_s"]["adapted"] / report["median_s"]["plain"], abs=1e-3
    )


def test_a_missing_run_is_named(bench, tmp_path):
    with pytest.raises(SystemExit, match=r"missing .*synth_0\.tif"):
        bench("adapt_cost").main([str(tmp_path / "nothing")])
    with pytest.raises(SystemExit):
        bench("adapt_cost").main([str(tmp_path), "--repeats", "0"])
