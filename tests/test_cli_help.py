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


@pytest.mark.parametrize("command, option, words", [
    ("train", "--optimizer", ["sgd", "(default: sgd)"]),
    ("train", "--momentum", ["(default: 0.9)"]),
    ("train", "--weight-decay", ["(default: 0.0005)"]),
    ("train", "--schedule", ["onecycle", "(default: onecycle)"]),
    ("train", "--label-smoothing", ["(default: 0.0)"]),
    ("train", "--seed", ["(default: 0)"]),
    ("predict", "--topk", ["classes", "(default: 5)"]),
])
def test_options_say_what_they_do_and_their_default(command, option, words):
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    action = next(a for a in parser._actions if option in a.option_strings)
    described = parser._get_formatter()._expand_help(action) if action.help else ""  # as --help prints it
    for w in words:
        assert w in described, (option, described)
