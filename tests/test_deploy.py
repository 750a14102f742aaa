"""omniseg.deploy.package_source: where the envs' post-deploy scripts install omniseg from."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniseg.deploy import package_source

REPO = Path(__file__).resolve().parents[1]


def test_a_clone_installs_its_own_tree():
    assert package_source(REPO / "workflow") == str(REPO)
    assert package_source(f"{REPO}/workflow/") == str(REPO)


@pytest.mark.parametrize(
    ("basedir", "source"),
    [
        (
            "https://raw.githubusercontent.com/lab/omniseg/v0.2.0/workflow",
            "https://github.com/lab/omniseg/archive/v0.2.0.tar.gz",
        ),
        (
            "https://raw.githubusercontent.com/lab/omniseg/0123abc/workflow/rules",
            "https://github.com/lab/omniseg/archive/0123abc.tar.gz",
        ),
        (
            "https://ghe.example.org/lab/omniseg/raw/v1.0/workflow",
            "https://ghe.example.org/lab/omniseg/archive/v1.0.tar.gz",
        ),
    ],
)
def test_a_github_module_installs_its_tagged_archive(basedir, source):
    assert package_source(basedir) == source


def test_unknown_source_says_what_to_set(tmp_path):
    (tmp_path / "workflow").mkdir()
    with pytest.raises(ValueError, match="OMNISEG_PACKAGE_SOURCE"):
        package_source(tmp_path / "workflow")


def test_catalog_describes_the_same_route():
    import yaml

    catalog = yaml.safe_load((REPO / ".snakemake-workflow-catalog.yml").read_text())
    desc = catalog["usage"]["mandatory-flags"]["desc"]
    assert "post-deploy" in desc and "archive" in desc and "pip install -e ." in desc
    assert "src/" not in desc  # a module has no src/ to put on sys.path
    assert catalog["usage"]["software-stack-deployment"]["conda"] is True
