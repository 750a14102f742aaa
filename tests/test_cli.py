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
