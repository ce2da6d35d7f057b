"""The dataclass -> argparse builder: flags, groups, types from the annotations, help, one-line errors."""

from dataclasses import dataclass
from typing import Literal

import pytest

from grpo_fast.cli import build_parser
from grpo_fast.config import option

Mode = Literal["fast", "slow"]


@dataclass
class Demo:
    rate: float = option(0.5, "share of items, in %", "main")
    mode: Mode = option("fast", "how to run", "main")
    max_items: int | None = option(None, "cap on items (None: all)", "limits")
    verbose: bool = option(False, "print more", "limits")


def _parser():
    return build_parser(Demo, prog="demo", description="A demo.", presets={"quick": {"rate": 0.9}})


def _parse(*args: str) -> dict:
    return vars(_parser().parse_args(list(args)))


def test_only_the_flags_typed_are_parsed_with_their_types():
    assert _parse() == {}
    assert _parse("--rate", "0.25", "--mode", "slow") == {"rate": 0.25, "mode": "slow"}
    assert _parse("--max-items", "none") == {"max_items": None}
    assert _parse("--max_items", "7") == {"max_items": 7}  # the snake_case alias
    assert Demo(**_parse("--rate", "1")).rate == 1.0


def test_bool_flags_alone_mean_true_and_take_a_value():
    assert _parse("--verbose") == {"verbose": True}
    assert _parse("--verbose", "false") == {"verbose": False}
    assert _parse("--verbose", "yes", "--rate", "0.1") == {"verbose": True, "rate": 0.1}


def test_literal_fields_become_choices_and_sections_groups():
    parser = _parser()
    actions = {a.dest: a for a in parser._actions}
    assert actions["mode"].choices == ("fast", "slow") and actions["rate"].choices is None
    groups = {g.title: [a.dest for a in g._group_actions] for g in parser._action_groups}
    assert groups["main"] == ["rate", "mode"] and groups["limits"] == ["max_items", "verbose"]


def test_help_escapes_percent_and_shows_defaults_and_presets(capsys):
    with pytest.raises(SystemExit) as done:
        _parser().parse_args(["--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert done.value.code == 0
    assert "share of items, in % [default: 0.5; quick preset: 0.9]" in flat
    assert (
        "--mode {fast,slow}" in flat and "--verbose [BOOL]" in flat and "--max-items ITEMS, --max_items ITEMS" in flat
    )


@pytest.mark.parametrize(
    "args, message",
    [
        (["--mode", "medium"], "argument --mode: invalid choice: 'medium'"),
        (["--rate", "high"], "argument --rate: rate must be float, got 'high'"),
        (["--max-items", "2.5"], "max_items must be int, got '2.5'"),
        (["--verbose", "perhaps"], "verbose must be bool, got 'perhaps'"),
        (["--nope"], "unrecognized arguments: --nope"),
    ],
)
def test_a_bad_value_is_one_line_and_exit_code_2(capsys, args, message):
    with pytest.raises(SystemExit) as done:
        _parse(*args)
    err = capsys.readouterr().err
    assert done.value.code == 2 and err.startswith("error: ") and err.endswith(" (see --help)\n"), err
    assert message in err and err.count("\n") == 1
