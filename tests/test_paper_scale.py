"""The paper-size study (config/paper.yaml) builds its DAG quickly, with jobs per stage, not per ROI."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
N_ROIS = 1751  # the paper's study: 1751 ROIs of 3000x3000 at 40x
STAINS = ("he", "pas", "sil", "tri")


def fabricate_study(root: Path, n_rois: int, keys: list[str]) -> Path:
    """A sample sheet of ``n_rois`` ROIs with empty placeholder files (the DAG checks existence)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    rows = ["roi_id\tpatient\tstain\ttissue\timage\tmask"]
    for i in range(n_rois):
        roi = f"roi{i:04d}"
        (root / "images" / f"{roi}.png").touch()
        (root / "masks" / f"{roi}.png").touch()
        rows.append(
            f"{roi}\tpatient{i % 90:02d}\t{STAINS[i % 4]}\t{keys[i % len(keys)]}"
            f"\timages/{roi}.png\tmasks/{roi}.png"
        )
    sheet = root / "rois.tsv"
    sheet.write_text("\n".join(rows) + "\n")
    return sheet


def dry_run(work: Path, n_rois: int) -> tuple[dict[str, int], float]:
    shutil.copytree(REPO / "config", work / "config")
    keys = [
        line.split("\t")[1] for line in (work / "config/tissues.tsv").read_text().splitlines()[1:]
    ]
    fabricate_study(work / "resources", n_rois, keys)
    cfg = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    cfg.pop("wsi", None)  # slides are a separate study; this checks the ROI study
    (work / "config/study.yaml").write_text(yaml.safe_dump(cfg))
    cmd = [
        sys.executable, "-m", "snakemake", "-n", "--quiet", "rules",
        "--snakefile", str(REPO / "workflow/Snakefile"), "--directory", str(work),
        "--configfile", str(work / "config/study.yaml"), "--cores", "1",
    ]  # fmt: skip
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - t0
    assert proc.returncode == 0, proc.stdout + proc.stderr
    counts = {
        m.group(1): int(m.group(2))
        for m in re.finditer(r"^(\w+)\s+(\d+)$", proc.stdout + proc.stderr, re.MULTILINE)
    }
    return counts, seconds


@pytest.mark.slow
def test_paper_size_dag_scales_with_stages_not_rois(tmp_path):
    # The time it takes is printed (run with -s), not asserted: timings are for bench/, and the
    # README quotes the figure.
    full, seconds = dry_run(tmp_path / "full", N_ROIS)
    small, _ = dry_run(tmp_path / "small", 60)
    cfg = yaml.safe_load((REPO / "config/paper.yaml").read_text())
    methods = cfg["methods"]
    n_tissues = 6
    networks = sum(n_tissues if m.get("per_tissue") else 1 for m in methods.values())
    assert full["extract_patches"] == n_tissues
    assert full["train"] == networks
    assert full["evaluate"] == len(methods)
    assert full["qualitative"] == n_tissues
    # the same jobs for 60 ROIs as for 1751: nothing is per ROI
    assert full == small
    print(
        f"paper-size DAG ({N_ROIS} ROIs, {full['total']} jobs): snakemake -n took {seconds:.1f} s"
    )
