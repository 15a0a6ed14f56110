"""``report.html``: one self-contained page about a run — what was trained, how it went, where it fails and
what it looks at.

Every picture is embedded as a base64 PNG and the styles are inline; a Content-Security-Policy forbids
everything else (no scripts, no fonts, no network requests), so the file can be mailed, archived or opened
offline and shows the same. It is written to a temporary file and renamed, so a browser never reads half a
report. The figures come from ``best.pt`` on the run's own validation set (``predictions``), the plots from
``plots``, and the pictures of the model from ``cnnkit.inspect``.
"""

from __future__ import annotations

import base64
import datetime
import html
import io
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any, Iterable

import torch
from PIL import Image

from cnnkit.atomic import atomic_write, check_writable, out_not_writable, why_not_written
from cnnkit.errors import UserError
from cnnkit.report import plots
from cnnkit.report.predictions import Predictions, predict_validation
from cnnkit.runs import divergence, planned_epochs
from cnnkit.stages import Stage, parse_stages, smoke_stages
from cnnkit.train.metrics import macro_averages

FEATURE_CHANNELS = 16  # tiles per feature-map grid
CSP = "default-src 'none'; img-src data:; style-src 'unsafe-inline'"
STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 0 auto;
       max-width: 1180px; padding: 0 24px 48px; color: #1d2330; background: #fff; line-height: 1.45; }
header { border-bottom: 3px solid #1f77b4; margin-bottom: 8px; padding: 18px 0 10px; }
h1 { margin: 0; font-size: 26px; } h2 { margin-top: 34px; border-bottom: 1px solid #d9dee7; padding-bottom: 4px; }
.sub { color: #5a6475; margin: 4px 0 0; } nav a { margin-right: 14px; color: #1f5fa8; text-decoration: none; }
.cards { display: flex; flex-wrap: wrap; gap: 12px; margin: 14px 0; }
.card { border: 1px solid #d9dee7; border-radius: 8px; padding: 10px 16px; min-width: 140px; background: #f7f9fc; }
.card .value { font-size: 24px; font-weight: 600; } .card .label { color: #5a6475; font-size: 13px; }
img { max-width: 100%; height: auto; } figure { margin: 10px 0; } figcaption { color: #5a6475; font-size: 13px; }
.gallery { display: flex; flex-wrap: wrap; gap: 16px; } .gallery figure { margin: 0; }
table { border-collapse: collapse; font-size: 13px; margin: 8px 0; }
th, td { border-bottom: 1px solid #e3e7ee; padding: 3px 10px; text-align: right; white-space: nowrap; }
th { background: #eef2f8; } td.text, th.text { text-align: left; } tr.total td { font-weight: 600; }
td.bad { color: #b00000; font-weight: 600; } .note { color: #5a6475; font-size: 13px; }
.columns { display: flex; flex-wrap: wrap; gap: 28px; align-items: flex-start; }
.narrow { max-width: 380px; } .warnings li { color: #8a4b00; }
code { background: #eef2f8; padding: 0 4px; border-radius: 3px; }
"""


@dataclass
class ReportResult:
    path: str
    run_dir: str
    size_bytes: int
    sections: list[str]  # the ids of the sections written, in order
    plots: dict[str, str]  # the PNG files written into the run's plots/ folder
    seconds: float
    notes: list[str] = field(default_factory=list)  # parts left out, and why


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _png_uri(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode("ascii")


def _file_uri(path: str) -> str:
    with open(path, "rb") as f:
        return _png_uri(f.read())


def _img(path: str, alt: str, caption: str | None = None) -> str:
    cap = f"<figcaption>{_e(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{_e(alt)}" src="{_file_uri(path)}">{cap}</figure>'


def _table(header: Iterable[str], rows: Iterable[Iterable[Any]], text_columns: int = 1,
           classes: Iterable[str] | None = None) -> str:
    """An HTML table; the first ``text_columns`` columns are left-aligned text, the rest right-aligned figures."""
    head = "".join(f'<th class="text">{_e(h)}</th>' if i < text_columns else f"<th>{_e(h)}</th>"
                   for i, h in enumerate(header))
    body = []
    for row, css in zip(rows, classes or _forever("")):
        cells = "".join(f'<td class="text">{_e(v)}</td>' if i < text_columns else f"<td>{_e(v)}</td>"
                        for i, v in enumerate(row))
        body.append(f'<tr class="{css}">{cells}</tr>' if css else f"<tr>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"


def _forever(value: str) -> Iterable[str]:
    while True:
        yield value


def _card(value: str, label: str) -> str:
    return f'<div class="card"><div class="value">{_e(value)}</div><div class="label">{_e(label)}</div></div>'


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


# --- sections ------------------------------------------------------------------------------------------------

def _metrics_section(result: dict | None, history: list[dict], pred: Predictions | None) -> str:
    last = history[-1] if history else {}
    best = max((r for r in history if r.get("val_acc") is not None), key=lambda r: r["val_acc"], default={})
    cards = [
        _card(_pct(last.get("val_acc")), f"final validation accuracy (epoch {int(last['epoch'])})" if last else
              "final validation accuracy"),
        _card(_pct(best.get("val_acc")), f"best validation accuracy (epoch {int(best['epoch'])})" if best else
              "best validation accuracy"),
        _card(f"{last['val_loss']:.3f}" if last.get("val_loss") is not None else "-", "final validation loss"),
        _card(_pct(last.get("train_acc")), "final training accuracy"),
    ]
    # with 5 classes or fewer top-5 accuracy is 1 by definition: not shown (nor without best.pt: no epoch ran)
    top5 = pred is not None and len(pred.classes) > 5
    if top5:
        cards.append(_card(_pct(last.get("val_top5")), "final top-5 accuracy"))
    if result:  # a run that diverged in its first epoch has no images_per_s
        cards += [_card(f"{result['images_per_s']:,.0f}" if result.get("images_per_s") is not None else "-",
                        "training images per second"),
                  _card(f"{result['train_time_s']:.1f} s", "training time"),  # as the console's done line
                  _card(f"{result['params']:,}", "parameters")]
    columns = ("train_loss", "train_acc", "val_loss", "val_acc") + (("val_top5",) if top5 else ())
    rows = [(int(r["epoch"]), f"{r['lr']:.3g}" if r.get("lr") is not None else "-",
             *(f"{r[k]:.4f}" if r.get(k) is not None else "-" for k in columns),
             f"{r['images_per_s']:,.0f}" if r.get("images_per_s") is not None else "-") for r in history]
    per_epoch = _table(("epoch", "lr", "train loss", "train acc", "val loss", "val acc")
                       + (("val top-5",) if top5 else ()) + ("images/s",), rows, text_columns=0)
    about = (f'<p class="note">The confusion matrix, per-class table, top losses and class activation maps below '
             f'are of <code>best.pt</code> on the {len(pred.labels):,} validation images: accuracy '
             f'{_pct(pred.acc)}, loss {pred.loss:.4f}.</p>' if pred is not None else
             '<p class="note">The run diverged before its first epoch ended, so there is no <code>best.pt</code> to measure.</p>')
    return (f'<div class="cards">{"".join(cards)}</div>{about}'
            f"<details open><summary>Every epoch</summary>{per_epoch}</details>")


def _per_class_section(pred: Predictions, confusion_png: str) -> str:
    metrics = pred.per_class()
    # "-" where there is no figure: the precision of a class never predicted (0/0), the recall and F1 of a class
    # without validation images (--val-data of some of the classes), which is not among the hardest either. The
    # macro average is eval's and metrics.csv's (cnnkit/train/metrics.py), where a "-" counts 0.
    measured = [m for m in metrics if m.support]
    worst = sorted(measured, key=lambda m: m.f1)[: max(1, len(measured) // 5)]

    def shown(value: float | None) -> str:
        return "-" if value is None else f"{value:.3f}"

    rows = [(m.name, shown(m.precision), shown(m.recall), shown(m.f1), m.support) for m in metrics]
    css = ["" for _ in metrics]
    cm = pred.confusion()
    macro = macro_averages(cm, [vars(m) for m in metrics])
    rows.append(("macro average", *(f"{macro[k]:.3f}" for k in ("macro_precision", "macro_recall", "macro_f1")),
                 sum(m.support for m in metrics)))
    css.append("total")
    table = _table(("class", "precision", "recall", "F1", "support"), rows, classes=css)
    hardest = ", ".join(f"{m.name} (F1 {m.f1:.2f})" for m in worst)
    undefined = (" -: no figure, the precision of a class never predicted (0/0), the recall and F1 of a class "
                 "without images; the macro average counts a - as 0, as scikit-learn does by default."
                 if any(None in (m.precision, m.recall) for m in metrics) else "")
    return (f'<div class="columns"><div>{_img(confusion_png, "confusion matrix")}</div>'
            f"<div class=\"narrow\">{table}<p class=\"note\">Precision: of the images predicted as the class, the share that are it. "
            f"Recall: of the images of the class, the share found. F1: their harmonic mean.{undefined}<br>"
            f"Hardest: {_e(hardest)}.</p></div></div>")


def _cam_section(ckpt_path: str, pred: Predictions, count: int, folder: str) -> str:
    from cnnkit.inspect.cam import class_activation_map

    wrong = [i for i in pred.top_losses(count).tolist() if pred.predicted[i] != pred.labels[i]][: count // 2]
    right = pred.confident_correct(count - len(wrong)).tolist()
    figures = []
    for kind, index in [("mistake", i) for i in wrong] + [("right", i) for i in right]:
        image = _save_image(pred, index, folder)
        out = os.path.join(folder, f"cam_{index}.png")
        cam = class_activation_map(ckpt_path, image, method="gradcam", out=out)
        true, guess = pred.classes[int(pred.labels[index])], pred.classes[int(pred.predicted[index])]
        caption = (f"{'wrong' if kind == 'mistake' else 'right'}: true {true}, predicted {guess} "
                   f"(p={float(pred.probs[index].max()):.2f}); Grad-CAM of '{guess}' at {cam.layer}")
        figures.append(_img(out, f"Grad-CAM of validation image {index}", caption))
    return (f'<p class="note">Where the evidence for the predicted class lies (red: strong). Mistakes first, '
            f'then confidently right images.</p><div class="gallery">{"".join(figures)}</div>')


def _save_image(pred: Predictions, index: int, folder: str) -> str:
    """Validation image ``index`` as a PNG file, for the inspect functions that take image files."""
    pixels = pred.images(torch.tensor([index]))[0]
    arr = pixels.permute(1, 2, 0).numpy()
    path = os.path.join(folder, f"val_{index}.png")
    Image.fromarray(arr[..., 0] if arr.shape[2] == 1 else arr).save(path)
    return path


def _feature_maps_section(ckpt_path: str, pred: Predictions, folder: str, summary: Any) -> str:
    """Activations of the first, a middle and the last convolution for one validation image, captured with
    cnnkit.inspect's hooks and tiled with its drawing helpers (no title band: the caption says what it is)."""
    from cnnkit.inspect import drawing
    from cnnkit.inspect.hooks import capture, inspecting
    from cnnkit.inspect.loading import load_model, prepare_image

    convs = [layer.name for layer in summary.layers if layer.type == "Conv2d"]
    if not convs:
        return '<p class="note">The model has no convolution, so there are no feature maps to show.</p>'
    chosen = list(dict.fromkeys([convs[0], convs[len(convs) // 2], convs[-1]]))
    picked = pred.confident_correct(1)
    index = int(picked[0]) if len(picked) else 0
    target = load_model(ckpt_path)
    x, shown = prepare_image(target, _save_image(pred, index, folder))
    with inspecting(target.model), capture(target.model, chosen) as acts:
        target.model(x)
    figures = [_png_figure(drawing.upscale(shown, drawing.tile_factor(shown.shape[0], 192)), "input image",
                           f"the input: {pred.classes[int(pred.labels[index])]}")]
    for name in chosen:
        act = acts[name][0]
        maps = drawing.normalise(act[:FEATURE_CHANNELS])
        factor = drawing.tile_factor(act.shape[-1], 48)
        tiles = [drawing.upscale(drawing.colour(m), factor) for m in maps]
        figures.append(_png_figure(drawing.grid(tiles, 4), f"feature maps of {name}",
                                   f"{name}: {'x'.join(map(str, act.shape))}, channels 1-{len(tiles)}"))
    return (f'<p class="note">What the first, a middle and the last convolution output for a validation image '
            f'(each channel scaled to its own range; bright: high).</p><div class="gallery">{"".join(figures)}</div>')


def _png_figure(pixels: Any, alt: str, caption: str) -> str:
    """A figure of an H x W x 3 uint8 array, encoded in memory."""
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return (f'<figure><img alt="{_e(alt)}" style="image-rendering: pixelated" src="{_png_uri(buffer.getvalue())}">'
            f"<figcaption>{_e(caption)}</figcaption></figure>")


def _summary_section(summary: Any, field_result: Any) -> str:
    from cnnkit.inspect.summary import called, human
    from cnnkit.inspect.trace import whole_input_note

    rows = [(("\u00a0\u00a0" * (r.depth - 1)) + r.name, called(r.type, r.calls),
             "x".join(map(str, r.output_shape)) if r.output_shape else "-", f"{r.params:,}",
             human(r.macs) if r.macs else "-") for r in summary.layers if r.depth <= 2]
    table = _table(("layer", "type", "output", "params", "MACs"), rows, text_columns=3)
    totals = (f"{summary.total_params:,} parameters ({summary.trainable_params:,} trainable); "
              f"{human(summary.total_macs)} multiply-accumulates for one {'x'.join(map(str, summary.input_size))} "
              f"image; activations {human(summary.activation_bytes, 'B')} per image.")
    shown = [x for x in field_result.layers if x.name.count(".") < 2]
    rf_rows = [(x.name, "x".join(map(str, x.output_shape)) if x.output_shape else "-",
                "-" if x.rf is None else f"{x.rf}{'*' if x.whole else ''}",
                "-" if x.jump is None else f"{x.jump:g}", "-" if x.start is None else f"{x.start:g}")
               for x in shown]
    rf_table = _table(("layer", "output", "receptive field (px)", "jump (px)", "start (px)"), rf_rows, text_columns=2)
    size = "x".join(map(str, field_result.input_size[1:]))
    verdict = ("every unit sees the whole input" if field_result.every_unit_covers else
               "its centre unit sees the whole input, its corner units do not" if field_result.covers_input else
               "no unit sees the whole input")
    rf_note = (f"Final feature layer <code>{_e(field_result.final_layer)}</code>: receptive field "
               f"{_e(field_result.final_rf)} px on a {size} input; {verdict}." if field_result.final_layer
               else "No layer keeps a spatial layout.")
    # the "*" explained where the table shows one, as summary and rf do
    starred = f" {_e(whole_input_note(field_result.input_size))}." if any(x.whole for x in shown) else ""
    return (f'<div class="columns"><div><h3>Layers</h3>{table}<p class="note">{_e(totals)}</p></div>'
            f'<div><h3>Receptive fields</h3>{rf_table}<p class="note">{rf_note} Jump: input pixels between '
            f'neighbouring units; start: centre of the first unit\'s field.{starred}</p></div></div>')


@dataclass
class _StageShown:
    """One stage of a staged run as the report shows it: what it trained, for how many epochs, at which rate."""

    modules: str
    epochs: int
    lr: float
    ran: bool  # the run began it (stages.json records it); else it is the plan's, never run


def _stage_plan(config: dict, stages: list[dict] | None) -> list[_StageShown] | None:
    """Each stage of a run with --stages, which set the epochs and lr in place of its own (config.json records those
    as given, so that it replays the run): as stages.json records it for a stage the run began (a smoke run's cut
    epochs included), else as the plan has it (a smoke run's cut), marked as not run; None without --stages."""
    if not config.get("stages"):
        return None
    planned = parse_stages(str(config["stages"]))
    if config.get("smoke"):
        planned = smoke_stages(planned)
    def not_run(stage: Stage) -> _StageShown:
        return _StageShown("+".join(stage.modules or ["all"]), stage.epochs, stage.lr, False)

    try:
        began = {int(s["stage"]): s for s in stages or []}
        return [_StageShown("+".join(began[i]["modules"]), int(began[i]["epochs"]), float(began[i]["lr"]), True)
                if i in began else not_run(s) for i, s in enumerate(planned, 1)]
    except (KeyError, TypeError, ValueError):  # a stages.json that is not the run's records: the plan alone
        return [not_run(s) for s in planned]


def _config_section(config: dict, plan: list[_StageShown] | None = None) -> str:
    """config.json as three tables side by side (it has some fifty options); a staged run's epochs, lr and stages
    as its stages (``plan``) set them, a stage the run never began marked so."""
    config = dict(config)
    if plan:
        not_run = [str(i) for i, s in enumerate(plan, 1) if not s.ran]
        missing = f"; stage{'s' * (len(not_run) > 1)} {', '.join(not_run)} not run" if not_run else ""
        parts = " + ".join(str(s.epochs) for s in plan)
        config["epochs"] = f"{sum(s.epochs for s in plan)} (--stages: {parts}{missing})"
        config["lr"] = f"{', '.join(f'{s.lr:g}' for s in plan)} (--stages{missing})"
        config["stages"] = f"{config['stages']} (" + "; ".join(
            f"{i}. {s.modules}: {s.epochs} epoch{'s' * (s.epochs > 1)} at lr {s.lr:g}{'' if s.ran else ', not run'}"
            for i, s in enumerate(plan, 1)) + ")"
    rows = [(k, "-" if v is None else v) for k, v in config.items()]
    third = -(-len(rows) // 3)
    tables = "".join(f"<div>{_table(('option', 'value'), rows[i:i + third], text_columns=2)}</div>"
                     for i in range(0, len(rows), third))
    return f'<div class="columns">{tables}</div>'


# --- the page ----------------------------------------------------------------------------------------------

def write_report(run_dir: str, out: str | None = None, device: str = "auto", cam_images: int = 4) -> ReportResult:
    """Write ``out`` (default ``<run_dir>/report.html``) and the run's plots; see the module doc. A run that
    diverged opens with why it stopped; one that did before its first epoch ended has no ``best.pt``, and its page
    leaves out what needs it (``ReportResult.notes`` says so). Any other run without ``best.pt`` is a UserError."""
    from cnnkit import __version__
    from cnnkit.inspect.receptive_field import receptive_field
    from cnnkit.inspect.summary import summary
    from cnnkit.checkpoint import load_checkpoint
    from cnnkit.train.config import check_recorded_paths, moved_data

    start = time.perf_counter()
    if not os.path.isdir(run_dir):
        raise UserError(f"{run_dir} is not a folder; pass a run folder that `cnnkit train` wrote (see `cnnkit runs`)")
    config = plots.read_json(run_dir, "config.json")
    if config is None:
        raise UserError(f"{run_dir} is not a cnnkit run folder (no config.json); pass a folder `cnnkit train` wrote")
    best_pt = os.path.join(run_dir, "best.pt")
    stop = divergence(run_dir)  # a diverged run writes result.json too: stop.json decides
    diverged = stop is not None
    has_best = os.path.isfile(best_pt)
    # A run that diverged before its first epoch ended has no best.pt, and resuming it would replay the failure:
    # its report shows what there is (the steps' losses, why it stopped), without the parts that need a model.
    if not has_best and not diverged:
        raise UserError(f"{run_dir} has no best.pt yet: the run has not finished an epoch; train or resume it first")
    # Its figures come from the run's validation images: a run recording relative paths needs them. A data folder
    # moved or deleted since leaves them out, not the rest of the page.
    gone = moved_data(config) if has_best else None
    if has_best and gone is None:
        check_recorded_paths(config, run_dir, "cnnkit report")
    # the plots go into the run folder whatever --out says: a read-only run folder (or a file called plots in it)
    # is refused before the work, in one line saying what to do, not after it with an OSError
    plots_dir = os.path.join(run_dir, "plots")
    try:
        check_writable(os.path.join(plots_dir, "curves.png"))
    except OSError as e:
        raise UserError(f"cannot write the plots into {plots_dir} ({why_not_written(e)}), where the report draws "
                        "them whatever --out says; copy the run folder somewhere writable and report the copy"
                        ) from None
    out = out or os.path.join(run_dir, "report.html")
    # before the work, as export and embed do: an unwritable folder is refused, a missing one made with the page
    try:
        check_writable(out)
    except OSError as e:
        raise out_not_writable(out, e) from None

    result = plots.read_json(run_dir, "result.json")
    history = plots.read_metrics(run_dir)
    pred = predict_validation(load_checkpoint(best_pt), device) if has_best and gone is None else None
    written = plots.write_plots(run_dir, pred, device)
    # the model's layers from any checkpoint there is: last.pt where a --save-every save came before the failure
    model_pt = next((p for p in (best_pt, os.path.join(run_dir, "last.pt")) if os.path.isfile(p)), None)
    model_summary = summary(model_pt) if model_pt is not None else None  # of best.pt wherever there are predictions
    notes: list[str] = []

    sections: list[tuple[str, str, str]] = []
    if diverged:
        sections.append(("diverged", "The run diverged",
                         f'<p>{_e(stop.get("message", "see its stop.json"))}</p><p class="note">Resuming it would '
                         f"replay the same steps into the same failure; start a new run from its settings with a "
                         f"lower <code>--lr</code> (<code>cnnkit train --resume</code> says how).</p>"))
    # what the run warned of on its console (broken images left out, too few validation images): whoever reads
    # the page did not see that console
    warned = (result or {}).get("warnings")
    if isinstance(warned, list) and warned:
        sections.append(("warnings", "Warnings", '<ul class="warnings">'
                         + "".join(f"<li>{_e(w)}</li>" for w in warned) + "</ul>"))
    sections += [
        ("metrics", "Results", _metrics_section(result, history, pred)),
        ("curves", "Training curves", _img(written["curves"], "loss and accuracy curves") +
         _img(written["lr"], "learning rate")),
    ]
    if pred is not None:
        sections.append(("classes", "Confusion matrix and per-class metrics",
                         _per_class_section(pred, written["confusion"])))
    elif gone is not None:
        notes.append(f"confusion matrix, per-class metrics, top losses, Grad-CAM and feature maps: the run's "
                     f"validation images went with its \"{gone}\" folder {config[gone]}, which is not there any more "
                     "(moved or deleted); put it back and run cnnkit report again")
    else:
        notes.append("confusion matrix, per-class metrics, top losses, Grad-CAM and feature maps: the run diverged "
                     "before its first epoch ended, so there is no best.pt")
    with tempfile.TemporaryDirectory(prefix="cnnkit-report-") as folder:
        if pred is not None and pred.has_images and len(pred.labels):
            sections.append(("top-losses", "Top losses", _img(written["top_losses"], "top losses")))
            sections.append(("cam", "Where the model looks (Grad-CAM)",
                             _cam_section(best_pt, pred, cam_images, folder)))
            sections.append(("features", "Feature maps",
                             _feature_maps_section(best_pt, pred, folder, model_summary)))
        elif pred is not None:
            notes.append("top losses, Grad-CAM and feature maps left out: the validation images could not be "
                         "matched to their files (one broke after training)")
        if model_pt is not None:
            sections.append(("model", "Model", _summary_section(model_summary, receptive_field(model_pt))))
        else:
            notes.append("the model's layers: no checkpoint was written before the run diverged")
        plan = _stage_plan(config, plots.read_json(run_dir, "stages.json"))
        sections.append(("config", "Configuration", _config_section(config, plan)))

        planned = sum(s.epochs for s in plan) if plan else planned_epochs(config)
        status = (f"diverged in epoch {stop.get('epoch')}" if diverged else "finished"
                  if result else f"not finished ({len(history)} of {planned} epochs)")
        title = f"{config.get('model')} on {config.get('data')}"
        created = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
        nav = "".join(f'<a href="#{sid}">{_e(name)}</a>' for sid, name, _ in sections)
        body = "".join(f'<section id="{sid}"><h2>{_e(name)}</h2>{content}</section>' for sid, name, content in sections)
        note_html = "".join(f'<p class="note">Left out: {_e(n)}.</p>' for n in notes)
        page = (f'<!doctype html>\n<html lang="en"><head><meta charset="utf-8">'
                f'<meta http-equiv="Content-Security-Policy" content="{CSP}">'
                f'<meta name="viewport" content="width=device-width, initial-scale=1">'
                f"<title>cnnkit report: {_e(title)}</title><style>{STYLE}</style></head><body>"
                f"<header><h1>{_e(title)}</h1><p class=\"sub\">Run folder <code>{_e(os.path.abspath(run_dir))}</code>"
                f" &middot; {_e(status)} &middot; report written {created} by cnnkit {_e(__version__)}</p>"
                f"<nav>{nav}</nav></header>{note_html}{body}</body></html>\n")
    data = page.encode("utf-8")
    try:
        atomic_write(out, lambda f: f.write(data))
    except OSError as e:
        raise UserError(f"cannot write {out} ({e.strerror or e}); pass a writable --out") from None
    return ReportResult(out, run_dir, len(data), [sid for sid, _, _ in sections], written,
                        time.perf_counter() - start, notes)


def show_run(run_dir: str, report: bool = True, device: str = "auto", log: IO[str] | None = None) -> str | None:
    """At the end of training (``--plots``, ``--report``): write the plots, and the report when asked; returns
    the report's path. The run itself is finished and saved by then, so a failure here is one line on ``log``
    with the command that retries it, not a failed run."""
    log = log or sys.stdout
    try:
        if report:
            result = write_report(run_dir, device=device)
            print(f"cnnkit: report {result.path} ({result.size_bytes / 1e6:.1f} MB, {result.seconds:.1f} s)", file=log)
            return result.path
        paths = plots.write_plots(run_dir, device=device)
        print(f"cnnkit: plots {', '.join(os.path.basename(p) for p in paths.values())} in "
              f"{os.path.join(run_dir, 'plots')}", file=log)
    except Exception as e:  # noqa: BLE001 - see the docstring
        message = str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        print(f"cnnkit: the run is saved, but its {'report' if report else 'plots'} failed ({message}); "
              f"retry with: cnnkit --debug report {run_dir}", file=log)
    return None
