"""Where the workflow's conda envs install the ``omniseg`` package from.

The rules' scripts import the installed package (no ``sys.path`` tricks), so every env built by
``--sdm conda`` gets the package from the source tree of the workflow that runs:
``workflow/envs/*.post-deploy.sh`` pip-installs :func:`package_source` of ``workflow.basedir``,
which ``workflow/rules/common.smk`` exports as ``OMNISEG_PACKAGE_SOURCE``.
"""

from __future__ import annotations

import re
from pathlib import Path

#: ``github("owner/repo", path=..., tag=...)`` modules: Snakemake reads their files from here.
_GITHUB_RAW = re.compile(r"^https://(?:[^@/]+@)?raw\.githubusercontent\.com/([^/]+/[^/]+)/([^/]+)/")
#: Other hosts' raw file URLs, ``https://HOST/owner/repo/raw/REF/...`` (GitHub Enterprise).
_HOST_RAW = re.compile(r"^https://(?:[^@/]+@)?([^/]+)/([^/]+/[^/]+)/raw/([^/]+)/")


def package_source(basedir: str | Path) -> str:
    """What ``pip install`` takes to install the omniseg of the workflow in ``basedir``.

    Args:
        basedir: Snakemake's ``workflow.basedir``: the ``workflow/`` folder of a clone (or of a
            local module), or the raw-file URL of ``workflow/`` of a module deployed from GitHub.

    Returns:
        The repository root of a local tree (the folder holding ``pyproject.toml``), or the
        archive URL of the module's tag or commit (``https://github.com/OWNER/REPO/archive/REF.tar.gz``).

    Raises:
        ValueError: when neither applies (set ``OMNISEG_PACKAGE_SOURCE`` yourself then).
    """
    text = str(basedir).rstrip("/") + "/"
    m = _GITHUB_RAW.match(text)
    if m:
        return f"https://github.com/{m[1]}/archive/{m[2]}.tar.gz"
    m = _HOST_RAW.match(text)
    if m:
        return f"https://{m[1]}/{m[2]}/archive/{m[3]}.tar.gz"
    root = Path(basedir).resolve().parent
    if (root / "pyproject.toml").is_file() and (root / "src" / "omniseg").is_dir():
        return str(root)
    raise ValueError(
        f"cannot tell where the omniseg package of the workflow in {basedir} comes from: set "
        "OMNISEG_PACKAGE_SOURCE to its source folder or archive URL before running snakemake"
    )
