"""The slide sheet (``config/slides.tsv``): load, resolve paths, validate.

A sheet is a tab-separated file with one whole slide per row and the columns ``slide_id, path``
plus the optional ``mpp`` (level-0 um/px, overrides the metadata), ``mask`` (a tissue-mask image),
``truth`` (full ground truth HDF5, for scoring) and ``stain`` (the stain of the training ROIs the
slide's colours are normalised to; required where ``wsi.stain_norm`` is on). Rows are validated against
``omniseg/schemas/slides.schema.yaml``.
"""

from __future__ import annotations

import functools
import math
import os
from importlib import resources
from pathlib import Path

import jsonschema
import pandas as pd
import yaml

from omniseg.data.sheet import read_tsv_sheet

REQUIRED = ("slide_id", "path")
OPTIONAL = ("mpp", "mask", "truth", "stain")
PATH_COLUMNS = ("path", "mask", "truth")


@functools.cache
def slide_schema() -> dict:
    """The JSON schema of one slide-sheet row."""
    text = resources.files("omniseg").joinpath("schemas/slides.schema.yaml").read_text()
    return yaml.safe_load(text)


def load_slide_sheet(
    path: str | Path, check_files: bool = True, require_stain: bool = False
) -> pd.DataFrame:
    """Read and validate a slide sheet.

    Args:
        path: tab-separated sheet.
        check_files: check that every referenced file exists (existence only, cheap enough for
            DAG construction).
        require_stain: every row must give its ``stain`` (``wsi.stain_norm`` is on).

    Returns:
        One row per slide. ``slide_id``, ``path``, ``mask``, ``truth`` are ``str`` (``mask`` and
        ``truth`` empty when not given; paths absolute, relative ones resolved against the
        sheet's directory); ``mpp`` is a float, or None when not given; ``stain`` is ``str``
        (empty when not given). Extra columns are kept.

    Raises:
        FileNotFoundError: the sheet itself does not exist.
        ValueError: ``"slide sheet {path}:"`` followed by every problem found, one per line.
    """
    path = Path(path)
    df, problems, missing = read_tsv_sheet(path, "slide sheet", REQUIRED, OPTIONAL, "slide")

    validator = jsonschema.Draft202012Validator(slide_schema())
    for i, row in enumerate(df.to_dict(orient="records")):
        obj = {k: v for k, v in row.items() if not (k in OPTIONAL and v == "")}
        for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
            col = err.path[0] if err.path else "?"
            if err.validator == "required" or col in missing:
                continue
            problems.append(f"{_where(df, i)}: column {col}: {_short(err, col)}")
        mpp = row.get("mpp", "")
        if mpp and _number(mpp) is not None and not _number(mpp) > 0:
            problems.append(f"{_where(df, i)}: column mpp: must be > 0, got {mpp!r}")
        if require_stain and not row.get("stain", ""):
            problems.append(
                f"{_where(df, i)}: column stain: empty; wsi.stain_norm normalises each slide "
                "to the training ROIs of its stain (e.g. he), or set wsi.stain_norm: false"
            )

    if "slide_id" in df.columns:
        dup = df["slide_id"][df["slide_id"].duplicated(keep=False) & (df["slide_id"] != "")]
        for sid, rows in dup.groupby(dup).groups.items():
            where = ", ".join(str(i + 1) for i in rows)
            problems.append(f"rows {where}: duplicate slide_id {sid!r}")

    base = path.parent
    for col in PATH_COLUMNS:
        if col in df.columns:
            df[col] = [_resolve(v, base) for v in df[col]]
    if check_files:
        cols = [c for c in PATH_COLUMNS if c in df.columns]
        for i in range(len(df)):
            for col in cols:
                value = df[col].iat[i]
                if value and not os.path.isfile(value):
                    problems.append(f"{_where(df, i)}: {col} file {value} does not exist")

    if problems:
        raise ValueError(f"slide sheet {path}:\n" + "\n".join(f"  {p}" for p in problems))
    df["mpp"] = pd.Series([_number(v) if v else None for v in df["mpp"]], dtype=object)
    return df.reset_index(drop=True)


def _number(text: str) -> float | None:
    try:
        v = float(text)
    except ValueError:
        return None
    return v if math.isfinite(v) else None


def _short(err: jsonschema.ValidationError, col: str) -> str:
    if err.validator == "minLength":
        return "is empty"
    if err.validator == "pattern":
        if col == "mpp":
            return f"{err.instance!r} is not a number (micrometres per pixel, e.g. 0.25)"
        return f"{err.instance!r} may hold only letters, digits, '.', '_' and '-'"
    return err.message


def _where(df: pd.DataFrame, i: int) -> str:
    sid = df["slide_id"].iat[i] if "slide_id" in df.columns else ""
    return f"row {i + 1} (slide_id {sid!r})"


def _resolve(value: str, base: Path) -> str:
    if not value:
        return ""
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = base / p
    return os.path.normpath(os.path.abspath(p))
