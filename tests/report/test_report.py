"""The pictures of a run: plots, report.html (opened in a real browser), TensorBoard events, `cnnkit runs`.

One tiny run, trained once through the real CLI with --report --tensorboard --quiet, serves every test here.
"""

import base64
import io
import json
import os
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import cnnkit
from cnnkit.errors import UserError
from cnnkit.report.html import write_report
from cnnkit.report.predictions import predict_validation
from cnnkit.runs import latest_run, list_runs
from cnnkit.checkpoint import load_checkpoint
from tests.conftest import run_cli
from tests.report.browser import find_chromium, visit
from tests.test_cli import assert_one_line_error

EPOCHS = 2
SCALAR_TAGS = {"loss/train", "loss/val", "accuracy/train", "accuracy/val", "accuracy/val_top5", "learning_rate",
               "speed/images_per_s"}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("report") / "runs" / "tiny"
    proc = run_cli("train", "--num-samples", 256, "--epochs", EPOCHS, "--batch-size", 32, "--report", "--tensorboard",
                   "--quiet", "--out", out)
    assert proc.returncode == 0, proc.stderr
    return str(out), proc


def assert_picture(data: bytes, least=(100, 100)):
    with Image.open(io.BytesIO(data)) as img:
        assert img.format == "PNG"
        assert img.width >= least[0] and img.height >= least[1], img.size
        pixels = np.asarray(img.convert("RGB"), dtype=np.float32)
    assert pixels.std() > 10, "(nearly) constant picture"
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 16, "almost no distinct colours"


def test_quiet_train_prints_only_the_result(run):
    _, proc = run
    assert proc.stdout.count("\n") == 1 and proc.stdout.startswith("done: val acc"), proc.stdout
    assert "epoch 1/" not in proc.stdout + proc.stderr


def test_run_folder_holds_the_plots_and_the_report(run):
    folder, _ = run
    with open(os.path.join(folder, "config.json")) as f:
        assert json.load(f)["plots"] is True  # --report writes the plots, and the run's configuration says so
    assert sorted(os.listdir(os.path.join(folder, "plots"))) == ["confusion.png", "curves.png", "lr.png",
                                                                 "top_losses.png"]
    for name in os.listdir(os.path.join(folder, "plots")):
        with open(os.path.join(folder, "plots", name), "rb") as f:
            assert_picture(f.read(), least=(400, 250))
    assert os.path.isfile(os.path.join(folder, "report.html"))
    assert not [f for f in os.listdir(folder) if f.endswith(".tmp")]  # written atomically, nothing left over


def test_report_is_one_self_contained_file(run):
    folder, _ = run
    with open(os.path.join(folder, "report.html"), encoding="utf-8") as f:
        page = f.read()
    assert "Content-Security-Policy" in page and "<script" not in page
    # every resource is inline: no src/href that leaves the page
    links = re.findall(r'(?:src|href)="([^"]*)"', page)
    assert links and all(link.startswith(("data:image/png;base64,", "#")) for link in links), \
        [link[:60] for link in links if not link.startswith(("data:", "#"))]
    images = [link for link in links if link.startswith("data:")]
    assert len(images) >= 10  # curves, lr, confusion, top losses, CAMs, feature maps
    for uri in images:
        assert_picture(base64.b64decode(uri.split(",", 1)[1]), least=(32, 32))
    for section in ("metrics", "curves", "classes", "top-losses", "cam", "features", "model", "config"):
        assert f'id="{section}"' in page
    for text in ("Grad-CAM", "receptive field", "precision", "macro average", "simple_cnn", "star"):
        assert text in page
    # the "*" of a receptive field is explained as summary and rf explain it (it said "also sees every pixel through
    # a global operation", though simple_cnn's classifier reads a flattened map)
    assert "RF*: the layer sees every pixel of the 32x32 input" in page
    # the training time as the console's done line gives it, to a tenth of a second (it said "2 s" for 2.4)
    result = json.load(open(os.path.join(folder, "result.json")))
    assert re.search(rf">{result['train_time_s']:.1f} s<.*training time", page, re.S)


def need_chromium():
    if find_chromium() is None:
        message = "Chromium is not installed (apt-get install chromium; `make test` installs it)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)


def test_the_browser_check_sees_a_broken_page(tmp_path):
    # the check below must be able to fail: a missing image and a script error are both caught
    need_chromium()
    page = tmp_path / "broken.html"
    page.write_text('<!doctype html><body><p>x</p><img src="missing.png"><script>console.error("boom")</script>')
    errors = [e["text"] for e in visit("file://" + str(page)).errors()]
    assert any("ERR_FILE_NOT_FOUND" in e for e in errors) and "boom" in errors, errors


def test_report_opens_in_chromium_without_errors(run, tmp_path):
    need_chromium()
    folder, _ = run
    url = "file://" + os.path.abspath(os.path.join(folder, "report.html"))
    page = visit(url)
    assert page.errors() == [], page.errors()
    assert page.requests == [url]  # the page itself, nothing else
    with open(tmp_path / "report.png", "wb") as f:  # kept for a person to look at (pytest's tmp folder)
        f.write(page.screenshot)
    with Image.open(io.BytesIO(page.screenshot)) as shot:
        pixels = np.asarray(shot.convert("RGB"), dtype=np.float32)
    assert shot.width == 1280 and shot.height > 3000, shot.size  # the whole page, every section laid out
    assert pixels.std() > 20  # not blank
    colourful = np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max(axis=2) > 40
    assert colourful.mean() > 0.03  # the plots and pictures were decoded and painted, not just the text


def test_report_figures_agree_with_cnnkit_evaluate(run):
    folder, _ = run
    best = os.path.join(folder, "best.pt")
    pred = predict_validation(load_checkpoint(best), "cpu")
    ev = cnnkit.evaluate(best, device="cpu")
    assert pred.confusion().tolist() == ev.confusion_matrix
    assert pred.acc == pytest.approx(ev.acc) and pred.loss == pytest.approx(ev.loss, rel=1e-4)
    for mine, theirs in zip(pred.per_class(), ev.per_class):
        assert mine.name == theirs["class"] and mine.support == theirs["support"]
        assert mine.precision == pytest.approx(theirs["precision"]) and mine.recall == pytest.approx(theirs["recall"])
        assert mine.f1 == pytest.approx(theirs["f1"])
        if mine.precision is not None and mine.recall is not None:  # None: never predicted (0/0), or no images
            expected = 2 * mine.precision * mine.recall / (mine.precision + mine.recall) if mine.precision + mine.recall else 0
            assert mine.f1 == pytest.approx(expected)
    losses = pred.losses[pred.top_losses(5)]
    assert (losses[:-1] >= losses[1:]).all() and losses[0] == pred.losses.max()


def test_tensorboard_events_read_back(run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder, _ = run
    events = EventAccumulator(os.path.join(folder, "tensorboard"), size_guidance={"scalars": 0, "images": 0})
    events.Reload()
    tags = events.Tags()
    assert set(tags["scalars"]) == SCALAR_TAGS
    for tag in SCALAR_TAGS:
        assert [e.step for e in events.Scalars(tag)] == list(range(1, EPOCHS + 1)), tag
    metrics = [line.split(",") for line in open(os.path.join(folder, "metrics.csv")).read().splitlines()]
    val_acc = [float(row[metrics[0].index("val_acc")]) for row in metrics[1:]]
    assert [e.value for e in events.Scalars("accuracy/val")] == pytest.approx(val_acc)
    assert set(tags["images"]) == {"data/train_batch", "validation/confusion_matrix"}
    assert [e.step for e in events.Images("validation/confusion_matrix")] == list(range(1, EPOCHS + 1))
    assert tags["graph"]


def test_report_command_and_its_errors(run, tmp_path):
    folder, _ = run
    out = tmp_path / "again.html"
    proc = run_cli("report", folder, "--out", out, "--json")
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout)
    assert result["path"] == str(out) and out.stat().st_size == result["size_bytes"]
    assert_one_line_error(run_cli("report", tmp_path / "missing"), 2, "not a folder")
    empty = tmp_path / "not_a_run"
    empty.mkdir()
    with pytest.raises(UserError, match="no config.json"):
        write_report(str(empty))
    (empty / "config.json").write_text("{}")
    with pytest.raises(UserError, match="no best.pt"):
        write_report(str(empty))
    assert os.listdir(empty) == ["config.json"]  # nothing half-written
    # --out in a folder that does not exist yet: made, as export and embed make theirs
    assert write_report(folder, out=str(tmp_path / "new" / "report.html")).path == str(tmp_path / "new" / "report.html")
    (tmp_path / "a_file").write_text("")
    assert_one_line_error(run_cli("report", folder, "--out", tmp_path / "a_file" / "report.html"), 2,
                          f"cannot write --out {tmp_path / 'a_file' / 'report.html'}", "choose a path in a writable folder")


def test_runs_lists_the_run(run):
    folder, _ = run
    root = os.path.dirname(folder)
    proc = run_cli("runs", root)
    assert proc.returncode == 0, proc.stderr
    header, line = proc.stdout.strip().splitlines()
    assert header.split() == ["RUN", "MODEL", "DATA", "EPOCHS", "BEST", "ACC", "STARTED", "STATUS"]
    assert line.split()[:4] == [folder, "simple_cnn", "shapes", f"{EPOCHS}/{EPOCHS}"] and "finished" in line
    (listed,) = list_runs(root)
    result = json.load(open(os.path.join(folder, "result.json")))
    assert listed.best_val_acc == result["best_val_acc"] and listed.status == "finished"
    assert list_runs(folder) == [listed] and latest_run(root) == folder


def test_a_diverged_run_is_called_diverged_though_it_has_a_result(run, tmp_path):
    # A run that diverges writes result.json (its stop_reason says why) beside stop.json: neither `cnnkit runs`
    # nor the report may take the result for a finished run. Marked here on a copy of the tiny run.
    import shutil

    folder = str(tmp_path / "diverged")
    shutil.copytree(run[0], folder, ignore=shutil.ignore_patterns("report.html", "plots", "tensorboard"))
    message = "epoch 2: the loss became non-finite at batch 3 of this epoch (lr 0.1)"
    with open(os.path.join(folder, "result.json")) as f:
        result = {**json.load(f), "stop_reason": f"diverged: {message}"}
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump(result, f)
    with open(os.path.join(folder, "stop.json"), "w") as f:
        json.dump({"status": "diverged", "epoch": 2, "message": message}, f)
    assert list_runs(folder)[0].status == "diverged"
    report = write_report(folder)
    page = open(report.path).read()
    assert "diverged in epoch 2" in page and "finished" not in page
    assert report.sections[:2] == ["diverged", "metrics"] and "classes" in report.sections  # best.pt is kept
    assert f"<p>{message}</p>" in page


def test_the_runs_warnings_open_the_page_escaped(run, tmp_path):
    # result.json's warnings (broken images left out, too few validation images) reached the console of the one who
    # trained; the page someone else reads left them out. Marked here on a copy of the tiny run, which has none.
    import shutil

    with open(os.path.join(run[0], "result.json")) as f:
        result = json.load(f)
    with open(os.path.join(run[0], "report.html"), encoding="utf-8") as f:
        assert not result["warnings"] and 'id="warnings"' not in f.read()
    folder = str(tmp_path / "warned")
    shutil.copytree(run[0], folder, ignore=shutil.ignore_patterns("report.html", "plots", "tensorboard"))
    warned = ["skipped 1 broken image(s), listed in /data/<b>&</b>/bad_images.txt", "only 19 validation image(s)"]
    with open(os.path.join(folder, "result.json"), "w") as f:
        json.dump({**result, "warnings": warned}, f)
    report = write_report(folder, cam_images=1)
    page = open(report.path, encoding="utf-8").read()
    assert report.sections[:2] == ["warnings", "metrics"]
    assert ('<h2>Warnings</h2><ul class="warnings"><li>skipped 1 broken image(s), listed in '
            '/data/&lt;b&gt;&amp;&lt;/b&gt;/bad_images.txt</li><li>only 19 validation image(s)</li></ul>') in page
    assert "<b>" not in page and '<a href="#warnings">Warnings</a>' in page


def test_a_run_that_diverged_in_its_first_epoch_is_reported_without_a_model(tmp_path):
    # No epoch finished and no checkpoint was written, yet the steps' losses and why the run stopped are there:
    # bare `cnnkit report` (the newest run) shows them, and leaves out, naming why, what needs best.pt.
    import html

    from cnnkit.errors import NonFiniteLoss

    out = tmp_path / "runs" / "diverged"
    with pytest.raises(NonFiniteLoss):
        cnnkit.train(data="shapes", num_samples=256, batch_size=32, epochs=2, lr=1e4, schedule="constant",
                     progress=False, out=str(out))
    assert not [name for name in os.listdir(out) if name.endswith(".pt")]
    proc = run_cli("report", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[0].startswith(f"wrote {os.path.join('runs', 'diverged', 'report.html')}")
    assert "left out: confusion matrix, per-class metrics, top losses, Grad-CAM and feature maps: the run " \
           "diverged before its first epoch ended, so there is no best.pt" in proc.stdout
    page = (out / "report.html").read_text()
    stop = json.loads((out / "stop.json").read_text())
    assert "diverged in epoch 1" in page and f"<p>{html.escape(stop['message'])}</p>" in page
    assert sorted(os.listdir(out / "plots")) == ["curves.png", "lr.png"]
    report = write_report(str(out))
    assert report.sections == ["diverged", "metrics", "curves", "config"]
    from cnnkit.report.plots import _batches_per_epoch

    result = json.loads((out / "result.json").read_text())
    assert _batches_per_epoch(json.loads((out / "config.json").read_text()), result) == result["num_train"] // 32


def test_train_report_draws_a_run_that_diverged(tmp_path):
    from cnnkit.errors import NonFiniteLoss

    out = tmp_path / "run"
    with pytest.raises(NonFiniteLoss) as e:
        cnnkit.train(data="shapes", num_samples=256, batch_size=32, epochs=2, lr=1e4, schedule="constant",
                     progress=False, report=True, out=str(out))
    assert e.value.result.stop_reason == "diverged: " + str(e.value)  # the API's caller gets the result too
    page = (out / "report.html").read_text()
    assert "diverged in epoch 1" in page and (out / "plots" / "curves.png").exists()
    for uri in re.findall(r'src="data:image/png;base64,([^"]+)"', page):
        assert_picture(base64.b64decode(uri))


def test_a_blown_up_loss_is_drawn_on_a_log_scale_with_its_non_finite_step_marked():
    from cnnkit.report.plots import curves_figure

    steps = [(1, 1, 2.3), (1, 2, 7e12), (1, 3, float("nan"))]
    loss_axis = curves_figure([], steps).axes[0]
    assert loss_axis.get_yscale() == "log"
    marked = [line for line in loss_axis.get_lines() if line.get_label() == "non-finite loss (NaN or inf)"]
    assert len(marked) == 1 and list(marked[0].get_xdata()) == [1.0]
    # stopped at batch 3 of an epoch of 12: steps.csv alone would put it at the epoch's end
    marked = [line for line in curves_figure([], steps, steps_per_epoch=12).axes[0].get_lines()
              if line.get_label() == "non-finite loss (NaN or inf)"]
    assert list(marked[0].get_xdata()) == [0.25]
    finished = curves_figure([{"epoch": 1, "train_loss": 2.0, "val_loss": 2.1, "train_acc": 0.3, "val_acc": 0.3}],
                             [(1, 1, 2.3), (1, 2, 2.0)]).axes[0]
    assert finished.get_yscale() == "linear" and finished.get_ylim()[0] == 0


def test_tensorboard_missing_is_one_line_naming_the_extra(tmp_path):
    # a tensorboard package that cannot be imported stands in for one that is not installed
    fake = tmp_path / "site" / "tensorboard"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('No module named tensorboard')\n")
    proc = run_cli("train", "--tensorboard", "--out", tmp_path / "run",
                   env={"PYTHONPATH": f"{tmp_path / 'site'}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "pip install 'cnnkit[tensorboard]'" in proc.stderr
    assert not (tmp_path / "run").exists()


def test_learning_rate_plot_recomputes_what_the_run_recorded(run):
    # lr.png draws every step's rate from the configuration; at each epoch's start it must equal metrics.csv's
    from cnnkit.report.plots import read_json, read_metrics, read_steps, scheduled_lr

    folder, _ = run
    steps = read_steps(folder)
    per_epoch = max(s for _, s, _ in steps)
    xs, ys = scheduled_lr(read_json(folder, "config.json"), read_json(folder, "stages.json"), per_epoch, len(steps))
    assert len(xs) == len(steps) == EPOCHS * per_epoch
    at_start = {round(x): y for x, y in zip(xs, ys) if x == int(x)}
    assert [at_start[int(r["epoch"]) - 1] for r in read_metrics(folder)] == pytest.approx([r["lr"] for r in read_metrics(folder)])


def test_top5_is_shown_only_with_more_than_5_classes(run, tmp_path):
    from tests.conftest import write_image_folder

    folder, _ = run  # the shapes data: 10 classes, where top-5 says something
    with open(os.path.join(folder, "report.html"), encoding="utf-8") as f:
        assert "final top-5 accuracy" in f.read()
    text = run_cli("eval", folder)
    assert text.returncode == 0 and "top-5 " in text.stdout, text.stdout + text.stderr
    header = next(line for line in text.stdout.splitlines() if line.startswith("true \\ pred"))
    assert header.split()[3:] == load_checkpoint(os.path.join(folder, "best.pt")).classes  # in full: "triangle"

    four = write_image_folder(str(tmp_path / "four"), n_per_class=8, size=16)  # with 5 classes or fewer top-5 is 1
    out = tmp_path / "four-run"  # trained through the API: the module's run checks `cnnkit train --report`
    cnnkit.train(data=four, epochs=1, batch_size=16, report=True, progress=False, out=str(out), log=io.StringIO())
    with open(out / "report.html", encoding="utf-8") as f:
        page = f.read()
    assert "top-5" not in page and "final training accuracy" in page
    text = run_cli("eval", out)
    assert text.returncode == 0 and " acc " in text.stdout and "top-5" not in text.stdout, text.stdout


def assert_text_inside(fig):
    """Every piece of text of the figure lies within its edges (matplotlib clips what does not)."""
    from matplotlib.text import Text

    from cnnkit.report.plots import DPI

    fig.savefig(io.BytesIO(), format="png", dpi=DPI)  # laid out as the PNG file is
    width, height = fig.bbox.width, fig.bbox.height
    for text in fig.findobj(Text):
        if text.get_visible() and text.get_text():
            box = text.get_window_extent()
            assert box.x0 >= 0 and box.x1 <= width and box.y0 >= 0 and box.y1 <= height, \
                (text.get_text(), box.bounds, (width, height))


@pytest.mark.parametrize("classes", [["airplane", "automobile", "bird", "cat"], ["a", "b"],
                                     [f"class number {i}" for i in range(12)]])
def test_confusion_plot_title_fits_the_picture(classes):
    from cnnkit.report.plots import confusion_figure

    k = len(classes)
    fig = confusion_figure(np.eye(k, dtype=int) * 3, classes,
                           "Confusion matrix of best.pt on 24 validation images (acc 0.292)")
    assert_text_inside(fig)


def test_damaged_run_files_are_named_by_report_and_listed_by_runs(run, tmp_path):
    # A file cut short (a full disk, a killed copy) or edited by hand: report names it and what is wrong with it,
    # and `cnnkit runs` lists the run as damaged instead of leaving it out or calling it stopped.
    import shutil

    root = tmp_path / "runs"
    damage = {
        "config.json": lambda text: text[: text.index('"model"') + 3],  # in a string: where it is cut, is known
        "result.json": lambda text: text[: len(text) // 2],
        "metrics.csv": lambda text: "epoch,lr,train_loss\n1,0.1,\n",
    }
    for name, cut in damage.items():
        folder = root / name.replace(".", "_")
        shutil.copytree(run[0], folder, ignore=shutil.ignore_patterns("report.html", "plots", "tensorboard"))
        (folder / name).write_text(cut((folder / name).read_text()))
    with pytest.raises(UserError, match=r"config.json is damaged: not valid JSON \(.* \(cut short\?\)\); restore it"):
        write_report(str(root / "config_json"))
    with pytest.raises(UserError, match=r"result.json is damaged: not valid JSON .*; delete it to report the run as"):
        write_report(str(root / "result_json"))
    with pytest.raises(UserError, match="metrics.csv is damaged: its header has no train_acc, val_loss, val_acc "
                                        "columns; delete it"):
        write_report(str(root / "metrics_csv"))
    metrics = root / "metrics_csv" / "metrics.csv"
    metrics.write_text("epoch,train_loss,train_acc,val_loss,val_acc\n1,2.3,0.1\n")
    with pytest.raises(UserError, match="metrics.csv is damaged: line 2 has 3 cells, its header 5"):
        write_report(str(root / "metrics_csv"))
    assert_one_line_error(run_cli("report", root / "config_json"), 1, f"{root / 'config_json' / 'config.json'} "
                          "is damaged: not valid JSON")
    proc = run_cli("runs", root)
    assert proc.returncode == 0, proc.stderr
    status = {line.split()[0]: line.split("  ")[-1].strip() for line in proc.stdout.splitlines()[1:]}
    assert status == {str(root / "config_json"): "damaged: config.json", str(root / "metrics_csv"): "damaged: metrics.csv",
                      str(root / "result_json"): "damaged: result.json"}, proc.stdout


def test_a_loss_column_left_empty_does_not_break_the_curves(run, tmp_path):
    import shutil

    folder = tmp_path / "empty_losses"
    shutil.copytree(run[0], folder, ignore=shutil.ignore_patterns("report.html", "plots", "tensorboard"))
    lines = (folder / "metrics.csv").read_text().splitlines()
    header = lines[0].split(",")
    rows = [dict(zip(header, line.split(","))) for line in lines[1:]]
    for row in rows:
        row["train_loss"] = row["val_loss"] = ""
    (folder / "metrics.csv").write_text("\n".join([lines[0], *(",".join(r[h] for h in header) for r in rows)]) + "\n")
    from cnnkit.report.plots import write_plots

    assert sorted(write_plots(str(folder))) == ["confusion", "curves", "lr", "top_losses"]


def test_a_steps_file_being_appended_is_read_up_to_its_last_whole_line(tmp_path):
    # a report made while the run writes an epoch's steps: the line being written is no damage
    from cnnkit.report.plots import read_steps

    (tmp_path / "steps.csv").write_text("epoch,step,loss,lr\n1,1,2.3,0.1\n1,2,2.2,0.")
    assert read_steps(str(tmp_path)) == [(1, 1, 2.3)]
    (tmp_path / "steps.csv").write_text("epoch,step,loss,lr\n1,1,2.3,0.1\n1,x,2.2,0.1\n")
    with pytest.raises(UserError, match="steps.csv is damaged: line 3 is not epoch,step,loss"):
        read_steps(str(tmp_path))


def test_a_run_folder_that_cannot_take_the_plots_is_one_line_before_the_work(run, tmp_path):
    # the plots go into RUN/plots whatever --out says: a run folder that cannot take them (read-only, or here a
    # file called plots in the way, which fails the same for root) was an internal error after the predictions
    folder, _ = run
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("config.json", "result.json", "metrics.csv", "steps.csv", "best.pt"):
        (copy / name).write_bytes((Path(folder) / name).read_bytes())
    (copy / "plots").write_text("")
    out = tmp_path / "page.html"
    assert_one_line_error(run_cli("report", copy, "--out", out), 2, f"cannot write the plots into {copy / 'plots'}",
                          "copy the run folder somewhere writable")
    assert not out.exists()


def test_a_staged_runs_configuration_shows_the_epochs_and_rates_its_stages_used(tmp_path):
    # The Configuration table showed "epochs 5" and "lr 0.1", given beside --stages and never used, and a staged
    # run without them showed the defaults; the stages trained 1 + 1 epochs at 1e-3 then 1e-4.
    options = dict(data="shapes", num_samples=64, batch_size=32, progress=False, model="cnn_bn", precision="fp32",
                   stages="head:1@1e-3,all:1@1e-4")
    for name, given in (("given", dict(epochs=5, lr=0.1)), ("defaults", {})):
        cnnkit.train(**options, **given, out=str(tmp_path / name), log=io.StringIO())
        write_report(str(tmp_path / name), cam_images=1)
        page = (tmp_path / name / "report.html").read_text(encoding="utf-8")
        config = page[page.index('id="config"'):]
        cells = dict(re.findall(r"<td[^>]*>([a-z_]+)</td>\s*<td[^>]*>(.*?)</td>", config))
        assert cells["epochs"] == "2 (--stages: 1 + 1)" and cells["lr"] == "0.001, 0.0001 (--stages)", cells


def test_a_staged_runs_configuration_marks_the_stages_it_did_not_run():
    # A smoke run (1 epoch a stage) that stopped after its second stage showed "10 (--stages: 3 + 5 + 2)" and all
    # three rates, from the --stages string, as if every stage had run as written. stages.json holds the stages a
    # run began, as the training loop records them (_stage_record's fields).
    from cnnkit.report.html import _config_section, _stage_plan

    config = {"stages": "head:3@1e-3,all:5@1e-4,layer4+fc:2@1e-5", "smoke": True, "epochs": 30, "lr": 0.1}
    began = [{"stage": 1, "first_epoch": 1, "modules": ["head"], "epochs": 1, "lr": 0.001},
             {"stage": 2, "first_epoch": 2, "modules": ["all"], "epochs": 1, "lr": 0.0001}]
    cells = dict(re.findall(r"<td[^>]*>([a-z_]+)</td>\s*<td[^>]*>(.*?)</td>",
                            _config_section(config, _stage_plan(config, began))))
    assert cells["epochs"] == "3 (--stages: 1 + 1 + 1; stage 3 not run)"
    assert cells["lr"] == "0.001, 0.0001, 1e-05 (--stages; stage 3 not run)"
    assert cells["stages"] == ("head:3@1e-3,all:5@1e-4,layer4+fc:2@1e-5 (1. head: 1 epoch at lr 0.001; 2. all: 1 epoch "
                               "at lr 0.0001; 3. layer4+fc: 1 epoch at lr 1e-05, not run)")
    cells = dict(re.findall(r"<td[^>]*>([a-z_]+)</td>\s*<td[^>]*>(.*?)</td>",  # not a smoke run: the plan as written
                            _config_section({**config, "smoke": False}, _stage_plan({**config, "smoke": False}, []))))
    assert cells["epochs"] == "10 (--stages: 3 + 5 + 2; stages 1, 2, 3 not run)"
