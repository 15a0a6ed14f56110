import pytest

from cnnkit.cli import build_parser


def test_every_command_has_help_with_examples(capsys):
    parser = build_parser()
    assert "examples:" in parser.format_help()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps its sub-commands here
    assert {"train", "lr-find", "report", "runs", "eval", "predict"} <= set(commands)
    for name, command in commands.items():
        assert "examples:" in command.format_help(), name
    with pytest.raises(SystemExit):
        parser.parse_args(["--version"])
    version = capsys.readouterr().out
    assert version.startswith("cnnkit ") and "torch" in version and "Python" in version
