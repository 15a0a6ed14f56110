import json
import os

import pytest

from cnnkit.choices import BUILTIN
from tests.conftest import run_cli, write_image_folder

FAST = ["--num-samples", "128", "--epochs", "1", "--batch-size", "32"]


def assert_one_line_error(proc, code, *words):
    assert proc.returncode == code, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for w in words:
        assert w in lines[0], lines[0]


def usage_error(capsys, args):
    """What the parser prints to stderr for ``args`` (stripped), after checking that it exits with 2."""
    from cnnkit.cli import build_parser

    with pytest.raises(SystemExit) as e:
        build_parser().parse_args(args)
    assert e.value.code == 2
    return capsys.readouterr().err.strip()


def test_train_json_eval_predict_round_trip(tmp_path, image_folder):
    out = tmp_path / "run"
    train = run_cli("train", "--model", "cnn_bn", "--data", image_folder, "--val-split", "0.25", "--epochs", "2",
                    "--batch-size", "8", "--out", out, "--json")
    assert train.returncode == 0, train.stderr
    result = json.loads(train.stdout.strip().splitlines()[-1])
    for key in ("val_acc", "val_loss", "best_val_acc", "epochs", "train_time_s", "images_per_s", "run_dir"):
        assert key in result
    assert result["run_dir"] == str(out) and result["epochs"] == 2

    ev = run_cli("eval", out / "last.pt", "--json")
    assert ev.returncode == 0, ev.stderr
    ev = json.loads(ev.stdout.strip().splitlines()[-1])
    assert ev["acc"] == result["val_acc"]
    assert set(ev) >= {"acc", "top5", "loss", "per_class", "confusion_matrix"}
    assert [c["class"] for c in ev["per_class"]] == sorted(os.listdir(image_folder))

    text = run_cli("eval", out, "--data", image_folder)
    assert text.returncode == 0 and "precision" in text.stdout and "true \\ pred" in text.stdout

    pred = run_cli("predict", out, image_folder, "--topk", "2", "--json")
    assert pred.returncode == 0, pred.stderr
    items = json.loads(pred.stdout)
    assert len(items) == 32 and all(len(i["top"]) == 2 for i in items)
    assert {"class", "prob"} == set(items[0]["top"][0])


def test_predict_reports_a_bad_image_and_predicts_the_rest(tmp_path, image_folder):
    import cnnkit

    out = tmp_path / "run"  # trained through the API: `cnnkit train` on a folder is the round trip's to check
    cnnkit.train(data=image_folder, epochs=1, out=str(out), progress=False)
    bad = tmp_path / "bad.png"
    bad.write_text("nope")
    good = os.path.join(image_folder, "circle", "001.png")
    proc = run_cli("predict", out, good, bad)
    assert proc.returncode == 1 and "bad.png" in proc.stderr and "Traceback" not in proc.stderr
    assert good in proc.stdout


@pytest.mark.parametrize("args, words", [
    (["--epochs", "0"], ["--epochs", "positive"]),
    (["--epochs", "-3"], ["--epochs"]),
    (["--batch-size", "0"], ["--batch-size"]),
    (["--lr", "0"], ["--lr", "positive"]),
    (["--lr", "-0.1"], ["--lr"]),
    (["--val-split", "0"], ["--val-split"]),
    (["--val-split", "1"], ["--val-split"]),
    (["--val-split", "1.5"], ["--val-split"]),
    (["--model", "resnet81"], ["unknown model", "resnet18"]),
    (["--data", "no/such/folder"], ["no/such/folder", "does not exist"]),
])
def test_usage_errors_exit_2_with_one_line_and_no_run_folder(tmp_path, args, words):
    out = tmp_path / "run"
    proc = run_cli("train", *args, "--out", out)
    assert_one_line_error(proc, 2, *words)
    assert not out.exists()


@pytest.mark.parametrize("layout, words", [
    ("empty", ["is empty"]),
    ("flat", ["no class sub-folders"]),
    ("no_images", ["no images"]),
])
def test_bad_folders_exit_2(tmp_path, layout, words):
    root = tmp_path / "data"
    root.mkdir()
    if layout == "flat":
        (root / "x.png").write_bytes(b"")
    if layout == "no_images":
        (root / "cat").mkdir()
    out = tmp_path / "run"
    assert_one_line_error(run_cli("train", "--data", root, "--out", out), 2, *words)
    assert not out.exists()


def test_undecodable_image_exits_1_naming_it(tmp_path, image_folder):
    with open(os.path.join(image_folder, "square", "broken.jpg"), "w") as f:
        f.write("not a jpeg")
    out = tmp_path / "run"
    proc = run_cli("train", "--data", image_folder, "--bad-images", "error", "--out", out)
    assert_one_line_error(proc, 1, "broken.jpg")
    assert not out.exists()


def test_debug_shows_the_traceback(tmp_path):
    proc = run_cli("--debug", "train", "--model", "nope", "--out", tmp_path / "r")
    assert proc.returncode != 0 and "Traceback" in proc.stderr


def test_debug_keeps_the_errors_own_exit_code(tmp_path):
    # a script that checks for 2 (usage) or 1 (run time) must not read a different code when rerun with --debug
    (tmp_path / "empty.pt").write_bytes(b"")
    for args, code, words in [(["eval", tmp_path / "nothing"], 2, "does not exist"),
                              (["eval", tmp_path / "empty.pt"], 1, "is empty")]:
        assert_one_line_error(run_cli(*args), code, words)
        proc = run_cli("--debug", *args)
        assert proc.returncode == code, proc.stderr
        assert "Traceback" in proc.stderr and words in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_eval_of_missing_checkpoint(tmp_path):
    assert_one_line_error(run_cli("eval", tmp_path / "nothing"), 2, "does not exist")


@pytest.mark.parametrize("channels, size", [(3, 64), (1, 28)])
def test_resnet18_trains_on_64px_rgb_and_28px_grayscale(tmp_path, channels, size):
    proc = run_cli("train", "--model", "resnet18", "--data", "shapes", "--input-size", size, "--channels", channels,
                   *FAST, "--out", tmp_path / "r", "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["epochs"] == 1


def test_version_and_help():
    assert run_cli("--version").stdout.startswith("cnnkit ")
    help_text = run_cli("train", "--help").stdout
    assert "examples:" in help_text and "--val-split" in help_text


@pytest.mark.parametrize("args", [
    ["train", "--lr", "inf"], ["train", "--lr", "nan"], ["train", "--momentum", "nan"],
    ["train", "--weight-decay", "inf"], ["train", "--label-smoothing", "nan"], ["train", "--warmup-epochs", "nan"],
    ["train", "--mixup", "inf"], ["train", "--clip-grad", "inf"], ["train", "--lr-backbone", "inf"],
    ["lr-find", "--momentum", "nan"], ["lr-find", "--end-lr", "inf"],
])
def test_non_finite_numbers_fail_the_argument_checks(capsys, args):
    err = usage_error(capsys, args)
    assert len(err.splitlines()) == 1 and args[1] in err and "finite" in err, err


@pytest.mark.parametrize("option", ["lr", "momentum", "weight_decay", "warmup_epochs", "clip_grad"])
def test_non_finite_numbers_fail_the_python_api_before_training(tmp_path, option):
    import cnnkit
    from cnnkit.errors import UserError

    for value in (float("nan"), float("inf")):
        with pytest.raises(UserError, match=f"{option} must be a finite number"):
            cnnkit.train(**{option: value}, num_samples=64, smoke=True, out=str(tmp_path / "run"), progress=False)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("args, words", [
    (["train", "--epochz", "3"], ["--epochz 3", "did you mean --epochs?", "(see cnnkit train --help)"]),
    (["eval", "RUN", "--emma"], ["--emma", "did you mean --ema?", "(see cnnkit eval --help)"]),
    (["predict", "RUN", "x.png", "--top-k=3"], ["did you mean --topk?", "(see cnnkit predict --help)"]),
    (["eval", "RUN", "--bogus"], ["unrecognized arguments: --bogus (see cnnkit eval --help)"]),
    (["--bogus"], ["unrecognized arguments: --bogus (see cnnkit --help)"]),
    # two names after a repeatable option: the second was only "unrecognized"
    (["features", "RUN", "--layer", "features.1", "features.7"],
     ["unrecognized arguments: features.7; --layer takes one NAME at a time, so repeat it: --layer features.1 "
      "--layer features.7 (see cnnkit features --help)"]),
])
def test_an_unknown_option_names_the_commands_help_and_a_close_option(capsys, args, words):
    lines = usage_error(capsys, args).splitlines()
    assert len(lines) == 1, lines
    for w in words:
        assert w in lines[0], lines[0]


@pytest.mark.parametrize("args, line", [
    (["summary", "--model", "resnet18", "--input-size", "64"],
     "cnnkit summary: error: MODEL_OR_RUN is given by position, without --model: cnnkit summary resnet18 "
     "--input-size 64 (see cnnkit summary --help)"),
    (["check-data", "--data=photos/"],
     "cnnkit check-data: error: DATA is given by position, without --data: cnnkit check-data photos/ "
     "(see cnnkit check-data --help)"),
    (["embed", "--out", "e.npy", "--data", "photos/", "--model", "resnet18"],
     "cnnkit embed: error: MODEL_OR_RUN and DATA are given by position, without --model and --data: "
     "cnnkit embed resnet18 photos/ --out e.npy (see cnnkit embed --help)"),
    (["embed", "resnet18", "--data", "photos/", "--out", "e.npy"],
     "cnnkit embed: error: DATA is given by position, without --data: cnnkit embed resnet18 photos/ --out e.npy "
     "(see cnnkit embed --help)"),
    (["summary"], "cnnkit summary: error: the following arguments are required: MODEL_OR_RUN "
                  "(see cnnkit summary --help)"),
    # the words left by position fill the other positional arguments, in their order; a required option missing
    # beside them is on the line too, so that the line is one that runs
    (["embed", "--data", "photos/", "resnet18"],
     "cnnkit embed: error: DATA is given by position, without --data: cnnkit embed resnet18 photos/ --out FILE.npy "
     "(see cnnkit embed --help)"),
    (["predict", "--checkpoint", "RUN", "cat.jpg"],
     "cnnkit predict: error: RUN_DIR_OR_CHECKPOINT is given by position, without --checkpoint: cnnkit predict RUN "
     "cat.jpg (see cnnkit predict --help)"),
    (["predict", "cat.jpg", "--checkpoint", "RUN"],
     "cnnkit predict: error: RUN_DIR_OR_CHECKPOINT is given by position, without --checkpoint: cnnkit predict RUN "
     "cat.jpg (see cnnkit predict --help)"),
    # two images fill both positional arguments, RUN_DIR_OR_CHECKPOINT with a.jpg: the option given first was still
    # said to be "already given by position (a.jpg)", the words of `predict RUN cat.jpg --checkpoint last`
    (["predict", "--checkpoint=RUN", "a.jpg", "b.jpg"],
     "cnnkit predict: error: RUN_DIR_OR_CHECKPOINT is given by position, without --checkpoint: cnnkit predict RUN "
     "a.jpg b.jpg (see cnnkit predict --help)"),
    # features and cam take the image as --image: the line gives it there (it named the conflict alone)
    (["features", "--model", "resnet18", "cat.jpg"],
     "cnnkit features: error: MODEL_OR_RUN is given by position, without --model, and the image with --image: "
     "cnnkit features resnet18 --image cat.jpg (see cnnkit features --help)"),
    (["cam", "--model=resnet18", "cat.jpg"],
     "cnnkit cam: error: MODEL_OR_RUN is given by position, without --model, and the image with --image: "
     "cnnkit cam resnet18 --image cat.jpg --out PNG (see cnnkit cam --help)"),
    (["features", "resnet18", "cat.jpg", "--out", "maps"],
     "cnnkit features: error: unrecognized arguments: cat.jpg; the image goes after --image: cnnkit features "
     "resnet18 --image cat.jpg --out maps (see cnnkit features --help)"),
    # cam requires --image: argparse said only that, with the image given by position beside it
    (["cam", "resnet18", "cat.jpg", "--out", "c.png"],
     "cnnkit cam: error: the following arguments are required: --image; the image goes after --image: cnnkit cam "
     "resnet18 --image cat.jpg --out c.png (see cnnkit cam --help)"),
    (["cam", "resnet18", "--out", "c.png"],
     "cnnkit cam: error: the following arguments are required: --image (see cnnkit cam --help)"),
])
def test_a_positional_argument_given_as_an_option_says_how_to_give_it(capsys, args, line):
    # `cnnkit train` takes --model and --data; the inspection commands take them by position.
    assert usage_error(capsys, args) == line


@pytest.mark.parametrize("args, line", [
    (["eval", "RUN", "--checkpoint", "last"],
     "cnnkit eval: error: there is no --checkpoint option; RUN was taken as RUN_DIR_OR_CHECKPOINT (by position), so "
     "--checkpoint last is one too many: give one RUN_DIR_OR_CHECKPOINT, a run folder (its best.pt) or a checkpoint "
     "file (.pt, .safetensors): cnnkit eval RUN (see cnnkit eval --help)"),
    (["eval", "--checkpoint=last", "RUN"],
     "cnnkit eval: error: there is no --checkpoint option; RUN was taken as RUN_DIR_OR_CHECKPOINT (by position), so "
     "--checkpoint=last is one too many: give one RUN_DIR_OR_CHECKPOINT, a run folder (its best.pt) or a checkpoint "
     "file (.pt, .safetensors): cnnkit eval RUN (see cnnkit eval --help)"),
    # what each word was taken as: the line alone ("already given by position (RUN)") read as that of
    # `predict --checkpoint RUN a.jpg b.jpg`
    (["predict", "RUN", "cat.jpg", "--checkpoint", "last"],
     "cnnkit predict: error: there is no --checkpoint option; RUN was taken as RUN_DIR_OR_CHECKPOINT and cat.jpg as "
     "PATH (by position), so --checkpoint last is one too many: give one RUN_DIR_OR_CHECKPOINT, a run folder, a .pt, "
     ".safetensors or .onnx file: cnnkit predict RUN cat.jpg (see cnnkit predict --help)"),
    (["predict", "a.jpg", "b.jpg", "c.jpg", "--checkpoint", "RUN", "--topk", "1"],
     "cnnkit predict: error: there is no --checkpoint option; a.jpg was taken as RUN_DIR_OR_CHECKPOINT and b.jpg "
     "c.jpg as PATH (by position), so --checkpoint RUN is one too many: give one RUN_DIR_OR_CHECKPOINT, a run folder, "
     "a .pt, .safetensors or .onnx file: cnnkit predict a.jpg b.jpg c.jpg --topk 1 (see cnnkit predict --help)"),
    # the line without the option is one that runs: embed's required --out is on it
    (["embed", "resnet18", "photos/", "--data", "other/"],
     "cnnkit embed: error: there is no --data option; resnet18 was taken as MODEL_OR_RUN and photos/ as DATA (by "
     "position), so --data other/ is one too many: give one DATA, a folder with one sub-folder per class, or "
     f"{', '.join(BUILTIN)}: cnnkit embed resnet18 photos/ --out FILE.npy (see cnnkit embed --help)"),
])
def test_an_option_named_after_a_positional_already_given_is_not_moved_into_its_place(capsys, args, line):
    # Moving `last` into RUN's place (`cnnkit eval RUN last`) would suggest a command that fails in turn.
    assert usage_error(capsys, args) == line


@pytest.mark.parametrize("args, want", [
    (["embed", "--data", "photos/", "resnet18"], {"model": "resnet18", "data": "photos/", "out": "FILE.npy"}),
    (["probe", "--data", "photos/", "RUN"], {"model": "RUN", "data": "photos/"}),
    (["predict", "--checkpoint", "RUN", "a.jpg"], {"checkpoint": "RUN", "paths": ["a.jpg"]}),
    (["predict", "--checkpoint=RUN", "a.jpg", "b.jpg"], {"checkpoint": "RUN", "paths": ["a.jpg", "b.jpg"]}),
    (["features", "--model", "resnet18", "cat.jpg", "--out", "maps"],
     {"model": "resnet18", "image": "cat.jpg", "out": "maps"}),
    (["cam", "--model", "RUN", "cat.jpg"], {"model": "RUN", "image": "cat.jpg"}),
    (["eval", "--checkpoint", "RUN", "--json"], {"checkpoint": "RUN", "json": True}),
    (["export", "--format", "onnx", "--checkpoint", "RUN", "--out", "m.onnx"], {"checkpoint": "RUN", "out": "m.onnx"}),
    (["summary", "--input-size", "64", "--model", "resnet18"], {"model": "resnet18", "input_size": [64]}),
])
def test_the_line_suggested_for_a_positional_given_as_an_option_means_what_was_given(capsys, args, want):
    # `cnnkit embed --data photos/ resnet18` was told `cnnkit embed photos/ resnet18`, which reads photos/ as the model
    from cnnkit.cli import build_parser

    line = usage_error(capsys, args)
    suggested = line.rsplit(": cnnkit ", 1)[1].removesuffix(f" (see cnnkit {args[0]} --help)")
    parsed = vars(build_parser().parse_args(suggested.split()))
    assert {k: parsed[k] for k in want} == want, line


def test_a_positionals_name_as_an_option_is_not_read_as_the_longer_option_it_abbreviates(capsys):
    # argparse took --model for --model-opt, and the command failed later on "--model-opt wants key=value"
    assert "there is no --model option; resnet18 was taken as MODEL_OR_RUN (by position), so --model x is one too " \
        "many" in usage_error(capsys, ["features", "resnet18", "--model", "x"])


@pytest.mark.parametrize("args, line", [
    (["--epochs", "3"],
     "cnnkit: error: --epochs belongs to a command, and none is given: cnnkit train --epochs 3 (see cnnkit --help)"),
    (["--data=photos/"], "cnnkit: error: --data belongs to a command (train, lr-find, eval), and none is given: "
                         "cnnkit train --data=photos/ (see cnnkit --help)"),
    (["--debug", "--threads", "1", "train", "--epochs", "1"],
     "cnnkit: error: --threads is an option of train, given before the command: cnnkit --debug train --threads 1 "
     "--epochs 1 (see cnnkit --help)"),
    (["--epochs", "3", "eval", "RUN"],
     "cnnkit: error: --epochs is an option of train, not of cnnkit or of eval (see cnnkit --help)"),
    (["--bogus", "3"], "cnnkit: error: unrecognized arguments: --bogus 3 (see cnnkit --help)"),
])
def test_a_commands_option_before_the_command_says_where_it_goes(capsys, args, line):
    # argparse took the option's value for the command: "argument COMMAND: invalid choice: '3'"
    from cnnkit.cli import build_parser

    assert usage_error(capsys, args) == line
    if ": cnnkit " in line:  # the line it suggests parses, with the option's value
        parsed = build_parser().parse_args(line.rsplit(": cnnkit ", 1)[1].removesuffix(" (see cnnkit --help)").split())
        assert parsed.command == "train" and (parsed.epochs, parsed.threads, parsed.data) in \
            ((3, None, "shapes"), (None, None, "photos/"), (1, 1, "shapes")) and parsed.debug == ("--debug" in args)


@pytest.mark.parametrize("argv, data, line", [
    (["train", "--data", "Mnist", "--epochs", "1"], "Mnist", "cnnkit train --data mnist --epochs 1"),
    (["--debug", "lr-find", "--data=cifar-10"], "cifar-10", "cnnkit --debug lr-find --data=cifar10"),
    (["embed", "resnet18", "FashionMNIST", "--out", "e.npy"], "FashionMNIST",
     "cnnkit embed resnet18 fashion_mnist --out e.npy"),
    (["eval", "RUN", "--data", "CIFAR10"], "CIFAR10", "cnnkit eval RUN --data cifar10"),
])
def test_a_builtin_datasets_name_spelt_otherwise_gets_the_line_that_names_it(tmp_path, monkeypatch, capsys, argv,
                                                                             data, line):
    # the error said "did you mean mnist?" only; the command line with the name as it is spelt is the fix to copy
    from cnnkit.cli import main

    monkeypatch.chdir(tmp_path)  # no folder of that name here
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # --debug: the traceback's last line
    assert f"data path {data} does not exist; for the built-in dataset " in err and err.endswith(f": {line}"), err


def _fake_run_folder(root):
    """A run folder's layout, with a picture in a sub-folder as `cnnkit report` leaves one (plots/curves.png):
    read as images, plots/ would pass for a class."""
    from PIL import Image

    root.mkdir()
    (root / "config.json").write_text(json.dumps({"model": "simple_cnn", "data": "photos/", "epochs": 1}))
    (root / "metrics.csv").write_text("epoch,val_acc\n1,0.5\n")
    (root / "best.pt").write_bytes(b"")
    (root / "plots").mkdir()
    Image.new("RGB", (8, 8)).save(root / "plots" / "curves.png")
    return root


@pytest.mark.parametrize("args, what", [
    (["check-data", "{run}"], "{run} is a training run's folder (config.json, best.pt, metrics.csv)"),
    (["check-data", "{run}/best.pt"], "{run}/best.pt is a model file"),
    (["train", "--data", "{run}", "--out", "{tmp}/new"], "{run} is a training run's folder"),
    (["probe", "simple_cnn", "{run}"], "{run} is a training run's folder"),
])
def test_a_run_folder_or_checkpoint_given_as_data_is_named_with_the_runs_data(tmp_path, args, what):
    run = _fake_run_folder(tmp_path / "run")
    fill = {"run": run, "tmp": tmp_path}
    proc = run_cli(*[a.format(**fill) for a in args])
    assert_one_line_error(proc, 2, what.format(**fill), "not images",
                          'the run trained on photos/ ("data" in its config.json)')
    assert not (tmp_path / "new").exists()


def test_the_folder_of_runs_given_as_data_is_named_as_one(tmp_path):
    (tmp_path / "runs").mkdir()
    _fake_run_folder(tmp_path / "runs" / "a")
    _fake_run_folder(tmp_path / "runs" / "b")
    assert_one_line_error(run_cli("check-data", tmp_path / "runs"), 2,
                          f"{tmp_path / 'runs'} holds training runs (a, b), not class folders of images")


def test_a_reader_that_goes_away_ends_the_command_quietly():
    # `cnnkit models | head -1`: the closed pipe is the reader's choice, not a bug to report.
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "cnnkit", "models"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=60) == 141 and err == "", err


def test_cnnkits_own_option_after_the_command_says_where_it_goes(tmp_path):
    # "rerun with --debug" is naturally typed at the end of the command line
    from tests.conftest import run_cli

    proc = run_cli("runs", str(tmp_path), "--debug")
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("cnnkit runs: error: --debug is cnnkit's own option, given before the command: "
                                   "cnnkit --debug runs ... (see cnnkit runs --help)")


def test_the_internal_error_hint_puts_debug_where_it_is_accepted(monkeypatch, capsys, tmp_path):
    import cnnkit.runs
    from cnnkit.cli import main

    def broken(root):
        raise RuntimeError("a bug")

    monkeypatch.setattr(cnnkit.runs, "list_runs", broken)  # a stand-in for any bug behind a command
    assert main(["runs", str(tmp_path)]) == 1
    err = capsys.readouterr().err
    assert err == ("cnnkit runs: internal error: RuntimeError: a bug (rerun as cnnkit --debug runs ... for the "
                   "traceback, and please report it)\n")


def test_runs_without_a_runs_folder_is_no_error_but_a_missing_dir_given_is(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli("runs", cwd=tmp_path)  # nothing trained here yet, as with an empty runs/
    assert proc.returncode == 0 and proc.stdout == (f"no runs in runs/ ({tmp_path / 'runs'}) yet; start one with: "
                                                    "cnnkit train, or list another folder's with: cnnkit runs DIR\n"), \
        proc.stderr
    proc = run_cli("runs", "--json", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", proc.stderr
    assert_one_line_error(run_cli("runs", "runs", cwd=tmp_path), 2, "runs is not a folder")
    assert_one_line_error(run_cli("runs", "experiments", cwd=tmp_path), 2, "experiments is not a folder")


def test_runs_without_runs_in_runs_names_the_folders_here_that_hold_some(tmp_path):
    # runs made with --out somewhere were listed only by `cnnkit runs somewhere`; `cnnkit runs` said "no runs in
    # runs/ yet", as if nothing had been trained
    from tests.conftest import run_cli

    _fake_run_folder(tmp_path / "again")
    (tmp_path / "exp").mkdir()
    _fake_run_folder(tmp_path / "exp" / "a")
    _fake_run_folder(tmp_path / "exp" / "b")
    (tmp_path / "photos" / "cat").mkdir(parents=True)  # a data folder: no runs
    (tmp_path / "runs").mkdir()  # empty
    proc = run_cli("runs", cwd=tmp_path)
    assert proc.returncode == 0 and proc.stdout == (
        f"no runs in runs/ ({tmp_path / 'runs'}); runs elsewhere in this folder: cnnkit runs . lists 1 run (again); "
        "cnnkit runs exp lists 2 runs\n"), proc.stderr
    assert run_cli("runs", "--json", cwd=tmp_path).stdout.strip() == "[]"  # the list is runs/'s, as before
    listed = run_cli("runs", "exp", cwd=tmp_path).stdout.splitlines()
    assert [line.split()[0] for line in listed[1:3]] == [os.path.join("exp", "a"), os.path.join("exp", "b")]


def test_a_models_pattern_that_matches_nothing_says_so(tmp_path):
    from tests.conftest import run_cli

    proc = run_cli("models", "foo*")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip() == "cnnkit models: error: no model name matches 'foo*'; `cnnkit models` lists them all"


def test_an_out_folder_with_other_files_is_not_called_a_run(tmp_path):
    from tests.conftest import run_cli

    (tmp_path / "notes.txt").write_text("mine")
    proc = run_cli("train", "--smoke", "--out", tmp_path)
    assert proc.returncode == 2
    assert proc.stderr.strip().endswith("already holds files; pass a new --out folder (it is not a run folder)")


@pytest.mark.parametrize("pattern, hint", [
    ("resnet", "try '*resnet*' (7 names: resnet101, resnet152, resnet18, ...)"),
    ("ResNet*", "try 'resnet*' (5 names: resnet101, resnet152, resnet18, ...)"),
    ("VGG16", "try '*vgg16*' (2 names: vgg16, vgg16_bn)"),
    ("ResNet18", "try '*resnet18*' (1 name: resnet18)"),
])
def test_a_models_pattern_that_misses_by_case_or_wildcards_suggests_the_one_that_matches(capsys, pattern, hint):
    """`cnnkit models resnet` matched nothing (a pattern matches whole names, and they are lower case) and said
    only that, where seven names hold "resnet"."""
    from cnnkit.cli import main

    assert main(["models", pattern]) == 2
    assert capsys.readouterr().err.strip() == f"cnnkit models: error: no model name matches '{pattern}'; {hint}"


def test_an_error_naming_a_file_with_a_newline_in_its_name_stays_one_line(tmp_path):
    root = write_image_folder(str(tmp_path / "d"))
    (tmp_path / "d" / "circle" / "bad\nname.jpg").write_bytes(b"not an image")
    proc = run_cli("train", "--data", root, "--bad-images", "error", "--epochs", "1", "--out", tmp_path / "run")
    assert proc.returncode == 1
    assert len(proc.stderr.splitlines()) == 1 and "bad\\nname.jpg" in proc.stderr, proc.stderr


@pytest.mark.parametrize("args, typed, meant", [
    (["trian"], "trian", "train"),
    (["export", "run", "--format", "onxx", "--out", "m.onnx"], "onxx", "onnx"),
])
def test_a_mistyped_command_or_choice_names_the_near_match(capsys, args, typed, meant):
    # Mistyped options got "did you mean"; a mistyped command or choice got only argparse's list of them.
    line = usage_error(capsys, args)
    assert len(line.splitlines()) == 1 and f"invalid choice: '{typed}'" in line, line
    assert f"; did you mean {meant}? (see cnnkit" in line, line
    assert "did you mean" not in usage_error(capsys, ["xyz"])
