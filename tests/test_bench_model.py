"""bench/model.py: its demo networks are the default config's, and its layout comparison runs."""

from __future__ import annotations

from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def test_the_demo_networks_are_the_default_configs(bench):
    methods = bench("model").METHODS
    config = yaml.safe_load((REPO / "config" / "config.yaml").read_text())["methods"]
    assert set(methods) == set(config)
    for method, (name, _, per_tissue, _, demo) in methods.items():
        assert name == config[method]["model"], method
        assert demo == config[method]["kwargs"], method
        assert per_tissue == bool(config[method].get("per_tissue", False)), method


def test_the_layout_comparison_times_both_layouts(bench):
    report = bench("model").bench_methods(
        "demo", size=32, batch=2, iters=1, methods=["multi_unet"], bf16=True, channels_last=True
    )
    row = report["methods"]["multi_unet"]
    for key in ("s_per_step", "s_per_step_nhwc", "s_per_step_bf16_nhwc", "s_inference_nhwc"):
        assert row[key] > 0, key
    for key in ("nhwc_speedup_step", "nhwc_speedup_infer", "nhwc_speedup_step_bf16"):
        assert row[key] > 0, key
