"""The ROI sample sheet: load, resolve paths, validate (schema + cross-row checks).

A sheet is a tab-separated file with one ROI per row and the columns ``roi_id, patient, stain,
tissue, image, mask`` plus the optional ``split`` (``train|val|test`` or empty) and ``truth``
(``.npz`` of all tissue masks). Rows are validated against ``omniseg/schemas/rois.schema.yaml``,
whose ``tissue`` and ``stain`` enums are filled in from the tissue registry and the configured
stains at load time.
"""

from __future__ import annotations

import copy
import functools
import os
from collections.abc import Sequence
from importlib import resources
from pathlib import Path

import jsonschema
import pandas as pd
import yaml

from omniseg.tissues import TissueTable

STAINS = ("he", "pas", "sil", "tri")
REQUIRED = ("roi_id", "patient", "stain", "tissue", "image", "mask")
OPTIONAL = ("split", "truth")
PATH_COLUMNS = ("image", "mask", "truth")


@functools.cache
def _base_schema() -> dict:
    text = resources.files("omniseg").joinpath("schemas/rois.schema.yaml").read_text()
    return yaml.safe_load(text)


def row_schema(tissues: TissueTable, stains: Sequence[str] = STAINS) -> dict:
    """The JSON schema of one sheet row with the tissue and stain enums filled in."""
    schema = copy.deepcopy(_base_schema())
    schema["properties"]["tissue"]["enum"] = list(tissues.keys)
    schema["properties"]["stain"]["enum"] = list(stains)
    return schema


def read_tsv_sheet(
    path: Path, kind: str, required: Sequence[str], optional: Sequence[str], item: str
) -> tuple[pd.DataFrame, list[str], list[str]]:
    """Read a tab-separated sheet as stripped strings; shared by the ROI and slide sheets.

    Args:
        path: the sheet.
        kind: its name in messages (``"sample sheet"``).
        required, optional: column names; missing optional columns are added empty.
        item: what a row lists, for the empty-sheet message (``"ROI"``).

    Returns:
        ``(df, problems, missing)``: the sheet, the problems found so far (missing columns, no
        rows) and the missing required columns.

    Raises:
        FileNotFoundError: no such file.
        ValueError: an empty or unparsable file, naming it.
    """
    if not path.is_file():
        raise FileNotFoundError(f"{kind} {path} does not exist")
    try:
        df = pd.read_csv(path, sep="\t", dtype=str, keep_default_na=False, comment=None)
    except pd.errors.EmptyDataError:
        raise ValueError(f"{kind} {path}:\n  the file is empty (no header, no rows)") from None
    except pd.errors.ParserError as exc:
        raise ValueError(f"{kind} {path}:\n  cannot be parsed as TSV: {exc}") from None
    df.columns = [str(c).strip() for c in df.columns]
    df = df.apply(lambda col: col.str.strip())

    problems: list[str] = []
    missing = [c for c in required if c not in df.columns]
    if missing:
        problems.append(f"missing column(s): {', '.join(missing)}")
    if len(df) == 0:
        problems.append(f"no rows (the sheet lists no {item})")
    for col in optional:
        if col not in df.columns:
            df[col] = ""
    return df, problems, missing


def load_sheet(
    path: str | Path,
    tissues: TissueTable,
    stains: Sequence[str] = STAINS,
    check_files: bool = True,
) -> pd.DataFrame:
    """Read and validate a ROI sample sheet.

    Args:
        path: tab-separated sheet.
        tissues: registry; ``tissue`` values must be its keys.
        stains: allowed stain codes.
        check_files: check that every referenced file exists (existence only, nothing is read,
            so this is cheap enough for DAG construction).

    Returns:
        One row per ROI, all columns as ``str``; ``split`` and ``truth`` are always present
        (empty string when not given); ``image``, ``mask`` and non-empty ``truth`` are absolute
        paths (relative ones are resolved against the sheet's directory). Extra columns are kept.

    Raises:
        FileNotFoundError: the sheet itself does not exist.
        ValueError: ``"sample sheet {path}:"`` followed by every problem found, one per line
            (missing columns, schema violations, duplicate roi_ids, missing files, patients in
            two splits, empty sheet).
    """
    path = Path(path)
    df, problems, missing = read_tsv_sheet(path, "sample sheet", REQUIRED, OPTIONAL, "ROI")

    problems += _schema_problems(df, row_schema(tissues, stains), skip=set(missing))

    if "roi_id" in df.columns:
        dup = df["roi_id"][df["roi_id"].duplicated(keep=False) & (df["roi_id"] != "")]
        for rid, rows in dup.groupby(dup).groups.items():
            where = ", ".join(str(i + 1) for i in rows)
            problems.append(f"rows {where}: duplicate roi_id {rid!r}")

    if "patient" in df.columns:
        problems += _split_conflicts(df)

    base = path.parent
    for col in PATH_COLUMNS:
        if col in df.columns:
            df[col] = [_resolve(v, base) for v in df[col]]
    if check_files:
        cols = [c for c in PATH_COLUMNS if c in df.columns]
        for i, values in enumerate(zip(*(df[c] for c in cols), strict=True)):
            for col, value in zip(cols, values, strict=True):
                if value and not os.path.isfile(value):
                    problems.append(f"{_where(df, i)}: {col} file {value} does not exist")

    if problems:
        raise ValueError(f"sample sheet {path}:\n" + "\n".join(f"  {p}" for p in problems))
    return df.reset_index(drop=True)


def _schema_problems(df: pd.DataFrame, schema: dict, skip: set[str]) -> list[str]:
    validator = jsonschema.Draft202012Validator(schema)
    problems = []
    optional = set(OPTIONAL)
    for i, row in enumerate(df.to_dict(orient="records")):
        # empty optional cells mean "not given"
        obj = {k: v for k, v in row.items() if not (k in optional and v == "")}
        for err in sorted(validator.iter_errors(obj), key=lambda e: list(e.path)):
            if err.validator == "required":
                continue  # reported once as a missing column
            col = err.path[0] if err.path else "?"
            if col in skip:
                continue
            problems.append(f"{_where(df, i)}: column {col}: {_short(err)}")
    return problems


def _short(err: jsonschema.ValidationError) -> str:
    if err.validator == "enum":
        allowed = ", ".join(repr(v) for v in err.validator_value if v != "")
        return f"{err.instance!r} is not one of {allowed}"
    if err.validator == "minLength":
        return "is empty"
    if err.validator == "pattern":
        return f"{err.instance!r} contains white space"
    return err.message


def _split_conflicts(df: pd.DataFrame) -> list[str]:
    given = df[df["split"] != ""]
    problems = []
    for patient, grp in given.groupby("patient", sort=True):
        splits = sorted(set(grp["split"]))
        if len(splits) > 1:
            rois = ", ".join(grp["roi_id"]) if "roi_id" in grp else ""
            problems.append(
                f"patient {patient!r} is in several splits ({', '.join(splits)}): "
                f"ROIs {rois}; all ROIs of a patient must share one split"
            )
    return problems


def _where(df: pd.DataFrame, i: int) -> str:
    rid = df["roi_id"].iat[i] if "roi_id" in df.columns else ""
    return f"row {i + 1} (roi_id {rid!r})"


def _resolve(value: str, base: Path) -> str:
    if not value:
        return ""
    p = Path(value).expanduser()
    if not p.is_absolute():
        p = base / p
    return os.path.normpath(os.path.abspath(p))
