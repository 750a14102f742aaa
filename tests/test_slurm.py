"""The demo pipeline through SLURM gives what a local run gives (needs a real cluster).

Run by ``.ci/run`` between ``tests/cluster/slurm-up.sh`` and ``slurm-down.sh``::

    bash tests/cluster/slurm-up.sh
    OMNISEG_SLURM=1 pytest -q -m cluster tests/test_slurm.py
    bash tests/cluster/slurm-down.sh

The pipeline runs twice on ``tests/configs/tiny.yaml`` in two copies of the repository's
workflow/, config/ and src/: once locally (``--cores 2``) and once through the SLURM executor with
the project's profile (``--workflow-profile``: it replaces the workstation profile, as a user runs
it), to which the test adds only the test cluster's partition and ``squeue`` status command. Both are bounded by ``timeout -k``. Then the patch sets
must be identical (every HDF5 dataset pixel for pixel, every attribute), the tables present and
sane, and every non-local job must have gone through SLURM (completed there; training with a GPU).
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time
from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CONFIG = REPO / "tests" / "configs" / "tiny.yaml"
TIMEOUT_S = 600
COPIED = ("workflow", "config", "src")

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.skipif(
        os.environ.get("OMNISEG_SLURM") != "1",
        reason="needs the test SLURM cluster (tests/cluster/slurm-up.sh) and OMNISEG_SLURM=1",
    ),
]


def _copy_repo(dest: Path) -> Path:
    """The parts of the repository a run needs, without caches or earlier results."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".snakemake", "*.egg-info")
    for name in COPIED:
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    shutil.copy(CONFIG, dest / "tiny.yaml")
    return dest


def _test_cluster_profile(workdir: Path) -> Path:
    """The project's SLURM profile plus the two settings of the test cluster only: its partition
    (``debug``) and ``squeue`` for job states (it has no accounting database, so sacct never
    answers). The project's profile sets neither: both depend on the cluster."""
    profile = yaml.safe_load(
        (workdir / "workflow" / "profiles" / "slurm" / "config.yaml").read_text()
    )
    assert "slurm-status-command" not in profile, "the project's profile must not force squeue"
    profile["slurm-status-command"] = "squeue"
    profile.setdefault("default-resources", {})["slurm_partition"] = "debug"
    dest = workdir / "test-cluster-profile"
    dest.mkdir()
    (dest / "config.yaml").write_text(yaml.safe_dump(profile, sort_keys=False))
    return dest


def _snakemake(workdir: Path, *args: str) -> tuple[float, str]:
    """Run snakemake in ``workdir`` under ``timeout -k``; (wall seconds, combined output)."""
    cmd = ["timeout", "-k", "30", str(TIMEOUT_S), "snakemake", "--configfile", "tiny.yaml", *args]
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True)
    wall = time.perf_counter() - start
    out = proc.stdout + proc.stderr
    if proc.returncode != 0:
        logs = sorted((workdir / ".snakemake" / "slurm_logs").rglob("*.log"))
        tails = "\n".join(f"--- {p}\n{p.read_text()[-2000:]}" for p in logs[-3:])
        what = "timed out" if proc.returncode in (124, 137) else f"failed ({proc.returncode})"
        pytest.fail(f"{' '.join(cmd)} in {workdir} {what}:\n{out[-6000:]}\n{tails}")
    return wall, out


def _job_stats(output: str) -> dict[str, int]:
    """Rule -> job count from the 'Job stats' table Snakemake prints before running."""
    block = output.split("Job stats:", 1)[1]
    stats = {}
    for line in block.splitlines()[3:]:
        parts = line.split()
        if len(parts) != 2 or parts[0] == "total":
            break
        stats[parts[0]] = int(parts[1])
    return stats


def _submitted(output: str) -> dict[str, list[str]]:
    """Rule -> SLURM job ids, from Snakemake's 'submitted with SLURM jobid' lines.

    Several jobs may be announced before their submissions are logged, so the rule of each id
    is read from SLURM itself: the plugin names it in the job's comment
    (``rule_{rule}_wildcards_...``).
    """
    jobs: dict[str, list[str]] = {}
    for job_id in re.findall(r"submitted with SLURM jobid (\d+(?:_\d+)?)", output):
        comment = _slurm_job(job_id).get("Comment", "")
        m = re.match(r"rule_(\w+?)(?:_wildcards_|$)", comment)
        assert m, f"SLURM job {job_id} has no rule in its comment: {comment!r}"
        jobs.setdefault(m[1], []).append(job_id)
    return jobs


def _slurm_job(job_id: str) -> dict[str, str]:
    """``scontrol show job`` fields of a job (kept for MinJobAge after it ends)."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id.split("_")[0]],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    return dict(f.split("=", 1) for f in out.split() if "=" in f)


def _h5_contents(path: Path) -> dict[str, object]:
    """Every dataset (as an array) and every attribute of an HDF5 file, by path."""
    items: dict[str, object] = {}
    with h5py.File(path, "r") as f:
        items.update({f"/@{k}": v for k, v in f.attrs.items()})

        def visit(name, obj):
            items.update({f"{name}@{k}": v for k, v in obj.attrs.items()})
            if isinstance(obj, h5py.Dataset):
                items[name] = obj[()]

        f.visititems(visit)
    return items


def _equal(a, b) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.dtype == b.dtype and a.shape == b.shape and np.array_equal(a, b)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, request):
    """The two runs: (workdir, wall seconds, output) for 'local' and 'slurm'."""
    if shutil.which("sbatch") is None or shutil.which("snakemake") is None:
        pytest.fail("OMNISEG_SLURM=1 but sbatch or snakemake is not on PATH")
    local = _copy_repo(tmp_path_factory.mktemp("local"))
    slurm = _copy_repo(tmp_path_factory.mktemp("slurm"))
    results = {
        "local": (local, *_snakemake(local, "--cores", "2")),
        "slurm": (
            slurm,
            *_snakemake(
                slurm,
                "--workflow-profile",
                str(_test_cluster_profile(slurm).relative_to(slurm)),
                # keep the per-job logs: they show that the jobs ran as SLURM jobs
                "--slurm-keep-successful-logs",
            ),
        ),
    }
    reporter = request.config.pluginmanager.getplugin("terminalreporter")
    capture = request.config.pluginmanager.getplugin("capturemanager")
    line = (
        f"tiny pipeline wall time: local --cores 2 {results['local'][1]:.1f} s, "
        f"SLURM executor {results['slurm'][1]:.1f} s"
    )
    (tmp_path_factory.getbasetemp() / "slurm_timings.txt").write_text(line + "\n")
    if reporter is not None and capture is not None:  # shown under -q and output capture
        with capture.global_and_fixture_disabled():
            reporter.write_line(f"\n[test_slurm] {line}")
    return results


def test_both_runs_build_the_same_jobs(runs):
    local, slurm = _job_stats(runs["local"][2]), _job_stats(runs["slurm"][2])
    assert local == slurm
    assert local.get("train", 0) >= 1 and local.get("extract_patches", 0) >= 1, local


def test_jobs_went_through_slurm(runs):
    workdir, _, output = runs["slurm"]
    stats = _job_stats(output)
    submitted = _submitted(output)
    local_rules = set(re.findall(r"^localrule (\w+):", output, re.M))
    assert set(submitted) == set(stats) - local_rules, (submitted, stats, local_rules)
    for rule, ids in submitted.items():
        assert len(ids) == stats[rule], f"rule {rule}: {len(ids)} SLURM jobs for {stats[rule]}"
        assert (workdir / ".snakemake" / "slurm_logs" / f"rule_{rule}").is_dir(), rule
        for job_id in ids:
            job = _slurm_job(job_id)
            assert job.get("JobState") == "COMPLETED", f"rule {rule}: SLURM job {job_id} {job}"
            assert job.get("Partition") == "debug", job
            assert job.get("Comment", "").startswith(f"rule_{rule}"), job
    for job_id in submitted["train"]:
        job = _slurm_job(job_id)
        gres = " ".join(job.get(k, "") for k in ("TresPerJob", "TresPerNode", "TRES"))
        assert re.search(r"gpu[:=]1\b", gres), f"training job {job_id} asked no GPU: {job}"


def test_patch_sets_identical(runs):
    local = sorted((runs["local"][0] / "results" / "patches").glob("*.h5"))
    slurm_dir = runs["slurm"][0] / "results" / "patches"
    assert local, "the local run wrote no patch sets"
    assert [p.name for p in local] == sorted(p.name for p in slurm_dir.glob("*.h5"))
    for path in local:
        a, b = _h5_contents(path), _h5_contents(slurm_dir / path.name)
        assert sorted(a) == sorted(b), f"{path.name}: different datasets or attributes"
        differ = [k for k in a if not _equal(a[k], b[k])]
        assert not differ, f"{path.name}: local and SLURM runs differ in {differ}"
        assert a["images"].size > 0, f"{path.name} holds no patches"


def test_summaries_present_and_sane(runs):
    local = sorted((runs["local"][0] / "results" / "eval").glob("*/summary.csv"))
    assert local, "the local run wrote no summary.csv"
    for path in local:
        other = runs["slurm"][0] / path.relative_to(runs["local"][0])
        assert other.is_file(), f"the SLURM run wrote no {other.relative_to(runs['slurm'][0])}"
        a, b = pd.read_csv(path), pd.read_csv(other)
        assert list(a.columns) == list(b.columns)
        assert len(a) == len(b) and len(a) > 0
        dice = [c for c in a.columns if c.lower().startswith("dice")]
        assert dice, f"{path}: no Dice column in {list(a.columns)}"
        for table in (a, b):
            values = table[dice].to_numpy(dtype=float)
            finite = values[np.isfinite(values)]
            assert finite.size > 0, f"{path}: no Dice value"
            assert ((finite >= 0) & (finite <= 100)).all(), f"{path}: Dice outside [0, 100]"
