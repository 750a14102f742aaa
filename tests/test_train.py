"""Training: config checks, per-tissue pools, learning, resume, NaN handling, outputs."""

from __future__ import annotations

import csv
import logging
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import omniseg.partial_labels as pl
import omniseg.train as tr
from omniseg.checkpoint import load_model, read_checkpoint
from omniseg.data.patchset import PatchSetWriter
from omniseg.plots import read_log, training_curve
from omniseg.train import DEFAULTS, merge_config, plan_batches, poly_lr, train

ROOT = Path(__file__).resolve().parents[1]
TSV = ROOT / "config/tissues.tsv"
P = 32

# tiny and fast: width 4, 32x32 patches, no augmentation unless a test turns it on
TINY = {
    "model": {"kwargs": {"width": 4}},
    "epochs": 2,
    "lr": 0.01,
    "momentum": 0.9,
    "augment": {"p_geometric": 0.0, "p_color": 0.0, "p_noise": 0.0},
    "val_batch_size": 8,
}


@pytest.fixture(autouse=True)
def one_thread():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


def write_sets(folder: Path, tissues, keys=("dt", "tuft"), n_train=8, n_val=4, seed=0):
    """Tiny patch sets where the mask is exactly the bright pixels (trivially learnable)."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for k, key in enumerate(keys):
        n = n_train + n_val
        masks = np.kron(rng.random((n, P // 8, P // 8)) < 0.4, np.ones((8, 8))).astype(bool)
        images = rng.integers(0, 90, (n, P, P, 3), dtype=np.uint8)
        images[masks] = rng.integers(180, 255, (int(masks.sum()), 3), dtype=np.uint8)
        splits = ["train"] * n_train + ["val"] * n_val
        path = folder / f"{key}.h5"
        with PatchSetWriter(path, tissues[key], P, config_hash=f"h{seed}{k}") as w:
            w.append(
                images,
                masks,
                {
                    "split": splits,
                    "roi_id": [f"r{i}" for i in range(n)],
                    "patient": ["p"] * n,
                    "stain": ["he"] * n,
                },
            )
        paths.append(path)
    return paths


@pytest.fixture(scope="module")
def sets(tmp_path_factory, tissues):
    return write_sets(tmp_path_factory.mktemp("sets"), tissues)


def outputs(d: Path) -> dict:
    return {
        "model_out": d / "model.pt",
        "log_csv": d / "log.csv",
        "curve_png": d / "curve.png",
        "state_dir": d / "state",
    }


def run(paths, tissues, cfg, d: Path, **kw):
    return train(paths, tissues, cfg, **outputs(d), progress=False, **kw)


def log_rows(path: Path) -> list[dict]:
    with path.open(newline="") as fh:
        return list(csv.DictReader(fh))


class _Stop(Exception):
    pass


def stop_after(monkeypatch, epoch: int):
    """Make the next `train` raise right after the state of ``epoch`` is saved (a crash)."""
    original = tr._save_state

    def save_then_stop(path, state):
        original(path, state)
        if state["epoch"] == epoch:
            raise _Stop

    monkeypatch.setattr(tr, "_save_state", save_then_stop)
    return lambda: monkeypatch.setattr(tr, "_save_state", original)


def record_tissues(monkeypatch) -> list[list[int]]:
    """Record the tissue ids of every training batch (wraps the binary loss)."""
    seen: list[list[int]] = []
    original = pl.STRATEGIES["binary"]

    def spy(model, images, masks, tissue, **options):
        seen.append(tissue.tolist())
        return original(model, images, masks, tissue, **options)

    spy.__signature__ = tr.inspect.signature(original)
    monkeypatch.setitem(pl.STRATEGIES, "binary", spy)
    return seen


# -- config ------------------------------------------------------------------------------------
def test_defaults_are_the_papers():
    cfg = merge_config({})
    assert cfg == DEFAULTS and cfg is not DEFAULTS
    assert (cfg["batch_size"], cfg["pool_size"], cfg["lr"], cfg["momentum"]) == (4, 8, 1e-3, 0.99)
    assert cfg["nesterov"] and cfg["poly_power"] == 0.9 and cfg["epochs"] == 100
    assert cfg["loss"] == {"boundary_weight": 1.2, "ring_width": 2}


def test_merge_is_deep():
    cfg = merge_config({"augment": {"p_color": 0.0}, "model": {"kwargs": {"width": 16}}})
    assert cfg["augment"] == {"p_geometric": 0.5, "p_color": 0.0, "p_noise": 0.5}
    assert cfg["model"] == {"name": "omniseg", "kwargs": {"width": 16}}
    other = merge_config({"model": {"name": "unet"}})
    assert other["model"] == {"name": "unet", "kwargs": {}}  # omniseg's width is not inherited
    assert DEFAULTS["augment"]["p_color"] == 0.5  # defaults untouched


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"learning_rate": 0.1}, "unknown key.*learning_rate"),
        ({"model": {"name": "omniseg", "width": 8}}, "unknown model key.*width"),
        ({"model": {"kwargs": {"num_tissues": 3}}}, "num_tissues is set from the tissue table"),
        ({"batch_mode": "random"}, "batch_mode must be one of tissue, mixed"),
        ({"pool_size": 2}, "pool_size 2 is smaller than batch_size 4"),
        ({"epochs": 0}, "epochs must be an integer >= 1"),
        ({"lr": -1}, "lr must be a number > 0"),
        ({"momentum": 1.0}, "momentum must be in"),
        ({"steps_per_epoch": 0}, "steps_per_epoch must be null or an integer"),
        ({"augment": 3}, "augment must be a mapping"),
        ({"ema": 1.0}, "ema must be null or a number in"),
        ({"ema": "yes"}, "ema must be null or a number in"),
        ({"swa": 0.75}, "swa must be null or a mapping"),
        ({"swa": {"begin": 0.5}}, "swa must be null or a mapping"),
        ({"swa": {"start": 1.0}}, r"swa.start must be a number in \[0, 1\)"),
        ({"swa": {"bn_batches": -1}}, r"swa.bn_batches must be an integer >= 0"),
        ({"swa": {}, "ema": 0.99}, "ema and swa are two ways"),
        ({"implied_labels": 3}, "implied_labels must be null or a mapping"),
        ({"implied_labels": {"weight": 1, "pairs": []}}, "implied_labels must be null or a"),
        ({"implied_labels": {"weight": -1}}, r"implied_labels.weight must be a number >= 0"),
        ({"implied_labels": {"nested": "tuft"}}, r"implied_labels.nested must be a list"),
        ({"implied_labels": {"nested": [["tuft"]]}}, r"implied_labels.nested must be a list"),
    ],
)
def test_bad_config(cfg, message):
    with pytest.raises(ValueError, match=message):
        merge_config(cfg)


def test_train_rejects_unknown_keys_before_writing(sets, tissues, tmp_path):
    with pytest.raises(ValueError, match="unknown key.*epoch_count"):
        run(sets, tissues, {**TINY, "epoch_count": 3}, tmp_path)
    with pytest.raises(ValueError, match="unknown loss option.*ring"):
        run(sets, tissues, {**TINY, "loss": {"ring": 3}}, tmp_path)
    with pytest.raises(ValueError, match="augment"):
        run(sets, tissues, {**TINY, "augment": {"p_sharpen": 0.5}}, tmp_path)
    with pytest.raises(ValueError, match="unknown tissue key.*kidney"):
        run(sets, tissues, TINY, tmp_path, select=["kidney"])
    assert not list(tmp_path.iterdir())


def test_poly_lr():
    assert poly_lr(1e-3, 0, 100, 0.9) == 1e-3
    assert poly_lr(1e-3, 50, 100, 0.9) == pytest.approx(1e-3 * 0.5**0.9)
    assert poly_lr(1e-3, 99, 100, 0.9) > 0


# -- pools -------------------------------------------------------------------------------------
TISSUE_OF = np.array([0, 0, 1, 0, 1, 1, 0, 1, 0])
ORDER = np.array([0, 2, 1, 3, 4, 5, 6, 7, 8])


def test_pools_give_single_tissue_batches():
    # loader batches of 2: [0,2] [1,3] [4,5] [6,7] [8], worked out by hand
    batches, pools, dropped = plan_batches([ORDER], TISSUE_OF, {}, batch_size=2, pool_size=4)
    assert batches == [[0, 1], [2, 4], [3, 6], [5, 7]]
    assert pools == {0: [8]} and dropped == 0
    # the leftover waits for the next epoch and is served first
    again, pools, _ = plan_batches([ORDER[::-1]], TISSUE_OF, pools, batch_size=2, pool_size=4)
    assert again[0] == [8, 8] and all(len({TISSUE_OF[i] for i in b}) == 1 for b in again)


def test_mixed_batches_follow_the_stream():
    batches, pools, _ = plan_batches(
        [ORDER], TISSUE_OF, {}, batch_size=2, pool_size=4, mode="mixed"
    )
    assert batches == [[0, 2], [1, 3], [4, 5], [6, 7], [8]]
    assert pools == {}
    assert any(len({TISSUE_OF[i] for i in b}) > 1 for b in batches)


def test_steps_cut_an_epoch_and_cycle_passes():
    passes = iter([ORDER, ORDER[::-1]])
    batches, pools, _ = plan_batches(passes, TISSUE_OF, {}, batch_size=2, pool_size=4, steps=3)
    assert batches == [[0, 1], [2, 4], [3, 6]] and pools == {1: [5, 7]}
    passes = iter([ORDER, ORDER[::-1]])
    mixed, _, _ = plan_batches(
        passes, TISSUE_OF, {}, batch_size=2, pool_size=4, steps=7, mode="mixed"
    )
    assert mixed[4:] == [[8], [8, 7], [6, 5]]


def test_full_pool_drops_patches():
    batches, pools, dropped = plan_batches([ORDER], TISSUE_OF, {}, batch_size=2, pool_size=2)
    assert batches == [[0, 1], [2, 4], [6, 8]] and pools == {1: [7]} and dropped == 2


def test_training_batches_are_single_tissue_in_tissue_mode(sets, tissues, tmp_path, monkeypatch):
    seen = record_tissues(monkeypatch)
    run(sets, tissues, {**TINY, "epochs": 1}, tmp_path / "t")
    assert len(seen) == 4 and all(len(set(b)) == 1 for b in seen)  # 16 patches / 4
    assert {b[0] for b in seen} == {tissues["dt"].id, tissues["tuft"].id}
    seen.clear()
    # threads=2: one loader worker process reads the HDF5 files (torch itself kept at one
    # thread: the test machine's two cores are shared)
    monkeypatch.setattr(tr, "configure_threads", lambda n: torch.set_num_threads(1))
    run(sets, tissues, {**TINY, "epochs": 1, "batch_mode": "mixed"}, tmp_path / "m", threads=2)
    assert len(seen) == 4 and any(len(set(b)) > 1 for b in seen)


# -- learning and outputs ----------------------------------------------------------------------
def test_loss_decreases_and_outputs(sets, tissues, tmp_path):
    cfg = {**TINY, "epochs": 3, "steps_per_epoch": 30}
    summary = run(sets, tissues, cfg, tmp_path)
    rows = log_rows(tmp_path / "log.csv")
    assert list(rows[0]) == [
        "epoch",
        "lr",
        "loss",
        "val_dice_dt",
        "val_dice_tuft",
        "val_dice_mean",
        "seconds",
    ]
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    losses = [float(r["loss"]) for r in rows]
    assert losses[2] < 0.8 * losses[0], losses
    assert float(rows[1]["lr"]) == pytest.approx(poly_lr(0.01, 1, 3, 0.9), rel=1e-5)
    best = max(rows, key=lambda r: float(r["val_dice_mean"]))
    assert summary["best_epoch"] == int(best["epoch"])
    assert summary["val_dice_mean"] == pytest.approx(float(best["val_dice_mean"]), abs=1e-3)
    assert summary["trained_tissues"] == ["dt", "tuft"] and summary["resumed_from"] is None
    # the model file holds the best epoch and the run's metadata
    model, meta = load_model(tmp_path / "model.pt", tissues)
    assert meta["best_epoch"] == summary["best_epoch"] and meta["epochs"] == 3
    assert meta["method"] == "omniseg" and meta["select"] is None
    assert set(meta["val_dice"]) == {"dt", "tuft"}
    assert meta["train_config"]["steps_per_epoch"] == 30
    assert model.num_tissues == len(tissues)
    assert not (tmp_path / "state").exists()  # removed once the model is written
    png = (tmp_path / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000


def test_select_trains_one_tissue_with_all_heads(sets, tissues, tmp_path):
    summary = run(sets, tissues, {**TINY, "epochs": 1}, tmp_path, select=["tuft"], method="multi")
    assert summary["trained_tissues"] == ["tuft"]
    assert "val_dice_dt" not in log_rows(tmp_path / "log.csv")[0]
    model, meta = load_model(tmp_path / "model.pt")
    assert meta["select"] == ["tuft"] and meta["method"] == "multi"
    assert model.num_tissues == len(tissues)


def test_without_validation_patches_the_last_epoch_is_kept(tissues, tmp_path, caplog):
    paths = write_sets(tmp_path / "sets", tissues, keys=("dt",), n_val=0)
    with caplog.at_level(logging.WARNING, logger="omniseg.train"):
        summary = run(paths, tissues, {**TINY, "epochs": 2}, tmp_path)
    assert "no validation patches" in caplog.text
    assert summary["best_epoch"] == 2
    assert log_rows(tmp_path / "log.csv")[0]["val_dice_mean"] == ""


def test_patience_stops_early(sets, tissues, tmp_path, monkeypatch):
    scores = iter([60.0, 50.0, 40.0, 30.0])
    monkeypatch.setattr(tr, "_validate", lambda *a: {3: next(scores)})
    summary = run(sets, tissues, {**TINY, "epochs": 4, "patience": 1}, tmp_path, select=["tuft"])
    assert summary["stopped_early"] and summary["epochs_run"] == 2 and summary["best_epoch"] == 1


def test_val_every_validates_some_epochs_and_the_last(sets, tissues, tmp_path, monkeypatch):
    """Epochs 2, 4 and 5 (the last) are validated; the best is chosen among them only, and
    the epochs between count neither as the best nor towards the patience."""
    calls = []
    scores = iter([50.0, 70.0, 60.0])  # epochs 2, 4, 5

    def fake(*_a):
        calls.append(1)
        return {3: next(scores)}

    monkeypatch.setattr(tr, "_validate", fake)
    cfg = {**TINY, "epochs": 5, "val_every": 2, "patience": 2}
    summary = run(sets, tissues, cfg, tmp_path, select=["tuft"])
    rows = log_rows(tmp_path / "log.csv")
    assert len(calls) == 3 and summary["epochs_run"] == 5 and not summary["stopped_early"]
    assert [r["val_dice_mean"] for r in rows] == ["", "50", "", "70", "60"]
    assert summary["best_epoch"] == 4 and summary["val_dice_mean"] == 70
    png = (tmp_path / "curve.png").read_bytes()
    assert png.startswith(b"\x89PNG") and len(png) > 5000
    with pytest.raises(ValueError, match="val_every must be an integer >= 1"):
        run(sets, tissues, {**TINY, "val_every": 0}, tmp_path / "bad")


def test_training_curve_reads_the_log(tmp_path, tissues):
    log = tmp_path / "log.csv"
    log.write_text(
        "epoch,lr,loss,val_dice_dt,val_dice_mean,seconds\n1,0.1,1.0,,,.5\n2,0.05,0.5,70,70,.5\n"
    )
    cols = read_log(log)
    assert cols["loss"] == [1.0, 0.5] and np.isnan(cols["val_dice_dt"][0])
    out = training_curve(log, tmp_path / "c.png", tissues)
    assert out.read_bytes().startswith(b"\x89PNG")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="bad.csv lacks column"):
        read_log(tmp_path / "bad.csv")


def test_cuda_style_path_on_cpu(sets, tissues, tmp_path, monkeypatch):
    """channels_last tensors (the CPU's default) and bf16 autocast, as on CUDA."""
    monkeypatch.setenv("OMNISEG_CHANNELS_LAST", "1")
    monkeypatch.setattr(
        tr, "autocast_context", lambda device: torch.autocast("cpu", dtype=torch.bfloat16)
    )
    # width 16, BatchNorm: neither a strided 1x1 convolution under 16 input channels nor a
    # GroupNorm, which train contiguous on the CPU (omniseg.device.channels_last_for_training)
    cfg = {
        **TINY,
        "model": {"kwargs": {"width": 16, "norm": "batch"}},
        "epochs": 1,
        "augment": {"p_geometric": 1.0, "p_color": 1.0, "p_noise": 1.0},
    }
    seen = []
    original = tr._TrainingParts.build

    def build(*args, **kwargs):
        parts = original(*args, **kwargs)
        seen.append(parts.channels_last)
        return parts

    monkeypatch.setattr(tr._TrainingParts, "build", build)
    summary = run(sets, tissues, cfg, tmp_path)
    assert seen == [True]
    assert 0 <= summary["val_dice_mean"] <= 100
    stored = read_checkpoint(tmp_path / "model.pt")["state_dict"]
    assert all(v.is_contiguous() for v in stored.values())  # saved in the default layout


def test_the_layout_changes_only_the_order_of_sums(sets, tissues, tmp_path, monkeypatch):
    """A training step channels-last (the CPU's default) and contiguous gives the same weights
    up to rounding: same batch, same augmentation draws. One SGD step: Adam's first steps are
    the gradients' signs, which rounding flips where a gradient is near 0, and over tens of
    steps any change of summation order (a second thread as much as the layout) grows to
    different weights."""
    aug = {"p_geometric": 1.0, "p_color": 1.0, "p_noise": 1.0}
    cfg = {
        **TINY,
        "model": {"kwargs": {"width": 16, "norm": "batch"}},
        "epochs": 1,
        "steps_per_epoch": 1,
        "optimizer": "sgd",
        "augment": aug,
    }
    weights = {}
    for flag in ("0", "1"):
        monkeypatch.setenv("OMNISEG_CHANNELS_LAST", flag)
        run(sets, tissues, cfg, tmp_path / flag)
        weights[flag] = read_checkpoint(tmp_path / flag / "model.pt")["state_dict"]
    assert weights["0"].keys() == weights["1"].keys()
    moved = 0
    for key, w in weights["0"].items():
        if w.is_floating_point():
            torch.testing.assert_close(weights["1"][key], w, rtol=1e-3, atol=1e-4)
            moved += int(not torch.equal(weights["1"][key], w))
    assert moved > 0  # the layout did change the arithmetic: the comparison above means something


# -- failures and resume -----------------------------------------------------------------------
def test_nan_loss_stops_and_keeps_last_good_state(sets, tissues, tmp_path, monkeypatch):
    calls = []
    original = pl.STRATEGIES["binary"]

    def poisoned(model, images, masks, tissue, **options):
        calls.append(1)
        loss = original(model, images, masks, tissue, **options)
        return loss * float("nan") if len(calls) == 5 else loss

    poisoned.__signature__ = tr.inspect.signature(original)
    monkeypatch.setitem(pl.STRATEGIES, "binary", poisoned)
    cfg = {**TINY, "epochs": 3, "steps_per_epoch": 3}
    with pytest.raises(FloatingPointError, match=r"epoch 2, step 2.*last good checkpoint"):
        run(sets, tissues, cfg, tmp_path)
    state = torch.load(tmp_path / "state/last.pt", weights_only=True)
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    assert not (tmp_path / "model.pt").exists()
    assert [r["epoch"] for r in log_rows(tmp_path / "log.csv")] == ["1"]


def test_absurd_lr_raises(sets, tissues, tmp_path):
    cfg = {**TINY, "epochs": 2, "lr": 1e12, "momentum": 0.99}
    with pytest.raises(FloatingPointError, match="non-finite|loss is"):
        run(sets, tissues, cfg, tmp_path)
    assert not (tmp_path / "model.pt").exists()


@pytest.mark.parametrize(
    ("ema", "swa", "kwargs"),
    [
        (None, None, None),
        (0.9, None, None),
        (None, {"start": 0.25, "bn_batches": 3}, None),
        # a channels-last network on the CPU: the saved state is contiguous, the resumed
        # parameters channels-last again, the optimizer's moments as saved
        (None, {"start": 0.25, "bn_batches": 3}, {"width": 16, "norm": "batch"}),
    ],
)
def test_resume_equals_straight_run(sets, tissues, tmp_path, monkeypatch, caplog, ema, swa, kwargs):
    # 7 patches per tissue and batch 4: pools carry patches across epochs; augmentation draws
    # from the RNG streams: both must be restored for the runs to agree (and the weight average)
    paths = write_sets(tmp_path / "sets", tissues, n_train=7, n_val=2)
    augment = {"p_geometric": 0.5, "p_color": 0.5, "p_noise": 0.5}
    cfg = {**TINY, "epochs": 4, "augment": augment, "ema": ema, "swa": swa}
    if kwargs is not None:
        cfg["model"] = {"kwargs": kwargs}
    straight = run(paths, tissues, cfg, tmp_path / "a")  # swa: epochs 2-4, resumed after 2

    restore = stop_after(monkeypatch, 2)
    with pytest.raises(_Stop):
        run(paths, tissues, cfg, tmp_path / "b")
    restore()
    with caplog.at_level(logging.INFO, logger="omniseg.train"):
        resumed = run(paths, tissues, cfg, tmp_path / "b")
    assert "resuming from epoch 3" in caplog.text
    assert resumed["resumed_from"] == 3 and resumed["epochs_run"] == 4
    a = read_checkpoint(tmp_path / "a/model.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "b/model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    drop = lambda rows: [{k: v for k, v in r.items() if k != "seconds"} for r in rows]  # noqa: E731
    assert drop(log_rows(tmp_path / "a/log.csv")) == drop(log_rows(tmp_path / "b/log.csv"))
    assert straight["best_epoch"] == resumed["best_epoch"]


def test_changed_settings_start_fresh(sets, tissues, tmp_path, monkeypatch, caplog):
    restore = stop_after(monkeypatch, 1)
    with pytest.raises(_Stop):
        run(sets, tissues, TINY, tmp_path)
    restore()
    with caplog.at_level(logging.WARNING, logger="omniseg.train"):
        summary = run(sets, tissues, {**TINY, "lr": 0.02}, tmp_path)
    assert "starting fresh" in caplog.text
    assert summary["resumed_from"] is None
    assert [r["epoch"] for r in log_rows(tmp_path / "log.csv")] == ["1", "2"]


@pytest.mark.slow  # a fresh interpreter imports torch: ~10 s on two cores
def test_resume_after_sigkill(sets, tissues, tmp_path):
    out = outputs(tmp_path)
    cfg = {**TINY, "epochs": 8}
    code = textwrap.dedent(f"""
        import torch
        torch.set_num_threads(1)
        from omniseg.tissues import load_tissues
        from omniseg.train import train
        train({[str(p) for p in sets]!r}, load_tissues({str(TSV)!r}), {cfg!r},
              progress=False, **{ {k: str(v) for k, v in out.items()}!r})
    """)
    proc = subprocess.Popen([sys.executable, "-c", code], stderr=subprocess.PIPE)
    state = out["state_dir"] / "last.pt"
    deadline = time.monotonic() + 120
    while not state.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == -signal.SIGKILL, err.decode()[-2000:]
    before = log_rows(out["log_csv"])
    assert 1 <= len(before) < 8

    summary = run(sets, tissues, cfg, tmp_path)
    assert summary["resumed_from"] is not None and summary["resumed_from"] > 1
    rows = log_rows(out["log_csv"])
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))
    done = summary["resumed_from"] - 1
    assert rows[:done] == before[:done]  # the killed run's epochs are kept, not redone
    model, meta = load_model(out["model_out"], tissues)
    assert meta["epochs"] == 8 and not out["state_dir"].exists()


# -- the authors' options: pools emptied each epoch, loss kind ----------------------------------
@pytest.mark.parametrize("reset", [False, True])
def test_reset_pools_empties_the_pools_each_epoch(sets, tissues, tmp_path, monkeypatch, reset):
    carried = []
    original = tr.plan_batches

    def spy(orders, tissue_of, pools, **kw):
        carried.append(sum(len(v) for v in pools.values()))
        return original(orders, tissue_of, pools, **kw)

    monkeypatch.setattr(tr, "plan_batches", spy)
    # 3 steps of 4 from 16 patches in tissue pools: leftovers wait in the pools after epoch 1
    cfg = {**TINY, "epochs": 2, "steps_per_epoch": 3, "reset_pools": reset}
    run(sets, tissues, cfg, tmp_path / "r")
    assert carried[0] == 0
    assert (carried[1] == 0) == reset


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        ({"reset_pools": "yes"}, "reset_pools must be true or false"),
        ({"loss": {"kind": "dice"}}, "loss.kind must be one of omniseg, authors"),
    ],
)
def test_bad_authors_options(cfg, message):
    with pytest.raises(ValueError, match=message):
        merge_config(cfg)
    assert merge_config({"loss": {"kind": "authors"}, "reset_pools": True})["reset_pools"]


# -- weight average ----------------------------------------------------------------------------
def test_weight_average_follows_the_formula():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    average = tr.WeightAverage(model, 0.9)
    start = {k: v.clone() for k, v in average.model.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
        model[1].running_mean.fill_(2.0)
        model[1].num_batches_tracked.fill_(7)
    average.update()  # step 1: decay min(0.9, 2 / 11)
    d = 2 / 11
    got = average.model.state_dict()
    assert torch.allclose(got["0.weight"], start["0.weight"] + (1 - d) * 1.0)
    assert torch.allclose(got["1.running_mean"], torch.full((2,), (1 - d) * 2.0))
    assert int(got["1.num_batches_tracked"]) == 7  # integer buffers are copied
    for _ in range(200):
        average.update()  # decay reaches 0.9; the average converges to the model
    assert torch.allclose(average.model[0].weight, model[0].weight, atol=1e-6)
    assert not any(p.requires_grad for p in average.model.parameters())
    with pytest.raises(ValueError, match="decay must be in"):
        tr.WeightAverage(model, 1.0)


def test_training_with_ema_saves_the_average(sets, tissues, tmp_path):
    cfg = {**TINY, "epochs": 2}
    plain = run(sets, tissues, cfg, tmp_path / "plain")
    averaged = run(sets, tissues, {**cfg, "ema": 0.5}, tmp_path / "ema")
    a = read_checkpoint(tmp_path / "plain/model.pt")
    b = read_checkpoint(tmp_path / "ema/model.pt")
    assert b["train_config"]["ema"] == 0.5 and a["train_config"]["ema"] is None
    # same seed and batches: the live weights agree, so a difference is the average
    assert any(not torch.equal(a["state_dict"][k], b["state_dict"][k]) for k in a["state_dict"])
    assert plain["epochs_run"] == averaged["epochs_run"] == 2


def test_uniform_average_is_the_mean_of_what_was_added():
    model = torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), torch.nn.BatchNorm2d(2))
    average = tr.UniformAverage(model)
    added = []
    for value in (1.0, 2.0, 6.0):
        with torch.no_grad():
            model[0].weight.fill_(value)
            model[1].num_batches_tracked.fill_(int(value))
        average.add()
        added.append(model[0].weight.clone())
    assert average.steps == 3
    assert torch.allclose(average.model[0].weight, torch.stack(added).mean(0))
    assert torch.allclose(average.model[0].weight, torch.full_like(model[0].weight, 3.0))
    assert int(average.model[1].num_batches_tracked) == 6  # integer buffers are copied
    assert not any(p.requires_grad for p in average.model.parameters())
    restored = tr.UniformAverage(model)
    restored.load_state_dict(average.state_dict())
    assert restored.steps == 3 and torch.equal(restored.model[0].weight, average.model[0].weight)


def test_recompute_batchnorm_averages_the_batches_statistics():
    torch.manual_seed(0)

    class Net(torch.nn.Module):  # the training call signature: model(images, tissue)
        def __init__(self):
            super().__init__()
            self.bn = torch.nn.BatchNorm2d(3, momentum=0.1)

        def forward(self, x, tissue):
            return self.bn(x)

    net = Net()
    batches = [(torch.randn(4, 3, 5, 5) * s + s, torch.zeros(4, dtype=torch.long)) for s in (1, 3)]
    used = tr.recompute_batchnorm(net, iter(batches), torch.device("cpu"))
    assert used == 2 and not net.training and net.bn.momentum == 0.1
    means = torch.stack([x.mean(dim=(0, 2, 3)) for x, _ in batches]).mean(0)
    variances = torch.stack([x.var(dim=(0, 2, 3)) for x, _ in batches]).mean(0)  # unbiased
    assert torch.allclose(net.bn.running_mean, means, atol=1e-5)
    assert torch.allclose(net.bn.running_var, variances, atol=1e-4)
    kept = net.bn.running_mean.clone()
    assert tr.recompute_batchnorm(net, iter([]), torch.device("cpu")) == 0
    assert torch.equal(net.bn.running_mean, kept)  # no batch: the statistics are left alone
    assert tr.recompute_batchnorm(torch.nn.Conv2d(1, 1, 1), iter(batches), None) == 0


def test_training_with_swa_saves_the_average_of_the_last_epochs(sets, tissues, tmp_path,
                                                                 monkeypatch):  # fmt: skip
    snapshots = []
    original = tr.UniformAverage.add

    def spy(self):
        snapshots.append({k: v.detach().clone() for k, v in self.model.state_dict().items()})
        original(self)
        # what was folded in: the live weights, recovered from the running mean
        n = self.steps
        snapshots[-1] = {
            k: (v * n - snapshots[-1][k] * (n - 1)) if v.is_floating_point() else v
            for k, v in self.model.state_dict().items()
        }

    monkeypatch.setattr(tr.UniformAverage, "add", spy)
    batchnorm = {"kwargs": {"width": 4, "norm": "batch"}}
    cfg = {**TINY, "model": batchnorm, "epochs": 4, "swa": {"start": 0.5, "bn_batches": 0}}
    summary = run(sets, tissues, cfg, tmp_path / "swa")
    assert len(snapshots) == 2  # epochs 3 and 4
    assert summary["averaged_epochs"] == [3, 4] and summary["best_epoch"] == 4
    saved = read_checkpoint(tmp_path / "swa/model.pt")
    assert saved["averaged_epochs"] == [3, 4]
    weights = [k for k, v in saved["state_dict"].items() if v.is_floating_point()]
    for k in weights:
        mean = (snapshots[0][k] + snapshots[1][k]) / 2
        assert torch.allclose(saved["state_dict"][k], mean, atol=1e-5), k
    assert np.isfinite(saved["val_dice_mean"])
    # with its BatchNorm recomputed the running statistics are no longer the averaged ones
    monkeypatch.setattr(tr.UniformAverage, "add", original)
    run(sets, tissues, {**cfg, "swa": {"start": 0.5, "bn_batches": 2}}, tmp_path / "bn")
    fitted = read_checkpoint(tmp_path / "bn/model.pt")["state_dict"]
    stats = [k for k in fitted if k.endswith("running_mean")]
    assert stats and any(not torch.allclose(fitted[k], saved["state_dict"][k]) for k in stats)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    learned = [k for k in fitted if not k.endswith(buffers)]
    assert all(torch.allclose(fitted[k], saved["state_dict"][k]) for k in learned)


def test_swa_after_an_early_stop_keeps_the_best_epoch(sets, tissues, tmp_path, caplog,
                                                     monkeypatch):  # fmt: skip
    scores = iter([50.0, 40.0, 30.0, 20.0, 10.0, 0.0])  # worse at every validation
    monkeypatch.setattr(tr, "_validate", lambda *a: {0: next(scores)})
    cfg = {**TINY, "epochs": 6, "patience": 1, "swa": {"start": 0.5}}
    with caplog.at_level(logging.WARNING, logger="omniseg.train"):
        summary = run(sets, tissues, cfg, tmp_path)
    assert summary["stopped_early"] and summary["epochs_run"] == 2
    assert summary["averaged_epochs"] is None and summary["best_epoch"] == 1
    assert "before the averaged epochs" in caplog.text


def test_the_order_of_the_patch_sets_does_not_change_the_model(sets, tissues, tmp_path):
    """The workflow lists patch sets in registry order, a shell glob alphabetically: the same
    seed must train the same model either way."""
    cfg = {**TINY, "epochs": 1}
    run(sets, tissues, cfg, tmp_path / "a")
    run(list(reversed(sets)), tissues, cfg, tmp_path / "b")
    a = read_checkpoint(tmp_path / "a/model.pt")["state_dict"]
    b = read_checkpoint(tmp_path / "b/model.pt")["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert tr.registry_order(list(reversed(sets)), tissues) == tr.registry_order(sets, tissues)


# -- implied labels ------------------------------------------------------------------------------
def test_implied_labels_reach_the_loss_of_a_shared_network(tissues, tmp_path, monkeypatch):
    """DT and PT share their scale: with implied_labels the binary loss gets their relation
    (each excludes the other) and its weight; without, neither."""
    paths = write_sets(tmp_path / "sets", tissues, keys=("dt", "pt"))
    seen = []
    original = pl.STRATEGIES["binary"]

    def spy(model, images, masks, tissue, **options):
        seen.append(options)
        return original(model, images, masks, tissue, **options)

    spy.__signature__ = tr.inspect.signature(original)
    monkeypatch.setitem(pl.STRATEGIES, "binary", spy)
    cfg = {**TINY, "epochs": 1, "steps_per_epoch": 2, "implied_labels": {"weight": 0.5}}
    run(paths, tissues, cfg, tmp_path / "a")
    assert seen and all(o["implied_weight"] == 0.5 for o in seen)
    rel = seen[0]["relations"]
    dt, pt, ves = tissues["dt"].id, tissues["pt"].id, tissues["ves"].id
    assert rel[dt, pt] == pl.EXCLUDES and rel[pt, dt] == pl.EXCLUDES
    assert rel[dt, ves] == pl.NO_RELATION  # VES is not trained here
    seen.clear()
    run(paths, tissues, {**cfg, "implied_labels": None}, tmp_path / "b")
    assert seen and not any("relations" in o for o in seen)


def test_implied_labels_need_a_network_that_can_take_them(tissues, tmp_path):
    paths = write_sets(tmp_path / "sets", tissues, keys=("dt", "pt"))
    cfg = {**TINY, "epochs": 1, "steps_per_epoch": 2, "implied_labels": {"weight": 1.0}}
    unet = {**cfg, "model": {"name": "unet", "kwargs": {"width": 2}}}
    with pytest.raises(ValueError, match="implied_labels is set, but model 'unet'"):
        run(paths, tissues, unet, tmp_path / "a")
    assert not (tmp_path / "a").exists() or not list((tmp_path / "a").iterdir())
    # one tissue per network: nothing to imply, so any network trains
    run(paths, tissues, unet, tmp_path / "b", select=["dt"])
    assert (tmp_path / "b" / "model.pt").is_file()
    bad = {**cfg, "implied_labels": {"nested": [["dt", "ptc"]]}}
    with pytest.raises(ValueError, match="implied_labels: nested pair .* must share its scale"):
        run(paths, tissues, bad, tmp_path / "c")
    with pytest.raises(ValueError, match="unknown loss option.*relations"):
        run(paths, tissues, {**TINY, "loss": {"relations": 1}}, tmp_path / "d")
