"""Atomic writes and checked image reading."""

import numpy as np
import pytest

from omniseg.io import atomic_path, read_image, read_mask, write_png


def test_atomic_path_leaves_nothing_on_error(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.txt"]


def test_atomic_path_replaces_on_success(tmp_path):
    target = tmp_path / "sub" / "out.txt"
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"
    assert target.stat().st_mode & 0o044  # readable by others, unlike mkstemp's 0600


def test_png_round_trip_rgba_and_grey(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, (7, 9, 3), dtype=np.uint8)
    write_png(tmp_path / "a.png", rgb)
    assert np.array_equal(read_image(tmp_path / "a.png"), rgb)
    rgba = np.dstack([rgb, np.full((7, 9), 255, np.uint8)])
    write_png(tmp_path / "b.png", rgba)
    assert np.array_equal(read_image(tmp_path / "b.png"), rgb)
    grey = rgb[:, :, 0]
    write_png(tmp_path / "c.png", grey)
    assert np.array_equal(read_image(tmp_path / "c.png"), np.dstack([grey] * 3))


def test_masks_binary_in_several_encodings(tmp_path):
    m = np.zeros((5, 6), bool)
    m[1:3, 2:5] = True
    write_png(tmp_path / "m255.png", m)
    write_png(tmp_path / "m1.png", m.astype(np.uint8))
    write_png(
        tmp_path / "rgba.png",
        np.dstack([m.astype(np.uint8) * 255] * 3 + [np.full((5, 6), 255, np.uint8)]),
    )
    for name in ("m255.png", "m1.png", "rgba.png"):
        assert np.array_equal(read_mask(tmp_path / name), m), name


def test_bad_inputs_name_the_file(tmp_path):
    with pytest.raises(ValueError, match="missing.png does not exist"):
        read_image(tmp_path / "missing.png")
    write_png(tmp_path / "ok.png", np.zeros((64, 64, 3), np.uint8) + 7)
    data = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="cut.png cannot be read"):
        read_image(tmp_path / "cut.png")
    grey = np.array([[0, 128], [255, 0]], np.uint8)
    write_png(tmp_path / "grey.png", grey)
    with pytest.raises(ValueError, match="grey.png is not binary"):
        read_mask(tmp_path / "grey.png")
    colour = np.zeros((2, 2, 3), np.uint8)
    colour[0, 0] = (255, 0, 0)
    write_png(tmp_path / "colour.png", colour)
    with pytest.raises(ValueError, match="colour.png is a colour image"):
        read_mask(tmp_path / "colour.png")
