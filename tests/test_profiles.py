"""Snakemake profiles: the workstation default and the SLURM one parse, say what they must, and
apply to the jobs (checked with dry runs on the tiny config)."""

from __future__ import annotations

import importlib.util
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
PROFILES = REPO / "workflow" / "profiles"
DEFAULT = PROFILES / "default" / "config.yaml"
SLURM = PROFILES / "slurm" / "config.yaml"
TINY = REPO / "tests" / "configs" / "tiny.yaml"
# The SLURM profile's options come from the executor plugin (the `slurm` extra); the README's
# install (`.[dev]`) does not have it, so the tests that need it say so and skip.
HAS_SLURM_PLUGIN = importlib.util.find_spec("snakemake_executor_plugin_slurm") is not None
needs_slurm_plugin = pytest.mark.skipif(
    not HAS_SLURM_PLUGIN,
    reason='needs snakemake-executor-plugin-slurm: pip install -e ".[slurm]"',
)
SLURM_PARAM = pytest.param(SLURM, id="slurm", marks=needs_slurm_plugin)


def _load(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    assert isinstance(data, dict), f"profile {path} is not a YAML mapping"
    return data


def _rule_names() -> set[str]:
    files = [REPO / "workflow" / "Snakefile", *(REPO / "workflow" / "rules").glob("*.smk")]
    pattern = re.compile(r"^\s*(?:rule|checkpoint)\s+(\w+)\s*:", re.M)
    return {name for f in files for name in pattern.findall(f.read_text())}


@pytest.fixture(scope="module")
def cli_options() -> set[str]:
    """Long options of this Snakemake with its installed plugins (--slurm-* included)."""
    from snakemake.cli import get_argument_parser

    return {o for a in get_argument_parser()._actions for o in a.option_strings}


@pytest.mark.parametrize("path", [pytest.param(DEFAULT, id="default"), SLURM_PARAM])
def test_profile_keys_are_snakemake_options(path, cli_options):
    unknown = [k for k in _load(path) if f"--{k}" not in cli_options]
    assert not unknown, f"{path}: not Snakemake options: {unknown}"


@pytest.mark.parametrize("path", [DEFAULT, SLURM], ids=["default", "slurm"])
def test_every_entry_is_commented(path):
    """Each key, at any depth, has a comment on its line or on the lines just above it."""
    lines = path.read_text().splitlines()
    bare = []
    for i, line in enumerate(lines):
        if not re.match(r"^\s*[\w-]+\s*:", line) or "#" in line:
            continue
        above = lines[i - 1].strip() if i else ""
        # a key directly under a commented parent that holds one entry counts as explained
        parent_commented = i >= 2 and lines[i - 2].strip().startswith("#")
        if not above.startswith("#") and not (above.endswith(":") and parent_commented):
            bare.append(f"{path.name}:{i + 1}: {line.strip()}")
    assert not bare, "profile entries without a comment:\n" + "\n".join(bare)


@pytest.mark.parametrize("path", [DEFAULT, SLURM], ids=["default", "slurm"])
def test_set_resources_name_real_rules(path):
    unknown = set(_load(path).get("set-resources", {})) - _rule_names()
    assert not unknown, f"{path}: set-resources for rules that do not exist: {sorted(unknown)}"


def test_default_profile_is_a_workstation_profile():
    p = _load(DEFAULT)
    assert p["cores"] == "all"
    assert p["printshellcmds"] is True and p["rerun-incomplete"] is True
    assert p["keep-going"] is False
    assert {"mem_mb", "runtime"} <= set(p["default-resources"])
    assert "train" in p["set-resources"]
    assert "executor" not in p
    # the GPU entry is there, commented out, with how to enable it
    assert re.search(r"^\s*#\s*gpu:\s*1", DEFAULT.read_text(), re.M)


def test_slurm_profile():
    p = _load(SLURM)
    text = SLURM.read_text()
    assert p["executor"] == "slurm"
    assert int(p["jobs"]) >= 1 and int(p["latency-wait"]) >= 5
    # the plugin chooses its status command (sacct or squeue); only the test cluster forces squeue
    assert "slurm-status-command" not in p
    assert int(p["slurm-init-seconds-before-status-checks"]) * 3 <= 300  # SLURM's default age
    resources = p["default-resources"]
    # no partition: a guessed one ("debug": short jobs) fails on most clusters; commented EDIT
    assert "slurm_partition" not in resources
    assert re.search(r"^\s*#\s*slurm_partition:", text, re.M)
    assert re.search(r"^\s*#\s*slurm_account:", text, re.M)
    # envs are built on the login node: how to get the CUDA build of pytorch there
    assert "CONDA_OVERRIDE_CUDA" in text and "compute nodes" not in text.split("Conda:")[1][:80]
    assert {"mem_mb", "runtime"} <= set(resources)
    gpu = p["set-resources"]["train"]
    assert gpu.get("gpu") == 1 or "gpu" in str(gpu.get("gres", "")), gpu
    # conda is the user's choice (--sdm conda); it cannot run on every machine
    assert not {"use-conda", "software-deployment-method", "sdm"} & set(p)


@pytest.mark.parametrize("path", [DEFAULT, SLURM], ids=["default", "slurm"])
def test_profiles_replace_the_default_config(path):
    """The profiles name the default config; `--configfile` replaces that value as a whole.

    Not Snakemake's internal workflow.overwrite_configfiles, and not a `configfile:` directive with
    --replace-workflow-config: spawned cluster jobs get --configfiles but not that flag, so they
    would merge the two configs again (seen on the test cluster: jobs expected every method of
    config/config.yaml)."""
    assert _load(path)["configfile"] == "config/config.yaml"
    snakefile = (REPO / "workflow" / "Snakefile").read_text()
    assert "overwrite_configfiles" not in snakefile
    assert not re.search(r"^\s*configfile:", snakefile, re.M)


def _dry_run(tmp_path: Path, *args: str) -> str:
    """`snakemake -n` of the real workflow on the tiny config, in a scratch directory."""
    if shutil.which("snakemake") is None:
        pytest.skip("snakemake is not on PATH")
    shutil.copytree(REPO / "config", tmp_path / "config")
    shutil.copy(TINY, tmp_path / "tiny.yaml")
    cmd = ["snakemake", "-n", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(tmp_path)]
    cmd += ["--configfile", "tiny.yaml", *args]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def _resources(output: str, rule: str) -> str:
    m = re.search(rf"^rule {rule}:\n(?:    .*\n)*?    resources: (.*)$", output, re.M)
    assert m, f"no resources line for rule {rule}"
    return m[1]


@pytest.mark.slow
def test_default_profile_applies_by_itself(tmp_path):
    out = _dry_run(tmp_path)
    assert f"workflow specific profile {DEFAULT.parent}" in out
    train = _resources(out, "train")
    assert "gpu" not in train and "slurm_partition" not in train
    assert f"mem_mb={_load(DEFAULT)['set-resources']['train']['mem_mb']}" in train


@pytest.mark.slow
def test_configfile_replaces_the_default_config(tmp_path):
    """tiny.yaml lists two methods; none of config/config.yaml's others may leak in."""
    out = _dry_run(tmp_path)
    methods = set(re.findall(r"results/models/(\w+)/", out))
    assert methods == set(yaml.safe_load(TINY.read_text())["methods"]), methods


@pytest.mark.slow
@needs_slurm_plugin
def test_slurm_profile_replaces_the_default(tmp_path):
    out = _dry_run(tmp_path, "--workflow-profile", str(SLURM.parent))
    assert f"workflow specific profile {SLURM.parent}" in out
    assert str(DEFAULT.parent) not in out
    train = _resources(out, "train")
    assert "gpu=1" in train and "slurm_partition" not in train
    assert "slurm_partition" not in _resources(out, "split_patients")
