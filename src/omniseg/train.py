"""Training from partially labelled patches: per-tissue image pools, resumable, on CPU or CUDA.

Every training patch is labelled for one tissue only. As in Deng et al. (2022), patches stream
from a shuffled loader into one pool per tissue, and a step takes ``batch_size`` patches of one
tissue from a pool that holds at least that many (``batch_mode="tissue"``); ``"mixed"`` takes the
shuffled stream as it comes. The pools are simulated on patch *indices* before each epoch
(:func:`plan_batches`), so the batches are known in advance, the loader reads each patch once, and
the pools' contents are small enough to be part of the resume state.

With ``ema`` set, an exponential moving average of the weights (and of BatchNorm's running
statistics) is kept beside them, updated after every step; validation scores the average and
the best epoch's average is the saved model (:class:`WeightAverage`). With ``swa`` set, the
weights after each of the last epochs are averaged uniformly instead (stochastic weight
averaging, Izmailov et al. 2018), BatchNorm's statistics are recomputed for the average on
training batches, and the average is the saved model (:class:`UniformAverage`).

After every epoch the full state (weights, optimizer, best weights, pools, RNG states, the log
rows) is written atomically to ``state_dir/last.pt``; a killed run started again with the same
inputs continues with the next epoch. ``state_dir`` must not be a Snakemake output (Snakemake
deletes a failed job's outputs); the declared output is ``model_out``.
"""

from __future__ import annotations

import copy
import csv
import functools
import hashlib
import inspect
import itertools
import json
import logging
import math
import random
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from omniseg import __version__
from omniseg.checkpoint import save_model
from omniseg.device import (
    autocast_context,
    channels_last_for_training,
    configure_threads,
    select_device,
)
from omniseg.io import atomic_path
from omniseg.losses import LOSS_KINDS
from omniseg.partial_labels import IMPLIED_OPTIONS, loss_for
from omniseg.tissues import TissueTable

logger = logging.getLogger(__name__)

#: The paper's settings (Deng et al. 2022); a run's config is merged over these.
DEFAULTS: dict[str, Any] = {
    "model": {"name": "omniseg", "kwargs": {"width": 32}},
    "epochs": 100,
    "batch_size": 4,
    "pool_size": 8,
    "reset_pools": False,
    "batch_mode": "tissue",
    "strategy": None,
    "optimizer": "sgd",
    "lr": 1e-3,
    "momentum": 0.99,
    "nesterov": True,
    "weight_decay": 3e-5,
    "poly_power": 0.9,
    "steps_per_epoch": None,
    "val_batch_size": 16,
    "val_every": 1,
    "augment": {"p_geometric": 0.5, "p_color": 0.5, "p_noise": 0.5},
    "loss": {"boundary_weight": 1.2, "ring_width": 2},
    "seed": 0,
    "patience": None,
    "ema": None,
    "swa": None,
    "implied_labels": None,
}

#: ``swa`` keys and their values when absent: average the epochs after this fraction of the
#: run; recompute BatchNorm's statistics over this many training batches (0: keep the averaged
#: running statistics).
SWA_DEFAULTS: dict[str, Any] = {"start": 0.75, "bn_batches": 100}

BATCH_MODES = ("tissue", "mixed")
STATE_FORMAT = "omniseg-train-state/1"
STATE_FILE = "last.pt"


OPTIMIZERS = ("sgd", "adamw")


def make_optimizer(model: torch.nn.Module, cfg: Mapping[str, Any]) -> torch.optim.Optimizer:
    """The paper's SGD (momentum, Nesterov), or AdamW for short demo runs (momentum unused)."""
    if cfg["optimizer"] == "adamw":
        return torch.optim.AdamW(model.parameters(), lr=cfg["lr"], weight_decay=cfg["weight_decay"])
    return torch.optim.SGD(
        model.parameters(),
        lr=cfg["lr"],
        momentum=cfg["momentum"],
        nesterov=cfg["nesterov"],
        weight_decay=cfg["weight_decay"],
    )


# -- configuration -----------------------------------------------------------------------------
def merge_config(config: Mapping[str, Any] | None) -> dict[str, Any]:
    """``config`` merged over :data:`DEFAULTS` and checked.

    Sections ``augment`` and ``loss`` merge key by key; ``model.kwargs`` merges over the default
    kwargs only when the model name is the default one.

    Raises:
        ValueError: unknown keys or values out of range, all listed in one message.
    """
    config = dict(config or {})
    problems = []
    unknown = sorted(set(config) - set(DEFAULTS))
    if unknown:
        problems.append(
            f"unknown key(s) {', '.join(unknown)} (known: {', '.join(sorted(DEFAULTS))})"
        )
    out = copy.deepcopy(DEFAULTS)
    for key, value in config.items():
        if key not in DEFAULTS:
            continue
        if key in ("augment", "loss"):
            if not isinstance(value, Mapping):
                problems.append(f"{key} must be a mapping, got {value!r}")
                continue
            out[key].update(copy.deepcopy(dict(value)))
        elif key == "model":
            if not isinstance(value, Mapping):
                problems.append(f"model must be a mapping with name and kwargs, got {value!r}")
                continue
            bad = sorted(set(value) - {"name", "kwargs"})
            if bad:
                problems.append(f"unknown model key(s) {', '.join(bad)} (known: kwargs, name)")
            name = value.get("name", DEFAULTS["model"]["name"])
            kwargs = dict(DEFAULTS["model"]["kwargs"]) if name == DEFAULTS["model"]["name"] else {}
            kwargs.update(copy.deepcopy(dict(value.get("kwargs") or {})))
            if "num_tissues" in kwargs:
                problems.append("model.kwargs.num_tissues is set from the tissue table; remove it")
            out["model"] = {"name": name, "kwargs": kwargs}
        else:
            out[key] = value
    problems += _check_values(out)
    if problems:
        raise ValueError("training config: " + "; ".join(problems))
    return out


def _is_int(v: Any) -> bool:
    """An integer of the config (YAML or numpy), not a bool."""
    return isinstance(v, int | np.integer) and not isinstance(v, bool)


def _is_num(v: Any) -> bool:
    """A finite number of the config (YAML or numpy), not a bool."""
    return isinstance(v, int | float | np.number) and not isinstance(v, bool) and math.isfinite(v)


def _check_values(cfg: Mapping[str, Any]) -> list[str]:
    problems = []
    for key in ("epochs", "batch_size", "pool_size", "val_batch_size", "val_every"):
        if not (_is_int(cfg[key]) and cfg[key] >= 1):
            problems.append(f"{key} must be an integer >= 1, got {cfg[key]!r}")
    for key in ("steps_per_epoch", "patience"):
        if cfg[key] is not None and not (_is_int(cfg[key]) and cfg[key] >= 1):
            problems.append(f"{key} must be null or an integer >= 1, got {cfg[key]!r}")
    if cfg["ema"] is not None and not (_is_num(cfg["ema"]) and 0 < cfg["ema"] < 1):
        problems.append(f"ema must be null or a number in (0, 1), got {cfg['ema']!r}")
    if not _is_int(cfg["seed"]):
        problems.append(f"seed must be an integer, got {cfg['seed']!r}")
    if cfg["batch_mode"] not in BATCH_MODES:
        problems.append(
            f"batch_mode must be one of {', '.join(BATCH_MODES)}, got {cfg['batch_mode']!r}"
        )
    if (
        _is_int(cfg["pool_size"])
        and _is_int(cfg["batch_size"])
        and cfg["pool_size"] < cfg["batch_size"]
    ):
        problems.append(
            f"pool_size {cfg['pool_size']} is smaller than batch_size {cfg['batch_size']}"
        )
    if not (_is_num(cfg["lr"]) and cfg["lr"] > 0):
        problems.append(f"lr must be a number > 0, got {cfg['lr']!r}")
    if cfg["optimizer"] not in OPTIMIZERS:
        problems.append(
            f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {cfg['optimizer']!r}"
        )
    if not (_is_num(cfg["momentum"]) and 0 <= cfg["momentum"] < 1):
        problems.append(f"momentum must be in [0, 1), got {cfg['momentum']!r}")
    if not isinstance(cfg["reset_pools"], bool):
        problems.append(f"reset_pools must be true or false, got {cfg['reset_pools']!r}")
    kind = cfg["loss"].get("kind", "omniseg") if isinstance(cfg["loss"], Mapping) else None
    if kind not in LOSS_KINDS:  # absent: "omniseg", the strategies' default
        problems.append(f"loss.kind must be one of {', '.join(LOSS_KINDS)}, got {kind!r}")
    if not isinstance(cfg["nesterov"], bool):
        problems.append(f"nesterov must be true or false, got {cfg['nesterov']!r}")
    elif cfg["nesterov"] and _is_num(cfg["momentum"]) and cfg["momentum"] == 0:
        problems.append("nesterov needs momentum > 0")
    for key in ("weight_decay", "poly_power"):
        if not (_is_num(cfg[key]) and cfg[key] >= 0):
            problems.append(f"{key} must be a number >= 0, got {cfg[key]!r}")
    problems += _check_implied(cfg["implied_labels"])
    problems += _check_swa(cfg["swa"])
    if cfg["swa"] is not None and cfg["ema"] is not None:
        problems.append("ema and swa are two ways to average the weights: set one of them")
    model = cfg["model"]
    if not isinstance(model.get("name"), str):
        problems.append(f"model.name must be a string, got {model.get('name')!r}")
    return problems


def _check_implied(implied: Any) -> list[str]:
    """Problems of the ``implied_labels`` setting: null or ``{weight: w >= 0, nested: [[inner,
    outer], ...]}`` (the tissue keys are checked against the registry when training starts)."""
    if implied is None:
        return []
    if not isinstance(implied, Mapping) or set(implied) - {"weight", "nested"}:
        return [f"implied_labels must be null or a mapping with weight and nested, got {implied!r}"]
    weight, nested = implied.get("weight", 1.0), implied.get("nested", [])
    problems = []
    if not (_is_num(weight) and weight >= 0):
        problems.append(f"implied_labels.weight must be a number >= 0, got {weight!r}")
    if not isinstance(nested, list) or not all(
        isinstance(p, list | tuple) and len(p) == 2 and all(isinstance(k, str) for k in p)
        for p in nested
    ):
        problems.append(
            f"implied_labels.nested must be a list of [inner, outer] tissue-key pairs, got "
            f"{nested!r}"
        )
    return problems


def _check_swa(swa: Any) -> list[str]:
    """Problems of the ``swa`` setting: null or ``{start: 0 <= s < 1, bn_batches: n >= 0}``."""
    if swa is None:
        return []
    if not isinstance(swa, Mapping) or set(swa) - set(SWA_DEFAULTS):
        return [f"swa must be null or a mapping with start and bn_batches, got {swa!r}"]
    start, bn_batches = swa_settings(swa)
    problems = []
    if not (_is_num(start) and 0 <= start < 1):
        problems.append(f"swa.start must be a number in [0, 1), got {start!r}")
    if not (_is_int(bn_batches) and bn_batches >= 0):
        problems.append(f"swa.bn_batches must be an integer >= 0, got {bn_batches!r}")
    return problems


def swa_settings(swa: Mapping[str, Any]) -> tuple[float, int]:
    """``(start, bn_batches)`` of an ``swa`` mapping, :data:`SWA_DEFAULTS` where absent."""
    merged = {**SWA_DEFAULTS, **swa}
    return merged["start"], merged["bn_batches"]


def swa_first_epoch(start: float, epochs: int) -> int:
    """The first (1-based) epoch whose weights join the average: the epochs after ``start`` of
    the run, and always the last one (start 0.75 of 40 epochs: epochs 31-40)."""
    return min(int(math.floor(start * epochs)) + 1, epochs)


def poly_lr(lr0: float, epoch: int, epochs: int, power: float) -> float:
    """Learning rate of 0-based ``epoch``: ``lr0 * (1 - epoch / epochs) ** power``."""
    return lr0 * (1.0 - epoch / epochs) ** power


# -- per-tissue pools --------------------------------------------------------------------------
def plan_batches(
    orders: Iterable[np.ndarray],
    tissue_of: Mapping[int, int] | np.ndarray,
    pools: Mapping[int, Sequence[int]],
    *,
    batch_size: int,
    pool_size: int,
    mode: str = "tissue",
    steps: int | None = None,
) -> tuple[list[list[int]], dict[int, list[int]], int]:
    """Simulate the paper's per-tissue image pools on patch indices: the batches of one epoch.

    The shuffled stream arrives in loader batches of ``batch_size`` patches. Tissue mode: each
    patch joins its tissue's pool (a patch arriving at a full pool of ``pool_size`` is dropped, as
    in the paper's image pool); after each loader batch, every pool (in tissue-id order) holding
    at least ``batch_size`` patches gives one batch of its oldest ``batch_size`` patches. Pools
    carried in from the previous epoch are served first. Mixed mode: the loader batches are the
    training batches (the last one of a pass may be smaller).

    Args:
        orders: shuffled passes over the training indices; only the first is used when
            ``steps`` is None, further passes are drawn until ``steps`` batches exist.
        tissue_of: index -> tissue id (an array indexed by patch index, or a mapping).
        pools: tissue id -> indices waiting from the previous epoch (not modified).
        batch_size: patches per training batch.
        pool_size: capacity of a pool.
        mode: ``"tissue"`` or ``"mixed"``.
        steps: number of batches to plan; None = one pass.

    Returns:
        ``(batches, pools, dropped)``: lists of indices (one tissue each in tissue mode), the
        pools left for the next epoch, and how many patches found their pool full.
    """
    if mode not in BATCH_MODES:
        raise ValueError(f"batch mode must be one of {', '.join(BATCH_MODES)}, got {mode!r}")
    pools = {int(t): [int(i) for i in v] for t, v in pools.items()}
    batches: list[list[int]] = []
    dropped = 0

    def done() -> bool:
        return steps is not None and len(batches) >= steps

    def serve() -> None:
        for t in sorted(pools):
            if done():
                return
            if len(pools[t]) >= batch_size:
                batches.append(pools[t][:batch_size])
                del pools[t][:batch_size]

    if mode == "tissue":
        serve()
    for order in orders:
        order = np.asarray(order, dtype=np.int64)
        for start in range(0, len(order), batch_size):
            if done():
                break
            chunk = [int(i) for i in order[start : start + batch_size]]
            if mode == "mixed":
                batches.append(chunk)
                continue
            for i in chunk:
                pool = pools.setdefault(int(tissue_of[i]), [])
                if len(pool) < pool_size:
                    pool.append(i)
                else:
                    dropped += 1
            serve()
        if steps is None or done():
            break
    return batches, {t: v for t, v in pools.items() if v}, dropped


def shuffled_passes(indices: np.ndarray, seed: int, epoch: int) -> Iterable[np.ndarray]:
    """Endless seeded permutations of ``indices``: pass ``p`` of ``epoch`` is always the same."""
    for p in itertools.count():
        yield np.random.default_rng([seed, epoch, p]).permutation(indices)


class _PlannedBatches(torch.utils.data.Sampler):
    """A batch sampler whose batches are replaced before each epoch (keeps workers alive)."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


# -- the training run --------------------------------------------------------------------------
def train(
    patch_sets: Sequence[str | Path],
    tissues: TissueTable,
    config: Mapping[str, Any] | None,
    *,
    model_out: str | Path,
    log_csv: str | Path,
    curve_png: str | Path,
    state_dir: str | Path,
    method: str = "omniseg",
    select: Sequence[str] | None = None,
    device: str = "auto",
    threads: int = 1,
    progress: bool = True,
) -> dict[str, Any]:
    """Train one network on the ``train`` split, select the best epoch on ``val``, save it.

    Args:
        patch_sets: HDF5 patch sets (one per tissue, all splits inside).
        tissues: the registry; the model always has ``len(tissues)`` tissue codes.
        config: training settings merged over :data:`DEFAULTS` (unknown keys: ValueError).
        model_out: the trained model file (:func:`omniseg.checkpoint.save_model`), best epoch.
        log_csv: per-epoch log: epoch, lr, loss, val_dice_{key} per trained tissue,
            val_dice_mean, seconds; rewritten atomically after every epoch.
        curve_png: loss and validation Dice against epoch, drawn at the end.
        state_dir: resume state (``last.pt``); removed once ``model_out`` is written.
        method: name recorded in the model file; also picks a loss (:func:`omniseg.partial_labels.loss_for`).
        select: train on these tissue keys only (None: every tissue with training patches).
        device: ``auto``, ``cpu``, ``cuda`` or ``cuda:N``.
        threads: CPU threads (torch threads; ``threads - 1`` loader workers, at most 8).
        progress: show a tqdm bar per epoch.

    Returns:
        Summary: method, trained_tissues, epochs_run, best_epoch, val_dice (per tissue key),
        val_dice_mean, resumed_from (1-based epoch this call started at, None if fresh),
        stopped_early, seconds, model_out.

    Raises:
        ValueError: bad config, unknown tissue keys, no training patches.
        FloatingPointError: a non-finite loss or weights; ``state_dir/last.pt`` from the last
            good epoch is kept.
    """
    t_start = time.perf_counter()
    cfg = merge_config(config)
    if int(threads) != threads or threads < 1:
        raise ValueError(f"threads must be a positive integer, got {threads!r}")
    if not patch_sets:
        raise ValueError("no patch sets given")
    patch_sets = registry_order([Path(p) for p in patch_sets], tissues)
    select = _check_select(select, tissues)
    state_dir, log_csv = Path(state_dir), Path(log_csv)
    state_path = state_dir / STATE_FILE

    dev = select_device(device)
    configure_threads(int(threads))
    _seed_everything(cfg["seed"])
    if dev.type == "cuda":
        torch.backends.cudnn.benchmark = True
    data = _TrainingData.load(patch_sets, tissues, select, cfg, threads, dev)
    parts = _TrainingParts.build(cfg, tissues, dev, trained=data.trained)
    run_hash = _run_hash(cfg, patch_sets, tissues, select, method)
    run = _RunState()
    state = _load_state(state_path, run_hash)
    if state is not None:
        run = _RunState.resume(state, parts)
        logger.info("resuming from epoch %d (state %s)", run.epoch + 1, state_path)
    resumed_from = run.epoch + 1 if state is not None else None

    columns = ["epoch", "lr", "loss", *(f"val_dice_{k}" for k in data.trained_keys),
               "val_dice_mean", "seconds"]  # fmt: skip
    # the first (1-based) epoch whose weights join the stochastic weight average
    swa_from = (
        swa_first_epoch(swa_settings(cfg["swa"])[0], cfg["epochs"])
        if cfg["swa"] is not None
        else None
    )
    while run.epoch < cfg["epochs"] and not run.stopped_early:
        t0 = time.perf_counter()
        lr, loss = _train_epoch(run, data, parts, cfg, dev, method, state_path, progress)
        # validated every val_every-th epoch and at the last; the others neither compete for
        # the best epoch nor count towards the patience
        number = run.epoch + 1  # 1-based number of the epoch just trained
        due = number % cfg["val_every"] == 0 or number == cfg["epochs"]
        val = (
            _validate(parts.scored, data.val_loader, dev, parts.channels_last)
            if data.val_batches and due
            else {}
        )
        row = run.end_epoch(val, parts, cfg, lr, loss, data, tissues, time.perf_counter() - t0,
                            skipped=bool(data.val_batches) and not due)  # fmt: skip
        if parts.swa is not None and run.epoch >= swa_from:
            parts.swa.add()
        _write_log(log_csv, columns, run.rows)
        logger.info(
            "epoch %d/%d lr %.3g loss %.4f val Dice %.2f (best %.2f @ %d) %.1f s",
            run.epoch, cfg["epochs"], lr, row["loss"], row["val_dice_mean"], run.best_score,
            run.best_epoch, row["seconds"],
        )  # fmt: skip
        _save_state(state_path, run.state(run_hash, parts))

    # outputs: log (again, for a run resumed after its last epoch), curve, model, then cleanup
    _write_log(log_csv, columns, run.rows)
    from omniseg.plots import training_curve

    training_curve(log_csv, curve_png, tissues)
    summary = _save_best(model_out, run, parts, tissues, cfg, data, dev, method, select)
    _remove_state(state_dir)
    return {
        "method": method,
        "trained_tissues": data.trained_keys,
        "epochs_run": len(run.rows),
        **summary,
        "resumed_from": resumed_from,
        "stopped_early": run.stopped_early,
        "seconds": round(time.perf_counter() - t_start, 3),
        "model_out": str(model_out),
    }


# -- the pieces of a training run ----------------------------------------------------------------
def _check_select(select: Sequence[str] | str | None, tissues: TissueTable) -> list[str] | None:
    if isinstance(select, str):
        select = [select]
    if select is None:
        return None
    select = [str(k) for k in select]
    unknown = [k for k in select if k not in tissues]
    if unknown:
        raise ValueError(
            f"select: unknown tissue key(s) {', '.join(unknown)}; known: {', '.join(tissues.keys)}"
        )
    return select


@dataclass
class _TrainingData:
    """The training and validation patches of a run, their loaders and the batch plan inputs."""

    train_ds: Any
    trained: list[int]  # tissue ids with training patches, sorted
    trained_keys: list[str]
    all_train: np.ndarray  # every training patch index, sorted
    tissue_of: np.ndarray  # patch index -> tissue id (-1: not a training patch)
    val_batches: list[list[int]]  # single-tissue validation batches
    train_loader: Any
    planned: _PlannedBatches  # the training loader's batches, replaced every epoch
    val_loader: Any

    @classmethod
    def load(cls, patch_sets, tissues, select, cfg, threads, dev) -> _TrainingData:
        from omniseg.data.patchset import PatchDataset

        train_ds = PatchDataset(patch_sets, "train", tissues, select=select)
        train_idx = {
            int(t): np.asarray(v, dtype=np.int64) for t, v in train_ds.tissue_indices().items()
        }
        trained = sorted(t for t, v in train_idx.items() if len(v))
        if select is not None:
            empty = [k for k in select if tissues[k].id not in trained]
            if empty:
                names = ", ".join(str(p) for p in patch_sets)
                raise ValueError(f"no training patches of tissue(s) {', '.join(empty)} in {names}")
        if not trained:
            raise ValueError(f"no training patches in {', '.join(str(p) for p in patch_sets)}")
        trained_keys = [tissues[t].key for t in trained]
        all_train = np.sort(np.concatenate([train_idx[t] for t in trained]))
        tissue_of = np.full(int(all_train.max()) + 1, -1, dtype=np.int64)
        for t in trained:
            tissue_of[train_idx[t]] = t
        bs = cfg["batch_size"]
        if cfg["batch_mode"] == "tissue" and max(len(train_idx[t]) for t in trained) < bs:
            raise ValueError(
                f"batch_mode 'tissue' needs a tissue with at least batch_size={bs} training "
                f"patches; counts: "
                + ", ".join(f"{tissues[t].key}={len(train_idx[t])}" for t in trained)
            )
        val_ds = PatchDataset(patch_sets, "val", tissues, select=trained_keys)
        val_idx = {
            int(t): np.sort(np.asarray(v, dtype=np.int64))
            for t, v in val_ds.tissue_indices().items()
        }
        val_batches = []  # single-tissue batches: predict_proba queries one head per batch
        vbs = cfg["val_batch_size"]
        for t in trained:
            v = val_idx.get(t, np.zeros(0, dtype=np.int64))
            val_batches += [v[s : s + vbs].tolist() for s in range(0, len(v), vbs)]
        if not val_batches:
            logger.warning(
                "no validation patches of %s: the last epoch is kept, not the best one",
                ", ".join(trained_keys),
            )
        train_loader, planned = _loader(train_ds, threads, dev)
        val_loader, val_planned = _loader(val_ds, threads, dev)
        val_planned.batches = val_batches
        return cls(train_ds, trained, trained_keys, all_train, tissue_of, val_batches,
                   train_loader, planned, val_loader)  # fmt: skip


@dataclass
class _TrainingParts:
    """Model, optimizer, weight average, loss and augmentation of a run."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    average: WeightAverage | None
    swa: UniformAverage | None
    loss_fn: Callable[..., Tensor]
    augmenter: Any
    channels_last: bool

    @property
    def scored(self) -> torch.nn.Module:
        """The model that is validated and kept: the weight average when there is one."""
        return self.average.model if self.average is not None else self.model

    @classmethod
    def build(cls, cfg, tissues, dev, trained=None) -> _TrainingParts:
        from omniseg.augment import Augmenter
        from omniseg.models import build_model

        model = build_model(
            cfg["model"]["name"], num_tissues=len(tissues), **cfg["model"]["kwargs"]
        )
        model.to(dev)
        channels_last = channels_last_for_training(model, dev)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        optimizer = make_optimizer(model, cfg)
        average = WeightAverage(model, cfg["ema"]) if cfg["ema"] is not None else None
        swa = UniformAverage(model) if cfg["swa"] is not None else None
        # None: the model's own kind ("binary" or "multiclass") names its strategy
        loss_fn = loss_for(cfg["strategy"] if cfg["strategy"] is not None else model.output_kind)
        _check_options(loss_fn, cfg["loss"], "loss", reserved=IMPLIED_OPTIONS)
        loss_fn = _with_implied_labels(loss_fn, cfg, tissues, trained, dev)
        try:
            augmenter = Augmenter(**cfg["augment"])
        except TypeError as exc:
            raise ValueError(f"training config: augment: {exc}") from exc
        if isinstance(augmenter, torch.nn.Module):
            augmenter.to(dev)
        return cls(model, optimizer, average, swa, loss_fn, augmenter, channels_last)


def _with_implied_labels(loss_fn, cfg, tissues: TissueTable, trained, dev) -> Callable[..., Tensor]:
    """``loss_fn`` with the relations of ``implied_labels`` bound (unchanged when it is off or
    relates none of the ``trained`` tissues).

    Raises:
        ValueError: a bad nested pair, or a model/strategy that cannot take implied labels.
    """
    from omniseg.models.registry import takes_implied_labels
    from omniseg.partial_labels import label_relations

    implied = cfg["implied_labels"]
    if implied is None or implied.get("weight", 1.0) == 0:
        return loss_fn
    try:
        relations = label_relations(tissues, implied.get("nested", []), trained)
    except ValueError as exc:
        raise ValueError(f"training config: implied_labels: {exc}") from None
    if not bool((relations != 0).any()):
        return loss_fn
    if not takes_implied_labels(cfg["model"]["name"], cfg["strategy"]):
        raise ValueError(
            f"training config: implied_labels is set, but model {cfg['model']['name']!r} "
            f"with strategy {cfg['strategy'] or 'its default'!r} cannot run every tissue's "
            "head on a patch: remove implied_labels for this method"
        )
    weight = implied.get("weight", 1.0)
    return functools.partial(loss_fn, relations=relations.to(dev), implied_weight=weight)


@dataclass
class _RunState:
    """What a run has done so far: everything the resume state holds besides the weights."""

    rows: list[dict[str, Any]] = field(default_factory=list)
    pools: dict[int, list[int]] = field(default_factory=dict)
    best_state: dict[str, Tensor] | None = None
    best_score: float = -math.inf
    best_epoch: int = 0
    since_best: int = 0
    epoch: int = 0  # epochs done
    stopped_early: bool = False

    @classmethod
    def resume(cls, state: Mapping[str, Any], parts: _TrainingParts) -> _RunState:
        """Restore the weights, optimizer and average into ``parts`` and the RNG states."""
        parts.model.load_state_dict(state["model"])
        parts.optimizer.load_state_dict(state["optimizer"])
        if parts.average is not None:
            parts.average.load_state_dict(state["average"])
        if parts.swa is not None:
            parts.swa.load_state_dict(state["swa"])
        _set_rng_state(state["rng"])
        return cls(
            rows=[dict(r) for r in state["rows"]],
            pools={int(t): list(v) for t, v in state["pools"].items()},
            best_state=state["best_state"],
            best_score=state["best_score"],
            best_epoch=state["best_epoch"],
            since_best=state["since_best"],
            epoch=state["epoch"],
            stopped_early=state["stopped_early"],
        )

    def end_epoch(
        self, val, parts, cfg, lr, loss, data, tissues, seconds, skipped: bool = False
    ) -> dict[str, Any]:
        """Record an epoch: keep the best weights, append its log row, count patience.

        ``skipped``: the epoch was not validated (``val_every``): it is logged but neither
        kept as the best nor counted towards the patience. Without any validation data
        (``val`` empty, not skipped) every epoch replaces the kept weights: the last is saved.
        """
        val_mean = float(np.mean(list(val.values()))) if val else math.nan
        if not skipped and (not val or val_mean > self.best_score):
            self.best_state = {
                k: v.detach().to("cpu", copy=True) for k, v in parts.scored.state_dict().items()
            }
            self.best_score = val_mean if val else -math.inf
            self.best_epoch, self.since_best = self.epoch + 1, 0
        elif not skipped:
            self.since_best += 1
        row = {"epoch": self.epoch + 1, "lr": lr, "loss": loss}
        row.update({f"val_dice_{tissues[t].key}": val.get(t, math.nan) for t in data.trained})
        row.update({"val_dice_mean": val_mean, "seconds": round(seconds, 3)})
        self.rows.append(row)
        self.epoch += 1
        if cfg["patience"] is not None and self.since_best >= cfg["patience"]:
            self.stopped_early = True
            logger.info("no improvement for %d epochs: stopping early", self.since_best)
        return row

    def state(self, run_hash: str, parts: _TrainingParts) -> dict[str, Any]:
        """The resume state after the last epoch (:data:`STATE_FORMAT`)."""
        return {
            "format": STATE_FORMAT,
            "hash": run_hash,
            "epoch": self.epoch,
            "stopped_early": self.stopped_early,
            "model": {k: v.detach().cpu() for k, v in parts.model.state_dict().items()},
            "optimizer": parts.optimizer.state_dict(),
            "average": parts.average.state_dict() if parts.average is not None else None,
            "swa": parts.swa.state_dict() if parts.swa is not None else None,
            "best_state": self.best_state,
            "best_score": self.best_score,
            "best_epoch": self.best_epoch,
            "since_best": self.since_best,
            "pools": {int(t): list(v) for t, v in self.pools.items()},
            "rng": _rng_state(),
            "rows": self.rows,
        }


def _train_epoch(
    run: _RunState, data: _TrainingData, parts: _TrainingParts, cfg, dev, method: str,
    state_path: Path, progress: bool,
) -> tuple[float, float]:  # fmt: skip
    """Plan and run one epoch's steps; returns ``(lr, mean loss)``.

    Raises:
        FloatingPointError: a non-finite loss or weights (the last good state is kept).
    """
    from tqdm.auto import tqdm

    epoch, epochs = run.epoch, cfg["epochs"]
    lr = poly_lr(cfg["lr"], epoch, epochs, cfg["poly_power"])
    for group in parts.optimizer.param_groups:
        group["lr"] = lr
    batches, run.pools, dropped = plan_batches(
        shuffled_passes(data.all_train, cfg["seed"], epoch),
        data.tissue_of,
        {} if cfg["reset_pools"] else run.pools,  # the authors' code empties them every epoch
        batch_size=cfg["batch_size"],
        pool_size=cfg["pool_size"],
        mode=cfg["batch_mode"],
        steps=cfg["steps_per_epoch"],
    )
    if dropped:
        logger.warning(
            "epoch %d: %d patches found their pool full and were skipped", epoch + 1, dropped
        )
    data.planned.batches = batches
    model = parts.model
    model.train()
    total, steps = 0.0, 0
    bar = tqdm(total=len(batches), desc=f"{method} epoch {epoch + 1}/{epochs}",
               disable=not progress, leave=False, mininterval=1.0)  # fmt: skip
    for batch in data.train_loader:
        images, masks, tissue = _to_device(batch, dev)
        images, masks = parts.augmenter(images, masks)
        if parts.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast_context(dev):
            loss = parts.loss_fn(model, images, masks, tissue, **cfg["loss"])
        value = float(loss.detach())
        if not math.isfinite(value):
            bar.close()
            raise FloatingPointError(
                f"training loss is {value} at epoch {epoch + 1}, step {steps + 1} "
                f"(lr {lr:.3g}); stopped. {_kept(state_path, epoch)}"
            )
        parts.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        parts.optimizer.step()
        if parts.average is not None:
            parts.average.update()
        total += value
        steps += 1
        bar.update(1)
        bar.set_postfix(loss=f"{total / steps:.4f}", refresh=False)
    bar.close()
    if not all(bool(torch.isfinite(p).all()) for p in model.parameters()):
        raise FloatingPointError(
            f"weights became non-finite during epoch {epoch + 1}; stopped. "
            f"{_kept(state_path, epoch)}"
        )
    return lr, total / max(steps, 1)


def _save_best(model_out, run: _RunState, parts: _TrainingParts, tissues, cfg, data, dev,
               method, select) -> dict[str, Any]:  # fmt: skip
    """Write the kept weights with their provenance: the best validated epoch's or, with
    ``swa``, the average of the last epochs (BatchNorm's statistics recomputed for it).

    Returns:
        ``best_epoch`` (with ``swa``: the last epoch), ``averaged_epochs`` (``[first, last]``
        or None), ``val_dice`` (per tissue key) and ``val_dice_mean`` of the saved weights.
    """
    rows = run.rows
    averaged = None
    if parts.swa is not None and parts.swa.steps > 0:
        model = parts.swa.model
        bn_batches = swa_settings(cfg["swa"])[1]
        if bn_batches:
            batches = _recalibration_batches(data, parts, cfg, dev, bn_batches)
            recompute_batchnorm(model, batches, dev)
        val = (
            _validate(model, data.val_loader, dev, parts.channels_last) if data.val_batches else {}
        )
        model.eval()
        val_dice = {tissues[t].key: float(val.get(t, math.nan)) for t in data.trained}
        val_mean = float(np.mean(list(val.values()))) if val else math.nan
        best_epoch = run.epoch
        averaged = [run.epoch - parts.swa.steps + 1, run.epoch]
        logger.info(
            "saved the average of epochs %d-%d: val Dice %.2f (best single epoch %.2f @ %d)",
            *averaged, val_mean, run.best_score, run.best_epoch,
        )  # fmt: skip
    else:
        if parts.swa is not None:
            logger.warning(
                "swa: training stopped at epoch %d, before the averaged epochs: the best "
                "validated epoch is saved", run.epoch,
            )  # fmt: skip
        model = parts.model
        if run.best_state is not None:
            model.load_state_dict(run.best_state)
        best_epoch = run.best_epoch
        best_row = next((r for r in rows if r["epoch"] == best_epoch), rows[-1] if rows else {})
        val_dice = {k: float(best_row.get(f"val_dice_{k}", math.nan)) for k in data.trained_keys}
        val_mean = float(best_row.get("val_dice_mean", math.nan))
    save_model(
        model_out,
        model,
        tissues,
        extra={
            "method": method,
            "select": select,
            "trained_tissues": data.trained_keys,
            # the slide path tiles at this size by default: the controller pools the whole
            # input, so a head sees the context it was trained on
            "patch_size": int(data.train_ds.patch_size),
            "epochs": len(rows),
            "best_epoch": best_epoch,
            "averaged_epochs": averaged,
            "val_dice": val_dice,
            "val_dice_mean": val_mean,
            "train_config": cfg,
            "created_by": f"omniseg {__version__}",
        },
    )
    return {"best_epoch": best_epoch, "averaged_epochs": averaged, "val_dice": val_dice,
            "val_dice_mean": val_mean}  # fmt: skip


def _recalibration_batches(data, parts: _TrainingParts, cfg, dev, n: int):
    """``n`` training batches ``(images, tissue)`` planned and augmented as the run's were (a
    fresh shuffle, the pass after the last epoch): what the average's BatchNorm is fitted on."""
    batches, _, _ = plan_batches(
        shuffled_passes(data.all_train, cfg["seed"], cfg["epochs"]),
        data.tissue_of,
        {},
        batch_size=cfg["batch_size"],
        pool_size=cfg["pool_size"],
        mode=cfg["batch_mode"],
        steps=n,
    )
    data.planned.batches = batches
    for batch in data.train_loader:
        images, masks, tissue = _to_device(batch, dev)
        images, _ = parts.augmenter(images, masks)
        if parts.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        yield images, tissue


@torch.no_grad()
def recompute_batchnorm(
    model: torch.nn.Module, batches: Iterable[tuple[Tensor, Tensor]], device: torch.device
) -> int:
    """Set every BatchNorm's running statistics of ``model`` to their plain average over
    ``batches`` (``(images, tissue)``, forward passes in training mode without gradients).

    Averaged weights need this: the averaged running statistics belong to none of the weights
    that were averaged (Izmailov et al. 2018). The momenta are restored afterwards, the model
    is left in eval mode, and with no batch at all the statistics are left as they were.

    Returns:
        the number of batches used (0 for a model without BatchNorm: nothing is read).
    """
    norms = [m for m in model.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    kept = [{k: v.clone() for k, v in m.state_dict().items()} for m in norms]
    momenta = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average over the batches
    model.train()
    used = 0
    try:
        for images, tissue in batches:
            with autocast_context(device):
                model(images, tissue)
            used += 1
    finally:
        for m, momentum, state in zip(norms, momenta, kept, strict=True):
            m.momentum = momentum
            if not used:
                m.load_state_dict(state)
        model.eval()
    return used


# -- helpers -----------------------------------------------------------------------------------
class _Average:
    """A frozen copy of a model (eval mode) that folds the live model's weights in.

    Floating-point tensors move towards the live ones by :meth:`_fold`'s weight; integer
    buffers (BatchNorm's batch counter) are copied. The live model trains on unchanged.
    """

    def __init__(self, model: torch.nn.Module):
        self.steps = 0  # folds so far
        self.model = copy.deepcopy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        # the live model's tensors are updated in place (optimizer steps, load_state_dict), so
        # the pairs are found once, not at every fold
        ours = self.model.state_dict(keep_vars=True)
        self._mine, self._theirs, self._copied = [], [], []
        for name, value in model.state_dict(keep_vars=True).items():
            if value.is_floating_point():
                self._mine.append(ours[name].data)
                self._theirs.append(value.data)
            else:
                self._copied.append((ours[name], value))

    @torch.no_grad()
    def _fold(self, weight: float) -> None:
        """``a <- a + weight (x - a)`` for every average ``a`` and live tensor ``x``."""
        torch._foreach_lerp_(self._mine, self._theirs, weight)
        for dst, src in self._copied:
            dst.copy_(src)

    def state_dict(self) -> dict[str, Any]:
        weights = {k: v.detach().cpu() for k, v in self.model.state_dict().items()}
        return {"steps": self.steps, "weights": weights}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.steps = int(state["steps"])
        self.model.load_state_dict(state["weights"])


class WeightAverage(_Average):
    """Exponential moving average of a model's weights and floating-point buffers.

    After step ``n`` (from 1) every average ``a`` of a tensor ``x`` becomes
    ``a + (1 - d_n) (x - a)`` with ``d_n = min(decay, (1 + n) / (10 + n))``: the warm-up keeps
    the first steps' random weights from dominating a short run. Integer buffers (BatchNorm's
    batch counter) are copied. The average is a separate model in eval mode, validated and saved
    in place of the live one (the ``model`` it was made from); it changes nothing about how the
    live model trains.
    """

    def __init__(self, model: torch.nn.Module, decay: float):
        if not 0 < decay < 1:
            raise ValueError(f"weight average decay must be in (0, 1), got {decay!r}")
        super().__init__(model)
        self.decay = float(decay)

    def update(self) -> None:
        """Fold the live model's current weights into the average (after an optimizer step)."""
        self.steps += 1
        self._fold(1.0 - min(self.decay, (1 + self.steps) / (10 + self.steps)))


class UniformAverage(_Average):
    """Uniform average of a model's weights at chosen moments (stochastic weight averaging).

    After ``n`` calls of :meth:`add` the average is the plain mean of the weights added
    (``a + (x - a) / n``); integer buffers are copied. Its BatchNorm statistics are the average
    of the live ones until :func:`recompute_batchnorm` replaces them.
    """

    def add(self) -> None:
        """Fold the live model's current weights into the average."""
        self.steps += 1
        self._fold(1.0 / self.steps)


def _loader(dataset: torch.utils.data.Dataset, threads: int, device: torch.device):
    from omniseg.data import patchset

    planned = _PlannedBatches()
    workers = min(int(threads) - 1, 8)
    loader = torch.utils.data.DataLoader(
        dataset,
        batch_sampler=planned,
        num_workers=workers,
        worker_init_fn=getattr(patchset, "worker_init_fn", None) if workers else None,
        persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",
        # a private generator: iterating the loader must not consume the global RNG streams
        generator=torch.Generator().manual_seed(0),
    )
    return loader, planned


def _to_device(batch: Mapping[str, Tensor], device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
    nb = device.type == "cuda"
    images = batch["image"].to(device, non_blocking=nb)
    masks = batch["mask"].to(device, non_blocking=nb)
    tissue = batch["tissue"].to(device, non_blocking=nb).long().reshape(-1)
    return images, masks, tissue


@torch.inference_mode()
def _validate(model, loader, device: torch.device, channels_last: bool) -> dict[int, float]:
    """Mean Dice (%) per tissue over the validation batches (each batch is one tissue)."""
    from omniseg.metrics import dice_batch

    model.eval()
    scores: dict[int, list[np.ndarray]] = {}
    for batch in loader:
        images, masks, tissue = _to_device(batch, device)
        if channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        t = int(tissue[0])
        with autocast_context(device):
            prob = model.predict_proba(images, [t])[:, 0]
        pred = (prob.float() > 0.5).cpu().numpy()
        gt = (masks[:, 0] > 0.5).cpu().numpy()
        scores.setdefault(t, []).append(np.asarray(dice_batch(pred, gt), dtype=np.float64))
    model.train()
    return {t: float(np.concatenate(v).mean()) for t, v in sorted(scores.items())}


def _check_options(
    fn: Callable, options: Mapping[str, Any], section: str, reserved: Sequence[str] = ()
) -> None:
    """Unknown ``options`` of ``fn`` (keyword-only, minus ``reserved``: set by the trainer)."""
    params = inspect.signature(fn).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = [
        n
        for n, p in params.items()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and n not in reserved
    ]
    bad = sorted(set(options) - set(accepted))
    if bad:
        raise ValueError(
            f"training config: unknown {section} option(s) {', '.join(bad)} for "
            f"{fn.__name__} (accepted: {', '.join(accepted)})"
        )


def _write_log(path: Path, columns: Sequence[str], rows: Sequence[Mapping[str, Any]]) -> None:
    with atomic_path(path) as tmp, tmp.open("w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(columns))
        writer.writeheader()
        for row in rows:
            writer.writerow({c: _fmt(row.get(c)) for c in columns})


def _fmt(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return value


def _patch_set_id(path: Path) -> str:
    """The patch set's ``config_hash`` attribute (or size + mtime when it has none)."""
    import h5py

    try:
        with h5py.File(path, "r") as fh:
            value = fh.attrs.get("config_hash", "")
    except OSError as exc:
        raise ValueError(f"patch set {path} cannot be opened: {exc}") from exc
    value = value.decode() if isinstance(value, bytes) else str(value)
    if value:
        return value
    st = path.stat()
    return f"size={st.st_size},mtime={st.st_mtime_ns}"


def registry_order(paths: Sequence[Path], tissues: TissueTable) -> list[Path]:
    """``paths`` sorted by the registry id of each patch set's tissue (stable for equal ids).

    The batches are drawn over the dataset's patch indices, which follow the order of the
    files: in registry order, the same seed trains the same model however the files are
    listed (the workflow lists them in registry order, a shell glob alphabetically). Only the
    files' attributes are read. A file that cannot be read sorts first; :class:`PatchDataset`
    then reports it.
    """
    from omniseg.data.patchset import read_attrs, registry_tissue

    def key(path: Path) -> int:
        try:
            return registry_tissue(read_attrs(path), tissues, path).id
        except (OSError, ValueError, KeyError):
            return -1

    return sorted(paths, key=key)


def _run_hash(
    cfg: Mapping[str, Any],
    patch_sets: Sequence[Path],
    tissues: TissueTable,
    select: Sequence[str] | None,
    method: str,
) -> str:
    """What a resume state must match: config, inputs, tissue table, selection, method."""
    blob = {
        "config": cfg,
        "patch_sets": [[str(p), _patch_set_id(p)] for p in patch_sets],
        "tissues": tissues.fingerprint(),
        "select": list(select) if select is not None else None,
        "method": method,
    }
    return hashlib.sha256(json.dumps(blob, sort_keys=True, default=str).encode()).hexdigest()


def _load_state(path: Path, run_hash: str) -> dict | None:
    if not path.is_file():
        return None
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # a damaged state only costs the epochs it held
        logger.warning("resume state %s cannot be read (%s): starting fresh", path, exc)
        return None
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        logger.warning("%s is not a training state: starting fresh", path)
        return None
    if state.get("hash") != run_hash:
        logger.warning("resume state %s belongs to other inputs or settings: starting fresh", path)
        return None
    return state


def _save_state(path: Path, state: Mapping[str, Any]) -> None:
    with atomic_path(path) as tmp:
        torch.save(dict(state), tmp)


def _remove_state(state_dir: Path) -> None:
    (state_dir / STATE_FILE).unlink(missing_ok=True)
    try:
        state_dir.rmdir()
    except OSError:  # not empty (something else lives there) or already gone
        pass


def _kept(state_path: Path, epoch: int) -> str:
    if epoch > 0 and state_path.is_file():
        return f"The last good checkpoint {state_path} (after epoch {epoch}) is kept."
    return "No epoch had completed, so there is no checkpoint to resume from."


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)  # noqa: NPY002 - the global stream third-party code uses
    torch.manual_seed(seed)


def _rng_state() -> dict[str, Any]:
    """RNG states of torch (CPU and CUDA), numpy and random, as weights_only-loadable values."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()  # noqa: NPY002
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {
            "keys": torch.from_numpy(keys.astype(np.int64)),
            "pos": int(pos),
            "has_gauss": int(has_gauss),
            "gauss": float(gauss),
        },
        "random": {"version": version, "internal": list(internal), "gauss": gauss_next},
    }


def _set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda") or []
    if cuda and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)
    n = state["numpy"]
    np.random.set_state(  # noqa: NPY002
        ("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"])
    )
    r = state["random"]
    random.setstate((r["version"], tuple(r["internal"]), r["gauss"]))
