"""The tissue registry is a declared input of every rule that reads it (dry runs on the tiny config).

Editing ``config/tissues.tsv`` must rerun what depends on it: the rules take it as
``input: tissues=config["tissues"]`` (so its modification time counts) and the patch sets' config
hash reads its contents, not its path.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "tests" / "configs" / "tiny.yaml"
RULES = REPO / "workflow" / "rules"
SCRIPTS = REPO / "workflow" / "scripts"
# Rules of the ROI pipeline (data, train, evaluate, report) whose scripts read the registry.
READERS = {
    "synthesize_cohort",
    "split_patients",
    "extract_patches",
    "train",
    "evaluate",
    "table1",
    "qualitative",
}


def _snakemake(workdir: Path, *args: str) -> str:
    if shutil.which("snakemake") is None:
        pytest.skip("snakemake is not on PATH")
    cmd = ["snakemake", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(workdir)]
    cmd += ["--configfile", "tiny.yaml", *args]
    proc = subprocess.run(cmd, cwd=workdir, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _jobs(output: str) -> dict[str, list[tuple[str, str]]]:
    """rule -> [(input line, output line)] of the jobs a dry run lists."""
    jobs: dict[str, list[tuple[str, str]]] = {}
    for block in re.findall(r"^rule (\w+):\n((?:    .*\n)+)", output, re.M):
        name, body = block
        fields = dict(re.findall(r"^    (\w+): (.*)$", body, re.M))
        jobs.setdefault(name, []).append((fields.get("input", ""), fields.get("output", "")))
    return jobs


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    shutil.copytree(REPO / "config", tmp_path / "config")
    config = yaml.safe_load(TINY.read_text())
    config.pop("wsi", None)  # the slide rules have their own tests
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump(config))
    return tmp_path


def test_scripts_read_the_registry_from_their_input():
    """No script of these rules takes the registry as a param (a path string: no rerun)."""
    for path in SCRIPTS.glob("*.py"):
        if path.name.startswith("wsi_"):
            continue
        text = path.read_text()
        assert "snakemake.params.tissues" not in text, f"{path.name}: read snakemake.input.tissues"
    for smk in ("data.smk", "train.smk", "evaluate.smk", "report.smk"):
        text = (RULES / smk).read_text()
        params = re.findall(r"^\s+params:\n((?:\s{8,}.*\n)+)", text, re.M)
        assert not any("tissues=" in p for p in params), f"{smk}: tissues given as a param"


@pytest.mark.slow
def test_every_rule_that_reads_the_registry_declares_it(workdir):
    jobs = _jobs(_snakemake(workdir, "-n"))
    assert READERS <= set(jobs), sorted(jobs)
    missing = [
        rule
        for rule in READERS
        for inputs, _ in jobs[rule]
        if "config/tissues.tsv" not in inputs.split(", ")
    ]
    assert not missing, f"jobs without config/tissues.tsv among their inputs: {sorted(missing)}"


@pytest.mark.slow
def test_editing_the_registry_reruns_what_reads_it(workdir):
    """With every output in place and newer than the registry nothing runs; after an edit of the
    registry, the jobs that read it (and what is built from their outputs) run again."""
    jobs = _jobs(_snakemake(workdir, "-n"))
    for entries in jobs.values():
        for _, outputs in entries:
            for out in outputs.split(", "):
                path = workdir / out
                if not out or path.exists():
                    continue
                path.parent.mkdir(parents=True, exist_ok=True)
                # directory() outputs of the cohort have no suffix; files get one byte
                path.mkdir() if not path.suffix else path.write_bytes(b"\0")
    old = os.stat(workdir / "config" / "tissues.tsv").st_mtime - 3600
    os.utime(workdir / "config" / "tissues.tsv", (old, old))
    quiet = _snakemake(workdir, "-n", "--rerun-triggers", "mtime")
    assert "Nothing to be done" in quiet, quiet[-2000:]

    registry = workdir / "config" / "tissues.tsv"
    registry.write_text(registry.read_text().replace("distal tubule", "distal tubule (DT)"))
    rerun = set(_jobs(_snakemake(workdir, "-n", "--rerun-triggers", "mtime")))
    assert READERS <= rerun, sorted(rerun)
