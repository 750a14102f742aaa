"""End to end: the real ``snakemake`` on a tiny config in a temporary directory."""

from __future__ import annotations

import shutil
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml
from snakemake_runner import snakemake

from omniseg.tissues import load_tissues

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def make_workdir(path: Path, config: dict | None = None) -> Path:
    """A working directory with the repository's config/ and a config file ``config/tiny.yaml``."""
    shutil.copytree(REPO / "config", path / "config")
    if config is None:
        shutil.copy(TINY, path / "config" / "tiny.yaml")
    else:
        (path / "config" / "tiny.yaml").write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    work = make_workdir(tmp_path_factory.mktemp("tiny"))
    snakemake(work, "--cores", "2")
    return work


@pytest.mark.slow
def test_patch_sets_hold_the_configured_patches(tiny_run):
    cfg = yaml.safe_load(TINY.read_text())
    tissues = load_tissues(tiny_run / "config" / "tissues.tsv")
    size = cfg["patches"]["size"]
    splits = pd.read_csv(tiny_run / "results/split/patients.tsv", sep="\t")
    assert set(splits["split"]) == {"train", "val", "test"}
    for t in tissues:
        with h5py.File(tiny_run / "results" / "patches" / f"{t.key}.h5", "r") as f:
            assert f.attrs["tissue_key"] == t.key
            assert f.attrs["um_per_px"] == pytest.approx(t.um_per_px)
            images, masks = f["images"], f["masks"]
            assert images.shape[1:] == (size, size, 3) and images.dtype == np.uint8
            assert masks.shape == images.shape[:3]
            assert set(np.unique(masks[:])) <= {0, 1}
            split = f["meta/split"].asstr()[:]
            patient = f["meta/patient"].asstr()[:]
            for s, n in cfg["patches"]["counts"].items():
                assert (split == s).sum() == n, (t.key, s)
            # provenance agrees with the patient split: no patient in two splits
            expected = dict(zip(splits["patient"], splits["split"], strict=True))
            assert all(expected[p] == s for p, s in zip(patient, split, strict=True))
            assert masks[:].any(), f"{t.key}: no labelled pixel in any patch"


@pytest.mark.slow
def test_model_and_metrics_are_produced(tiny_run):
    tissues = load_tissues(tiny_run / "config" / "tissues.tsv")
    model = tiny_run / "results/models/omniseg/all/model.pt"
    assert model.stat().st_size > 0
    log = pd.read_csv(tiny_run / "results/models/omniseg/all/log.csv")
    assert list(log["epoch"]) == [1, 2]
    summary = pd.read_csv(tiny_run / "results/eval/omniseg/summary.csv")
    assert set(tissues.keys) <= set(summary["tissue"])
    assert summary["dice_pct"].between(0, 100).all()
    per_patch = pd.read_csv(tiny_run / "results/eval/omniseg/per_patch.csv")
    assert len(per_patch) == 4 * len(tissues)  # test count per tissue in tiny.yaml


@pytest.mark.slow
def test_table1_and_figures_cover_every_method(tiny_run):
    table = pd.read_csv(tiny_run / "results/tables/table1.csv")
    assert set(table["method"]) == {"omniseg", "tal"}
    assert table["dice_pct"].between(0, 100).all()
    markdown = (tiny_run / "results/tables/table1.md").read_text()
    assert "paper's published Table 1" in markdown and "| omniseg |" in markdown
    points = pd.read_csv(tiny_run / "results/figures/params_vs_dice.csv")
    assert set(points["method"]) == {"omniseg", "tal"} and (points["params"] > 1000).all()
    for key in load_tissues(tiny_run / "config" / "tissues.tsv").keys:
        assert (tiny_run / f"results/figures/qualitative_{key}.png").stat().st_size > 10_000


@pytest.mark.slow
def test_rerun_is_a_no_op(tiny_run):
    proc = snakemake(tiny_run, "--cores", "1", "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_bad_sheet_fails_before_any_job(tmp_path):
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"] = {"source": "sheet", "sheet": "rois.tsv"}
    make_workdir(tmp_path, cfg)
    (tmp_path / "rois.tsv").write_text(
        "roi_id\tpatient\tstain\ttissue\timage\tmask\n"
        "r1\tp1\the\tglomerulus\tmissing.png\tmissing_mask.png\n"
    )
    proc = snakemake(tmp_path, "--cores", "1", "-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "rois.tsv" in out and "glomerulus" in out and "missing.png" in out


SAMPLE = REPO.parent / "shared" / "data" / "omniseg_release_sample" / "KI_data_testingset_demo"


@pytest.mark.slow
def test_real_release_sample_smoke(tmp_path):
    """config/release_sample.yaml on the real patches: import, train briefly, evaluate."""
    if not SAMPLE.is_dir():
        pytest.skip(f"real release sample absent: {SAMPLE}")
    cfg = yaml.safe_load((REPO / "config" / "release_sample.yaml").read_text())
    cfg["data"]["release_dir"] = str(SAMPLE)
    cfg["training"].update(epochs=1, steps_per_epoch=4)
    make_workdir(tmp_path, cfg)
    snakemake(tmp_path, "--cores", "2", "evaluate_all")
    summary = pd.read_csv(tmp_path / "results/eval/omniseg/summary.csv")
    per_patch = pd.read_csv(tmp_path / "results/eval/omniseg/per_patch.csv")
    assert len(per_patch) > 0 and per_patch["dice"].between(0, 100).all()
    assert "average" in set(summary["tissue"])
    # the split is by source image: no source image in two splits
    groups = {}
    for key in load_tissues(REPO / "config" / "tissues.tsv").keys:
        path = tmp_path / "results/patches" / f"{key}.h5"
        if path.exists():
            with h5py.File(path, "r") as f:
                for p, s in zip(
                    f["meta/patient"].asstr()[:], f["meta/split"].asstr()[:], strict=True
                ):
                    groups.setdefault(p, set()).add(s)
    assert groups and all(len(s) == 1 for s in groups.values())


@pytest.mark.slow
def test_html_report_holds_the_figures(tiny_run):
    out = tiny_run / "report.html"
    snakemake(tiny_run, "--cores", "1", "--report", str(out))
    html = out.read_text(errors="replace")
    for name in ("params_vs_dice.png", "table1.csv", "qualitative_tuft.png", "curve.png"):
        assert name in html, name
    assert "Omni-Seg" in html  # the workflow description
