import io
import json

import pytest
import torch

import cnnkit
from cnnkit.errors import WARNING, UserError
from cnnkit.train.lr_find import (EDGE_METHOD, EDGE_SHARE, FLAT_METHOD, MAX_PASSES, MIN_STEPS, TENTH_METHOD,
                                  _beyond, _flat_message, _no_blowup_message, default_smoothing, default_steps, suggest)
from cnnkit.training import lr_find
from tests.conftest import run_cli
from tests.test_cli import assert_one_line_error

TINY = dict(data="shapes", num_samples=128, batch_size=32, progress=False)


def test_range_test_sweeps_exponentially_and_stops_when_the_loss_blows_up(tmp_path):
    # convnet (BatchNorm) learns within a few dozen steps even of tiny data; lr up to 1e3 makes it blow up
    r = lr_find(model="convnet", **TINY, start_lr=1e-3, end_lr=1e3, steps=80, out=str(tmp_path))
    assert 10 <= r.steps < 80 and r.diverged
    assert len(r.lrs) == len(r.losses) == len(r.smoothed) == r.steps
    ratios = [b / a for a, b in zip(r.lrs, r.lrs[1:])]
    assert r.lrs[0] == pytest.approx(1e-3) and max(ratios) == pytest.approx(min(ratios))  # geometric
    assert ratios[0] == pytest.approx((1e3 / 1e-3) ** (1 / 79))
    assert r.smoothed[-1] > 4 * min(r.smoothed)
    assert r.method == EDGE_METHOD and r.suggestion == pytest.approx(r.edge_lr / 3)
    assert r.edge_lr >= r.min_loss_lr >= r.steepest_lr > r.lrs[0]
    assert (tmp_path / "lr_find.png").stat().st_size > 10_000 and r.plot == str(tmp_path / "lr_find.png")


def test_default_steps_are_at_most_a_few_passes_over_a_small_data_set_and_enough_for_a_curve():
    assert [default_steps(b) for b in (1, 12, 13, 25, 50, 51, 10_000)] == [50, 50, 52, 100, 200, 200, 200]
    assert (MAX_PASSES, MIN_STEPS) == (4, 50)
    # the moving average remembers a quarter of the sweep: 0.98 from 200 steps up, as the rules were measured with
    assert [default_smoothing(s) for s in (50, 100, 200, 1000)] == pytest.approx([0.92, 0.96, 0.98, 0.98])
    text = " ".join(run_cli("lr-find", "--help").stdout.split())
    assert f"(default: 200, but at most {MAX_PASSES} passes over the training images and at least {MIN_STEPS} steps)" \
        in text


def test_a_small_data_set_gets_fewer_steps_and_about_the_same_suggestion():
    # 128 images of 32: 4 batches a pass, so 50 steps (the fewest for a curve; 12.5 passes) instead of 200
    log = io.StringIO()
    short = lr_find(**dict(TINY, model="linear"), log=log)
    assert ("up to 50 steps of 32 images (12.5 passes over the 128 training images: not the default 200 steps, 50.0 "
            "passes that would mostly measure how well the model memorises them, nor fewer than 50, which a "
            "readable curve needs; --steps N to choose), lr 1e-06 -> 10") in log.getvalue(), log.getvalue()
    assert short.steps <= 50 and short.method == EDGE_METHOD
    # --steps is taken as given, and says how many passes it makes; the short sweep's suggestion is about the same
    # (the linear model's valley ends at 0.019 there and at 0.032 in 200 steps, seeds 0 and 1 alike)
    log = io.StringIO()
    full = lr_find(**dict(TINY, model="linear"), steps=200, log=log)
    assert "up to 200 steps of 32 images (50.0 passes over the 128 training images), lr" in log.getvalue()
    assert full.steps > 50 and full.method == EDGE_METHOD
    assert full.suggestion / 3 < short.suggestion < full.suggestion * 3, (short.suggestion, full.suggestion)
    # 640 images: 20 batches a pass, so 4 passes, 80 steps
    log = io.StringIO()
    assert lr_find(**dict(TINY, model="linear", num_samples=640), log=log).steps <= 80
    assert ("up to 80 steps of 32 images (4.0 passes over the 640 training images: not the default 200 steps, 10.0 "
            "passes that would mostly measure how well the model memorises them; --steps N to choose)"
            ) in log.getvalue()


def test_suggestion_is_a_third_of_the_valleys_end_for_one_cycle_and_a_tenth_of_it_otherwise():
    # The end itself was too close to divergence: simple_cnn on 3 CIFAR-10 classes went NaN there (issue 24)
    lrs = [10 ** (-4 + i / 10) for i in range(50)]  # 1e-4 .. 8e0
    # settles at 2.3, falls to a valley from step 20 to 34 (lowest, 1.5, at step 25), then climbs
    smoothed = [2.3] * 10 + [2.3 - 0.08 * i for i in range(10)] + [1.6, 1.55, 1.55, 1.52, 1.51, 1.5, 1.52, 1.55,
                                                                    1.54, 1.57, 1.58, 1.55, 1.56, 1.57, 1.58]
    smoothed += [1.8 + 0.2 * i for i in range(len(lrs) - len(smoothed))]
    # the valley ends where the loss is more than a tenth of the 0.8 descent (0.08) above the minimum: 1.58
    suggestion, method, edge, low = suggest(lrs, smoothed, "onecycle", 0.05)
    assert (low, edge, method) == (25, 34, EDGE_METHOD) and suggestion == pytest.approx(lrs[34] / 3)
    assert smoothed[edge] <= smoothed[low] + EDGE_SHARE * (smoothed[5] - smoothed[low]) < smoothed[edge + 1]
    assert suggest(lrs, smoothed, "cosine", 0.05)[:2] == (pytest.approx(lrs[34] / 10), TENTH_METHOD)
    flat = [2.3 + 0.001 * (i % 3) for i in range(50)]  # noise only: the default, whatever the noise's minimum
    assert suggest(lrs, flat, "onecycle", 0.05)[:2] == (0.05, FLAT_METHOD)


def test_flat_curve_keeps_the_default_learning_rate():
    # lr never above 1e-6: the loss cannot move, so the minimum is noise and the default is kept
    log = io.StringIO()
    r = lr_find(model="cnn_bn", **TINY, start_lr=1e-8, end_lr=1e-6, steps=20, log=log)
    assert r.method == FLAT_METHOD and r.suggestion == 0.05 and not r.diverged and r.blowup_lr is None
    # The sweep ended at 1e-6 without a blow-up: not a plateau the network is stuck on, but rates too low to tell.
    text = log.getvalue()
    assert "the loss neither fell nor blew up by lr 1e-06, where the range test ended" in text, text
    assert "raise --end-lr); keeping the sgd default 0.05" in text and "plateau" not in text


def test_a_curve_that_rose_short_of_the_blow_up_test_says_what_it_did():
    # convnet on 128 shapes images: the smoothed loss bottoms out near lr 0.02 and climbs back above where it
    # started, but not to 4x its minimum, where the test stops early (with 10 classes the loss starts near
    # ln(10) = 2.3): the minimum lies inside the test, and the message says so instead of "raise --end-lr".
    log = io.StringIO()
    r = lr_find(model="convnet", **TINY, log=log)
    assert not r.diverged and r.method == EDGE_METHOD
    low, peak = r.smoothed.index(min(r.smoothed)), max(r.smoothed[r.smoothed.index(min(r.smoothed)):])
    assert r.lrs[low] == r.min_loss_lr and peak > r.smoothed[len(r.lrs) // 10]  # it did rise, above its start
    text = log.getvalue()
    assert "did not blow up" not in text and "--end-lr" not in text, text
    assert (f"the smoothed loss fell to its minimum {min(r.smoothed):.3g} at lr {r.min_loss_lr:.3g}, then rose to "
            f"{peak:.3g} by lr ") in text
    assert (f", so the valley ends inside the test, at lr {r.edge_lr:.3g}; the test ran on to lr {r.lrs[-1]:.3g} "
            "because it stops early only once the loss passes 4x its minimum") in text


def test_a_flat_curve_that_rose_without_blowing_up_does_not_send_the_user_past_the_end():
    # simple_cnn on 108 images of 3 CIFAR-10 classes: the loss sat at ln(3) = 1.1 up to lr 0.19, then rose to 1.36,
    # short of 4x its minimum; the message said it "neither fell nor blew up by lr 10 ... (raise --end-lr)"
    lrs = [10 ** (-6 + i / 7) for i in range(50)]  # 1e-6 .. 10
    smoothed = [1.1 + 0.002 * (i % 3) for i in range(37)] + [1.1 + 0.02 * i for i in range(1, 14)]
    assert suggest(lrs, smoothed, "onecycle", 0.05)[:2] == (0.05, FLAT_METHOD)
    rise = next(i for i, v in enumerate(smoothed) if v > 1.05 * smoothed[5])
    text = _flat_message(lrs, smoothed, 4.0, _beyond(10, False), "keeping the sgd default 0.05")
    assert text == (f"cnnkit: the loss did not fall at any rate of the range test: the smoothed loss stayed near 1.1 "
                    f"up to lr {lrs[rise - 1]:.3g}, then rose to 1.36 by lr 10, so the curve cannot rank the rates "
                    "(the test ran on to lr 10 because it stops early only once the loss passes 4x its minimum); "
                    "keeping the sgd default 0.05")
    flat = [1.1 + 0.002 * (i % 3) for i in range(50)]  # never moved: the rates that move it may lie beyond
    assert _flat_message(lrs, flat, 4.0, _beyond(10, False), "keeping the sgd default 0.05") == (
        "cnnkit: the loss neither fell nor blew up by lr 10, where the range test ended: the smoothed loss went from "
        "1.1 to 1.1 (-0.2%), within the 5% the test reads as flat; the rates that move it may lie beyond "
        "(raise --end-lr); keeping the sgd default 0.05")


def test_a_flat_curve_that_ended_a_few_percent_higher_says_by_how_much():
    # simple_cnn on shapes: the smoothed loss ended 4% above its start, short of the 5% that counts as a rise, and
    # the message said only that it "neither fell nor blew up", which read as a loss that never moved
    lrs = [10 ** (-6 + i / 7) for i in range(50)]
    smoothed = [2.3] * 40 + [2.3 + 0.0092 * i for i in range(1, 11)]  # 2.3 -> 2.392, +4.0%
    assert suggest(lrs, smoothed, "onecycle", 0.05)[:2] == (0.05, FLAT_METHOD)
    text = _flat_message(lrs, smoothed, 4.0, _beyond(10, False), "keeping the sgd default 0.05")
    assert "the loss neither fell nor blew up by lr 10" in text
    assert "the smoothed loss went from 2.3 to 2.39 (+4.0%), within the 5% the test reads as flat" in text, text


def test_a_curve_still_in_its_valley_says_how_to_sweep_further_in_lr_find_and_in_train():
    lrs = [10 ** (-4 + i / 10) for i in range(50)]
    smoothed = [2.3] * 10 + [2.3 - 0.05 * i for i in range(20)] + [1.3 + 0.001 * (i % 2) for i in range(20)]
    _, _, edge, low = suggest(lrs, smoothed, "onecycle", 0.05)
    assert edge == len(lrs) - 1  # the valley had not ended where the test did
    assert _no_blowup_message(lrs, smoothed, low, edge, 4.0, _beyond(10, False)) == (
        f"cnnkit: the loss did not blow up by lr {lrs[-1]:.3g}; the minimum may lie beyond it (raise --end-lr)")
    # train --lr auto has no --end-lr: its message names the command that has
    assert "--end-lr" not in run_cli("train", "--help").stdout
    assert _no_blowup_message(lrs, smoothed, low, edge, 4.0, _beyond(10, True)).endswith(
        "(run cnnkit lr-find with this run's options and --end-lr 100 to see further)")
    log = io.StringIO()  # the flat curve's message too, as train's range test prints it
    lr_find(model="cnn_bn", **TINY, start_lr=1e-8, end_lr=1e-6, steps=20, log=log, for_train=True)
    assert ("may lie beyond (run cnnkit lr-find with this run's options and --end-lr 1e-05 to see further); keeping "
            "the sgd default 0.05") in log.getvalue(), log.getvalue()


def test_a_flat_curve_that_blew_up_below_the_default_suggests_a_third_of_that_rate():
    # simple_cnn on its plateau with Muon, whose default (0.24) is tuned for fastnet: the loss blows up first
    log = io.StringIO()
    r = lr_find(model="simple_cnn", optimizer="muon", **dict(TINY, num_samples=64), start_lr=1e-2, end_lr=100,
                steps=40, log=log)
    assert r.diverged and r.blowup_lr < 3 * 0.24
    assert r.method == "default: flat curve, capped at blow-up/3" and r.suggestion == pytest.approx(r.blowup_lr / 3)
    text = log.getvalue()
    assert (f"the muon default 0.24 capped at {r.suggestion:.3g}, a third of the {r.blowup_lr:.3g} at which the "
            "loss blew up") in text
    # the message is about this model and data, and simple_cnn has no BatchNorm: the advice to use it is given
    assert "simple_cnn sat on its starting plateau on shapes (loss about " in text and ") until it blew up" in text
    assert "a longer sweep would not help; networks with BatchNorm" in text


def test_the_suggestion_stays_below_the_rate_where_the_loss_blew_up():
    # A flat curve keeps the optimizer's default, which knows nothing of the network: simple_cnn with Muon (default
    # 0.24) on 128 shapes images sat flat and blew up at 0.108. Synthetic curves here: the rule, not a network.
    lrs = [10 ** (-4 + i / 10) for i in range(50)]  # 1e-4 .. 8e0
    flat = [2.3 + 0.001 * (i % 3) for i in range(50)]
    suggestion, method, _, _ = suggest(lrs, flat, "onecycle", 0.24, blowup_lr=0.108)
    assert suggestion == pytest.approx(0.036) and method == "default: flat curve, capped at blow-up/3"
    assert suggest(lrs, flat, "cosine", 0.24, blowup_lr=0.108)[:2] == (pytest.approx(0.0108),
                                                                        "default: flat curve, capped at blow-up/10")
    assert suggest(lrs, flat, "onecycle", 0.05, blowup_lr=0.5)[:2] == (0.05, FLAT_METHOD)  # well below: kept
    # a valley's edge lies below where the test stopped, so its third is below the cap already
    smoothed = [2.3] * 10 + [2.3 - 0.08 * i for i in range(10)] + [1.5] * 15 + [1.8 + 0.5 * i for i in range(15)]
    suggestion, method, edge, _ = suggest(lrs, smoothed, "onecycle", 0.05, blowup_lr=lrs[-1])
    assert method == EDGE_METHOD and suggestion == pytest.approx(lrs[edge] / 3)


def test_auto_lr_trains_exactly_as_with_the_suggested_rate(tmp_path):
    common = dict(TINY, model="linear", epochs=1, device="cpu")  # the cheapest model: the test is about plumbing
    auto = cnnkit.train(**common, lr="auto", out=str(tmp_path / "auto"))
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    found = json.loads((tmp_path / "auto" / "lr_find.json").read_text())
    assert config["lr"] == found["suggestion"] and found["method"] in (EDGE_METHOD, FLAT_METHOD)
    assert "lr_find" not in config  # config.json stays a file that --config replays
    assert (tmp_path / "auto" / "lr_find.png").exists() and found["plot"] == str(tmp_path / "auto" / "lr_find.png")
    fixed = cnnkit.train(**common, lr=found["suggestion"], out=str(tmp_path / "fixed"))
    # the range test ran on its own model and the generators were re-seeded: the same run, bit for bit
    a = torch.load(tmp_path / "auto" / "last.pt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "fixed" / "last.pt", weights_only=True)["state_dict"]
    assert all(torch.equal(a[k], b[k]) for k in a) and auto.val_loss == fixed.val_loss


def test_lr_find_command_writes_plot_and_figures_into_the_out_folder(tmp_path):
    out = tmp_path / "runs" / "lrf"  # a folder, as train's --out, made if missing
    proc = run_cli("lr-find", "--model", "linear", "--num-samples", 128, "--batch-size", 32, "--steps", 30,
                   "--start-lr", "1e-4", "--end-lr", "1e3", "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["plot"] == str(out / "lr_find.png") and (out / "lr_find.png").exists() and result["suggestion"] > 0
    assert json.loads((out / "lr_find.json").read_text()) == result
    assert "range test" in proc.stderr  # the log goes to stderr with --json, the result alone to stdout


def test_lr_find_out_names_a_folder_not_a_file(tmp_path):
    assert_one_line_error(run_cli("lr-find", "--out", tmp_path / "lr.png"), 2, "--out", "folder", str(tmp_path / "lr"))
    (tmp_path / "taken").write_text("")
    assert_one_line_error(run_cli("lr-find", "--out", tmp_path / "taken"), 2, "in the way")


def test_a_failed_lr_find_leaves_no_empty_out_folder(tmp_path):
    # the folder was made before the data and the model: an unknown model, a data folder without images or a
    # Ctrl-C in the start-up left an empty --out behind
    empty = tmp_path / "no_images"
    empty.mkdir()
    assert_one_line_error(run_cli("lr-find", "--model", "nope", "--out", tmp_path / "lrf" / "a"), 2, "unknown model")
    assert_one_line_error(run_cli("lr-find", "--data", empty, "--out", tmp_path / "lrf" / "b"), 2, "is empty")
    assert not (tmp_path / "lrf").exists()


@pytest.mark.parametrize("options, words", [
    (dict(steps=3), "at least 10 steps"),
    (dict(start_lr=1.0, end_lr=0.1), "start lr < end lr"),
    (dict(out="x.png"), "names a folder"),
    (dict(stages="fc:1@0.1"), "--stages"),
])
def test_range_test_rejects_bad_settings_before_any_work(options, words):
    with pytest.raises(UserError, match=words):
        lr_find(**TINY, **options)


@pytest.mark.parametrize("args, words", [
    (["--lr", "auto", "--stages", "fc:1@0.1"], ["--lr auto", "--stages"]),
    (["--lr", "fast"], ["--lr", "not a number"]),
])
def test_train_lr_usage_errors(tmp_path, args, words):
    assert_one_line_error(run_cli("train", *args, cwd=tmp_path), 2, *words)
    assert not (tmp_path / "runs").exists()


def test_library_rejects_a_learning_rate_that_is_neither_a_number_nor_auto():
    with pytest.raises(UserError, match="positive or 'auto'"):
        cnnkit.train(lr="fast", **TINY)


def test_a_flat_curves_suggestion_line_names_no_valley(tmp_path):
    # "the loss neither fell ..." beside "the smoothed loss is lowest at 2e-08, its valley ends at 2e-08": a flat
    # curve's lowest point is noise, and it has no valley
    proc = run_cli("lr-find", "--model", "cnn_bn", "--num-samples", 128, "--batch-size", 32, "--steps", 20,
                   "--start-lr", "1e-8", "--end-lr", "1e-6", "--out", tmp_path / "lrf")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("suggested learning rate"))
    assert line == "suggested learning rate: 0.05 (default: flat curve); 20 steps", line
    assert "valley" not in line


def test_lr_find_writes_into_a_new_folder_under_runs_and_names_both_files(tmp_path):
    # By default it wrote lr_find.png and lr_find.json into the current folder, each test over the last one's, and
    # named the curve alone ("curve in ./lr_find.png")
    import os

    args = ("lr-find", "--model", "linear", "--num-samples", 64, "--batch-size", 32, "--steps", 10, "--quiet")
    first, second = run_cli(*args, cwd=tmp_path), run_cli(*args, cwd=tmp_path)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    assert not (tmp_path / "lr_find.png").exists() and not (tmp_path / "lr_find.json").exists()
    folders = sorted(os.listdir(tmp_path / "runs"))
    assert len(folders) == 2 and all(f.endswith(("-lr_find", "-lr_find-2")) for f in folders), folders
    for proc in (first, second):
        wrote = [line for line in proc.stdout.splitlines() if line.startswith("wrote ")]
        assert len(wrote) == 1, proc.stdout
        folder = wrote[0].split()[1].rsplit("/", 1)[0]
        assert wrote[0] == f"wrote {folder}/lr_find.png (the curve) and {folder}/lr_find.json (the figures)"
        assert (tmp_path / folder / "lr_find.png").is_file() and (tmp_path / folder / "lr_find.json").is_file()
        assert folder.startswith("runs/") and os.path.basename(folder) in folders
    # --out . as before: the files in the current folder, named so
    proc = run_cli(*args, "--out", ".", cwd=tmp_path)
    assert "wrote ./lr_find.png (the curve) and ./lr_find.json (the figures)" in proc.stdout.splitlines(), proc.stdout
    assert (tmp_path / "lr_find.json").is_file()


def test_train_lr_auto_prints_the_set_up_notes_once(tmp_path):
    # the range test builds the run as train does, and printed its notes too: each came twice
    log = io.StringIO()
    cnnkit.train(model="linear", data="shapes", num_samples=160, val_split=0.2, batch_size=64, epochs=1, lr="auto",
                 log=log, progress=False, out=str(tmp_path / "run"))
    assert log.getvalue().count("batch(es) an epoch") == 1, log.getvalue()


def test_lr_find_returns_the_warnings_its_log_showed():
    # as TrainResult.warnings: a Python caller gets them as data, each as its log line after the prefix
    log = io.StringIO()
    r = cnnkit.lr_find(model="simple_cnn", freeze="backbone", num_samples=64, batch_size=16, steps=10, threads=1,
                       log=log, progress=False)
    shown = [line[len(WARNING):] for line in log.getvalue().splitlines() if line.startswith(WARNING)]
    assert r.warnings == shown and len(shown) == 1 and shown[0].startswith("--freeze backbone keeps the other layers")


def test_lr_find_json_and_lr_find_json_carry_the_data_warnings_as_train_does(tmp_path, image_folder):
    # `train --json` and result.json carried the data's warnings (a file beside the class folders, a tiny
    # validation split); `lr-find` neither showed them (its run skipped the data check) nor put them in its JSON
    (tmp_path / "images" / "stray.png").write_bytes(b"")
    out = tmp_path / "lrf"
    proc = run_cli("lr-find", "--model", "linear", "--data", image_folder, "--batch-size", 8, "--steps", 12,
                   "--threads", 1, "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert json.loads((out / "lr_find.json").read_text()) == result  # one record, on stdout and in the folder
    trained = json.loads(run_cli("train", "--model", "linear", "--data", image_folder, "--batch-size", 8,
                                 "--epochs", 1, "--threads", 1, "--out", tmp_path / "run", "--json").stdout)
    assert result["warnings"] == trained["warnings"] and len(result["warnings"]) == 2, result["warnings"]
    assert "stray.png" in result["warnings"][0] and "validation image(s)" in result["warnings"][1]
    assert [line[len(WARNING):] for line in proc.stderr.splitlines() if line.startswith(WARNING)] == result["warnings"]
    # as train's, --no-check-data skips them, the folder's own too (the check is what shows those)
    proc = run_cli("lr-find", "--model", "linear", "--data", image_folder, "--batch-size", 8, "--steps", 12,
                   "--threads", 1, "--out", out, "--json", "--no-check-data")
    assert proc.returncode == 0 and json.loads(proc.stdout)["warnings"] == [], proc.stderr


def test_lr_find_warns_of_the_broken_images_it_skipped_as_train_does(tmp_path, image_folder):
    # train warned "skipped N broken image(s)"; lr-find left them out of its curve without a word
    (tmp_path / "images" / "circle" / "empty.jpg").write_bytes(b"")
    (tmp_path / "images" / "square" / "text.jpg").write_text("not an image\n")
    log = io.StringIO()
    r = cnnkit.lr_find(model="linear", data=image_folder, batch_size=8, steps=10, threads=1, check_data=False,
                       log=log, progress=False)
    shown = [line[len(WARNING):] for line in log.getvalue().splitlines() if line.startswith(WARNING)]
    assert r.warnings == shown and len(shown) == 1, shown
    assert shown[0].startswith(f"left out 2 broken image(s) of {image_folder} (`cnnkit check-data {image_folder}` "
                               "lists them all): cannot decode image ") and "(and 1 more)" in shown[0]
