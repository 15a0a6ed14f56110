"""``cnnkit runs``: the run folders under a directory (``runs/`` by default), one line each — model, data,
epochs, best validation accuracy, when it started and whether it finished — read from each folder's
``config.json``, ``run.json``, ``result.json`` and ``metrics.csv``.
"""

from __future__ import annotations

import csv
import datetime
import json
import os
import time
from dataclasses import dataclass
from typing import Any

from cnnkit.errors import DataError, UserError
from cnnkit.stages import parse_stages, smoke_epochs

DEFAULT_ROOT = "runs"


@dataclass
class RunInfo:
    path: str
    model: str
    data: str
    epochs_done: int  # rows in metrics.csv
    epochs: int  # planned
    best_val_acc: float | None  # None before the first epoch ends
    best_epoch: int | None
    started: str  # local time, YYYY-MM-DD HH:MM: run.json's "started", or config.json's file time (below)
    status: str  # "finished", "diverged" (stop.json: the loss or outputs became non-finite), "stopped"
    # (Ctrl-C, SIGTERM, a killed process; also while it is still running), or "damaged: FILE" (config.json,
    # result.json or metrics.csv there but unreadable: `cnnkit report` says what is wrong with it)
    # False for a run folder without a readable run.json (written by cnnkit before it recorded the start): its
    # start is config.json's file time then, which a copy of the folder (cp -r, rsync, unzip) resets to its own
    started_recorded: bool = True
    smoke: bool = False  # a --smoke run: a check that a command line runs, whose accuracy is no score


# What to do about a damaged file of a run, by name: config.json holds the settings nothing else records in full;
# the others can go (a run without result.json is reported as stopped, one without metrics.csv without its curves).
_DAMAGE_FIX = {
    "config.json": "restore it from a copy (it holds the run's settings; best.pt still serves cnnkit eval and predict)",
    "result.json": "delete it to report the run as stopped, or restore it from a copy",
    "metrics.csv": "delete it to report the run without its per-epoch figures, or restore it from a copy",
}
METRICS_NEEDED = ("epoch", "train_loss", "train_acc", "val_loss", "val_acc")  # what every run's metrics.csv holds


def start_record() -> dict[str, str]:
    """What a new run writes to its ``run.json``: when it started, as local time with its UTC offset (ISO 8601).
    A file's time does not say it: copying or restoring the folder gives its files the copy's time."""
    return {"started": datetime.datetime.now().astimezone().isoformat()}


def started(run_dir: str) -> tuple[datetime.datetime, bool]:
    """When the run in ``run_dir`` started, as a local time, and whether its run.json recorded it (else it is
    config.json's file time: a folder from before run.json, or one whose run.json is unreadable)."""
    try:
        with open(os.path.join(run_dir, "run.json"), encoding="utf-8") as f:
            return datetime.datetime.fromisoformat(json.load(f)["started"]).astimezone(), True
    except (OSError, ValueError, TypeError, KeyError):
        return datetime.datetime.fromtimestamp(os.path.getmtime(os.path.join(run_dir, "config.json"))), False


def damaged(path: str, what: str) -> DataError:
    """The error for a run's file ``path`` that is there but unreadable (``what``: what is wrong with it): exit code
    1, as for a damaged checkpoint; the command line that named the run is not at fault."""
    fix = _DAMAGE_FIX.get(os.path.basename(path), "restore it from a copy or delete it")
    return DataError(f"{path} is damaged: {what}; {fix}")


def load_json(path: str, want_object: bool = True) -> Any:
    """A run's JSON file (a dict, or any JSON value with ``want_object=False``); None when there is none. A file
    that is there but is not valid JSON (cut short by a full disk or a killed copy, edited by hand) or, where one is
    wanted, not a JSON object is a UserError naming it and what is wrong."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None
    try:
        text = raw.decode(json.detect_encoding(raw))  # decoded here, so that positions count characters
    except UnicodeDecodeError:
        raise damaged(path, "not JSON text (not UTF-8)") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        # It ends where the text does, or in a string the text ends inside.
        cut = " (cut short?)" if e.pos >= len(text.rstrip()) or e.msg.startswith("Unterminated string") else ""
        what = e.msg.removesuffix(" at")  # "Unterminated string starting at" (at the line and column)
        raise damaged(path, f"not valid JSON ({what} at line {e.lineno}, column {e.colno}{cut})") from None
    if want_object and not isinstance(data, dict):
        raise damaged(path, f"a JSON {type(data).__name__} where a JSON object is expected")
    return data


def _read_json(path: str) -> dict | None:
    """``load_json`` for readers a damaged file must not stop (whether a run diverged, its rate): None for it,
    as for a missing one; ``cnnkit report`` names what is wrong with it."""
    try:
        return load_json(path)
    except UserError:
        return None


def load_history(run_dir: str) -> list[dict[str, str]]:
    """``metrics.csv`` of ``run_dir`` as one dict of text cells per epoch; [] when there is none. One that lacks a
    column every run writes, or has a row with another number of cells or no whole epoch number, is a UserError
    naming the file, the line and what is wrong."""
    path = os.path.join(run_dir, "metrics.csv")
    rows: list[dict[str, str]] = []
    try:
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            header = reader.fieldnames or []
            missing = [c for c in METRICS_NEEDED if c not in header]
            if header and missing:
                raise damaged(path, f"its header has no {', '.join(missing)} column{'s' if len(missing) > 1 else ''}")
            for row in reader:
                extra, short = row.pop(None, None) or [], sum(v is None for v in row.values())
                if extra or short:
                    raise damaged(path, f"line {reader.line_num} has {len(header) + len(extra) - short} cells, "
                                        f"its header {len(header)}")
                if not row["epoch"].isdigit():
                    raise damaged(path, f"line {reader.line_num} has epoch {row['epoch']!r}, not a whole number")
                rows.append(row)
    except FileNotFoundError:
        return []
    except OSError as e:
        raise UserError(f"cannot read {path} ({e.strerror or e}); check its permissions") from None
    except (csv.Error, ValueError) as e:  # a NUL byte, text that is not UTF-8
        raise damaged(path, f"not CSV text ({e})") from None
    return rows


def new_folder_name(kind: str) -> str:
    """A path ``runs/<timestamp>-<kind>`` that does not exist yet (``-2``, ``-3``, ... after it where one started
    in the same second): where `cnnkit train` (``kind``: the model) and `cnnkit lr-find` write by default."""
    base = os.path.join(DEFAULT_ROOT, time.strftime("%Y%m%d-%H%M%S") + f"-{kind}")
    path, i = base, 2
    while os.path.exists(path):
        path, i = f"{base}-{i}", i + 1
    return path


def is_run(path: str) -> bool:
    """Whether ``path`` is a run folder: one that holds the config.json `cnnkit train` writes first."""
    return os.path.isfile(os.path.join(path, "config.json"))


def run_info(run_dir: str) -> RunInfo | None:
    """What ``run_dir`` holds, or None when it is not a run folder (no config.json). A run whose config.json,
    result.json or metrics.csv is there but unreadable is listed with the status "damaged: FILE"."""
    if not is_run(run_dir):
        return None
    config_path = os.path.join(run_dir, "config.json")
    broken: list[str] = []

    def read(name: str, load, empty):
        try:
            return load()
        except UserError:
            broken.append(name)
            return empty

    config = read("config.json", lambda: load_json(config_path), None) or {}
    result = read("result.json", lambda: load_json(os.path.join(run_dir, "result.json")), None)
    history = read("metrics.csv", lambda: load_history(run_dir), [])
    scored = []
    for row in history:
        try:
            scored.append((float(row["val_acc"]), int(row["epoch"])))
        except (KeyError, TypeError, ValueError):
            continue
    # the first epoch with the highest accuracy, as the training loop counts "best"
    best = max(scored, key=lambda s: (s[0], -s[1]), default=(None, None))
    if result:
        best = (result.get("best_val_acc", best[0]), result.get("best_epoch", best[1]))
    # a diverged run writes result.json too (its stop_reason says why it stopped): stop.json decides first
    status = "diverged" if divergence(run_dir) else "finished" if result else "stopped"
    if broken:
        status = f"damaged: {', '.join(broken)}"
    planned = (result or {}).get("epochs") or planned_epochs(config)
    start, recorded = started(run_dir)
    return RunInfo(run_dir, str(config.get("model", "?")), str(config.get("data", "?")), len(history), int(planned),
                   best[0], best[1], start.strftime("%Y-%m-%d %H:%M"), status, recorded, bool(config.get("smoke")))


def planned_epochs(config: dict[str, Any]) -> int:
    """The epochs a run's config.json plans: its --stages' (which set the epochs in place of --epochs), else its
    epochs, as --smoke cuts them short (a stopped smoke run of --epochs 30 plans 2); 0 when it says neither."""
    if config.get("stages"):
        try:
            epochs = [stage.epochs for stage in parse_stages(str(config["stages"]))]
        except UserError:  # a config.json edited by hand: train refuses it, its --epochs says nothing
            return 0
    else:
        epochs = [config.get("epochs") or 0]
    return sum(smoke_epochs(e, len(epochs)) for e in epochs) if config.get("smoke") else sum(epochs)


def divergence(run_dir: str) -> dict | None:
    """``stop.json`` of a run that diverged (its "epoch" and "message"), or None for any other run."""
    stop = _read_json(os.path.join(run_dir, "stop.json")) or {}
    return stop if stop.get("status") == "diverged" else None


def refuse_resuming_divergence(run_dir: str) -> None:
    """Raise a UserError when ``run_dir`` diverged: its last.pt, RNG state included, holds the state from before
    the failure, so resuming it replays the same steps into the same failure. The message names what does go on:
    a new run from its settings at a lower rate, from last.pt's weights where there is one, or at the rate --lr auto
    picks (a tenth may diverge again)."""
    stop = divergence(run_dir)
    if stop is None:
        return
    lower = lower_rate(run_dir)
    weights = (f" --weights {os.path.join(run_dir, 'last.pt')}"
               if os.path.isfile(os.path.join(run_dir, "last.pt")) else "")
    # a tenth of the rate may diverge again; a run whose rate --lr auto picked (lr_find.json) needs a fixed one
    auto = ("" if os.path.isfile(os.path.join(run_dir, "lr_find.json")) else
            f" (or with --lr auto in place of --lr {lower}, to have a range test pick it; cnnkit lr-find draws its "
            "curve)")
    raise UserError(f"--resume {run_dir}: the run diverged ({stop.get('message', 'see its stop.json')}); resuming "
                    f"replays the same steps into the same failure. Go on in a new run at a lower rate{auto}: "
                    f"cnnkit train --config {os.path.join(run_dir, 'config.json')}{weights} --lr {lower} --out NEW_DIR")


def lower_rate(run_dir: str) -> str:
    """A tenth of the peak rate in ``run_dir``'s config.json, as --lr takes it, for a run that diverged; "LOWER"
    where it records none."""
    lr = (_read_json(os.path.join(run_dir, "config.json")) or {}).get("lr")
    if not isinstance(lr, (int, float)) or isinstance(lr, bool):
        return "LOWER"
    return f"{lr / 10:.3g}".replace("e+0", "e").replace("e+", "e").replace("e-0", "e-")


def list_runs(root: str = DEFAULT_ROOT) -> list[RunInfo]:
    """The run folders directly under ``root`` (or ``root`` itself, if it is one), oldest first (by ``started``,
    to the microsecond)."""
    if not os.path.isdir(root):
        raise UserError(f"{root} is not a folder; pass the folder that holds your runs "
                        f"(`cnnkit train` writes them under ./{DEFAULT_ROOT}/)")
    single = run_info(root)
    if single is not None:
        return [single]
    runs = [info for name in sorted(os.listdir(root)) if not name.startswith(".")
            for info in [run_info(os.path.join(root, name))] if info is not None]
    return sorted(runs, key=lambda r: (started(r.path)[0].timestamp(), r.path))


def folders_with_runs(where: str = ".") -> list[tuple[str, list[str]]]:
    """Where `cnnkit runs FOLDER` finds runs, no deeper than one level below ``where``, DEFAULT_ROOT left out: each
    folder with the names of the run folders it lists, ``where`` first when runs sit directly in it (`train --out
    again`), then the folders under it that hold runs (`train --out experiments/a`). For `cnnkit runs` to point at
    runs made with --out when runs/ holds none."""
    def sub_folders(path: str) -> list[str]:
        try:
            with os.scandir(path) as entries:  # is_dir from the listing: no stat of every image of a data folder
                return sorted(e.name for e in entries if not e.name.startswith(".") and e.is_dir())
        except OSError:  # unreadable: nothing to point at
            return []

    if is_run(where):
        return [(where, [os.path.basename(os.path.abspath(where))])]
    found, here = [], []
    for name in sub_folders(where):
        path = os.path.join(where, name)
        if os.path.normpath(path) == os.path.normpath(DEFAULT_ROOT):
            continue
        if is_run(path):
            here.append(name)
        elif held := [n for n in sub_folders(path) if is_run(os.path.join(path, n))]:
            found.append((path if where != "." else name, held))
    return ([(where, here)] if here else []) + found


def latest_run(root: str = DEFAULT_ROOT) -> str:
    """The most recently started run folder under ``root``; where there is none in the default root, the error
    names a run made with --out nearby (``folders_with_runs``), as `cnnkit runs` does."""
    runs = list_runs(root) if os.path.isdir(root) else []
    if runs:
        return newest(runs)
    found = folders_with_runs() if root == DEFAULT_ROOT else []
    named = [os.path.normpath(os.path.join(folder, names[0])) for folder, names in found[:3]]
    more = ", ..." if len(found) > 3 or any(len(names) > 1 for _, names in found[:3]) else ""
    elsewhere = f" (runs made with --out: {', '.join(named)}{more})" if found else ""
    if not os.path.isdir(root):
        raise UserError(f"no {root}/ folder here, so there is no latest run; pass a run folder{elsewhere}")
    raise UserError(f"no run folders in {root}/; pass a run folder{elsewhere}")


def newest(runs: list[RunInfo]) -> str:
    """The folder of the most recently started of ``runs`` (non-empty), by ``started`` to the microsecond:
    ``RunInfo.started`` keeps only the minute."""
    return max(runs, key=lambda r: started(r.path)[0].timestamp()).path


def format_runs(runs: list[RunInfo]) -> str:
    """An aligned table, one run a line; a start time that no run.json recorded is marked and explained below."""
    header = ("RUN", "MODEL", "DATA", "EPOCHS", "BEST ACC", "STARTED", "STATUS")
    rows = [(r.path, r.model, r.data if len(r.data) <= 30 else "..." + r.data[-27:], f"{r.epochs_done}/{r.epochs}",
             "-" if r.best_val_acc is None else f"{r.best_val_acc:.4f} (ep {r.best_epoch})",
             r.started + ("" if r.started_recorded else "*"), r.status + (" (smoke run)" if r.smoke else ""))
            for r in runs]
    widths = [max(len(x[i]) for x in [header, *rows]) for i in range(len(header))]
    table = "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths)).rstrip() for row in [header, *rows])
    if all(r.started_recorded for r in runs):
        return table
    return table + ("\n* config.json's file time (no run.json: a run from an older cnnkit); a copied folder shows "
                    "the copy's time")
