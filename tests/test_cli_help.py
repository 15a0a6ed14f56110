import argparse

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


def test_every_argument_of_every_command_says_what_it_is():
    # features' --image and --max-channels, export's --format, eval's --batch-size, many a --json had no help
    commands = build_parser()._subparsers._group_actions[0].choices
    bare = [f"{name} {action.option_strings[0] if action.option_strings else action.metavar}"
            for name, command in commands.items() for action in command._actions
            if not action.help and action.dest != "help"]
    assert not bare, bare


@pytest.mark.parametrize("command, option, words", [
    ("train", "--optimizer", ["sgd", "(default: sgd)"]),
    ("train", "--momentum", ["(default: 0.9)"]),
    ("train", "--weight-decay", ["(default: 0.0005)"]),
    ("train", "--schedule", ["onecycle", "(default: onecycle)"]),
    ("train", "--label-smoothing", ["(default: 0.0)"]),
    ("train", "--seed", ["(default: 0)"]),
    ("predict", "--topk", ["classes", "(default: 5)"]),
    ("predict", "--json", ["one JSON list", "an object per image"]),  # said "one JSON object", printed a list
    ("runs", "--json", ["one JSON list", "an object per run"]),
])
def test_options_say_what_they_do_and_their_default(command, option, words):
    parser = build_parser()._subparsers._group_actions[0].choices[command]
    action = next(a for a in parser._actions if option in a.option_strings)
    described = parser._get_formatter()._expand_help(action) if action.help else ""  # as --help prints it
    for w in words:
        assert w in described, (option, described)


def _options(parser):
    return {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}


def test_lr_find_takes_trains_options_for_data_model_and_optimizer_and_its_own():
    commands = build_parser()._subparsers._group_actions[0].choices
    train, lr_find = _options(commands["train"]), _options(commands["lr-find"])
    own = {"start_lr", "end_lr", "steps", "out"}
    assert own <= set(lr_find) and {"model", "data", "batch_size", "optimizer", "weight_decay", "recipe"} <= set(lr_find)
    assert not {"epochs", "lr", "schedule", "resume", "tta", "config", "report"} & set(lr_find)
    for dest in set(lr_find) - own:  # the same option as train's: names, default, type, choices, help
        a, b = lr_find[dest], train[dest]
        assert (a.option_strings, a.default, a.type, a.choices, a.help, a.metavar) == \
               (b.option_strings, b.default, b.type, b.choices, b.help, b.metavar), dest


def test_an_on_off_flag_states_the_default_it_has():
    # train's and lr-find's --nesterov said "(default: off)" while TrainConfig's default, and every run, had it on
    commands = build_parser()._subparsers._group_actions[0].choices
    stated = {}
    for name, command in commands.items():
        for a in command._actions:
            if isinstance(a, argparse.BooleanOptionalAction) and a.default is not None and "(default: o" in a.help:
                stated[f"{name} {a.option_strings[0]}"] = ("(default: on)" in a.help, a.default)
    assert stated and all(says == default for says, default in stated.values()), stated
    assert stated["train --nesterov"] == (True, True)
