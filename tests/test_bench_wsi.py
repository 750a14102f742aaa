"""bench/wsi.py: its untrained Omni-Seg is the demo config's unless told otherwise."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


def _args(kwargs: str = "", width: int = 0) -> argparse.Namespace:
    return argparse.Namespace(kwargs=kwargs, width=width)


def test_the_untrained_model_is_the_demo_configs_omniseg(bench):
    wsi = bench("wsi")
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    assert wsi.untrained_kwargs(_args()) == config["methods"]["omniseg"]["kwargs"]
    assert wsi.untrained_kwargs(_args(width=8))["width"] == 8


def test_kwargs_replace_the_config_and_must_be_an_object(bench):
    wsi = bench("wsi")
    assert wsi.untrained_kwargs(_args("{}")) == {}
    assert wsi.untrained_kwargs(_args('{"width": 32}', width=16)) == {"width": 16}
    with pytest.raises(SystemExit, match="JSON object"):
        wsi.untrained_kwargs(_args("[1]"))
