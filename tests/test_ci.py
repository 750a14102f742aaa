"""`.ci/run` installs exactly what the README's quick start installs before it runs the README's
test command; the extras for CI's own later steps (SLURM, report) come after."""

from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _quick_start_installs() -> list[str]:
    """The `pip install ...` steps of the README's quick-start command line."""
    readme = (REPO / "README.md").read_text()
    block = re.search(r"## Quick start.*?```bash\n(.*?)```", readme, re.S)
    assert block, "README has no quick-start code block"
    return [c.strip() for c in block[1].split("&&") if c.strip().startswith("pip install")]


def _ci_steps() -> list[str]:
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    return [re.sub(r"\s+#.*$", "", ln).strip() for ln in lines if ln.strip()]


def test_ci_installs_what_the_readme_installs_before_its_tests():
    steps = _ci_steps()
    tests_at = next(i for i, s in enumerate(steps) if s.startswith("pytest -n 2"))
    installs = [
        re.sub(r"^python -m pip install -q ", "pip install ", s)
        for s in steps[:tests_at]
        if re.match(r"^python -m pip install -q (?!--upgrade pip)", s)
    ]
    assert installs == _quick_start_installs(), (installs, _quick_start_installs())
    assert "pytest -n 2" in (REPO / "README.md").read_text()


def test_ci_installs_the_slurm_extra_before_the_slurm_test():
    steps = _ci_steps()
    tests_at = next(i for i, s in enumerate(steps) if s.startswith("pytest -n 2"))
    slurm_at = next(i for i, s in enumerate(steps) if "test_slurm.py" in s)
    extra = [i for i, s in enumerate(steps) if "pip install" in s and "slurm" in s]
    assert extra and tests_at < extra[0] < slurm_at, (tests_at, extra, slurm_at)


def test_readme_says_which_torch_build_the_install_gets():
    quick = (REPO / "README.md").read_text().split("## Quick start")[1].split("## The pipeline")[0]
    assert "CUDA build" in quick  # PyPI's Linux wheel
    assert "--index-url https://download.pytorch.org/whl/cpu" in quick  # the CPU-only build


def test_readme_says_how_to_build_cuda_envs_on_a_login_node():
    readme = (REPO / "README.md").read_text()
    conda = readme.split("**Conda.**")[1].split("\n## ")[0]
    assert "CONDA_OVERRIDE_CUDA" in conda and "login node" in conda
    assert "sys.path" not in conda  # the package is installed, not put on sys.path
    assert "conda-forge-versions.tsv" in conda


def test_ci_runs_the_slurm_profile_checks_once_the_plugin_is_there():
    steps = _ci_steps()
    extra = next(i for i, s in enumerate(steps) if "pip install" in s and "slurm" in s)
    assert any("tests/test_profiles.py" in s for s in steps[extra + 1 :])
