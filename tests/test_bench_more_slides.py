"""bench/more_slides.py: new slides are drawn after the run's own with the next seeds, masked,
scored through bench/robustness.py's pipeline wiring (the truth as the prediction scores ~100),
reused on a second run, and missing models or a non-synthetic config are named."""

from __future__ import annotations

import copy
from pathlib import Path

import h5py
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
TISSUES_TSV = REPO / "config" / "tissues.tsv"


@pytest.fixture(scope="module")
def more(bench):
    return bench("more_slides")


def _small_config() -> dict:
    config = copy.deepcopy(CONFIG)
    config["wsi"]["synthetic"] = {"seed": 1, "count": 2, "height": 512, "width": 1024,
                                  "strips": 2, "stain": "he", "focus": ["cap", "ves"], "tile": 256}  # fmt: skip
    config["wsi"]["mask"] = {**config["wsi"]["mask"], "min_area_um2": 1000.0}
    return config


def _results(tmp_path: Path) -> Path:
    results = tmp_path / "results"
    (results / "models" / "omniseg" / "all").mkdir(parents=True)
    (results / "models" / "omniseg" / "all" / "model.pt").touch()
    return results


def test_truth_as_prediction_on_a_new_slide(
    more, bench, tissues, tmp_path, monkeypatch, truth_as_prediction
):
    rob = bench("robustness")
    monkeypatch.setattr(rob, "predict_slide", truth_as_prediction)
    monkeypatch.setattr(more, "_robustness", lambda: rob)
    results, out = _results(tmp_path), tmp_path / "more"
    report = more.run(results, _small_config(), TISSUES_TSV, ["omniseg"], 1, out, 1)
    # the run's own slides are synth_0 and synth_1: the new one is synth_2, drawn with seed 1 + 2
    assert report["slides"] == ["synth_2"]
    with h5py.File(out / "slides" / "synth_2_truth.h5", "r") as fh:
        assert int(fh.attrs["seed"]) == 3
        present = [k for k in tissues.keys if fh[k][()].any()]
    assert len(present) >= 4
    assert truth_as_prediction.models[0] == [results / "models" / "omniseg" / "all" / "model.pt"]
    scores = report["methods"]["omniseg"]
    for key in present:
        assert 95.0 <= scores["slide_dice"][key] <= 100.0, key
    assert scores["per_slide_mean"] == {"synth_2": scores["slide_mean"]}  # one slide: the same
    stamp = (out / "slides" / "synth_2.tif").stat().st_mtime_ns
    more.run(results, _small_config(), TISSUES_TSV, ["omniseg"], 1, out, 1)
    assert (out / "slides" / "synth_2.tif").stat().st_mtime_ns == stamp  # reused, not redrawn


def test_missing_models_and_a_sheet_config_are_named(more, tmp_path):
    results = _results(tmp_path)
    with pytest.raises(SystemExit, match=r"models/med3d: no \*/model\.pt"):
        more.run(results, _small_config(), TISSUES_TSV, ["omniseg", "med3d"], 1, tmp_path / "o", 1)
    assert not (tmp_path / "o").exists()  # nothing drawn before the check
    sheet = _small_config()
    sheet["wsi"]["slides"] = "config/slides.tsv"
    with pytest.raises(SystemExit, match="not 'synthetic'"):
        more.run(results, sheet, TISSUES_TSV, ["omniseg"], 1, tmp_path / "o", 1)


def test_first_redraws_the_runs_slides_and_adapt_norm_reaches_the_prediction(
    more, bench, tissues, tmp_path, monkeypatch, truth_as_prediction
):
    """``--first 0`` draws synth_0 with the run's seed (the same slide as the pipeline's);
    ``--adapt-norm`` overrides ``wsi.adapt_norm`` for every prediction."""
    rob = bench("robustness")
    monkeypatch.setattr(rob, "predict_slide", truth_as_prediction)
    monkeypatch.setattr(more, "_robustness", lambda: rob)
    results, out = _results(tmp_path), tmp_path / "more"
    config = tmp_path / "config.yaml"
    config.write_text(yaml.safe_dump(_small_config()))
    argv = [str(results), "--config", str(config), "--methods", "omniseg", "--count", "1",
            "--first", "0", "--adapt-norm", "2", "--out", str(out), "--threads", "1"]  # fmt: skip
    assert more.main(argv) == 0
    with h5py.File(out / "slides" / "synth_0_truth.h5", "r") as fh:
        assert int(fh.attrs["seed"]) == 1  # wsi.synthetic.seed + 0, as the pipeline draws it
    assert len(truth_as_prediction.kwargs) == len(tissues.scales)
    assert {k["adapt_norm"] for k in truth_as_prediction.kwargs} == {2}
    truth_as_prediction.kwargs.clear()
    more.run(results, _small_config(), TISSUES_TSV, ["omniseg"], 1, out, 1, first=0)
    assert {k["adapt_norm"] for k in truth_as_prediction.kwargs} == {0}  # the config's default
    for bad in (["--first", "-1"], ["--adapt-norm", "-1"]):
        with pytest.raises(SystemExit):
            more.main([str(results), "--config", str(config), *bad])
