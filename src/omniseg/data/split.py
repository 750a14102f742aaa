"""Group-level (patient-level) train/val/test split, deterministic by seed.

Every distinct group (patient, or source image in the public release) goes to exactly one
split, so that no patient contributes patches to two splits.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd

SPLITS = ("train", "val", "test")
DEFAULT_FRACTIONS = (0.6, 0.1, 0.3)


def split_sizes(n: int, fractions: Sequence[float], given: Sequence[int] = (0, 0, 0)) -> list[int]:
    """Number of groups per split for ``n`` groups of which ``given[s]`` are fixed in split ``s``.

    Without fixed groups this is largest-remainder rounding of ``fractions * n``; then every
    split with a positive fraction gets at least one group when ``n`` allows it. Fixed groups
    count towards their split; the free groups go one at a time to the split furthest below its
    quota ``fractions[s] * n`` (ties: the first in ``SPLITS``), after first giving one to each
    positive-fraction split still empty.

    Returns:
        Total groups per split (fixed + free), in ``SPLITS`` order; sums to ``n``.
    """
    f = _check_fractions(fractions)
    counts = [int(g) for g in given]
    free = n - sum(counts)
    if free < 0:
        raise ValueError(f"{sum(counts)} groups are fixed but there are only {n}")
    if n >= sum(1 for x in f if x > 0):
        for s in range(len(SPLITS)):
            if free and f[s] > 0 and counts[s] == 0:
                counts[s] += 1
                free -= 1
    quota = [fs * n for fs in f]
    for _ in range(free):
        deficits = [quota[s] - counts[s] if f[s] > 0 else -np.inf for s in range(len(SPLITS))]
        counts[int(np.argmax(deficits))] += 1
    return counts


def assign_splits(
    groups: Sequence[str],
    fractions: Sequence[float] = DEFAULT_FRACTIONS,
    seed: int = 0,
    given: Mapping[str, str] | Iterable[tuple[str, str]] | None = None,
) -> dict[str, str]:
    """Assign each distinct group to one of ``SPLITS``.

    The distinct groups are sorted, permuted with ``numpy.random.default_rng(seed)``, and the
    free (not ``given``) groups are dealt out in that order: the first ``sizes[train]`` to
    train, then val, then test, with sizes from :func:`split_sizes`.

    Args:
        groups: group labels (repeats allowed), e.g. the ``patient`` column.
        fractions: shares of train, val, test; non-negative, summing to 1.
        seed: permutation seed; same inputs and seed give the same assignment.
        given: fixed assignments, a mapping or ``(group, split)`` pairs; honoured exactly.
            Groups not in ``groups`` are ignored.

    Returns:
        ``{group: split}`` for every distinct group.

    Raises:
        ValueError: bad fractions, an unknown split name, or a group given two splits.
    """
    uniq = sorted({str(g) for g in groups})
    fixed = _collect_given(given)
    fixed = {g: s for g, s in fixed.items() if g in set(uniq)}
    given_counts = [sum(1 for s in fixed.values() if s == name) for name in SPLITS]
    sizes = split_sizes(len(uniq), fractions, given_counts)
    order = np.random.default_rng(seed).permutation(len(uniq))
    free = [uniq[i] for i in order if uniq[i] not in fixed]
    out = dict(fixed)
    pos = 0
    for name, size, have in zip(SPLITS, sizes, given_counts, strict=True):
        for g in free[pos : pos + size - have]:
            out[g] = name
        pos += size - have
    return {g: out[g] for g in uniq}


def split_sheet(
    df: pd.DataFrame, fractions: Sequence[float] = DEFAULT_FRACTIONS, seed: int = 0
) -> pd.DataFrame:
    """Fill the ``split`` column of a sample sheet by patient.

    Rows whose ``split`` is set keep it, and fix their patient's split; the remaining patients
    are assigned by :func:`assign_splits`. ROIs of one patient always share one split.

    Returns:
        A copy of ``df`` with ``split`` filled for every row.

    Raises:
        ValueError: a patient whose rows name different splits (listing the ROIs), or an
            unknown split name.
    """
    out = df.copy()
    if "split" not in out.columns:
        out["split"] = ""
    split = out["split"].fillna("").astype(str).str.strip()
    patient = out["patient"].astype(str)
    pairs = list(zip(patient[split != ""], split[split != ""], strict=True))
    try:
        given = _collect_given(pairs)
    except ValueError:
        problems = []
        for p, grp in out[split != ""].groupby(patient[split != ""], sort=True):
            names = sorted(set(split[grp.index]))
            if len(names) > 1:
                rois = ", ".join(
                    f"{r}={split[i]}" for i, r in zip(grp.index, grp["roi_id"], strict=True)
                )
                problems.append(f"patient {p!r} is in several splits: {rois}")
        raise ValueError(
            "conflicting splits within a patient:\n  " + "\n  ".join(problems)
        ) from None
    mapping = assign_splits(patient.tolist(), fractions, seed, given)
    out["split"] = patient.map(mapping).astype(str)
    return out


def _collect_given(given: Mapping[str, str] | Iterable[tuple[str, str]] | None) -> dict[str, str]:
    if given is None:
        return {}
    items = given.items() if isinstance(given, Mapping) else given
    out: dict[str, str] = {}
    for g, s in items:
        g, s = str(g), str(s)
        if s not in SPLITS:
            raise ValueError(
                f"group {g!r}: unknown split {s!r} (expected one of {', '.join(SPLITS)})"
            )
        if out.setdefault(g, s) != s:
            raise ValueError(f"group {g!r} is given two splits: {out[g]} and {s}")
    return out


def _check_fractions(fractions: Sequence[float]) -> list[float]:
    f = [float(x) for x in fractions]
    if len(f) != len(SPLITS):
        raise ValueError(f"fractions must have {len(SPLITS)} values (train, val, test), got {f}")
    if any(x < 0 or not np.isfinite(x) for x in f):
        raise ValueError(f"fractions must be non-negative, got {f}")
    if abs(sum(f) - 1.0) > 1e-6:
        raise ValueError(f"fractions must sum to 1, got {f} (sum {sum(f):g})")
    return f
