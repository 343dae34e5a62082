import subprocess
import sys

import pytest

from ouro.cli import build_parser

SUBCOMMANDS = [
    "run",
    "serve",
    "learner",
    "retrain",
    "rollback",
    "export",
    "forget",
    "bench",
    "eval",
]


def test_every_subcommand_is_listed_in_help():
    text = build_parser().format_help()
    for name in SUBCOMMANDS:
        assert name in text


@pytest.mark.parametrize("name", SUBCOMMANDS)
def test_each_subcommand_has_help(name, capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args([name, "--help"])
    assert info.value.code == 0
    assert "usage: ouro " + name in capsys.readouterr().out


def test_console_script_help_runs():
    proc = subprocess.run(
        [sys.executable, "-m", "ouro", "--help"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0
    assert "self-healing" in proc.stdout


def test_unknown_subcommand_is_a_clear_error(capsys):
    with pytest.raises(SystemExit) as info:
        build_parser().parse_args(["fly"])
    assert info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["eval", "--counts", "1,ten"], "numbers separated by commas"),
        (["eval", "--counts", "0"], "counts must be between 1 and"),
        (["eval", "--counts", "100", "--groups", "2"], "do not fit the"),
        (["eval", "--groups", "3", "--from-group", "3"], "first group must be between 0 and 2"),
    ],
)
def test_eval_refuses_bad_counts_and_groups_before_loading_anything(argv, message, capsys):
    from ouro.cli import main

    assert main(argv) == 2
    assert message in capsys.readouterr().err
