from pathlib import Path

import pytest

from omniseg.data.sheet import load_sheet, row_schema

HEADER = "roi_id\tpatient\tstain\ttissue\timage\tmask"


def _touch(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")


def _write(tmp_path: Path, rows: list[str], header: str = HEADER) -> Path:
    sheet = tmp_path / "sheets" / "rois.tsv"
    sheet.parent.mkdir(parents=True, exist_ok=True)
    sheet.write_text("\n".join([header, *rows]) + "\n")
    return sheet


def test_valid_sheet_resolves_paths_against_sheet_dir(tmp_path, tissues):
    for name in ("a.png", "a_mask.png", "b.png", "b_mask.png"):
        _touch(tmp_path / "sheets" / "img" / name)
    sheet = _write(
        tmp_path,
        [
            "r1\tp1\the\ttuft\timg/a.png\timg/a_mask.png",
            "r2\tp2\tpas\tdt\timg/b.png\timg/b_mask.png",
        ],
    )
    df = load_sheet(sheet, tissues)
    assert list(df["roi_id"]) == ["r1", "r2"]
    assert df["image"][0] == str((tmp_path / "sheets/img/a.png").resolve())
    assert Path(df["mask"][1]).is_absolute()
    assert list(df["split"]) == ["", ""] and list(df["truth"]) == ["", ""]


def test_optional_split_and_truth(tmp_path, tissues):
    for name in ("a.png", "a_m.png", "a.npz"):
        _touch(tmp_path / "sheets" / name)
    sheet = _write(
        tmp_path,
        ["r1\tp1\the\tcap\ta.png\ta_m.png\ttest\ta.npz"],
        header=HEADER + "\tsplit\ttruth",
    )
    df = load_sheet(sheet, tissues)
    assert df["split"][0] == "test"
    assert df["truth"][0] == str((tmp_path / "sheets/a.npz").resolve())


def test_all_problems_in_one_error(tmp_path, tissues):
    for name in ("a.png", "a_m.png"):
        _touch(tmp_path / "sheets" / name)
    sheet = _write(
        tmp_path,
        [
            "r1\tp1\the\ttuft\ta.png\ta_m.png",
            "r2\tp1\the\tkidney\ta.png\ta_m.png",  # unknown tissue
            "r3\tp2\tgiemsa\ttuft\ta.png\ta_m.png",  # unknown stain
            "r1\tp3\tpas\tdt\ta.png\ta_m.png",  # duplicate id
            "r5\tp4\tpas\tdt\tmissing.png\ta_m.png",  # missing file
        ],
    )
    with pytest.raises(ValueError) as info:
        load_sheet(sheet, tissues)
    msg = str(info.value)
    assert msg.startswith(f"sample sheet {sheet}:")
    lines = msg.splitlines()[1:]
    assert any("row 2" in line and "'kidney'" in line and "tissue" in line for line in lines)
    assert any("row 3" in line and "'giemsa'" in line and "stain" in line for line in lines)
    assert any("rows 1, 4" in line and "duplicate roi_id 'r1'" in line for line in lines)
    assert any(
        "row 5" in line and "missing.png" in line and "does not exist" in line for line in lines
    )
    assert len(lines) == 4


def test_check_files_false_skips_existence(tmp_path, tissues):
    sheet = _write(tmp_path, ["r1\tp1\the\ttuft\tnope.png\tnope_m.png"])
    df = load_sheet(sheet, tissues, check_files=False)
    assert df["image"][0].endswith("nope.png")
    with pytest.raises(ValueError, match="nope.png"):
        load_sheet(sheet, tissues)


def test_custom_stains(tmp_path, tissues):
    sheet = _write(tmp_path, ["r1\tp1\tihc\ttuft\ta.png\tb.png"])
    assert load_sheet(sheet, tissues, stains=["ihc"], check_files=False)["stain"][0] == "ihc"
    with pytest.raises(ValueError, match="'ihc' is not one of"):
        load_sheet(sheet, tissues, check_files=False)


def test_empty_sheet(tmp_path, tissues):
    sheet = _write(tmp_path, [])
    with pytest.raises(ValueError, match="no rows"):
        load_sheet(sheet, tissues)
    sheet.write_text("")
    with pytest.raises(ValueError, match=r"sample sheet .*:\n.*empty"):
        load_sheet(sheet, tissues)


def test_missing_column_and_empty_cell(tmp_path, tissues):
    sheet = _write(
        tmp_path, ["r1\t\the\ttuft\ta.png"], header="roi_id\tpatient\tstain\ttissue\timage"
    )
    with pytest.raises(ValueError) as info:
        load_sheet(sheet, tissues, check_files=False)
    assert "missing column(s): mask" in str(info.value)
    assert "column patient: is empty" in str(info.value)


def test_patient_in_two_splits(tmp_path, tissues):
    sheet = _write(
        tmp_path,
        [
            "r1\tp1\the\ttuft\ta\tb\ttrain",
            "r2\tp1\the\tdt\ta\tb\ttest",
            "r3\tp2\the\tdt\ta\tb\tval",
        ],
        header=HEADER + "\tsplit",
    )
    with pytest.raises(ValueError, match=r"patient 'p1' is in several splits \(test, train\)"):
        load_sheet(sheet, tissues, check_files=False)


def test_bad_split_value(tmp_path, tissues):
    sheet = _write(tmp_path, ["r1\tp1\the\ttuft\ta\tb\ttraining"], header=HEADER + "\tsplit")
    with pytest.raises(ValueError, match="column split: 'training' is not one of"):
        load_sheet(sheet, tissues, check_files=False)


def test_schema_enums_come_from_registry(tissues):
    schema = row_schema(tissues, ["he"])
    assert schema["properties"]["tissue"]["enum"] == tissues.keys
    assert schema["properties"]["stain"]["enum"] == ["he"]
    assert all("description" in p for p in schema["properties"].values())
