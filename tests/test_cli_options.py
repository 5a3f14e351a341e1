"""The command line's shape: sub-parsers named as their commands, help on every option with its default, the
options that several commands share declared once and identical everywhere."""

import argparse
import inspect

import pytest

from finesam.amg import GENERATOR_OPTIONS, AutomaticMaskGenerator
from finesam.cli import build_parser

COMMANDS = (
    "convert",
    "download",
    "segment",
    "everything",
    "track",
    "demo",
    "serve",
    "export",
    "train",
    "synth",
    "eval",
    "models",
)


def sub_parsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(action.choices)


def test_every_command_is_a_sub_parser_of_its_own_name():
    parsers = sub_parsers()
    assert sorted(parsers) == sorted(COMMANDS)
    for name, parser in parsers.items():
        assert parser.prog.split()[-1] == name


@pytest.mark.parametrize("command", COMMANDS)
def test_every_option_has_help_and_shows_its_default(command):
    parser = sub_parsers()[command]
    text = parser.format_help()
    for action in parser._actions:
        if isinstance(action, argparse._HelpAction):
            continue
        assert action.help, f"finesam {command} {action.dest}: no help"
        shown = action.default not in (None, False, [], argparse.SUPPRESS)
        if shown and action.option_strings:
            assert f"(default: {action.default})" in " ".join(text.split()), f"{command} {action.dest}"


def _option(parser: argparse.ArgumentParser, flag: str) -> argparse.Action:
    return next(a for a in parser._actions if flag in a.option_strings)


def test_shared_options_are_the_same_everywhere():
    parsers = sub_parsers()
    for flag in ("--weights", "--hq", "--hq-only", "--device", "--dtype"):
        actions = [_option(parsers[c], flag) for c in ("segment", "everything", "eval")]
        assert len({(a.dest, a.default, str(a.type), a.required, tuple(a.choices or ())) for a in actions}) == 1
        assert len({a.help for a in actions if flag != "--hq"}) <= 1, flag
    defaults = inspect.signature(AutomaticMaskGenerator).parameters
    for name in GENERATOR_OPTIONS:
        action = _option(parsers["everything"], f"--{name.replace('_', '-')}")
        assert action.default == defaults[name].default


def test_generator_options_parse_into_the_generator(tmp_path):
    args = build_parser().parse_args(
        [
            "everything",
            "x.png",
            "--weights",
            "w",
            "--out",
            str(tmp_path),
            "--points-per-side",
            "4",
            "--crop-n-layers",
            "1",
        ]
    )
    assert (args.points_per_side, args.crop_n_layers, args.dtype) == (4, 1, "float32")
    assert args.run.__name__ == "run_everything"
