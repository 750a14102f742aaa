import logging
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from omniseg.data.patches import (
    allocate,
    crop_origins,
    cut_patches,
    downscale_image,
    downscale_mask,
    extract_patches,
    scale_factor,
    scaled_shape,
)
from omniseg.data.patchset import describe, read_patch_set
from omniseg.io import write_png


@pytest.mark.parametrize(
    ("src", "dst", "factor"),
    [
        (0.25, 2.0, 8.0),
        (0.25, 1.0, 4.0),
        (0.25, 0.5, 2.0),
        (0.25, 0.25, 1.0),
        (0.25, 0.6, 2.4),
        (0.5, 2.0, 4.0),
        (0.1, 0.3, 3.0),
    ],
)
def test_scale_factor_table(src, dst, factor):
    assert scale_factor(src, dst) == pytest.approx(factor, abs=1e-12)


def test_scale_factor_snaps_and_rejects():
    assert scale_factor(0.1, 0.3) == 3.0  # 0.3 / 0.1 = 2.9999999999999996 in floats
    with pytest.raises(ValueError, match="upsampling"):
        scale_factor(1.0, 0.25)
    with pytest.raises(ValueError, match="> 0"):
        scale_factor(0.0, 1.0)


def test_block_mean_known_array():
    img = np.arange(25, dtype=np.uint8).reshape(5, 5)  # remainder row/col 4 is cropped
    out = downscale_image(img, 2)
    # block (0,0) = 0,1,5,6 -> 3; (0,1) = 2,3,7,8 -> 5; (1,0) = 10,11,15,16 -> 13; (1,1) -> 15
    np.testing.assert_array_equal(out, [[3, 5], [13, 15]])
    half = np.array([[0, 1], [0, 0]], dtype=np.uint8)  # mean 0.25 -> 0; [[0,1],[1,0]] -> 0.5 -> 1
    assert downscale_image(half, 2)[0, 0] == 0
    assert downscale_image(np.array([[0, 1], [1, 0]], dtype=np.uint8), 2)[0, 0] == 1
    rgb = np.stack([img, img * 2, 255 - img], axis=-1)
    out3 = downscale_image(rgb, 2)
    assert out3.shape == (2, 2, 3) and out3.dtype == np.uint8
    np.testing.assert_array_equal(out3[..., 2], 255 - np.array([[3, 5], [13, 15]]))


def test_factor_one_is_a_copy():
    img = np.zeros((4, 4, 3), np.uint8)
    out = downscale_image(img, 1.0)
    out[0, 0, 0] = 9
    assert img[0, 0, 0] == 0


def test_non_integer_known_values_and_mean():
    row = np.array([[0, 3, 6]], dtype=np.uint8).repeat(3, axis=0)
    # factor 1.5: pixel 0 covers [0, 1.5) -> (0 + 3*0.5) / 1.5 = 1; pixel 1 -> (3*0.5 + 6) / 1.5 = 5
    np.testing.assert_array_equal(downscale_image(row, 1.5), [[1, 5], [1, 5]])
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(90, 120, 3), dtype=np.uint8)
    out = downscale_image(img, 2.5)  # 90 / 2.5 and 120 / 2.5 are whole: no crop
    assert out.shape == (36, 48, 3)
    np.testing.assert_allclose(out.mean(axis=(0, 1)), img.mean(axis=(0, 1)), atol=0.05)
    flat = np.full((50, 50, 3), 77, np.uint8)
    assert (downscale_image(flat, 2.4) == 77).all()
    assert scaled_shape((50, 50), 2.4) == (20, 20)


@pytest.mark.parametrize("factor", [4, 2.4])
def test_mask_stays_binary_and_aligned(factor):
    mask = np.zeros((64, 64), bool)
    mask[32:48, 16:40] = True
    img = np.where(mask[..., None], 200, 10).astype(np.uint8).repeat(3, axis=2)
    m = downscale_mask(mask, factor)
    i = downscale_image(img, factor)
    assert m.dtype == bool and m.shape == i.shape[:2] == scaled_shape((64, 64), factor)
    assert ((i[..., 0] >= 105) == m).all()  # mask = majority of the image pixel's area
    if factor == 4:
        expected = np.zeros((16, 16), bool)
        expected[8:12, 4:10] = True
        np.testing.assert_array_equal(m, expected)


def test_crop_origins_bounds_and_object_share():
    mask = np.zeros((256, 300), bool)
    mask[200:204, 10:14] = True  # one small object near the border
    rng = np.random.default_rng(0)
    o = crop_origins(mask, 100, 32, rng, object_fraction=0.4)
    assert o.shape == (100, 2) and o.dtype == np.int64
    assert (o >= 0).all() and (o[:, 0] <= 256 - 32).all() and (o[:, 1] <= 300 - 32).all()
    hits = (o[:, 0] <= 203) & (o[:, 0] + 32 > 200) & (o[:, 1] <= 13) & (o[:, 1] + 32 > 10)
    assert hits[:40].all()  # the object-centred crops come first and all contain the object
    assert hits[40:].sum() < 10  # uniform crops rarely do
    again = crop_origins(mask, 100, 32, np.random.default_rng(0), object_fraction=0.4)
    np.testing.assert_array_equal(o, again)
    none = crop_origins(mask, 100, 32, np.random.default_rng(0), object_fraction=0.0)
    assert none.shape == (100, 2) and hits.sum() > 3 * _hits(none)


def _hits(o):
    return int(
        ((o[:, 0] <= 203) & (o[:, 0] + 32 > 200) & (o[:, 1] <= 13) & (o[:, 1] + 32 > 10)).sum()
    )


def test_crop_origins_small_objects_sampled_per_object():
    mask = np.zeros((200, 200), bool)
    mask[:100, :100] = True  # one big object
    mask[150, 150] = True  # one single-pixel object
    o = crop_origins(mask, 400, 20, np.random.default_rng(1), object_fraction=1.0)
    small = (o[:, 0] <= 150) & (o[:, 0] + 20 > 150) & (o[:, 1] <= 150) & (o[:, 1] + 20 > 150)
    assert 0.35 < small.mean() < 0.65  # per-object, not per-pixel (that would be 1e-4)


def test_crop_origins_empty_mask_and_too_small():
    o = crop_origins(np.zeros((40, 40), bool), 5, 40, np.random.default_rng(0), 1.0)
    assert (o == 0).all()
    with pytest.raises(ValueError, match="39x40 px is smaller than one 40x40"):
        crop_origins(np.zeros((39, 40), bool), 1, 40, np.random.default_rng(0), 0.5)


def test_allocate_even():
    counts = allocate(7, 3, np.random.default_rng(0))
    assert sorted(counts.tolist()) == [2, 2, 3]
    assert allocate(0, 2, np.random.default_rng(0)).tolist() == [0, 0]


def _roi(tmp_path, name, size, seed):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), bool)
    r, c = rng.integers(0, size - 40, size=2)
    mask[r : r + 40, c : c + 40] = True
    write_png(tmp_path / f"{name}.png", img)
    write_png(tmp_path / f"{name}_mask.png", mask)
    return img, mask


def _sheet(tmp_path, tissue_key, splits, size=256):
    rows, arrays = [], {}
    for i, split in enumerate(splits):
        name = f"{tissue_key}_{i}"
        arrays[name] = _roi(tmp_path, name, size, i)
        rows.append(
            {
                "roi_id": name,
                "patient": f"p{i}",
                "stain": "he",
                "tissue": tissue_key,
                "image": str(tmp_path / f"{name}.png"),
                "mask": str(tmp_path / f"{name}_mask.png"),
                "split": split,
                "truth": "",
            }
        )
    return pd.DataFrame(rows), arrays


def test_extract_patches_counts_alignment_determinism(tmp_path, tissues):
    ves = tissues["ves"]  # 1.0 um/px: factor 4 from 0.25
    sheet, arrays = _sheet(tmp_path, "ves", ["train", "train", "train", "val", "test"])
    other = sheet.assign(tissue="dt", roi_id=sheet["roi_id"] + "_dt")  # ignored: other tissue
    counts = {"train": 7, "val": 2, "test": 3}
    out = extract_patches(
        pd.concat([sheet, other]),
        ves,
        tmp_path / "ves.h5",
        patch_size=32,
        counts=counts,
        seed=5,
        config_hash="h",
        progress=False,
    )
    d = describe(out)
    assert d["counts"] == counts and d["attrs"]["config_hash"] == "h"
    data = read_patch_set(out)
    meta = data["meta"]
    assert sorted(meta[meta["split"] == "train"]["roi_id"].value_counts().tolist()) == [2, 2, 3]
    assert list(meta["split"]) == ["train"] * 7 + ["val"] * 2 + ["test"] * 3
    assert (meta["um_per_px"] == 1.0).all()
    # provenance: the source crop at (y, x) of size 32 * 4, downscaled, is the stored patch
    for j in range(len(meta)):
        img, mask = arrays[meta["roi_id"].iat[j]]
        y, x = int(meta["y"].iat[j]), int(meta["x"].iat[j])
        assert y % 4 == 0 and x % 4 == 0
        np.testing.assert_array_equal(
            data["images"][j], downscale_image(img[y : y + 128, x : x + 128], 4)
        )
        np.testing.assert_array_equal(
            data["masks"][j], downscale_mask(mask[y : y + 128, x : x + 128], 4)
        )
    again = extract_patches(
        sheet,
        ves,
        tmp_path / "ves2.h5",
        patch_size=32,
        counts=counts,
        seed=5,
        config_hash="h",
        progress=False,
    )
    data2 = read_patch_set(again)
    np.testing.assert_array_equal(data["images"], data2["images"])
    assert data["meta"].equals(data2["meta"])
    other_seed = extract_patches(
        sheet, ves, tmp_path / "ves3.h5", patch_size=32, counts=counts, seed=6, progress=False
    )
    assert not np.array_equal(read_patch_set(other_seed)["meta"]["x"], meta["x"])


def test_extract_patches_empty_split_warns(tmp_path, tissues, caplog):
    sheet, _ = _sheet(tmp_path, "ptc", ["train"], size=64)
    with caplog.at_level(logging.WARNING):
        out = extract_patches(
            sheet,
            tissues["ptc"],
            tmp_path / "ptc.h5",
            patch_size=32,
            counts={"train": 3, "val": 2, "test": 0},
            progress=False,
        )
    assert "no ROI in split val" in caplog.text
    assert describe(out)["counts"] == {"train": 3, "val": 0, "test": 0}


def test_extract_patches_errors(tmp_path, tissues):
    cap = tissues["cap"]  # 2.0 um/px: factor 8
    sheet, _ = _sheet(tmp_path, "cap", ["train"], size=200)  # 25 px at 2 um/px
    with pytest.raises(
        ValueError,
        match=r"ROI cap_0 \(200x200 px at source\) is 25x25 px at 2 um/px, "
        r"smaller than one 32x32 patch",
    ):
        extract_patches(
            sheet, cap, tmp_path / "cap.h5", patch_size=32, counts={"train": 1}, progress=False
        )
    assert not (tmp_path / "cap.h5").exists()

    write_png(tmp_path / "small_mask.png", np.zeros((100, 200), bool))
    bad = sheet.assign(mask=str(tmp_path / "small_mask.png"))
    with pytest.raises(
        ValueError, match=r"mask .*small_mask.png is 100x200, image .*cap_0.png is 200x200"
    ):
        extract_patches(
            bad, cap, tmp_path / "cap.h5", patch_size=16, counts={"train": 1}, progress=False
        )
    with pytest.raises(ValueError, match="without a train/val/test split: cap_0"):
        extract_patches(
            sheet.assign(split=""),
            cap,
            tmp_path / "cap.h5",
            patch_size=16,
            counts={"train": 1},
            progress=False,
        )
    assert not list(tmp_path.glob("*.h5")) and not list(tmp_path.glob(".*"))


def test_extract_patches_non_integer_scale(tmp_path, tissues):
    t = replace(tissues["ves"], um_per_px=0.6)  # factor 2.4
    sheet, _ = _sheet(tmp_path, "ves", ["train"], size=120)  # 50 px at the target scale
    out = extract_patches(
        sheet, t, tmp_path / "v.h5", patch_size=32, counts={"train": 4}, progress=False
    )
    data = read_patch_set(out)
    assert data["images"].shape == (4, 32, 32, 3)
    assert set(np.unique(data["masks"])) <= {0, 1}
    assert np.allclose(data["meta"]["um_per_px"], 0.6)


def test_crop_origins_absent_share_shows_no_tissue():
    mask = np.zeros((200, 200), bool)
    mask[90:110, 90:110] = True  # one object in the middle: most 64-px crops hold part of it
    o = crop_origins(mask, 100, 64, np.random.default_rng(3), 0.3, absent_fraction=0.5)
    crops = cut_patches(mask, o, 64)
    has = crops.reshape(100, -1).any(axis=1)
    assert has[:30].all()  # object-centred first
    assert not has[30:80].any()  # then 50 crops without the tissue
    # uniform crops hold it far more often than never (the absent ones are chosen, not luck)
    uniform = crop_origins(mask, 400, 64, np.random.default_rng(3), 0.0)
    assert cut_patches(mask, uniform, 64).reshape(400, -1).any(axis=1).mean() > 0.3
    # no absent share: the same crops as before the option existed
    np.testing.assert_array_equal(
        crop_origins(mask, 50, 64, np.random.default_rng(4), 0.4),
        crop_origins(mask, 50, 64, np.random.default_rng(4), 0.4, absent_fraction=0.0),
    )


def test_crop_origins_absent_falls_back_to_uniform_where_the_tissue_is_everywhere():
    mask = np.ones((100, 100), bool)
    o = crop_origins(mask, 20, 32, np.random.default_rng(0), 0.0, absent_fraction=0.5)
    assert o.shape == (20, 2) and (o >= 0).all() and (o <= 100 - 32).all()
    with pytest.raises(ValueError, match="absent_fraction must be in"):
        crop_origins(mask, 20, 32, np.random.default_rng(0), 0.6, absent_fraction=0.5)
