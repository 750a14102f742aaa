"""Shared test settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

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


def _load_bench(name: str) -> ModuleType:
    """The script ``bench/{name}.py`` imported as a module (``bench/`` is not a package)."""
    spec = importlib.util.spec_from_file_location(name, REPO / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def bench():
    """``bench(name)``: the script ``bench/{name}.py`` imported as a module."""
    return _load_bench
