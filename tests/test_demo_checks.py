"""bench/demo_checks.py: the slide floors of the exported method and of Omni-Seg, bad input."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest


@pytest.fixture(scope="module")
def demo_checks(bench):
    return bench("demo_checks")


def _slide_table(results: Path, dice: dict[str, dict[str, float]]) -> None:
    rows = [
        {"method": m, "tissue": k, "dice": v}
        for m, per in dice.items()
        for k, v in {**per, "average": sum(per.values()) / len(per)}.items()
    ]
    (results / "tables").mkdir(parents=True)
    pd.DataFrame(rows).to_csv(results / "tables" / "slides.csv", index=False)


def test_floors_of_the_exported_method_and_of_omniseg(tmp_path, demo_checks):
    floors = demo_checks.SLIDE_FLOORS
    good = {k: f + 1.0 for k, f in floors.items()}
    bad = {**good, "pt": floors["pt"] - 0.5}
    _slide_table(tmp_path, {"multi_unet": good, "omniseg": bad})
    report = demo_checks.check(tmp_path, "omniseg", slide_method="multi_unet")
    assert all(f["met"] for f in report["slide_floors"].values())
    assert len(report["slide_floors"]) == len(floors)
    assert report["omniseg_slide_floors"]["pt"] == {
        "dice": floors["pt"] - 0.5, "floor": floors["pt"], "met": False
    }  # fmt: skip
    assert report["all_met"] is False  # Omni-Seg misses a floor (and trails on the slides)


def test_an_unscored_slide_method_is_an_error_not_a_pass(tmp_path, demo_checks, capsys):
    _slide_table(tmp_path, {"omniseg": {k: 99.0 for k in demo_checks.SLIDE_FLOORS}})
    with pytest.raises(ValueError, match=r"slides\.csv: the slide method 'nope' is not in"):
        demo_checks.check(tmp_path, "omniseg", slide_method="nope")
    assert demo_checks.main([str(tmp_path), "--slide-method", "nope"]) == 2
    assert "scored: omniseg" in capsys.readouterr().err
