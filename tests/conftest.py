"""Shared test settings."""

from __future__ import annotations

from pathlib import Path

import pytest

from omniseg.tissues import TissueTable, load_tissues

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _float32_everywhere(monkeypatch):
    """Tests compute in float32 whatever the machine: with ``OMNISEG_PRECISION`` unset, a CPU
    with AMX or AVX-512 BF16 would autocast to bfloat16 and tolerances would depend on the
    machine (the bf16 paths have their own tests, which set the precision themselves).
    Subprocesses inherit it."""
    monkeypatch.setenv("OMNISEG_PRECISION", "float32")


@pytest.fixture(scope="session")
def tissues() -> TissueTable:
    """The project's tissue registry, ``config/tissues.tsv``."""
    return load_tissues(REPO / "config" / "tissues.tsv")
