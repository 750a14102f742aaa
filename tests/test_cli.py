"""The ``omniseg`` command: help for every subcommand, defaults that work outside the repository."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from omniseg.cli import build_parser, main
from omniseg.tissues import DEFAULT_TISSUES, load_tissues

REPO = Path(__file__).resolve().parents[1]


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return dict(sub.choices)


def test_top_level_help_prints(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "evaluate" in capsys.readouterr().out


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_subcommand_help_prints_with_defaults(command, capsys):
    with pytest.raises(SystemExit) as exc:
        main([command, "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    assert "--tissues" in out
    parser = _subparsers()[command]
    shown = [
        a.option_strings[0]
        for a in parser._actions
        if a.option_strings and a.default not in (None, argparse.SUPPRESS, False)
    ]
    # ArgumentDefaultsHelpFormatter appends "(default: ...)" to every option with a default
    assert out.count("(default:") >= len(shown), (command, shown)


@pytest.mark.parametrize("command", sorted(_subparsers()))
def test_every_option_and_argument_has_help(command):
    bare = [
        a.option_strings or a.dest
        for a in _subparsers()[command]._actions
        if not isinstance(a, argparse._HelpAction) and not a.help
    ]
    assert not bare, f"omniseg {command}: no help for {bare}"


def test_default_registry_is_packaged_and_matches_the_config():
    assert DEFAULT_TISSUES.is_file()
    assert DEFAULT_TISSUES.read_bytes() == (REPO / "config" / "tissues.tsv").read_bytes()
    assert load_tissues() == load_tissues(REPO / "config" / "tissues.tsv")


def test_commands_use_the_packaged_registry_outside_the_repo(tmp_path, monkeypatch, capsys):
    """`omniseg split` in a folder without config/tissues.tsv works with the packaged one."""
    monkeypatch.chdir(tmp_path)
    rows = ["roi_id\tpatient\tstain\ttissue\timage\tmask"]
    rows += [f"r{i}\tp{i}\the\tdt\tr{i}.png\tr{i}_mask.png" for i in range(10)]
    (tmp_path / "rois.tsv").write_text("\n".join(rows) + "\n")
    assert main(["split", "rois.tsv", "splits.tsv"]) == 0, capsys.readouterr().err
    assert (tmp_path / "splits.tsv").is_file()
    assert not (tmp_path / "config").exists()


# -- defaults are declared once: in the step functions ---------------------------------------------
def _steps_of_commands() -> dict[str, list]:
    """Subcommand -> the step function(s) it calls with its options."""
    from omniseg.steps import rois as pipeline
    from omniseg.steps import slides as steps
    from omniseg.synthetic.cohort import synthesize_cohort
    from omniseg.wsi.tissue_mask import tissue_mask

    return {
        "synth": [synthesize_cohort],
        "split": [pipeline.split_patients],
        "patches": [pipeline.extract_tissue],
        "import-release": [pipeline.import_release],
        "train": [pipeline.train_model],
        "evaluate": [pipeline.evaluate_method],
        "synth-slide": [steps.synth_slide],
        "wsi-mask": [steps.mask_slide, tissue_mask],
        "stain-reference": [steps.stain_reference],
        "wsi-stain": [steps.slide_stain],
        "wsi-predict": [steps.predict_slide],
        "wsi-aggregate": [steps.aggregate_slide],
        "wsi-export": [steps.export_slide],
        "wsi-score": [steps.score_slide],
        "import-qupath": [steps.import_annotations],
    }


def test_every_command_is_mapped_to_its_steps():
    assert set(_steps_of_commands()) == set(_subparsers())


@pytest.mark.parametrize("command", sorted(_steps_of_commands()))
def test_cli_options_take_their_defaults_from_the_step_functions(command):
    """An option named like a keyword of the step it feeds gets its default from that step's
    signature (``cli._opt``), never a second literal, and the two agree."""
    import inspect

    params = {}
    for step in _steps_of_commands()[command]:
        for name, p in inspect.signature(step).parameters.items():
            if p.default is not inspect.Parameter.empty:
                params[name] = (step, p.default)
    checked = 0
    for action in _subparsers()[command]._actions:
        if not action.option_strings or action.dest not in params or action.dest == "tissues":
            continue
        step, default = params[action.dest]
        if action.default is None and default is None:
            # "not given" passes through as None; an option read from the step still counts
            checked += getattr(action, "step_param", None) == (step, action.dest)
            continue
        assert getattr(action, "step_param", None) == (step, action.dest), (
            f"omniseg {command} {action.option_strings[0]} restates a default instead of "
            f"reading {step.__qualname__}({action.dest}=...)"
        )
        expect = list(default) if isinstance(default, tuple) and action.nargs else default
        assert action.default == expect
        checked += 1
    assert checked > 0
