import json
from dataclasses import replace

import h5py
import numpy as np
import pytest
import torch

from omniseg.data.patchset import (
    FORMAT,
    PatchDataset,
    PatchSetWriter,
    describe,
    read_patch_set,
    worker_init_fn,
)

P = 8


def _batch(n, seed, split):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, size=(n, P, P, 3), dtype=np.uint8)
    masks = rng.random((n, P, P)) > 0.5
    meta = {
        "split": [split] * n,
        "roi_id": [f"roi{seed}_{i}" for i in range(n)],
        "patient": [f"pat{seed}"] * n,
        "stain": ["he"] * n,
        "x": np.arange(n) * 10,
        "y": np.arange(n) * 20,
        "um_per_px": np.full(n, 2.0),
    }
    return images, masks, meta


def _write(path, tissue, parts, patch=P):
    with PatchSetWriter(
        path, tissue, patch, config_hash="abc", expected=sum(p[0] for p in parts)
    ) as w:
        for n, seed, split in parts:
            w.append(*_batch(n, seed, split))
    return path


def test_round_trip(tmp_path, tissues):
    tuft = tissues["tuft"]
    path = _write(tmp_path / "tuft.h5", tuft, [(3, 0, "train"), (2, 1, "test")])
    with h5py.File(path) as h5:
        assert h5["images"].shape == (5, P, P, 3) and h5["images"].dtype == np.uint8
        assert h5["images"].chunks == (1, P, P, 3) and h5["images"].compression == "lzf"
        assert h5["masks"].shape == (5, P, P) and h5["masks"].chunks == (1, P, P)
        assert h5["masks"].compression is not None
        assert h5["meta/x"].dtype == np.int64 and h5["meta/um_per_px"].dtype == np.float32
        assert h5.attrs["format"] == FORMAT and h5.attrs["tissue_key"] == "tuft"
        assert h5.attrs["tissue_id"] == 3 and h5.attrs["patch_size"] == P
        assert json.loads(h5.attrs["tissue"])["release_folder"] == "3_0_tuft"
        assert h5.attrs["config_hash"] == "abc" and h5.attrs["created_by"].startswith("omniseg")
    data = read_patch_set(path)
    images, masks, meta = _batch(3, 0, "train")
    np.testing.assert_array_equal(data["images"][:3], images)
    np.testing.assert_array_equal(data["masks"][:3], masks.astype(np.uint8))
    assert data["masks"].dtype == np.uint8
    assert list(data["meta"]["split"]) == ["train"] * 3 + ["test"] * 2
    assert list(data["meta"]["roi_id"][:3]) == meta["roi_id"]
    assert list(data["meta"]["y"][:3]) == [0, 20, 40]
    assert data["attrs"]["tissue"]["key"] == "tuft"

    test = read_patch_set(path, "test")
    np.testing.assert_array_equal(test["images"], _batch(2, 1, "test")[0])
    assert list(test["meta"].index) == [3, 4]
    assert read_patch_set(path, "val")["images"].shape == (0, P, P, 3)
    d = describe(path)
    assert d["n"] == 5 and d["counts"] == {"train": 3, "val": 0, "test": 2}
    assert d["rois"]["train"] == 3 and d["patients"]["test"] == 1


def test_exception_leaves_nothing(tmp_path, tissues):
    with pytest.raises(RuntimeError, match="boom"):
        with PatchSetWriter(tmp_path / "x.h5", tissues["dt"], P) as w:
            w.append(*_batch(2, 0, "train"))
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def test_expected_mismatch_leaves_nothing(tmp_path, tissues):
    with pytest.raises(ValueError, match="1 patches written, 3 expected"):
        with PatchSetWriter(tmp_path / "x.h5", tissues["dt"], P, expected=3) as w:
            w.append(*_batch(1, 0, "train"))
    assert list(tmp_path.iterdir()) == []


def test_append_validates(tmp_path, tissues):
    with pytest.raises(ValueError) as info:
        with PatchSetWriter(tmp_path / "x.h5", tissues["dt"], P) as w:
            images, masks, meta = _batch(2, 0, "train")
            with pytest.raises(ValueError, match="images must be uint8"):
                w.append(images[:, :4], masks, meta)
            with pytest.raises(ValueError, match=r"\{0, 1\}"):
                w.append(images, masks.astype(np.uint8) * 255, meta)
            with pytest.raises(ValueError, match="unknown split"):
                w.append(images, masks, {**meta, "split": ["train", "dev"]})
            with pytest.raises(ValueError, match="meta lacks 'stain'"):
                w.append(images, masks, {k: v for k, v in meta.items() if k != "stain"})
            raise ValueError("done")
    assert str(info.value) == "done"
    assert list(tmp_path.iterdir()) == []


def test_empty_patch_set(tmp_path, tissues):
    path = _write(tmp_path / "e.h5", tissues["ptc"], [])
    assert describe(path)["n"] == 0
    assert len(PatchDataset([path], "train", tissues)) == 0


@pytest.fixture
def two_sets(tmp_path, tissues):
    a = _write(tmp_path / "tuft.h5", tissues["tuft"], [(3, 0, "train"), (2, 1, "val")])
    b = _write(tmp_path / "dt.h5", tissues["dt"], [(4, 2, "train"), (1, 3, "test")])
    return a, b


def test_dataset_selection_and_items(two_sets, tissues):
    a, b = two_sets
    ds = PatchDataset([a, b], "train", tissues)
    assert len(ds) == 7
    idx = ds.tissue_indices()
    assert set(idx) == {tissues["tuft"].id, tissues["dt"].id}
    np.testing.assert_array_equal(idx[tissues["dt"].id], [3, 4, 5, 6])
    item = ds[4]
    assert item["image"].shape == (3, P, P) and item["image"].dtype == torch.float32
    assert item["mask"].shape == (1, P, P) and item["mask"].dtype == torch.float32
    assert item["tissue"].dtype == torch.int64 and int(item["tissue"]) == tissues["dt"].id
    assert int(item["index"]) == 4
    images, masks, _ = _batch(4, 2, "train")
    np.testing.assert_allclose(
        item["image"].numpy(), images[1].transpose(2, 0, 1) / 255.0, atol=1e-6
    )
    np.testing.assert_array_equal(item["mask"][0].numpy(), masks[1].astype(np.float32))
    meta = ds.meta()
    assert list(meta.columns[:2]) == ["tissue", "tissue_id"]
    assert list(meta["tissue"]) == ["tuft"] * 3 + ["dt"] * 4
    assert set(meta["split"]) == {"train"}

    assert len(PatchDataset([a, b], None, tissues)) == 10
    assert len(PatchDataset([a, b], "test", tissues)) == 1
    sel = PatchDataset([a, b], "val", tissues, select=["tuft"])
    assert len(sel) == 2 and set(sel.meta()["roi_id"]) == {"roi1_0", "roi1_1"}
    with pytest.raises(ValueError, match="unknown tissue"):
        PatchDataset([a, b], "val", tissues, select=["kidney"])


def test_dataloader_workers(two_sets, tissues):
    ds = PatchDataset(two_sets, None, tissues)
    ds[0]  # a handle open in the parent must not leak into the workers
    loader = torch.utils.data.DataLoader(
        ds, batch_size=4, num_workers=2, worker_init_fn=worker_init_fn
    )
    seen = torch.cat([b["index"] for b in loader])
    assert sorted(seen.tolist()) == list(range(len(ds)))
    batch = next(iter(loader))
    assert batch["image"].shape == (4, 3, P, P) and batch["tissue"].shape == (4,)


def test_dataset_rejects_disagreeing_registry(two_sets, tissues):
    a, _ = two_sets
    records = tissues.to_records()
    records[3] = {**records[3], "um_per_px": 1.0}
    from omniseg.tissues import TissueTable

    other = TissueTable.from_records(records)
    with pytest.raises(ValueError, match=f"patch set {a}: tissue attribute"):
        PatchDataset([a], None, other)


def test_dataset_rejects_mixed_patch_sizes(tmp_path, two_sets, tissues):
    ves = replace(tissues["ves"])
    c = tmp_path / "ves.h5"
    with PatchSetWriter(c, ves, 16):
        pass
    with pytest.raises(ValueError, match=f"patch set {c} has 16px patches"):
        PatchDataset([two_sets[0], c], None, tissues)


def test_wrong_format(tmp_path, tissues):
    path = tmp_path / "bad.h5"
    with h5py.File(path, "w") as h5:
        h5.attrs["format"] = "other"
    with pytest.raises(ValueError, match=f"patch set {path}: format"):
        describe(path)
