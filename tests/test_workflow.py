"""End to end: the real ``snakemake`` on a tiny config in a temporary directory."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from omniseg.tissues import load_tissues

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"


def snakemake(workdir: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "snakemake",
        "--snakefile", str(REPO / "workflow" / "Snakefile"),
        "--directory", str(workdir),
        "--configfile", str(workdir / "config" / "tiny.yaml"),
        *args,
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"snakemake failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("tiny")
    (work / "config").mkdir()
    shutil.copy(REPO / "config" / "tissues.tsv", work / "config")
    shutil.copy(REPO / "config" / "config.yaml", work / "config")
    shutil.copy(TINY, work / "config" / "tiny.yaml")
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
def test_rerun_is_a_no_op(tiny_run):
    proc = snakemake(tiny_run, "--cores", "1", "-n")
    assert "Nothing to be done" in proc.stdout + proc.stderr


def test_bad_sheet_fails_before_any_job(tmp_path):
    (tmp_path / "config").mkdir()
    shutil.copy(REPO / "config" / "tissues.tsv", tmp_path / "config")
    shutil.copy(REPO / "config" / "config.yaml", tmp_path / "config")
    cfg = yaml.safe_load(TINY.read_text())
    cfg["data"] = {"source": "sheet", "sheet": "rois.tsv"}
    (tmp_path / "config" / "tiny.yaml").write_text(yaml.safe_dump(cfg))
    (tmp_path / "rois.tsv").write_text(
        "roi_id\tpatient\tstain\ttissue\timage\tmask\n"
        "r1\tp1\the\tglomerulus\tmissing.png\tmissing_mask.png\n"
    )
    proc = snakemake(tmp_path, "--cores", "1", "-n", check=False)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert "rois.tsv" in out and "glomerulus" in out and "missing.png" in out
