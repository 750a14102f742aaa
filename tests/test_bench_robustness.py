"""bench/robustness.py: which networks a method trains, the --set overrides, and the slide scoring
wired as the pipeline's (a prediction equal to the truth scores ~100 after aggregation)."""

from __future__ import annotations

from pathlib import Path

import h5py
import numpy as np
import pandas as pd
import pytest
import yaml

from omniseg.steps import slides as steps

REPO = Path(__file__).resolve().parents[1]
CONFIG = yaml.safe_load((REPO / "config" / "config.yaml").read_text())


@pytest.fixture(scope="module")
def rob(bench):
    return bench("robustness")


def test_a_network_on_all_tissues_is_one_run_with_the_overrides(rob, tissues):
    configs = rob.network_configs(
        CONFIG, "omniseg", tissues, ["lr=0.0015", "model.kwargs.width=24", "loss.boundary_weight=3"]
    )
    assert list(configs) == ["all"]
    cfg = configs["all"]
    # batch_per_tissue: 4 x 6 patches per step in ceil(40 / 6) steps, as the pipeline trains it
    assert (cfg["batch_size"], cfg["steps_per_epoch"]) == (24, 7)
    assert cfg["lr"] == 0.0015
    assert cfg["model"]["name"] == "omniseg" and cfg["model"]["kwargs"]["width"] == 24
    # a nested override keeps the shared entries beside it
    assert cfg["loss"] == {**CONFIG["training"]["loss"], "boundary_weight": 3}


def test_a_per_tissue_method_trains_one_network_per_tissue(rob, tissues):
    configs = rob.network_configs(CONFIG, "multi_unet", tissues)
    assert list(configs) == list(tissues.keys)
    for cfg in configs.values():
        assert (cfg["batch_size"], cfg["steps_per_epoch"], cfg["lr"]) == (4, 7, 0.002)
        assert cfg["model"]["name"] == "unet"
    assert list(rob.network_configs(CONFIG, "multi_unet", tissues, select=["dt", "ves"])) == [
        "dt",
        "ves",
    ]


def test_select_scales_the_steps_of_a_network_on_all_tissues(rob, tissues):
    cfg = rob.network_configs(CONFIG, "omniseg", tissues, select=["dt", "pt", "ves"])["all"]
    assert cfg["steps_per_epoch"] == 4  # ceil(7 * 3 / 6): the same samples per tissue


def test_a_malformed_override_is_named(rob, tissues):
    with pytest.raises(ValueError, match="'lr0.001'.*KEY=YAML"):
        rob.network_configs(CONFIG, "omniseg", tissues, ["lr0.001"])


def test_cli_refuses_an_unknown_method_and_slides_with_select(rob, tmp_path, capsys):
    with pytest.raises(SystemExit):
        rob.main(["x.h5", "--method", "nope"])
    assert "--method nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        rob.main(["x.h5", "--select", "dt", "--slides", str(tmp_path)])
    assert "leave out --select" in capsys.readouterr().err


def test_missing_slides_are_named(rob, tmp_path):
    with pytest.raises(FileNotFoundError, match="no slides/"):
        rob.demo_slides(tmp_path)
    (tmp_path / "slides").mkdir()
    (tmp_path / "slides" / "a_truth.h5").touch()
    (tmp_path / "slides" / "a.tif").touch()
    with pytest.raises(FileNotFoundError, match="slide a lacks .*tissue_mask.png"):
        rob.demo_slides(tmp_path)


def test_slides_of_several_folders_are_pooled_and_a_name_twice_is_refused(
    rob, tmp_path, monkeypatch, capsys
):
    """--slides A B: the slides of both folders are scored together; a slide name in both is
    an error before any training."""

    def folder(root: Path, *names: str) -> Path:
        for name in names:
            (root / "slides").mkdir(parents=True, exist_ok=True)
            (root / "wsi" / name).mkdir(parents=True)
            for f in (root / "slides" / f"{name}.tif", root / "slides" / f"{name}_truth.h5",
                      root / "wsi" / name / "tissue_mask.png",
                      root / "wsi" / name / "tissue_mask.json"):  # fmt: skip
                f.touch()
        return root

    a, b = folder(tmp_path / "a", "synth_0", "synth_1"), folder(tmp_path / "b", "synth_2")
    seen = {}

    def fake_run(patch_sets, tissues, configs, seed, threads, out, method, select, slides):
        seen["names"] = [e["name"] for e in slides[1]]
        return {"test_dice": {"dt": 1.0}, "test_dice_mean": 1.0, "slide_mean": 2.0}

    monkeypatch.setattr(rob, "run", fake_run)
    rob.main(["x.h5", "--seeds", "0", "--slides", str(a), str(b)])
    assert seen["names"] == ["synth_0", "synth_1", "synth_2"]
    capsys.readouterr()
    with pytest.raises(SystemExit):
        rob.main(["x.h5", "--slides", str(a), str(folder(tmp_path / "c", "synth_1"))])
    assert "slide(s) synth_1 in more than one folder" in capsys.readouterr().err


def _demo_slide(root: Path, name: str, seed: int, tissues) -> dict:
    """A small synthetic slide with its truth and tissue mask, laid out as a results folder;
    returns :func:`~omniseg.steps.slides.synth_slide`'s paths."""
    made = steps.synth_slide(
        root / "slides" / f"{name}.tif", tissues, seed=seed, height=512, width=1024, strips=2,
        focus=["cap", "ves"], tile=256,
    )  # fmt: skip
    steps.mask_slide(
        made["slide"], root / "wsi" / name / "tissue_mask.png",
        root / "wsi" / name / "tissue_mask.json", um_per_px=4.0, min_area_um2=1000.0,
    )  # fmt: skip
    return made


def test_slide_scoring_of_the_truth_is_near_100(
    rob, tissues, tmp_path, monkeypatch, truth_as_prediction
):
    """Known answer through the bench's wiring: probability maps equal to the truth, aggregated
    and scored with the config's rules, give near 100 per tissue (the tissue mask cuts a little
    at the biopsy's edge), the Dice of the slide's own score table."""
    results = tmp_path / "results"
    made = _demo_slide(results, "s", 1, tissues)
    entries = rob.demo_slides(results)
    assert [e["name"] for e in entries] == ["s"] and entries[0]["truth"] == made["truth"]

    monkeypatch.setattr(rob, "predict_slide", truth_as_prediction)
    scores = rob.score_slides([], tissues, CONFIG["wsi"], entries, tmp_path / "out", threads=1)
    with h5py.File(made["truth"], "r") as fh:
        present = [k for k in tissues.keys if fh[k][()].any()]
    assert len(present) >= 4
    table = pd.read_csv(tmp_path / "out" / "s" / "scores.csv").set_index("tissue")
    for key in present:
        assert 95.0 <= scores["slide_dice"][key] <= 100.0, key
        assert scores["slide_dice"][key] == pytest.approx(table.loc[key, "dice"], abs=0.01)
    assert scores["slide_mean"] == pytest.approx(
        np.mean(list(scores["slide_dice"].values())), abs=0.01
    )


def test_slides_of_two_folders_report_each_folders_mean(
    rob, tissues, tmp_path, monkeypatch, truth_as_prediction
):
    """With slides from two folders, each folder's own mean is reported beside the pooled one,
    and it equals that folder's slides scored alone; one folder reports no split."""
    a, b = tmp_path / "a", tmp_path / "b"
    _demo_slide(a, "s1", 1, tissues)
    _demo_slide(b, "s2", 2, tissues)

    def drop_ves(*args, **kwargs):
        """The truth, but the artery missed on slide s2: the two folders score apart."""
        out = truth_as_prediction(*args, **kwargs)
        with h5py.File(out, "r+") as fh:
            if Path(args[1]).stem == "s2" and "prob/ves" in fh:
                fh["prob/ves"][...] = 0
        return out

    monkeypatch.setattr(rob, "predict_slide", drop_ves)
    both = rob.score_slides(
        [], tissues, CONFIG["wsi"], rob.demo_slides(a) + rob.demo_slides(b), tmp_path / "o", 1
    )
    alone = {
        str(f): rob.score_slides(
            [], tissues, CONFIG["wsi"], rob.demo_slides(f), tmp_path / f.name, 1
        )
        for f in (a, b)
    }
    assert "slide_mean_by_folder" not in alone[str(a)]
    assert both["slide_mean_by_folder"] == {f: alone[f]["slide_mean"] for f in alone}
    assert alone[str(a)]["slide_mean"] != alone[str(b)]["slide_mean"]
    lo, hi = sorted(r["slide_mean"] for r in alone.values())
    assert lo <= both["slide_mean"] <= hi


def test_keep_writes_every_run_under_the_folder(rob, tmp_path, monkeypatch, capsys):
    """--keep DIR: each seed x thread run works in DIR/s{seed}_t{threads}, left in place."""
    seen = []

    def fake_run(patch_sets, tissues, configs, seed, threads, out, method, select, slides):
        out.mkdir(parents=True)
        (out / "model.pt").write_bytes(b"m")
        seen.append(out)
        return {"test_dice": {"dt": 1.0}, "test_dice_mean": 1.0}

    monkeypatch.setattr(rob, "run", fake_run)
    rob.main(["x.h5", "--seeds", "0", "1", "--threads", "1", "--keep", str(tmp_path / "k")])
    capsys.readouterr()
    assert seen == [tmp_path / "k" / "s0_t1", tmp_path / "k" / "s1_t1"]
    assert all((p / "model.pt").read_bytes() == b"m" for p in seen)
