"""The default demo run learns: checks on the results of `snakemake --cores all`.

Run after the quick start (``.ci/run`` does): ``OMNISEG_DEMO_RESULTS=results pytest -m demo``.
Skipped otherwise: training the demo takes minutes.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from omniseg.data.patchset import read_patch_set
from omniseg.metrics import dice_batch

RESULTS = os.environ.get("OMNISEG_DEMO_RESULTS")
pytestmark = [
    pytest.mark.demo,
    pytest.mark.skipif(
        not RESULTS, reason="set OMNISEG_DEMO_RESULTS to a finished demo's results/"
    ),
]


def chance_dice(results: Path, tissue: str, nonempty: bool = False) -> float:
    """Mean Dice of the best trivial answer on the test patches: all foreground or all empty
    (``nonempty``: over the patches whose mask is not empty, where all foreground is best)."""
    masks = read_patch_set(results / "patches" / f"{tissue}.h5", split="test")["masks"] > 0
    if nonempty:
        masks = masks[masks.reshape(len(masks), -1).any(axis=1)]
    full = dice_batch(np.ones_like(masks), masks).mean()
    empty = dice_batch(np.zeros_like(masks), masks).mean() if not nonempty else 0.0
    return float(max(full, empty))


def test_omniseg_learns_well_above_chance():
    """Omni-Seg segments the structures that are there far better than chance: its Dice over
    the non-empty test masks is 10 points above the all-foreground answer's, it is 5 points
    above the best trivial answer on at least half of the tissues, and its mean over all test
    masks is 10 points above the best trivial answers' mean.

    About a third of the test masks are empty (``patches.absent_fraction``), where answering
    nothing scores 100: the last check fails when the heads fire on tissue without their
    structure (without the presence gate the demo's Omni-Seg scored 64.1 against the trivial
    answers' 45.5, and earlier defaults 48, under them).
    """
    results = Path(RESULTS)
    summary = pd.read_csv(results / "eval/omniseg/summary.csv").set_index("tissue")
    tissues = [t for t in summary.index if t != "average"]
    chance = {t: chance_dice(results, t) for t in tissues}
    nonempty = [t for t in tissues if summary.loc[t, "n_nonempty"] > 0]
    chance_ne = {t: chance_dice(results, t, nonempty=True) for t in nonempty}
    mean_ne = float(np.mean([summary.loc[t, "dice_nonempty_pct"] for t in nonempty]))
    assert mean_ne >= float(np.mean(list(chance_ne.values()))) + 10, (mean_ne, chance_ne)
    above = [t for t in tissues if summary.loc[t, "dice_pct"] > chance[t] + 5]
    assert len(above) >= len(tissues) // 2, (summary["dice_pct"].to_dict(), chance)
    mean_all = float(np.mean([summary.loc[t, "dice_pct"] for t in tissues]))
    assert mean_all >= float(np.mean(list(chance.values()))) + 10, (mean_all, chance)


def test_every_method_is_in_table1():
    results = Path(RESULTS)
    table = pd.read_csv(results / "tables/table1.csv")
    evaluated = {p.parent.name for p in (results / "eval").glob("*/summary.csv")}
    assert set(table["method"]) == evaluated and "omniseg" in evaluated


def test_every_method_segments_the_demo_slides():
    results = Path(RESULTS)
    table = pd.read_csv(results / "tables/slides.csv")
    evaluated = {p.parent.name for p in (results / "eval").glob("*/summary.csv")}
    assert set(table["method"]) == evaluated
    assert (table["slides"] >= 2).all()  # the demo scores two slides of different seeds
    assert table["dice"].between(0, 100).all() and table["raw_dice"].between(0, 100).all()
