"""bench/stain.py: tiles read as decoded and through a stain gain, and the slide's density."""

from __future__ import annotations

import json

import pytest


def test_times_both_reads_and_the_density_on_a_small_slide(bench, capsys):
    assert bench("stain").main(["--height", "512", "--width", "1024", "--repeats", "1"]) == 0
    report = json.loads(capsys.readouterr().out)
    read = report["read"]
    assert read["tiles"] > 0 and read["as_decoded_s"] > 0 and read["through_gain_s"] > 0
    # the ratio of the unrounded times; the rounded ones agree within their rounding
    assert read["ratio"] == pytest.approx(read["through_gain_s"] / read["as_decoded_s"], rel=0.1)
    assert report["density_s"] > 0 and report["slide"]["tissue_mm2"] > 0
