#!/usr/bin/env bash
# Snakemake runs this once, inside the new env, right after building it (a post-deploy script:
# same name as the env file). It installs the omniseg package itself, without its dependencies
# (the env file pins those), from the source tree of the workflow being run, which
# workflow/rules/common.smk puts in OMNISEG_PACKAGE_SOURCE: the repository root of a clone
# (installed editable: the env runs the clone's current code), or the release archive of the
# tagged version when the workflow is deployed as a module from GitHub.
set -euo pipefail
src="${OMNISEG_PACKAGE_SOURCE:?is set by workflow/rules/common.smk while Snakemake builds the envs}"
if [ -d "$src" ]; then
    python -m pip install --no-deps --no-build-isolation -e "$src"
else
    python -m pip install --no-deps --no-build-isolation "$src"
fi
