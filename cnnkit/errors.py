"""Errors a person can act on.

The CLI prints a UserError as one line on stderr and exits with its ``exit_code``; anything else is a bug
and shows a traceback with ``--debug``.
"""

from __future__ import annotations

import re
from typing import IO, Callable, Iterable

WARNING = "cnnkit: warning: "  # what starts a warning's line: in a run's log, and the commands' own on stderr


class UserError(Exception):
    """Bad input: a wrong option, a missing path, an unknown name. Exit code 2."""

    exit_code = 2
    label = "error"


class DataError(UserError):
    """The input exists but cannot be used at run time (an image that does not decode). Exit code 1."""

    exit_code = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be read, or does not fit its own description or the run it resumes. Exit code 1.
    Weights that read fine but do not fit the model a command line builds (``--weights``) are a UserError: the
    fix is another option."""

    exit_code = 1


class TrainingStopped(UserError):
    """Training stopped on SIGINT/SIGTERM after saving a resumable checkpoint."""

    exit_code = 130
    label = "stopped"
    result = None  # a run stopped after its training (its final steps, the plots): TrainResult, as result.json holds it


class NonFiniteLoss(UserError):
    """The loss or the model's outputs became NaN or infinite; nothing after that is saved. Exit code 1."""

    exit_code = 1
    result = None  # from training: the run's TrainResult, as its result.json holds it (None before its folder)


def shown(value: object, limit: int = 80) -> str:
    """``value`` for an error message: its repr, shortened (containers cut after a few items, strings after 40
    characters, the whole at ``limit`` characters), so a message never renders an unbounded value."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxtuple, r.maxdict, r.maxset = 2, 4, 4, 4, 4
    r.maxstring, r.maxother, r.maxlong = 40, 40, 40
    text = r.repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def plural(noun: str, n: int | None) -> str:
    """``noun`` (singular) for ``n`` of them, in a message after the number: "image" for 1, "images" for any other
    count (None: a count not known yet)."""
    return noun if n == 1 else noun + "s"


def reason(error: BaseException, most: int = 160) -> str:
    """``error``'s text for the brackets of a one-line message: its first sentence (PyTorch's loader goes on with
    advice for its own developers, "If you are seeing this error, there is a high ..."), cut at a word and marked
    with "..." where it is longer than ``most`` characters."""
    lines = str(error).strip().splitlines()
    text = re.split(r"(?<=[^.\s]{2})\.\s", lines[0] if lines else "", maxsplit=1)[0].rstrip(".") or type(error).__name__
    if len(text) > most:
        text = text[:most].rsplit(" ", 1)[0].rstrip(",;:") + " ..."
    return text


def did_you_mean(word: str, known: Iterable[str], most: int = 1, cutoff: float = 0.6,
                 key: Callable[[str], str] | None = None) -> str:
    """The end of an error message about an unknown ``word``: ``"; did you mean X?"`` naming the entries of
    ``known`` closest to it (up to ``most`` of them, ``"X, Y or Z"``, closest first), or ``""`` when none is close.

    ``cutoff``: the similarity a name needs, difflib's ratio from 0 to 1 (the share of matching characters);
    ``key``: what of each name is compared (the name itself by default), while the name is what is shown.
    """
    import difflib

    names = list(known)
    compared = [key(n) for n in names] if key else names
    close = difflib.get_close_matches(word, compared, n=most, cutoff=cutoff)
    if not close:
        return ""
    found = [names[compared.index(c)] for c in close]
    return f"; did you mean {found[0] if len(found) == 1 else ', '.join(found[:-1]) + ' or ' + found[-1]}?"


def warn(log: IO[str], warnings: list[str], text: str) -> None:
    """``text`` as a warning's line in ``log``, and kept in ``warnings``: the result a Python caller gets back
    (``TrainResult.warnings``) holds what the log showed."""
    print(WARNING + text, file=log)
    warnings.append(text)
