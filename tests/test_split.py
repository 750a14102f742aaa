import pandas as pd
import pytest

from omniseg.data.split import SPLITS, assign_splits, split_sheet, split_sizes


@pytest.mark.parametrize(
    ("n", "expected"),
    [
        (1, [1, 0, 0]),
        (2, [1, 0, 1]),  # fewer groups than splits: plain largest remainder
        (3, [1, 1, 1]),
        (4, [2, 1, 1]),
        (5, [3, 1, 1]),
        (10, [6, 1, 3]),
        (20, [12, 2, 6]),
        (100, [60, 10, 30]),
    ],
)
def test_sizes_table(n, expected):
    assert split_sizes(n, (0.6, 0.1, 0.3)) == expected


def test_sizes_minimum_one_and_zero_fraction():
    assert split_sizes(10, (0.9, 0.05, 0.05)) == [8, 1, 1]
    assert split_sizes(10, (0.7, 0.0, 0.3)) == [7, 0, 3]
    assert split_sizes(3, (0.0, 0.0, 1.0)) == [0, 0, 3]


@pytest.mark.parametrize("n", [10, 20, 100])
def test_assign_fractions(n):
    groups = [f"p{i:03d}" for i in range(n)]
    out = assign_splits(groups * 2, seed=3)  # repeated labels count once
    assert set(out) == set(groups)
    counts = [sum(v == s for v in out.values()) for s in SPLITS]
    assert counts == split_sizes(n, (0.6, 0.1, 0.3))


def test_deterministic_and_seeded():
    groups = [f"g{i}" for i in range(30)]
    a = assign_splits(groups, seed=1)
    assert a == assign_splits(list(reversed(groups)), seed=1)  # order of input irrelevant
    assert a != assign_splits(groups, seed=2)


def test_given_honoured():
    groups = [f"g{i}" for i in range(10)]
    given = {"g0": "test", "g1": "test", "g2": "val", "g3": "val", "g4": "val", "gX": "train"}
    out = assign_splits(groups, given=given, seed=0)
    for g, s in given.items():
        if g in groups:
            assert out[g] == s
    assert "gX" not in out
    counts = [sum(v == s for v in out.values()) for s in SPLITS]
    assert counts == split_sizes(10, (0.6, 0.1, 0.3), (0, 3, 2)) == [5, 3, 2]


def test_conflicts_and_bad_values():
    with pytest.raises(ValueError, match="given two splits"):
        assign_splits(["a", "b"], given=[("a", "train"), ("a", "test")])
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        assign_splits(["a"], given={"a": "dev"})
    with pytest.raises(ValueError, match="sum to 1"):
        assign_splits(["a"], fractions=(0.5, 0.1, 0.1))
    with pytest.raises(ValueError, match="non-negative"):
        assign_splits(["a"], fractions=(1.2, -0.2, 0.0))


def _sheet(patients, splits):
    return pd.DataFrame(
        {"roi_id": [f"r{i}" for i in range(len(patients))], "patient": patients, "split": splits}
    )


def test_split_sheet_by_patient():
    patients = [f"p{i % 12}" for i in range(48)]
    splits = [""] * 48
    splits[5] = "val"  # fixes patient p5 to val, its other rows follow
    out = split_sheet(_sheet(patients, splits), seed=4)
    per_patient = out.groupby("patient")["split"].nunique()
    assert (per_patient == 1).all()  # no patient in two splits
    assert set(out.loc[out["patient"] == "p5", "split"]) == {"val"}
    assert set(out["split"]) <= set(SPLITS)
    assert (split_sheet(_sheet(patients, splits), seed=4) == out).all().all()


def test_split_sheet_conflict():
    with pytest.raises(ValueError, match=r"patient 'p1' is in several splits: r0=train, r1=test"):
        split_sheet(_sheet(["p1", "p1", "p2"], ["train", "test", ""]))
