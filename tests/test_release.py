import warnings
from pathlib import Path

import numpy as np
import pytest

from omniseg.data.patchset import describe, read_patch_set
from omniseg.data.release import find_pairs, import_release
from omniseg.io import write_png

SAMPLE = Path(__file__).parents[2] / "shared/data/omniseg_release_sample"
S = 16


def _rgba(arr):
    alpha = np.full(arr.shape[:2] + (1,), 255, np.uint8)
    return np.concatenate([arr, alpha], axis=2)


def _pair(d: Path, stem: str, suffix: str, seed: int, size: int = S):
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    mask = np.zeros((size, size), bool)
    mask[2:9, 3:7] = True
    write_png(d / f"{stem}.png", _rgba(img))
    m = (mask.astype(np.uint8) * 255)[..., None].repeat(3, axis=2)
    write_png(d / f"{stem}_mask_{suffix}.png", _rgba(m))
    return img, mask


@pytest.fixture
def release(tmp_path, tissues):
    """demo/{tuft,dt,ptc folders}/{he,pas}/im_A_B.png; A shared between tuft and dt."""
    top = tmp_path / "src" / "KI_demo"
    arrays = {}
    seed = 0
    for key, stains in (("tuft", ["he", "pas"]), ("dt", ["he"]), ("ptc", ["pas"])):
        t = tissues[key]
        for stain in stains:
            d = top / t.release_folder / stain
            d.mkdir(parents=True)
            for a in range(4):
                stem = f"im_{a + (10 if stain == 'pas' else 0)}_{seed % 3}"
                arrays[f"{t.release_folder}/{stain}/{stem}"] = _pair(d, stem, t.mask_suffix, seed)
                seed += 1
    return top, arrays


def _quiet_import(*args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return import_release(*args, **kwargs)


def test_import_fabricated_tree(release, tmp_path, tissues):
    top, arrays = release
    with pytest.warns(UserWarning, match=r"no files for tissue\(s\) pt \(folder 1_1_pt\), cap"):
        out = import_release(top.parent, tmp_path / "out", tissues, seed=1)
    assert set(out) == {"tuft", "dt", "ptc"}
    assert out["tuft"] == tmp_path / "out" / "tuft.h5"
    assert not (tmp_path / "out" / "cap.h5").exists()
    groups_split: dict[str, str] = {}
    for key, path in out.items():
        data = read_patch_set(path)
        meta = data["meta"]
        assert data["attrs"]["patch_size"] == S and data["images"].shape[1:] == (S, S, 3)
        assert data["attrs"]["um_per_px"] == tissues[key].um_per_px
        assert (meta["x"] == -1).all() and (meta["y"] == -1).all()
        for j, rid in enumerate(meta["roi_id"]):
            img, mask = arrays[rid]
            np.testing.assert_array_equal(data["images"][j], img)  # alpha dropped
            np.testing.assert_array_equal(data["masks"][j], mask.astype(np.uint8))
            folder, stain, stem = rid.split("/")
            assert folder == tissues[key].release_folder and stain == meta["stain"].iat[j]
            assert meta["patient"].iat[j] == stem.split("_")[1]
            # no source image A in two splits, across tissue folders too
            assert (
                groups_split.setdefault(meta["patient"].iat[j], meta["split"].iat[j])
                == meta["split"].iat[j]
            )
    assert len(read_patch_set(out["tuft"])["meta"]) == 8
    assert set(groups_split.values()) == {"train", "val", "test"}  # 8 groups: every split used


def test_src_may_be_top_folder_and_is_deterministic(release, tmp_path, tissues):
    top, _ = release
    a = _quiet_import(top, tmp_path / "a", tissues, seed=1)
    b = _quiet_import(top.parent, tmp_path / "b", tissues, seed=1)
    for key in a:
        ma, mb = read_patch_set(a[key])["meta"], read_patch_set(b[key])["meta"]
        assert ma.equals(mb)


def test_data_list(release, tmp_path, tissues):
    top, _ = release
    pairs = find_pairs(top, tissues)
    lines = ["image_path,label_path,name,task_id,scale_id"]
    for p in pairs[:5]:
        scale = {2.0: 0, 1.0: 1, 0.25: 3}[p.tissue.um_per_px]
        img, msk = (f"{top.name}/{p.folder}/{p.stain}/{f.name}" for f in (p.image, p.mask))
        lines.append(f"{img},{msk},x,{p.folder.split('_')[0]},{scale}")
    csv = top / "data_list.csv"
    csv.write_text("\n".join(lines) + "\n")
    out = _quiet_import(top, tmp_path / "out", tissues, data_list=csv)
    total = sum(describe(p)["n"] for p in out.values())
    assert total == 5
    csv.write_text("\n".join([lines[0], lines[1].rsplit(",", 1)[0] + ",3"]) + "\n")
    with pytest.raises(ValueError, match="scale_id '3' does not match tissue"):
        _quiet_import(top, tmp_path / "out2", tissues, data_list=csv)


def test_non_pair_files_warned_and_skipped(release, tmp_path, tissues):
    top, _ = release
    d = top / tissues["dt"].release_folder / "he"
    (d / "notes.txt").write_text("hello")
    (d / ".DS_Store").write_bytes(b"")  # hidden: ignored silently
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = import_release(top, tmp_path / "out", tissues)
    skipped = [str(w.message) for w in caught if "not image/mask pairs" in str(w.message)]
    assert len(skipped) == 1 and skipped[0].endswith(str(d / "notes.txt"))
    assert describe(out["dt"])["n"] == 4


def _assert_fails(top, outdir, tissues, pattern):
    with pytest.raises(ValueError, match=pattern):
        _quiet_import(top, outdir, tissues)
    assert not outdir.exists() or list(outdir.iterdir()) == []


def test_image_without_mask(release, tmp_path, tissues):
    top, _ = release
    d = top / tissues["tuft"].release_folder / "he"
    next(d.glob("*_mask_*.png")).unlink()
    _assert_fails(
        top, tmp_path / "out", tissues, r"image .*3_0_tuft/he/im_\d+_\d+\.png has no mask"
    )


def test_mask_without_image(release, tmp_path, tissues):
    top, _ = release
    d = top / tissues["ptc"].release_folder / "pas"
    img = sorted(p for p in d.glob("*.png") if "_mask_" not in p.name)[0]
    img.unlink()
    _assert_fails(
        top, tmp_path / "out", tissues, rf"mask .*{img.stem}_mask_PTC_lumen.png has no image"
    )


def test_truncated_png(release, tmp_path, tissues):
    top, _ = release
    d = top / tissues["dt"].release_folder / "he"
    img = sorted(p for p in d.glob("*.png") if "_mask_" not in p.name)[1]
    img.write_bytes(img.read_bytes()[:60])
    (tmp_path / "out").mkdir()
    _assert_fails(top, tmp_path / "out", tissues, rf"image {img} cannot be read")


def test_mask_of_another_size(release, tmp_path, tissues):
    top, _ = release
    d = top / tissues["tuft"].release_folder / "pas"
    mask = sorted(d.glob("*_mask_*.png"))[0]
    write_png(mask, np.zeros((S, S + 2), np.uint8))
    _assert_fails(
        top, tmp_path / "out", tissues, rf"mask {mask} is {S}x{S + 2}, image .* is {S}x{S}"
    )


def test_mixed_sizes_in_one_tissue(release, tmp_path, tissues):
    top, _ = release
    d = top / tissues["ptc"].release_folder / "pas"
    _pair(d, "im_99_9", tissues["ptc"].mask_suffix, 0, size=S * 2)
    _assert_fails(
        top, tmp_path / "out", tissues, "im_99_9.png is 32x32, other ptc patches are 16x16"
    )


def test_no_tissue_folders(tmp_path, tissues):
    (tmp_path / "empty").mkdir()
    _assert_fails(tmp_path / "empty", tmp_path / "out", tissues, "no image/mask pairs found")


@pytest.mark.slow
def test_real_release_sample(tmp_path, tissues):
    if not SAMPLE.is_dir():
        pytest.skip(f"real release sample {SAMPLE} absent")
    out = _quiet_import(SAMPLE, tmp_path / "out", tissues)
    assert set(out) == set(tissues.keys)
    described = {k: describe(p) for k, p in out.items()}
    assert sum(d["n"] for d in described.values()) == 59
    assert all(d["attrs"]["patch_size"] == 256 for d in described.values())
    data = read_patch_set(out["cap"])
    assert data["images"].shape == (10, 256, 256, 3)
    assert data["masks"].any(axis=(1, 2)).all()  # every real mask has foreground
    assert set(data["meta"]["stain"]) == {"he", "pas"}
    split_of: dict[str, str] = {}
    for p in out.values():
        meta = read_patch_set(p)["meta"]
        for g, s in zip(meta["patient"], meta["split"], strict=True):
            assert split_of.setdefault(g, s) == s


def test_patch_sets_go_where_the_rule_names_them(release, tmp_path, tissues):
    top, _ = release
    named = {"tuft": tmp_path / "declared" / "glom_tufts.h5"}
    out = _quiet_import(top, tmp_path / "out", tissues, seed=1, outputs=named)
    assert out["tuft"] == named["tuft"] and named["tuft"].is_file()
    assert not (tmp_path / "out" / "tuft.h5").exists()
    assert out["dt"] == tmp_path / "out" / "dt.h5"  # not named: the folder's convention
