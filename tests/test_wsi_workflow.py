"""Whole-slide segmentation end to end: the real ``snakemake wsi_all`` on the tiny config."""

from __future__ import annotations

import json
import re
import shutil
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import tifffile
import yaml
from snakemake_runner import snakemake

from omniseg.io import write_png
from omniseg.tissues import TissueTable

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def setup_workdir(work: Path, **wsi) -> dict:
    """The tiny config in ``work/config``, with ``wsi`` entries replaced."""
    (work / "config").mkdir(parents=True)
    shutil.copy(REPO / "config" / "tissues.tsv", work / "config")
    shutil.copy(REPO / "config" / "config.yaml", work / "config")
    cfg = yaml.safe_load(TINY.read_text())
    cfg["wsi"].update(wsi)
    (work / "config" / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    return cfg


def job_counts(output: str) -> dict[str, int]:
    """The "Job stats" table of a Snakemake run."""
    table = output.split("Job stats:", 1)[1]
    return {m[1]: int(m[2]) for m in re.finditer(r"^(\w+)\s+(\d+)$", table, re.M)}


@pytest.fixture(scope="module")
def wsi_run(tmp_path_factory) -> tuple[Path, dict]:
    work = tmp_path_factory.mktemp("wsi")
    cfg = setup_workdir(work)
    t0 = time.perf_counter()
    snakemake(work, "--cores", "2", "wsi_all")
    print(f"tiny wsi_all: {time.perf_counter() - t0:.1f} s wall")
    return work, cfg


def test_label_pyramid_reads_back(wsi_run, tissues):
    work, cfg = wsi_run
    syn = cfg["wsi"]["synthetic"]
    out = work / "results" / "wsi" / "synth_0"
    with h5py.File(out / "omniseg" / "labels.h5", "r") as fh:
        labels = fh["labels"][()]
    with tifffile.TiffFile(out / "labels.ome.tif") as tif:
        assert tif.is_ome
        series = tif.series[0]
        assert series.shape == (syn["height"], syn["width"]) and series.dtype == np.uint8
        assert len(series.levels) >= 3  # 1024x1536 halved down to <= 256
        level0 = series.levels[0].asarray()
        assert series.levels[1].shape == ((syn["height"] + 1) // 2, (syn["width"] + 1) // 2)
        assert 'PhysicalSizeX="0.25"' in tif.ome_metadata
    np.testing.assert_array_equal(level0, labels)
    assert set(np.unique(level0)) <= set(range(len(tissues) + 1))


def test_geojson_areas_and_scores(wsi_run, tissues):
    work, _ = wsi_run
    out = work / "results" / "wsi" / "synth_0"
    gj = json.loads((out / "tissues.geojson").read_text())
    assert gj["type"] == "FeatureCollection"
    names = {t.name: t.key for t in tissues}
    features = gj["features"]
    assert features, "the tiny model segments something on the synthetic slide"
    for f in features:
        assert f["geometry"]["type"] in ("Polygon", "MultiPolygon")
        assert names[f["properties"]["classification"]["name"]] == f["properties"]["tissue"]
    areas = pd.read_csv(out / "areas.csv")
    assert list(areas["tissue"]) == tissues.keys
    counts = pd.Series([f["properties"]["tissue"] for f in features]).value_counts()
    assert [counts.get(k, 0) for k in tissues.keys] == list(areas["objects"])
    assert (areas["area_mm2"] >= 0).all() and (areas["fraction_of_tissue"] <= 1).all()
    for method in ("omniseg", "tal"):  # every configured method is scored on the slide
        scores = pd.read_csv(out / method / "scores.csv")
        assert list(scores["tissue"]) == tissues.keys and (scores["method"] == method).all()
        assert scores["dice"].between(0, 100).all() and scores["raw_dice"].between(0, 100).all()
        ref = scores.set_index("tissue")["ref_px"]
        assert ref["cap"] > 0 and ref["tuft"] > 0 and ref["ves"] > 0  # focus: [cap, ves]
    assert (work / "results" / "wsi" / "synth_0" / "overlay.png").stat().st_size > 0
    table = pd.read_csv(work / "results" / "tables" / "slides.csv")
    assert list(dict.fromkeys(table["method"])) == ["omniseg", "tal"]
    assert set(table["tissue"]) == {*tissues.keys, "average"} and (table["slides"] == 1).all()
    assert "Dice (%) after aggregation" in (work / "results" / "tables" / "slides.md").read_text()


def test_each_slide_is_read_through_its_stain_gain(wsi_run):
    """wsi.stain_norm (on in the tiny config, as in the demo): the run's reference, the slide's
    gain, and every prediction of the slide made through that gain."""
    work, cfg = wsi_run
    ref = json.loads((work / "results" / "wsi" / "stain_reference.json").read_text())
    assert ref["split"] == "train" and cfg["wsi"]["synthetic"]["stain"] in ref["stains"]
    out = work / "results" / "wsi" / "synth_0"
    stain = json.loads((out / "stain.json").read_text())
    assert stain["stain"] == cfg["wsi"]["synthetic"]["stain"] and stain["tissue_pixels"] > 0
    assert stain["reference"] == ref["stains"][stain["stain"]]["density"]
    assert np.allclose(stain["gain"], np.array(stain["reference"]) / stain["density"])
    probs = sorted((out / "omniseg").glob("prob_*.h5"))
    assert len(probs) == 3
    for path in probs:
        with h5py.File(path, "r") as fh:
            assert np.allclose(fh.attrs["stain_gain"], stain["gain"])


def test_slide_tiles_default_to_the_training_patch_size(wsi_run):
    work, cfg = wsi_run
    with h5py.File(work / "results" / "wsi" / "synth_0" / "omniseg" / "prob_1.h5", "r") as fh:
        assert fh.attrs["tile"] == cfg["patches"]["size"]  # wsi.tile: null


def test_a_crashed_step_reruns_alone(wsi_run, tmp_path):
    """As if aggregation had crashed: its output and everything after it are missing."""
    work, _ = wsi_run
    assert "Nothing to be done" in (p := snakemake(work, "-n", "wsi_all")).stdout + p.stderr
    out = work / "results" / "wsi" / "synth_0"
    lost = ["omniseg/labels.h5", "labels.ome.tif", "overlay.png", "tissues.geojson", "areas.csv"]
    lost.append("omniseg/scores.csv")
    (tmp_path / "omniseg").mkdir()
    for name in lost:
        (out / name).rename(tmp_path / name)
    try:
        counts = job_counts(snakemake(work, "-n", "wsi_all").stdout)
    finally:
        for name in lost:
            (tmp_path / name).rename(out / name)
    assert counts == {
        "wsi_aggregate": 1,
        "wsi_export": 1,
        "wsi_score": 1,
        "slide_table": 1,
        "wsi_all": 1,
        "total": 5,
    }


def test_model_of_another_tissue_table_fails_naming_it(wsi_run, tmp_path, tissues):
    from omniseg.checkpoint import save_model
    from omniseg.models import build_model

    work, _ = wsi_run
    copy = tmp_path / "copy"
    shutil.copytree(work, copy, symlinks=True)
    five = TissueTable.from_records(tissues.to_records()[:5])
    model = copy / "results" / "models" / "omniseg" / "all" / "model.pt"
    save_model(model, build_model("omniseg", num_tissues=5, width=4), five)
    proc = snakemake(copy, "--cores", "1", "wsi_all", check=False)
    assert proc.returncode != 0
    assert "Error in rule wsi_predict" in proc.stdout + proc.stderr
    logs = "".join(
        p.read_text() for p in (copy / "logs" / "wsi" / "synth_0" / "omniseg").glob("predict_*")
    )
    assert "model checkpoint results/models/omniseg/all/model.pt was trained for tissues" in logs


# -- DAG construction (dry runs) ------------------------------------------------------------------
def test_slide_sheet_drives_the_dag(tmp_path):
    slides = tmp_path / "slides"
    slides.mkdir()
    write_png(slides / "a.png", np.full((64, 96, 3), 240, np.uint8))
    write_png(slides / "b.png", np.full((64, 96, 3), 240, np.uint8))
    (slides / "a_truth.h5").write_bytes(b"")  # existence is all the DAG checks
    (tmp_path / "slides.tsv").write_text(
        "slide_id\tpath\tmpp\ttruth\tstain\n"
        "case.a\tslides/a.png\t0.5\tslides/a_truth.h5\the\n"
        "case.b\tslides/b.png\t0.5\t\tpas\n"
    )
    setup_workdir(tmp_path, slides=str(tmp_path / "slides.tsv"))
    out = snakemake(tmp_path, "-n", "wsi_all").stdout
    counts = job_counts(out)
    assert "synthesize_slide" not in counts
    # one stain reference for the run, one stain measurement per slide (wsi.stain_norm)
    assert counts["stain_reference"] == 1 and counts["wsi_stain"] == 2
    # case.a has truth: both methods segment it (3 scales each); case.b only the exported one
    assert counts["wsi_tissue_mask"] == 2 and counts["wsi_predict"] == 3 * 3
    assert counts["wsi_export"] == 2 and counts["wsi_score"] == 2 and counts["slide_table"] == 1
    assert "results/wsi/case.a/tal/scores.csv" in out
    assert "results/wsi/case.b/tal/prob_1.h5" not in out


def test_bad_wsi_settings_fail_before_any_job(tmp_path):
    (tmp_path / "slides.tsv").write_text("slide_id\tpath\nx\tmissing.tif\n")
    setup_workdir(tmp_path, slides=str(tmp_path / "slides.tsv"))
    proc = snakemake(tmp_path, "-n", "wsi_all", check=False)
    assert proc.returncode != 0 and "missing.tif" in proc.stdout + proc.stderr
    # the sheet names no stain while wsi.stain_norm is on: the row is named before any job
    assert "row 1 (slide_id 'x'): column stain: empty" in proc.stdout + proc.stderr
    unstained = tmp_path / "unstained"
    setup_workdir(unstained, slides=str(tmp_path / "slides.tsv"), stain_norm=False)
    proc = snakemake(unstained, "-n", "wsi_all", check=False)
    assert proc.returncode != 0 and "column stain" not in proc.stdout + proc.stderr

    other = tmp_path / "other"
    setup_workdir(other, method="nope")
    proc = snakemake(other, "-n", "wsi_all", check=False)
    assert proc.returncode != 0
    assert "wsi.method 'nope' is not a configured method" in proc.stdout + proc.stderr
    third = tmp_path / "third"
    setup_workdir(third, methods=["omniseg", "multi_unet"])
    proc = snakemake(third, "-n", "wsi_all", check=False)
    assert proc.returncode != 0
    assert "wsi.methods names multi_unet, not configured" in proc.stdout + proc.stderr


def test_a_multi_network_method_segments_slides(tmp_path):
    """Per-tissue networks on a slide: each tissue's network at its scale (dry run)."""
    cfg = setup_workdir(tmp_path, method="multi_unet")
    cfg["methods"]["multi_unet"] = {"model": "unet", "kwargs": {"width": 4}, "per_tissue": True}
    (tmp_path / "config" / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    out = snakemake(tmp_path, "-n", "wsi_all").stdout
    assert "results/wsi/synth_0/multi_unet/prob_2.h5" in out
    for key in ("cap", "tuft"):  # the 5x tissues' networks feed the 5x prediction
        assert f"results/models/multi_unet/{key}/model.pt" in out
