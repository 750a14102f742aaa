"""Shared test settings."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import h5py
import numpy as np
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


class TruthAsPrediction:
    """A stand-in for :func:`omniseg.steps.slides.predict_slide` whose probability maps are the
    slide's ground truth (``{stem}_truth.h5`` beside the slide; 255 inside, 0 outside, at level
    0) for the tissues of the scale asked; :attr:`models` records the model files of each call,
    :attr:`kwargs` its keyword arguments.
    Through the real aggregation and scoring it must score ~100."""

    def __init__(self):
        self.models: list[list] = []
        self.kwargs: list[dict] = []

    def __call__(self, models, slide, mask_png, mask_json, tissues, key, out_h5, **kwargs):
        from omniseg.steps.slides import tissues_at_scale_key

        self.models.append(list(models))
        self.kwargs.append(kwargs)
        truth = Path(slide).with_name(Path(slide).stem + "_truth.h5")
        _, at_scale = tissues_at_scale_key(tissues, key)
        Path(out_h5).parent.mkdir(parents=True, exist_ok=True)
        with h5py.File(truth, "r") as src, h5py.File(out_h5, "w") as fh:
            for t in at_scale:
                fh[f"prob/{t.key}"] = (src[t.key][()] > 0).astype(np.uint8) * 255
            shape = np.asarray(src[at_scale[0].key].shape)
            fh.attrs.update(factor=1.0, level0_shape=shape, mpp=0.25, um_per_px=0.25)
        return Path(out_h5)


@pytest.fixture
def truth_as_prediction() -> TruthAsPrediction:
    """A fresh :class:`TruthAsPrediction` (patch it over a bench's ``predict_slide``)."""
    return TruthAsPrediction()
