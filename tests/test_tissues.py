"""The tissue registry: loading, validation, lookups."""

from pathlib import Path

import pytest

from omniseg.tissues import SOURCE_UM_PER_PX, TissueTable, load_tissues

REPO = Path(__file__).resolve().parents[1]
HEADER = "id\tkey\tname\tscale\tum_per_px\trelease_folder\tmask_suffix\tcolor\n"


@pytest.fixture
def table():
    return load_tissues(REPO / "config" / "tissues.tsv")


def write(tmp_path, rows):
    p = tmp_path / "tissues.tsv"
    p.write_text(HEADER + "".join("\t".join(map(str, r)) + "\n" for r in rows))
    return p


def test_the_papers_six_tissues(table):
    assert table.keys == ["dt", "pt", "cap", "tuft", "ves", "ptc"]
    assert table.scales == [0.25, 1.0, 2.0]
    assert [t.key for t in table.at_scale(2.0)] == ["cap", "tuft"]
    assert table["tuft"].downsample() == 2.0 / SOURCE_UM_PER_PX == 8.0
    assert table["ptc"].downsample() == 1.0
    assert table.by_release_folder("5_3_ptc").mask_suffix == "PTC_lumen"
    assert table.label_table()[4] == "tuft" and table.label_table()[0] == "background"
    assert table[3].label == 4
    assert table["dt"].rgb == (0x1F, 0x77, 0xB4)


def test_records_round_trip_and_fingerprint(table):
    again = TissueTable.from_records(table.to_records())
    assert again == table and again.fingerprint() == table.fingerprint()
    other = TissueTable.from_records(table.to_records()[:5])
    assert other.fingerprint() != table.fingerprint()


def test_a_user_can_add_a_tissue(tmp_path):
    p = write(
        tmp_path,
        [(0, "glom", "glomerulus", "5x", 2.0, "0_0_glom", "glom", "#ff0000"),
         (1, "ifta", "fibrosis", "2.5x", 4.0, "1_x_ifta", "ifta", "#00ff00")],
    )  # fmt: skip
    t = load_tissues(p)
    assert len(t) == 2 and t.scales == [2.0, 4.0]


@pytest.mark.parametrize(
    "rows, message",
    [
        ([(1, "dt", "d", "10x", 1.0, "f", "s", "#000000")], "ids must be 0..0"),
        ([(0, "dt", "d", "10x", 1.0, "f", "s", "#000000"),
          (1, "dt", "d", "10x", 1.0, "f", "s", "#000000")], "duplicate key"),
        ([(0, "DT", "d", "10x", 1.0, "f", "s", "#000000")], "lower-case"),
        ([(0, "dt", "d", "10x", 0, "f", "s", "#000000")], "um_per_px must be > 0"),
        ([(0, "dt", "d", "10x", "ten", "f", "s", "#000000")], "line 2"),
        ([(0, "dt", "d", "10x", 1.0, "f", "s", "red")], "color must be"),
        ([], "no tissues"),
    ],
)  # fmt: skip
def test_bad_tables_name_the_file_and_problem(tmp_path, rows, message):
    p = write(tmp_path, rows)
    with pytest.raises(ValueError, match=message) as err:
        load_tissues(p)
    assert str(p) in str(err.value)


def test_missing_file_and_column(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.tsv"):
        load_tissues(tmp_path / "nope.tsv")
    p = tmp_path / "t.tsv"
    p.write_text("id\tkey\n0\tdt\n")
    with pytest.raises(ValueError, match="missing column"):
        load_tissues(p)


def test_unknown_key_lists_known(table):
    with pytest.raises(KeyError, match="known: dt, pt"):
        table["glomerulus"]


def test_file_digest_follows_contents_not_path(tmp_path):
    from omniseg.tissues import file_digest

    a, b = tmp_path / "a.tsv", tmp_path / "b.tsv"
    a.write_text("id\tkey\n0\tdt\n")
    b.write_text("id\tkey\n0\tdt\n")
    assert file_digest(a) == file_digest(b)
    b.write_text("id\tkey\n0\tpt\n")
    assert file_digest(a) != file_digest(b)
