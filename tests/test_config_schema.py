"""The workflow config schema rejects unknown keys everywhere; training values have one rule set.

``workflow/schemas/config.schema.yaml`` validates the config before any job runs (Snakemake's
``validate``): a typo such as ``epochz: 10`` under ``training:`` must be an error naming the key
and where it is, not a run with the default epochs. The training values are checked by
``omniseg.train.merge_config`` only (``omniseg.steps.rois.check_training_configs`` runs it for
every method while the DAG is built), so the schema and the trainer cannot disagree.
"""

from __future__ import annotations

import copy
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from snakemake.exceptions import WorkflowError
from snakemake.utils import validate

from omniseg.steps.rois import check_training_configs, method_training_config
from omniseg.train import DEFAULTS

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow" / "schemas" / "config.schema.yaml"
CONFIGS = sorted((REPO / "config").glob("*.yaml"))
# Objects whose keys are not the workflow's to name: a model's constructor arguments (checked by
# the model's constructor when the job builds it) and per-method training overrides (the same
# keys as `training`, checked by merge_config before any job runs: see the test below).
FREE = {"properties.methods.additionalProperties.properties.kwargs"}
CHECKED_BY_TRAINER = {"properties.methods.additionalProperties.properties.training"}
# Training keys that method_training_config turns into trainer settings per network (and removes).
RESOLVED_BY_WORKFLOW = {"batch_per_tissue"}


def _objects(node, path=""):
    if isinstance(node, dict):
        if node.get("type") == "object" or "properties" in node:
            yield path.lstrip("."), node
        for key, value in node.items():
            yield from _objects(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _objects(value, f"{path}[{i}]")


def _config(name="config.yaml") -> dict:
    return yaml.safe_load((REPO / "config" / name).read_text())


def test_every_object_rejects_unknown_keys():
    schema = yaml.safe_load(SCHEMA.read_text())
    open_objects = [
        path
        for path, node in _objects(schema)
        if node.get("additionalProperties", True) is True and path not in FREE | CHECKED_BY_TRAINER
    ]
    assert not open_objects, f"objects that accept any key: {open_objects}"


@pytest.mark.parametrize("name", [p.name for p in CONFIGS], ids=str)
def test_shipped_configs_are_valid(name):
    config = _config(name)
    validate(config, str(SCHEMA))
    check_training_configs(config, 6)


@pytest.mark.parametrize(
    "where",
    [
        ("training",),
        ("training", "augment"),
        ("training", "loss"),
        ("data",),
        ("patches",),
        ("methods", "omniseg"),
        ("evaluate",),
        ("wsi",),
        ("wsi", "mask"),
    ],
    ids=".".join,
)
def test_unknown_key_is_an_error_naming_it_and_where(where):
    config = _config()
    node = config
    for key in where:
        node = node.setdefault(key, {})
    node["epochz"] = 10
    with pytest.raises(WorkflowError) as exc:
        validate(config, str(SCHEMA))
    message = str(exc.value)
    assert "'epochz' was unexpected" in message
    assert "".join(f"[{k!r}]" for k in where) in message  # e.g. instance['training']['augment']


def test_unknown_key_in_method_overrides_is_an_error():
    config = _config()
    config["methods"]["tal"]["training"] = {"epochz": 3}
    validate(config, str(SCHEMA))
    with pytest.raises(
        ValueError, match=r"method tal \(training \+ methods.tal.training\).*epochz"
    ):
        check_training_configs(config, 6)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("momentum", 1.0, "momentum must be in"),  # the schema allowed any momentum >= 0
        ("momentum", -0.1, "momentum must be in"),
        ("epochs", 0, "epochs must be an integer >= 1"),
        # with batch_per_tissue a network on all 6 tissues checks the scaled 12 against 24
        ("pool_size", 2, r"pool_size (2|12) is smaller than batch_size"),
        (
            "pool_size",
            2,
            r"method omniseg \(training \+ methods\.omniseg\.training; "
            r"batch_per_tissue: batch_size and pool_size x 6\): .*pool_size 12 is smaller than "
            r"batch_size 24",
        ),
        ("batch_mode", "random", "batch_mode must be one of"),
    ],
)
def test_training_values_have_one_rule_set(key, value, message):
    """A value the trainer rejects is rejected while the DAG is built, for every method."""
    config = _config()
    config["training"][key] = value
    validate(config, str(SCHEMA))  # the schema names keys; it does not judge these values
    with pytest.raises(ValueError, match=message) as exc:
        check_training_configs(config, 6)
    assert all(f"method {m} " in str(exc.value) for m in config["methods"])


def test_implied_labels_are_checked_before_any_job_runs():
    """Omni-Seg takes implied labels (its own override); a shared setting reaches TAL and the
    multi-class network, which cannot take them: an error naming them, before any job. The
    per-tissue networks learn one tissue each, so nothing is implied for them."""
    config = _config()
    config["methods"]["omniseg"]["training"] = {
        "implied_labels": {"weight": 0.3, "nested": [["tuft", "cap"]]}
    }
    validate(config, str(SCHEMA))
    check_training_configs(config, 6)
    config["training"]["implied_labels"] = {"weight": 0.3}
    validate(config, str(SCHEMA))
    with pytest.raises(ValueError, match="implied_labels needs a network") as exc:
        check_training_configs(config, 6)
    named = {m for m in config["methods"] if f"method {m} " in str(exc.value)}
    assert named == {"tal", "med3d", "multiclass"}
    config["training"]["implied_labels"] = {"weight": -1}
    with pytest.raises(WorkflowError):
        validate(config, str(SCHEMA))


def test_swa_is_checked_before_any_job_runs():
    """The shared swa setting reaches every method (each averages its own weights); its values
    are the trainer's to check, and the schema keeps them from being filled with defaults."""
    config = _config()
    config["training"]["swa"] = {"start": 0.5}
    validate(config, str(SCHEMA))
    assert config["training"]["swa"] == {"start": 0.5}  # no inner defaults filled in
    check_training_configs(config, 6)
    config["training"]["swa"] = {"start": 0.5, "ema": 0.9}
    with pytest.raises(WorkflowError):
        validate(config, str(SCHEMA))
    config["training"]["swa"] = {"start": 1.5}
    with pytest.raises(WorkflowError):
        validate(config, str(SCHEMA))
    config["training"]["swa"] = {"start": 0.5}
    config["methods"]["omniseg"]["training"] = {"ema": 0.99}
    with pytest.raises(ValueError, match="ema and swa are two ways") as exc:
        check_training_configs(config, 6)
    assert "method omniseg " in str(exc.value)


def test_schema_defaults_are_the_trainers():
    training = yaml.safe_load(SCHEMA.read_text())["properties"]["training"]["properties"]
    scalars = {k: v["default"] for k, v in training.items() if "default" in v}
    assert scalars == {k: DEFAULTS[k] for k in scalars}
    extra = set(training) - set(DEFAULTS) - RESOLVED_BY_WORKFLOW
    assert not extra, f"schema training keys the trainer does not know: {sorted(extra)}"
    assert not RESOLVED_BY_WORKFLOW & set(DEFAULTS)


@pytest.mark.slow
def test_workflow_stops_on_a_training_typo(tmp_path):
    if shutil.which("snakemake") is None:
        pytest.skip("snakemake is not on PATH")
    shutil.copytree(REPO / "config", tmp_path / "config")
    config = yaml.safe_load((REPO / "tests" / "configs" / "tiny.yaml").read_text())
    bad = copy.deepcopy(config)
    bad["training"]["epochz"] = 10
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump(bad))
    cmd = ["snakemake", "-n", "-s", str(REPO / "workflow" / "Snakefile"), "-d", str(tmp_path)]
    proc = subprocess.run(
        [*cmd, "--configfile", "bad.yaml"], cwd=tmp_path, capture_output=True, text=True
    )
    assert proc.returncode != 0
    assert "'epochz' was unexpected" in proc.stdout + proc.stderr


def _step_defaults() -> dict[str, tuple]:
    """Schema key -> (step function, keyword) that the workflow feeds it to."""
    from omniseg.steps import rois as pipeline
    from omniseg.steps import slides as steps
    from omniseg.synthetic.cohort import synthesize_cohort
    from omniseg.wsi.tissue_mask import tissue_mask

    table = {f"data.synthetic.{k}": (synthesize_cohort, k)
             for k in ("seed", "patients", "rois_per_tissue", "roi_size", "stains",
                       "edge_fraction")}  # fmt: skip
    table |= {"split.seed": (pipeline.split_patients, "seed"),
              "split.fractions": (pipeline.split_patients, "fractions")}  # fmt: skip
    table |= {f"patches.{k}": (pipeline.extract_tissue, k)
              for k in ("size", "seed", "object_fraction", "absent_fraction")}  # fmt: skip
    table |= {f"evaluate.{k}": (pipeline.evaluate_method, k) for k in ("split", "batch_size")}
    table |= {f"wsi.synthetic.{k}": (steps.synth_slide, k)
              for k in ("seed", "height", "width", "strips", "stain", "focus")}  # fmt: skip
    table |= {f"wsi.{k}": (steps.predict_slide, k) for k in ("tile", "overlap", "batch_size")}
    table["wsi.geojson_object_type"] = (steps.export_slide, "object_type")
    table["wsi.mask.um_per_px"] = (steps.mask_slide, "um_per_px")
    table |= {f"wsi.mask.{k}": (tissue_mask, k)
              for k in ("saturation_min", "od_min", "close_um", "open_um", "min_area_um2")}  # fmt: skip
    table["wsi.aggregation.threshold"] = (steps.aggregate_slide, "threshold")
    table["wsi.aggregation.mask_margin_um"] = (steps.aggregate_slide, "mask_margin_um")
    return table


def _schema_default(path: str):
    node = yaml.safe_load(SCHEMA.read_text())
    for part in path.split("."):
        node = node["properties"][part]
    return node["default"]


def _plain(value):
    """Tuples as lists, split fractions as the train/val/test list, for comparison."""
    if isinstance(value, dict) and set(value) == {"train", "val", "test"}:
        value = [value[k] for k in ("train", "val", "test")]
    return list(value) if isinstance(value, tuple | list) else value


@pytest.mark.parametrize("key", sorted(_step_defaults()))
def test_schema_defaults_are_the_steps(key):
    """A config key's schema default is the default of the step keyword it feeds, so a rule,
    ``omniseg <command>`` and a Python call without the setting all do the same."""
    import inspect

    step, name = _step_defaults()[key]
    expect = inspect.signature(step).parameters[name].default
    assert _plain(_schema_default(key)) == _plain(expect), f"{key} vs {step.__qualname__}({name})"


def _samples_per_tissue(cfg: dict, n_tissues: int) -> float:
    return cfg["batch_size"] * cfg["steps_per_epoch"] / n_tissues


def test_batch_per_tissue_gives_shared_networks_the_per_tissue_steps():
    """batch_per_tissue: a network on all 6 tissues takes 6x the batch in 1/6 of the steps, so
    it sees the same samples per tissue and takes as many optimizer steps as each per-tissue
    network; per-tissue networks are unchanged, and without the key every network keeps the
    paper's batch."""
    config = _config()
    config["training"].update(batch_size=4, pool_size=8, steps_per_epoch=40)
    config["training"]["batch_per_tissue"] = True
    validate(config, str(SCHEMA))
    check_training_configs(config, 6)
    shared = method_training_config(config, "omniseg", "all", 6)
    single = method_training_config(config, "multi_unet", "dt", 6)
    assert (shared["batch_size"], shared["pool_size"], shared["steps_per_epoch"]) == (24, 48, 7)
    assert (single["batch_size"], single["pool_size"], single["steps_per_epoch"]) == (4, 8, 7)
    assert _samples_per_tissue(shared, 6) == _samples_per_tissue(single, 1) == 28
    assert "batch_per_tissue" not in shared and "batch_per_tissue" not in single  # not a train key

    config["training"]["batch_per_tissue"] = False
    paper = method_training_config(config, "omniseg", "all", 6)
    assert (paper["batch_size"], paper["pool_size"], paper["steps_per_epoch"]) == (4, 8, 40)
    del config["training"]["batch_per_tissue"]
    assert method_training_config(config, "omniseg", "all", 6) == paper


def test_batch_per_tissue_yields_to_a_methods_own_batch():
    config = _config()
    config["training"].update(batch_size=4, pool_size=8, steps_per_epoch=40, batch_per_tissue=True)
    config["methods"]["tal"]["training"] = {"batch_size": 8, "pool_size": 16}
    tal = method_training_config(config, "tal", "all", 6)
    assert (tal["batch_size"], tal["pool_size"], tal["steps_per_epoch"]) == (8, 16, 7)


def test_batch_per_tissue_must_be_a_boolean():
    config = _config()
    config["training"]["batch_per_tissue"] = "yes"
    with pytest.raises(WorkflowError):
        validate(config, str(SCHEMA))
    with pytest.raises(ValueError, match="method omniseg: batch_per_tissue must be true or false"):
        method_training_config(config, "omniseg", "all", 6)


def test_a_methods_mapping_override_updates_the_shared_mapping():
    config = _config()
    config["training"]["loss"] = {"dice": "tissue", "boundary_weight": 10}
    config["training"]["swa"] = {"start": 0.75, "bn_batches": 100}
    config["methods"]["tal"]["training"] = {"lr": 0.001, "loss": {"boundary_weight": 3}}
    tal = method_training_config(config, "tal", "all", 6)
    assert tal["loss"] == {"dice": "tissue", "boundary_weight": 3}  # the shared dice is kept
    assert config["training"]["loss"]["boundary_weight"] == 10  # the shared config is untouched
    assert method_training_config(config, "med3d", "all", 6)["loss"]["boundary_weight"] == 10
    config["methods"]["tal"]["training"] = {"swa": None}  # null still switches averaging off
    assert method_training_config(config, "tal", "all", 6)["swa"] is None
    config["training"]["swa"] = None
    config["methods"]["tal"]["training"] = {"swa": {"start": 0.5}}
    assert method_training_config(config, "tal", "all", 6)["swa"] == {"start": 0.5}
