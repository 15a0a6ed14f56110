"""--config FILE: YAML or JSON training options, overridden by flags; a run's config.json replays it."""

import csv
import json
import os
import subprocess
import sys

import pytest

import cnnkit
from cnnkit.errors import UserError
from cnnkit.train.config import read_config_file
from tests.conftest import run_cli

YAML = """\
# a run described in a file
model: cnn_bn
num_samples: 128
val_split: 0.25
epochs: 3
batch_size: 32
optimizer: adamw
lr: 3e-3          # YAML 1.1 reads this as text; a float field takes it as the number
precision: fp32
seed: 4
mixup: 0.2
"""


def metrics(run):
    """metrics.csv without its timing columns."""
    return [{k: v for k, v in row.items() if k not in ("epoch_time_s", "images_per_s")}
            for row in csv.DictReader(open(run / "metrics.csv"))]


def test_yaml_options_overrides_win_and_config_json_replays_the_run_on_the_command_line(tmp_path):
    (tmp_path / "run.yaml").write_text(YAML)
    result = cnnkit.train(config=str(tmp_path / "run.yaml"), epochs=1, out=str(tmp_path / "a"), progress=False)
    saved = json.load(open(tmp_path / "a" / "config.json"))
    assert result.epochs == 1 and result.model == "cnn_bn"  # the keyword beat the file's 3 epochs
    assert (saved["optimizer"], saved["lr"], saved["mixup"], saved["seed"]) == ("adamw", 0.003, 0.2, 4)

    # config.json names its own run folder as "out": the flag given on the command line wins over the file.
    replay = run_cli("train", "--config", tmp_path / "a" / "config.json", "--out", tmp_path / "b")
    assert replay.returncode == 0, replay.stderr
    assert metrics(tmp_path / "a") == metrics(tmp_path / "b")
    assert (tmp_path / "a" / "steps.csv").read_text() == (tmp_path / "b" / "steps.csv").read_text()


@pytest.mark.parametrize("text, words", [
    ("epochs: 2\nbatchsize: 8\n", ["unknown key(s) batchsize", "did you mean batch_size"]),
    ("epochs: ten\n", ["epochs must be a whole number", "'ten'"]),
    ("epochs: 2.5\n", ["epochs must be a whole number"]),
    ("lr: fast\n", ["lr must be a number or 'auto' or null"]),
    ("flip: maybe\n", ["flip must be true or false or null"]),
    ("model_options: 3\n", ["model_options must be a mapping"]),
    ("- epochs\n", ["expected a mapping"]),
    ("epochs: [1\n", ["not valid YAML", "line"]),
])
def test_bad_config_files_are_named_in_one_line(tmp_path, text, words):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    with pytest.raises(UserError) as e:
        read_config_file(str(path))
    for w in words:
        assert w in str(e.value)
    assert "\n" not in str(e.value)


def test_config_errors_on_the_command_line_exit_2_with_one_line(tmp_path):
    (tmp_path / "run.json").write_text('{"epochs": 1, "nonsense": true}')
    proc = run_cli("train", "--config", tmp_path / "run.json", "--out", tmp_path / "run")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "nonsense" in proc.stderr and "Traceback" not in proc.stderr and not (tmp_path / "run").exists()
    with pytest.raises(UserError, match="cannot read"):
        read_config_file(str(tmp_path / "missing.yaml"))


def test_a_relative_data_path_that_is_missing_says_where_it_was_read_from(tmp_path):
    # a config file's `data: ../photos` is read from the folder the command runs in, not the file's: say so
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "run.json").write_text('{"data": "../photos", "epochs": 1}')
    proc = run_cli("train", "--config", tmp_path / "configs" / "run.json", "--out", tmp_path / "run",
                   cwd=tmp_path / "configs")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert (f"data path ../photos does not exist (a relative path, read from the current folder "
            f"{tmp_path / 'configs'})") in proc.stderr


def _alias_bomb(levels=9, width=9):
    """YAML whose value is a list of ``width`` aliases of a list of ``width`` aliases ... ``levels`` deep: a file of
    a few hundred bytes that stands for width**levels values (387 million for 9 of 9)."""
    value = f"&a0 [{', '.join(['x'] * width)}]"
    for i in range(1, levels):
        value = f"&a{i} [{', '.join([value] + [f'*a{i - 1}'] * (width - 1))}]"
    return value


# Run in a child process whose address space may grow by at most 1 GB past what the imports took, with a timeout:
# before the limits, the alias bombs ran past 60 s and 2.5 GB (the error message rendered the whole value).
_HOSTILE_CHILD = """
import json, resource, sys, time
from cnnkit.errors import UserError
from cnnkit.train.config import read_config_file
size = int([l.split()[1] for l in open("/proc/self/status") if l.startswith("VmSize:")][0]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (size + 2**30, size + 2**30))
out = {}
for path in sys.argv[1:]:
    start = time.perf_counter()
    try:
        read_config_file(path)
        message = "accepted"
    except UserError as e:
        message = str(e)
    out[path] = (message, time.perf_counter() - start)
print(json.dumps(out))
"""


def test_hostile_config_files_are_refused_in_bounded_time_and_memory(tmp_path):
    files = {
        "bomb_batch.yaml": ("batch_size: " + _alias_bomb() + "\n", "more than 10,000 values"),
        "bomb_stages.yaml": ("stages: " + _alias_bomb() + "\n", "more than 10,000 values"),
        "bomb_options.yaml": ("model_options: {widths: " + _alias_bomb() + "}\n", "more than 10,000 values"),
        "many.yaml": ("model_options: {widths: [" + ", ".join(["1"] * 20_000) + "]}\n", "more than 10,000 values"),
        "deep.yaml": ("epochs: " + "[" * 50_000 + "]" * 50_000 + "\n", "nested more than 20 levels"),
        "deep.json": ('{"epochs": ' + "[" * 50_000 + "]" * 50_000 + "}", "nested more than 20 levels"),
        "deep30.json": ('{"epochs": ' + "[" * 30 + "]" * 30 + "}", "nested more than 20 levels"),
        "big.yaml": ("epochs: 1\n" + "#" * 400_000 + "\n", "over 256 KB"),
    }
    for name, (text, _) in files.items():
        (tmp_path / name).write_text(text)
    proc = subprocess.run([sys.executable, "-c", _HOSTILE_CHILD, *files], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    results = json.loads(proc.stdout)
    for name, (_, words) in files.items():
        message, seconds = results[name]
        assert words in message and len(message) < 300, (name, message)
        assert seconds < 5, (name, seconds)


def test_a_wrong_value_is_shown_shortened(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("stages: [" + ", ".join(f"stage{i}" for i in range(5000)) + "]\nepochs: '" + "x" * 3000 + "'\n")
    with pytest.raises(UserError, match="stages must be text or null") as e:
        read_config_file(str(path))
    assert len(str(e.value)) < 200 and "stage0" in str(e.value) and "..." in str(e.value)


def test_a_config_file_that_is_not_utf8_is_named_in_one_line(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_bytes("epochs: 1\n".encode("utf-16"))  # starts with the byte order mark \xff\xfe
    with pytest.raises(UserError, match="not UTF-8 text .it starts like UTF-16.*save it as UTF-8"):
        read_config_file(str(path))
    proc = run_cli("train", "--config", path, "--out", tmp_path / "run")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert "not UTF-8" in proc.stderr and "internal error" not in proc.stderr


@pytest.mark.parametrize("text, words", [
    ("lr: .inf\n", "lr must be a finite number, got inf"),
    ("momentum: .nan\n", "momentum must be a finite number, got nan"),
    ("epochs: 0\n", "run.yaml: epochs must be a positive whole number, got 0"),
    ("threads: 0\n", "--config {path}: threads must be a whole number, 1 or more, got 0"),
    ("crop_pad: -5\n", "--config {path}: crop_pad must be 0 (no translation) or a number of pixels, got -5"),
    ("model: convnet\nmodel_options: {widths: [x, y]}\nnum_samples: 64\n",
     "option widths must be a list of whole numbers, got ('x', 'y')"),
    # the model's own check of its options, named as the file's key as the checks above are
    ("model: convnet\nmodel_options: {head: flaten}\nnum_samples: 64\n",
     "--config {path}: model_options: convnet: head must be one of flatten, gap, not 'flaten'"),
])
def test_bad_values_in_a_config_file_exit_2_with_one_line(tmp_path, text, words):
    (tmp_path / "run.yaml").write_text(text)
    proc = run_cli("train", "--config", tmp_path / "run.yaml", "--smoke", "--out", tmp_path / "run",
                   env={"CNNKIT_CACHE": str(tmp_path / "cache")})
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert words.format(path=tmp_path / "run.yaml") in proc.stderr


@pytest.mark.parametrize("name, text, words", [
    ("run.json", '{"epochs": 1, "epochs": 2}', "run.json: key epochs is given twice; keep one"),
    ("run.yaml", "epochs: 1\nlr: 0.1\nepochs: 2\n", "run.yaml: key epochs is given twice (the second at line 3); keep one"),
    ("run.json", '{"model_options": {"head": "gap", "head": "flatten"}}', "run.json: key head is given twice"),
    ("run.yaml", "model_options:\n  head: gap\n  head: flatten\n", "run.yaml: key head is given twice (the second at line 3)"),
])
def test_a_key_given_twice_is_refused_naming_the_file_and_the_key(tmp_path, name, text, words):
    # JSON and YAML parsers keep the last of the two, unseen: the run would not be the one the file seems to describe
    (tmp_path / name).write_text(text)
    with pytest.raises(UserError) as e:
        read_config_file(str(tmp_path / name))
    assert words in str(e.value) and "\n" not in str(e.value)


def test_yaml_merge_keys_may_still_be_overridden(tmp_path):
    (tmp_path / "run.yaml").write_text("model_options:\n  <<: {head: gap, widths: [8, 16]}\n  head: flatten\n")
    assert read_config_file(str(tmp_path / "run.yaml"))["model_options"] == {"head": "flatten", "widths": (8, 16)}


@pytest.mark.parametrize("text, words", [
    ("data: " + "d" * 100_000 + "\n", "a text of 100,000 characters, over the 4,096"),
    ("model_options: {" + ", ".join(f"option{i}: 1" for i in range(50)) + "}\n", "has no option option0, option1"),
])
def test_long_texts_and_many_keys_give_a_short_message(tmp_path, text, words):
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(UserError) as e:
        cnnkit.train(config=str(tmp_path / "run.yaml"), num_samples=64, smoke=True, out=str(tmp_path / "run"),
                     progress=False)
    assert words in str(e.value) and len(str(e.value)) < 300, str(e.value)[:500]


def test_an_error_of_another_option_is_not_blamed_on_the_files_model_options(tmp_path):
    (tmp_path / "run.yaml").write_text("model: convnet\nmodel_options: {head: gap}\n")
    proc = run_cli("train", "--config", tmp_path / "run.yaml", "--data", "shapes", "--input-size", "3", "--epochs", "1",
                   "--out", tmp_path / "run")
    assert proc.returncode == 2 and proc.stderr.startswith("cnnkit train: error: input size 3 is too small"), proc.stderr
    assert "model_options" not in proc.stderr


def test_a_config_from_bash_process_substitution_is_read():
    # --config <(cat run.yaml) passes /dev/fd/N, a pipe without an extension: read once, as YAML (JSON's superset)
    read_end, write_end = os.pipe()
    try:
        with open(write_end, "w") as w:
            w.write("epochs: 3\nmodel: resnet18\n")
        assert read_config_file(f"/dev/fd/{read_end}") == {"epochs": 3, "model": "resnet18"}
    finally:
        os.close(read_end)


def test_a_config_fifo_with_nproc_is_refused_not_waited_on(tmp_path):
    # each of --nproc's processes reads --config: of a FIFO the first takes the text and the others waited forever
    fifo = tmp_path / "run.yaml"
    os.mkfifo(fifo)
    proc = subprocess.run([sys.executable, "-m", "cnnkit", "train", "--config", str(fifo), "--nproc", "2"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"--config {fifo} is a pipe, which only one of the 2 processes" in proc.stderr
