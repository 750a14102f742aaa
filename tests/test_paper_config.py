"""config/paper.yaml holds the authors' settings, and every method's training config is valid."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from snakemake.utils import validate

from omniseg.augment import Augmenter
from omniseg.models import build_model
from omniseg.partial_labels import loss_for
from omniseg.steps.rois import method_training_config
from omniseg.train import merge_config

REPO = Path(__file__).resolve().parents[1]
SCHEMA = REPO / "workflow/schemas/config.schema.yaml"


def load(name: str) -> dict:
    cfg = yaml.safe_load((REPO / "config" / name).read_text())
    validate(cfg, str(SCHEMA))  # fills the schema's defaults, as the Snakefile does
    return cfg


def test_paper_yaml_is_the_authors_settings():
    cfg = load("paper.yaml")
    t = cfg["training"]
    assert t["weight_decay"] == 0 and t["reset_pools"] is True
    assert (t["optimizer"], t["lr"], t["momentum"], t["nesterov"]) == ("sgd", 0.001, 0.99, True)
    a = t["augment"]
    assert a["gamma"] == [0.0, 2.0] and a["noise_std"] == [0.0, 0.1]
    assert a["scale_per_axis"] is True and a["padding_mode"] == "zeros"
    assert (a["p_geometric"], a["p_color"], a["p_noise"]) == (0.5, 0.5, 0.5)
    assert t["loss"]["kind"] == "authors" and t["loss"]["boundary_weight"] == 1.2
    assert cfg["methods"]["omniseg"]["kwargs"]["feature_init_scale"] == 1.0


def test_demo_keeps_our_defaults():
    t = load("config.yaml")["training"]
    assert t.get("loss", {}).get("kind", "omniseg") == "omniseg"
    assert t["reset_pools"] is False
    a = t["augment"]
    assert a["scale_per_axis"] is False and a["padding_mode"] == "reflection"
    assert a["gamma"] == [0.7, 1.5] and a["noise_std"] == 0.03


@pytest.mark.parametrize("name", ["paper.yaml", "config.yaml"])
def test_every_method_gets_a_valid_training_config(name):
    torch.manual_seed(0)
    cfg = load(name)
    x = torch.rand(2, 3, 32, 32)
    masks = (torch.rand(2, 1, 32, 32) > 0.5).float()
    tissue = torch.tensor([0, 1])
    for method, m in cfg["methods"].items():
        merged = merge_config(method_training_config(cfg, method, "all", 6))
        aug_images, _ = Augmenter(**merged["augment"])(x, masks)
        assert aug_images.shape == x.shape
        # a tiny model of the same output kind runs the method's loss with its options
        tiny = build_model("multiclass" if m.get("strategy") else "unet", num_tissues=6, width=2)
        loss_fn = loss_for(merged["strategy"] or tiny.output_kind)
        loss = loss_fn(tiny, x, masks, tissue, **merged["loss"])
        assert torch.isfinite(loss), method
