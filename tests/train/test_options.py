"""One merge of a run's options, for the command line and the Python API alike: TrainConfig's defaults < the
recipe's < the config file's < the options given (flags or keyword arguments), then the checks."""

import pytest

from cnnkit.cli import _given_train_options, build_parser
from cnnkit.errors import UserError
from cnnkit.train.options import make_config
from cnnkit.train.recipes import RECIPES


def given(*argv: str) -> dict:
    """What the command line ``argv`` hands to the merge."""
    args = build_parser().parse_args(list(argv))
    args.argv = list(argv)
    return _given_train_options(args)


def test_the_command_line_hands_over_only_the_options_it_gives():
    assert given("train") == {"progress": True}
    assert given("train", "--epochs", "3", "--optimizer", "sgd") == {"epochs": 3, "optimizer": "sgd", "progress": True}
    assert given("train", "--quiet", "--no-flip", "--model-opt", "widths=[8,16]") == {
        "flip": False, "model_options": {"widths": (8, 16)}, "progress": False}
    assert given("lr-find", "--batch-size", "16", "--out", "curves") == {"batch_size": 16, "progress": True}


def test_a_flag_wins_over_the_recipe_even_when_it_repeats_the_default():
    cfg = make_config(None, given("train", "--recipe", "fast", "--optimizer", "muon", "--epochs", "2"))
    assert (cfg.model, cfg.optimizer, cfg.epochs, cfg.lr, cfg.tta) == ("fastnet", "muon", 2, RECIPES["fast"]["lr"], True)


def test_another_optimizer_than_the_recipes_starts_from_its_own_rate(tmp_path):
    # The recipe's 0.24 is Muon's rate: with --optimizer sgd it would train SGD at five times its default.
    cfg = make_config(None, given("train", "--recipe", "fast", "--optimizer", "sgd"))
    assert (cfg.model, cfg.optimizer, cfg.lr) == ("fastnet", "sgd", None)  # None: the optimizer's default
    assert make_config(None, given("train", "--recipe", "fast", "--optimizer", "sgd", "--lr", "0.3")).lr == 0.3
    (tmp_path / "c.yaml").write_text("recipe: fast\noptimizer: adamw\n")
    assert make_config(str(tmp_path / "c.yaml")).lr is None
    assert make_config(None, {"recipe": "fast"}).lr == RECIPES["fast"]["lr"]


def test_defaults_recipe_file_and_flags_layer_the_same_from_the_command_line_and_python(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("recipe: fast\nepochs: 5\nbatch_size: 100\nmodel_options: {widths: [8, 16, 16]}\n")
    cli = make_config(str(path), given("train", "--config", str(path), "--batch-size", "50", "--model-opt", "extra=1"))
    assert cli.model == "fastnet" and cli.tta  # the file's recipe
    assert (cli.epochs, cli.batch_size) == (5, 50)  # the file over the recipe's 8; the flag over the file
    assert cli.model_options == {"widths": (8, 16, 16), "extra": 1}  # --model-opt adds to the file's
    api = make_config(str(path), {"batch_size": 50, "model_options": {"extra": 1}})
    assert api == cli


def test_a_recipe_given_beside_a_config_file_lies_under_the_file(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 3\n")
    for options in ({"recipe": "fast"}, given("train", "--config", str(path), "--recipe", "fast")):
        cfg = make_config(str(path), options)
        assert (cfg.model, cfg.optimizer, cfg.epochs) == ("fastnet", "muon", 3)


def test_lr_find_on_the_command_line_takes_the_recipe_as_python_does():
    # lr-find has no --schedule, so the recipe's schedule picks the rule of the suggestion: it did in Python, not
    # on the command line, which took its options as defaults but left out those lr-find has no flag for.
    assert make_config(None, given("lr-find", "--recipe", "fast")).schedule == RECIPES["fast"]["schedule"]
    assert make_config(None, {"recipe": "fast"}).schedule == RECIPES["fast"]["schedule"]


def test_overfit_batches_sets_its_defaults_under_the_options_given():
    cfg = make_config(None, given("train", "--overfit-batches", "2", "--epochs", "7"))
    assert (cfg.optimizer, cfg.weight_decay, cfg.epochs) == ("adamw", 0.0, 7)


def test_the_merge_checks_every_value_once_for_both(tmp_path):
    with pytest.raises(UserError, match="batch size must be a positive whole number, got 0"):
        make_config(None, {"batch_size": 0})
    path = tmp_path / "run.yaml"
    path.write_text("batch_size: 0\n")
    with pytest.raises(UserError, match="batch_size must be a positive whole number, got 0"):
        make_config(str(path), given("train", "--config", str(path)))
    with pytest.raises(UserError, match="unknown training option"):
        make_config(None, {"batch": 8})
    # from Python as from a config file: the nearest option's name
    with pytest.raises(UserError, match=r"^unknown training option\(s\): epoch; did you mean epochs\?$"):
        make_config(None, {"epoch": 2})
    # a command-line flag that is no training option says what does its work from Python
    with pytest.raises(UserError, match=r"^unknown training option\(s\): quiet; --quiet is the command line's: "
                                        r"from Python pass progress=False"):
        make_config(None, {"quiet": True})


def test_a_warm_up_as_long_as_the_run_is_refused():
    # `--epochs 2 --warmup-epochs 5` trained without a word at a rate still rising when the run ended
    with pytest.raises(UserError, match=r"^--warmup-epochs 5 is not shorter than the run's 2 epoch\(s\): the learning "
                                        r"rate would still be rising when it ends, never reaching its peak; give it "
                                        r"less than 2 .* or raise --epochs$"):
        make_config(None, {"epochs": 2, "warmup_epochs": 5})
    with pytest.raises(UserError, match=r"^--warmup-epochs 2 is not shorter"):
        make_config(None, {"epochs": 2, "warmup_epochs": 2})
    assert make_config(None, {"epochs": 2, "warmup_epochs": 1.5}).warmup_epochs == 1.5
    # each stage of --stages warms up anew: the shortest stage is the one to compare with, not --epochs
    assert make_config(None, {"epochs": 2, "warmup_epochs": 3, "stages": "all:4@0.01"}).warmup_epochs == 3
    with pytest.raises(UserError, match=r"^--warmup-epochs 1 is not shorter than a stage of --stages, 1 epoch\(s\) "
                                        r"long .* or lengthen the stage$"):
        make_config(None, {"epochs": 9, "warmup_epochs": 1, "stages": "fc:1@0.01,all:4@0.001"})


def test_resume_refuses_the_settings_it_would_drop(tmp_path):
    from tests.conftest import run_cli

    (tmp_path / "run").mkdir()  # a run folder (a missing one is that error first)
    (tmp_path / "run" / "config.json").write_text("{}")
    r = run_cli("train", "--resume", tmp_path / "run", "--epochs", "7", "--lr", "0.5")
    assert r.returncode == 2
    assert "--resume continues a run with its own settings; drop --epochs, --lr" in r.stderr
    # The command it gives goes on from the run's weights; without --weights it trained again from the start.
    run = tmp_path / "run"
    assert f"cnnkit train --config {run / 'config.json'} --weights {run / 'last.pt'} [changed flags]" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_resume_takes_the_thread_count_of_this_session(tmp_path, capsys):
    # `cnnkit train --resume RUN --threads 1` was refused ("drop --threads"), though the thread count is the
    # machine's, not the run's; in process: the error after the flags' check is the missing last.pt
    from cnnkit.cli import main

    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "config.json").write_text("{}")
    assert main(["train", "--resume", str(tmp_path / "run"), "--threads", "1"]) == 2
    err = capsys.readouterr().err
    assert "drop --threads" not in err and "no last.pt in it" in err, err
    # the run goes on with its own settings and this session's thread count; from Python, another option was
    # dropped unseen
    import dataclasses

    from cnnkit.train.config import TrainConfig
    from cnnkit.train.loop import resumed_config

    saved = {"config": dataclasses.asdict(TrainConfig(threads=2, epochs=4)), "input_size": 32}
    cfg = resumed_config(saved, {"threads": 1, "progress": False})
    assert (cfg.threads, cfg.progress, cfg.epochs) == (1, False, 4)
    assert resumed_config(saved, {}).threads == 2
    with pytest.raises(UserError, match=r"continues with its own settings; drop epochs \(only threads and progress"):
        resumed_config(saved, {"epochs": 8, "threads": 1})


@pytest.mark.parametrize("text, words", [
    ("epochs: 0\n", "epochs must be a positive whole number, got 0"),
    ("batch_size: 0\n", "batch_size must be a positive whole number, got 0"),
    ("lr: -1\n", "lr must be positive or 'auto', got -1.0"),
    ("weight_decay: -0.1\n", "weight_decay cannot be negative, got -0.1"),
    ("clip_grad: 0\n", "clip_grad must be positive, got 0.0"),
    ("mixup: 1\nmix_off_epochs: -1\n", "mix_off_epochs must be a whole number, 0 or more, got -1"),
    # choices the command line's parser checks were named as flags, or (momentum 1.5) not checked at all
    ("optimizer: adam\n", "optimizer must be one of sgd, adamw, muon, not 'adam'"),
    ("schedule: cosin\n", "schedule must be one of onecycle, cosine, linear, step, constant, not 'cosin'"),
    ("precision: fp8\n", "precision must be one of auto, fp32, bf16, fp16, not 'fp8'"),
    ("momentum: 1.5\n", "momentum must be in [0, 1), got 1.5"),
    ("momentum: -0.1\n", "momentum must be in [0, 1), got -0.1"),
    ("val_split: 1.0\n", "val_split must be between 0 and 1 (exclusive), got 1.0"),
    # a negative backbone rate trained, climbing the loss below the head; 0 froze the backbone unseen
    ("lr_backbone: -0.01\n", "lr_backbone must be positive, got -0.01"),
    ("lr_backbone: 0\n", "lr_backbone must be positive, got 0.0"),
])
def test_a_config_files_value_out_of_range_names_the_file_and_its_key(tmp_path, text, words):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        make_config(str(path), given("train", "--config", str(path)))
    assert str(e.value) == f"--config {path}: {words}"


def test_a_flag_over_a_config_files_value_is_named_as_the_flag(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("epochs: 0\nclip_grad: 1.0\n")
    assert make_config(str(path), given("train", "--config", str(path), "--epochs", "3")).epochs == 3
    with pytest.raises(UserError) as e:  # the Python API's keyword names the option, not the file under it
        make_config(str(path), {"epochs": 2, "clip_grad": -1.0})
    assert str(e.value) == "--clip-grad must be positive, got -1.0"


@pytest.mark.parametrize("key, value, words", [
    ("num_classes", "3", "--model-opt num_classes: this option is set by the data (one class per class folder)"),
    ("in_channels", "1", "--model-opt in_channels: this option is set by --channels"),
    ("input_size", "64", "--model-opt input_size: this option is set by --input-size"),
    ("pretrained", "true", "--model-opt pretrained: this option is set by --pretrained"),
])
def test_a_model_option_that_training_sets_itself_is_refused_naming_what_sets_it(tmp_path, key, value, words):
    # create_model got it twice: "internal error: TypeError: ... got multiple values for keyword argument"
    with pytest.raises(UserError) as e:
        make_config(None, given("train", "--model-opt", f"{key}={value}"))
    assert str(e.value) == f"{words}; use that instead"
    path = tmp_path / "run.yaml"
    path.write_text(f"model_options: {{{key}: {value}}}\n")
    with pytest.raises(UserError) as e:
        make_config(str(path), given("train", "--config", str(path)))
    assert str(e.value).startswith(f"--config {path}: model_options {key}: this option is set by")


def test_model_opt_takes_numbers_as_python_writes_them():
    options = given("train", "--model-opt", "dropout=.5", "--model-opt", "a=5.", "--model-opt", "b=-.25",
                    "--model-opt", "c=1.e-3", "--model-opt", "d=nan", "--model-opt", "e=layer2")["model_options"]
    assert options == {"dropout": 0.5, "a": 5.0, "b": -0.25, "c": 0.001, "d": "nan", "e": "layer2"}
    assert make_config(None, given("train", "--model-opt", "dropout=.5")).model_options == {"dropout": 0.5}


@pytest.mark.parametrize("options", [dict(freeze="backbone", unfreeze="layer4"), dict(stages="fc:1"),
                                     dict(unfreeze="fc", stages="fc:1@0.01")])
def test_what_trains_is_checked_with_the_other_options_before_the_data_loads(options):
    # --stages was read, and --freeze set beside it refused, only once the data had loaded (minutes for a large
    # folder), where the other options are checked before.
    with pytest.raises(UserError, match="--stages|--freeze"):
        make_config(overrides=dict(model="resnet18", data="/no/such/folder", **options))


def test_a_backbone_rate_for_a_frozen_backbone_is_refused():
    # --freeze backbone --lr-backbone 1e-4 trained with the rate unused, without a word.
    with pytest.raises(UserError, match="--lr-backbone 0.0001 sets the rate .* --freeze backbone keeps frozen"):
        make_config(overrides=dict(model="resnet18", freeze="backbone", lr_backbone=1e-4))
    make_config(overrides=dict(model="resnet18", unfreeze="layer4,fc", lr_backbone=1e-4))


def test_a_backbone_rate_that_muon_would_ignore_is_refused():
    # --optimizer muon (or --recipe fast) --lr-backbone 1e-4 trained the backbone's filters at muon's own rate,
    # the option dropped without a word
    with pytest.raises(UserError, match="--lr-backbone 0.0001 sets the rate .* muon .* would ignore it"):
        make_config(overrides=dict(model="resnet18", optimizer="muon", unfreeze="layer4,fc", lr_backbone=1e-4))
    with pytest.raises(UserError, match="muon"):
        make_config(None, given("train", "--recipe", "fast", "--lr-backbone", "1e-4"))
    make_config(overrides=dict(model="resnet18", optimizer="adamw", unfreeze="layer4,fc", lr_backbone=1e-4))


def test_a_run_begun_with_a_warm_up_as_long_as_it_still_resumes():
    # the refusal above came after such runs were begun: --resume of one refused it as if it were new
    import dataclasses

    from cnnkit.train.config import TrainConfig
    from cnnkit.train.loop import resumed_config

    begun = dataclasses.asdict(make_config(None, {"epochs": 2}))
    saved = {"config": {**begun, "warmup_epochs": 5}, "input_size": 32}
    cfg = resumed_config(saved, {"threads": 1})
    assert (cfg.epochs, cfg.warmup_epochs, cfg.threads) == (2, 5, 1)
    with pytest.raises(UserError, match=r"^--warmup-epochs 5 is not shorter"):  # a new run from its settings is not
        make_config(TrainConfig(**{**begun, "warmup_epochs": 5}))
