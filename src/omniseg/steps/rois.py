"""The ROI-level steps: cohort, split, patches, training, evaluation, Table 1 and figures.

See :mod:`omniseg.steps`.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import MappingProxyType

import pandas as pd

from omniseg.io import atomic_path
from omniseg.tissues import TissueTable, as_tissue_table

log = logging.getLogger("omniseg")

SPLIT_ORDER = ("train", "val", "test")


def _fractions(fractions: Mapping[str, float] | Sequence[float]) -> tuple[float, float, float]:
    if isinstance(fractions, Mapping):
        return tuple(float(fractions[s]) for s in SPLIT_ORDER)  # type: ignore[return-value]
    return tuple(float(f) for f in fractions)  # type: ignore[return-value]


# -- data ---------------------------------------------------------------------------------------
def synth_cohort(
    sheet: str | Path,
    tissues: TissueTable | str | Path,
    *,
    threads: int = 1,
    **synthetic,
) -> Path:
    """Generate the synthetic cohort next to ``sheet`` (which must be ``<outdir>/rois.tsv``)."""
    from omniseg.synthetic.cohort import synthesize_cohort

    sheet = Path(sheet)
    written = synthesize_cohort(
        sheet.parent, as_tissue_table(tissues), threads=threads, **synthetic
    )
    if Path(written).resolve() != sheet.resolve():
        raise RuntimeError(f"cohort sheet written to {written}, expected {sheet}")
    return sheet


def split_patients(
    sheet: str | Path,
    tissues: TissueTable | str | Path,
    out: str | Path,
    *,
    fractions: Mapping[str, float] | Sequence[float] = (0.6, 0.1, 0.3),
    seed: int = 0,
) -> pd.DataFrame:
    """Assign every patient of ``sheet`` to train/val/test and write ``patient, split, rois``."""
    from omniseg.data.sheet import load_sheet
    from omniseg.data.split import split_sheet

    df = split_sheet(
        load_sheet(sheet, as_tissue_table(tissues), check_files=False), _fractions(fractions), seed
    )
    table = (
        df.groupby("patient", sort=True)
        .agg(split=("split", "first"), rois=("roi_id", "size"))
        .reset_index()
    )
    with atomic_path(out) as tmp:
        table.to_csv(tmp, sep="\t", index=False)
    counts = table.groupby("split")["patient"].size().to_dict()
    log.info("patients per split: %s", counts)
    return table


def sheet_with_splits(
    sheet: str | Path, splits: str | Path, tissues: TissueTable | str | Path
) -> pd.DataFrame:
    """The sample sheet with the ``split`` column taken from a patient split table."""
    from omniseg.data.sheet import load_sheet

    df = load_sheet(sheet, as_tissue_table(tissues), check_files=False)
    table = pd.read_csv(splits, sep="\t", dtype={"patient": str, "split": str})
    mapping = dict(zip(table["patient"], table["split"], strict=True))
    missing = sorted(set(df["patient"]) - set(mapping))
    if missing:
        raise ValueError(f"split table {splits} has no split for patient(s) {', '.join(missing)}")
    return df.assign(split=df["patient"].map(mapping))


#: Patches per split and tissue when none are given (the order of the paper's patch sets).
PAPER_COUNTS: Mapping[str, int] = MappingProxyType({"train": 2000, "val": 300, "test": 1000})


def extract_tissue(
    sheet: str | Path,
    splits: str | Path,
    tissues: TissueTable | str | Path,
    tissue: str,
    out: str | Path,
    *,
    size: int = 256,
    counts: Mapping[str, int] = PAPER_COUNTS,
    object_fraction: float = 0.5,
    absent_fraction: float = 0.0,
    seed: int = 0,
    config_hash: str = "",
) -> Path:
    """Scale one tissue's ROIs to its magnification, crop patches and write ``{tissue}.h5``."""
    from omniseg.data.patches import extract_patches

    table = as_tissue_table(tissues)
    df = sheet_with_splits(sheet, splits, table)
    return extract_patches(
        df,
        table[tissue],
        out,
        patch_size=size,
        counts=counts,
        object_fraction=object_fraction,
        absent_fraction=absent_fraction,
        seed=seed,
        config_hash=config_hash,
    )


def import_release(
    src: str | Path,
    outdir: str | Path,
    tissues: TissueTable | str | Path,
    *,
    fractions: Mapping[str, float] | Sequence[float] = (0.6, 0.1, 0.3),
    seed: int = 0,
    data_list: str | Path | None = None,
    outputs: Mapping[str, str | Path] | None = None,
) -> dict[str, Path]:
    """Convert the public release folder layout into patch sets: ``outputs[tissue]`` where
    given (a rule's declared outputs), else ``outdir/{tissue}.h5``."""
    from omniseg.data.release import import_release as _import

    return _import(
        src,
        outdir,
        as_tissue_table(tissues),
        fractions=_fractions(fractions),
        seed=seed,
        data_list=data_list,
        outputs=outputs,
    )


# -- models -------------------------------------------------------------------------------------
def method_training_config(config: Mapping, method: str, scope: str, n_tissues: int) -> dict:
    """The training settings of one network of ``method``, from a workflow config.

    Shared ``training`` settings, the method's own ``training`` overrides, its model and its
    partial-label ``strategy``. A per-tissue network (``scope`` a tissue key) sees one tissue's
    patches only, so its epochs are shortened to the same number of samples per tissue as a
    network trained on all ``n_tissues`` tissues.

    ``batch_per_tissue: true`` (a workflow setting, resolved here): a network trained on all
    ``n_tissues`` tissues takes ``batch_size x n_tissues`` patches per step (``pool_size`` scaled
    alike) in ``steps_per_epoch / n_tissues`` steps, so it sees the same samples per tissue *and*
    takes the same number of optimizer steps as each per-tissue network. False (the paper):
    ``batch_size`` patches in ``steps_per_epoch`` steps. A method's own override of a key wins;
    where both values are mappings (``loss``, ``augment``, ``swa``) the override's entries
    update the shared ones (``loss: {boundary_weight: 3}`` keeps the shared ``loss.dice``), and
    a method's ``swa: null`` still turns averaging off.
    """
    from omniseg.train import DEFAULTS

    methods = config.get("methods", {})
    if method not in methods:
        raise ValueError(f"method {method!r} is not configured (have {', '.join(methods)})")
    m = methods[method]
    overrides = m.get("training", {})
    shared = config.get("training", {})
    cfg = {
        **shared,
        **{
            key: {**shared[key], **value}
            if isinstance(value, Mapping) and isinstance(shared.get(key), Mapping)
            else value
            for key, value in overrides.items()
        },
        "model": {"name": m["model"], "kwargs": dict(m.get("kwargs", {}))},
    }
    if "strategy" in m:
        cfg["strategy"] = m["strategy"]
    per_tissue_batches = cfg.pop("batch_per_tissue", False)
    if not isinstance(per_tissue_batches, bool):
        raise ValueError(
            f"method {method}: batch_per_tissue must be true or false, got {per_tissue_batches!r}"
        )
    steps = cfg.get("steps_per_epoch")
    shorten = scope != "all" or (per_tissue_batches and n_tissues > 1)
    if shorten and steps and "steps_per_epoch" not in overrides:
        cfg["steps_per_epoch"] = max(1, -(-steps // n_tissues))
    for key in _scaled_batch_keys(overrides, scope, per_tissue_batches):
        cfg[key] = cfg.get(key, DEFAULTS[key]) * n_tissues
    return cfg


def _scaled_batch_keys(overrides: Mapping, scope: str, per_tissue_batches) -> list[str]:
    """The keys ``batch_per_tissue`` multiplies by the tissue count: batch and pool size of a
    network on all tissues, unless the method overrides them."""
    if scope != "all" or per_tissue_batches is not True:
        return []
    return [k for k in ("batch_size", "pool_size") if k not in overrides]


def _scaling_note(config: Mapping, m: Mapping, scope: str, n_tissues: int, exc: Exception) -> str:
    """``"; batch_per_tissue: ... x T"`` where an error of a network on all tissues shows a
    batch or pool size (``pool_size 12 ...``) that ``batch_per_tissue`` scaled, else ``""``."""
    overrides = m.get("training") or {}
    flag = overrides.get("batch_per_tissue", config.get("training", {}).get("batch_per_tissue"))
    scaled = [
        k
        for k in _scaled_batch_keys(overrides, scope, flag)
        if n_tissues > 1 and re.search(rf"\b{k} \d", str(exc))
    ]
    return f"; batch_per_tissue: {' and '.join(scaled)} x {n_tissues}" if scaled else ""


def check_training_configs(config: Mapping, n_tissues: int) -> None:
    """Check the training settings of every method of a workflow config, before any job runs.

    One rule set: each method's settings (shared ``training``, its overrides, model, strategy)
    go through :func:`omniseg.train.merge_config`, as its training job will.

    Raises:
        ValueError: naming each method whose settings are wrong, where they are, and why.
    """
    from omniseg.models.registry import takes_implied_labels
    from omniseg.train import merge_config

    problems = []
    for method, m in config.get("methods", {}).items():
        where = "training" + (f" + methods.{method}.training" if m.get("training") else "")
        scope = "tissue" if m.get("per_tissue", False) else "all"  # what its jobs will train
        try:
            cfg = merge_config(method_training_config(config, method, scope, n_tissues))
        except ValueError as exc:
            problems.append(
                f"method {method} ({where}{_scaling_note(config, m, scope, n_tissues, exc)}): {exc}"
            )
            continue
        implied = cfg["implied_labels"]
        if (
            implied is not None
            and implied.get("weight", 1.0) > 0
            and not m.get("per_tissue", False)
            and not takes_implied_labels(cfg["model"]["name"], cfg["strategy"])
        ):
            problems.append(
                f"method {method} ({where}): implied_labels needs a network that runs every "
                f"tissue's head on one backbone pass (model omniseg); model "
                f"{cfg['model']['name']!r} cannot: set implied_labels under "
                "methods.<method>.training of such a method only"
            )
    if problems:
        raise ValueError("config: " + "\n".join(problems))


# -- models -------------------------------------------------------------------------------------
def train_model(
    patch_sets: Sequence[str | Path],
    tissues: TissueTable | str | Path,
    training: Mapping,
    *,
    model_out: str | Path,
    log_csv: str | Path,
    curve_png: str | Path,
    state_dir: str | Path,
    method: str,
    scope: str = "all",
    device: str = "auto",
    threads: int = 1,
) -> dict:
    """Train one network: every tissue (scope ``all``) or one tissue (multi-network methods).

    ``device="auto"`` takes the ``OMNISEG_DEVICE`` environment variable when it is set
    (``cpu``, ``cuda``, ``cuda:1``), else CUDA when present, else the CPU.
    """
    from omniseg.device import requested_device
    from omniseg.train import train

    return train(
        patch_sets,
        as_tissue_table(tissues),
        training,
        model_out=model_out,
        log_csv=log_csv,
        curve_png=curve_png,
        state_dir=state_dir,
        method=method,
        select=None if scope == "all" else [scope],
        device=requested_device(device),
        threads=threads,
    )


def model_map(model_files: Sequence[str | Path], tissues: TissueTable) -> dict[str, Path]:
    """Tissue key -> model file, from what each file records: a network trained on every tissue
    (``select`` None) serves them all; one trained on selected tissues serves those."""
    from omniseg.checkpoint import read_checkpoint

    files = [Path(p) for p in model_files]
    served: dict[str, Path] = {}
    for path in files:
        select = read_checkpoint(path, mmap=True).get("select")  # metadata only
        if select is None:
            if len(files) != 1:
                raise ValueError(
                    f"{path} is a network for every tissue; a method has one such file, got "
                    f"{[str(f) for f in files]}"
                )
            return {key: path for key in tissues.keys}
        unknown = sorted(set(select) - set(tissues.keys))
        if unknown:
            raise ValueError(f"{path} was trained on unknown tissue(s) {', '.join(unknown)}")
        for key in select:
            if key in served:
                raise ValueError(f"two model files for tissue {key}: {served[key]} and {path}")
            served[key] = path
    return {key: served[key] for key in tissues.keys if key in served}


def evaluate_method(
    model_files: Sequence[str | Path],
    patch_sets: Sequence[str | Path],
    tissues: TissueTable | str | Path,
    *,
    method: str,
    out_dir: str | Path | None = None,
    outputs: Mapping[str, str | Path] | None = None,
    split: str = "test",
    device: str = "auto",
    batch_size: int = 16,
    threads: int = 1,
) -> dict[str, Path]:
    """Score a method's predictions on the test split (Dice, HD and MSD in micrometres); the
    files go to ``outputs`` by name, or under their names in ``out_dir``
    (:func:`omniseg.evaluate.evaluate`). ``threads``: CPU threads of torch."""
    from omniseg.device import configure_threads, requested_device
    from omniseg.evaluate import evaluate

    table = as_tissue_table(tissues)
    configure_threads(threads)
    device = requested_device(device)
    return evaluate(
        model_map(model_files, table),
        patch_sets,
        table,
        method=method,
        out_dir=out_dir,
        outputs=outputs,
        split=split,
        device=device,
        batch_size=batch_size,
    )


# -- Table 1 and figures ------------------------------------------------------------------------
def _method_of(path: str | Path) -> str:
    """The method a result file records: ``method`` of the rows of a table (``.csv``) or of a
    predictions file's attributes (``.h5``). Model files record theirs too (``meta["method"]``
    of :func:`omniseg.checkpoint.load_model`); reading them needs torch, these do not."""
    path = Path(path)
    if path.suffix == ".csv":
        methods = pd.read_csv(path, usecols=["method"])["method"].astype(str).unique()
        method = methods[0] if len(methods) == 1 else None
    elif path.suffix == ".h5":
        import h5py

        with h5py.File(path, "r") as fh:
            method = fh.attrs.get("method")
    else:
        method = None
    if not method:
        raise ValueError(f"{path} does not record one method")
    return str(method)


def make_table1(
    summaries: Sequence[str | Path],
    tissues: TissueTable | str | Path,
    *,
    out_csv: str | Path,
    out_md: str | Path,
    paper_csv: str | Path | None = None,
) -> pd.DataFrame:
    """The paper's Table 1 for every evaluated method, with the published table beside it.

    ``out_csv`` is long: one row per method and tissue (``average`` included) with dice_pct,
    hd_um, msd_um, the number of patches whose distances were undefined, the Dice over patches
    whose mask is non-empty and the false-positive patches among the empty masks. ``out_md``
    holds our table (best per column in bold) and, when ``paper_csv`` is given, the paper's own.
    """
    from omniseg.tables import (
        false_positive_counts,
        nonempty_dice,
        paper_table1,
        table1,
        table1_markdown,
        undefined_counts,
    )

    table = as_tissue_table(tissues)
    by_method = {_method_of(p): p for p in summaries}
    wide = table1(by_method, table)
    long = pd.concat(
        [pd.read_csv(p).assign(method=m) for m, p in by_method.items()], ignore_index=True
    )
    keep = ["method", "tissue", "n", "dice_pct", "hd_um", "msd_um", "n_hd_undefined"]
    keep += ["dice_nonempty_pct", "n_nonempty", "n_fp_empty", "n_empty_mask"]
    long = long[[c for c in keep if c in long.columns]]
    parts = [
        table1_markdown(
            wide,
            caption="This run, test split: Dice (%), Hausdorff distance and mean surface "
            "distance (µm); best per column in bold. An empty mask predicted empty scores Dice "
            "100, so the Dice over non-empty masks and the false-positive patches on empty "
            "masks are shown beside it.",
            left_out=undefined_counts(by_method, table),
            nonempty=nonempty_dice(by_method, table),
            false_positives=false_positive_counts(by_method, table),
        )
    ]
    if paper_csv is not None and Path(paper_csv).is_file():
        parts.append(
            table1_markdown(
                paper_table1(paper_csv, table),
                caption="The paper's published Table 1 (Deng et al., MIDL 2022), real data.",
            )
        )
    with atomic_path(out_csv) as tmp:
        long.to_csv(tmp, index=False)
    with atomic_path(out_md) as tmp:
        tmp.write_text("\n\n".join(parts) + "\n")
    return wide


def deployed_parameters(model_files: Sequence[str | Path]) -> dict[str, int]:
    """Method -> total parameters of the system that segments every tissue (all its networks)."""
    from omniseg.checkpoint import load_model
    from omniseg.models import count_parameters

    totals: dict[str, int] = {}
    for path in model_files:
        model, meta = load_model(path)
        method = meta.get("method")
        if not method:
            raise ValueError(f"{path} does not record its method")
        totals[method] = totals.get(method, 0) + count_parameters(model)
    return totals


def make_params_figure(
    model_files: Sequence[str | Path],
    summaries: Sequence[str | Path],
    *,
    out_png: str | Path,
    out_svg: str | Path,
    out_csv: str | Path,
    paper_csv: str | Path | None = None,
) -> pd.DataFrame:
    """The paper's Figure 4: deployed parameters against mean Dice, one point per method."""
    from omniseg.figures import params_vs_dice

    params = deployed_parameters(model_files)
    points = []
    for path in summaries:
        method = _method_of(path)
        summary = pd.read_csv(path).set_index("tissue")
        points.append(
            {"method": method, "params": params[method], "dice": summary.loc["average", "dice_pct"]}
        )
    paper = pd.read_csv(paper_csv) if paper_csv and Path(paper_csv).is_file() else None
    plotted = params_vs_dice(points, out_png, out_svg, paper=paper)
    with atomic_path(out_csv) as tmp:
        plotted.to_csv(tmp, index=False)
    return plotted


def make_qualitative(
    tissue: str,
    per_patch: Sequence[str | Path],
    predictions: Sequence[str | Path],
    patch_set: str | Path,
    tissues: TissueTable | str | Path,
    *,
    out_png: str | Path,
    reference: str = "omniseg",
    split: str = "test",
) -> pd.DataFrame:
    """The paper's Figure 3 for one tissue: best, median and worst test patch, every method."""
    from omniseg.figures import qualitative

    tables = {_method_of(p): p for p in per_patch}
    preds = {_method_of(p): p for p in predictions}
    if reference not in tables:
        reference = next(iter(tables))
    return qualitative(
        as_tissue_table(tissues)[tissue],
        tables,
        preds,
        patch_set,
        out_png,
        reference=reference,
        split=split,
    )
