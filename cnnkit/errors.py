"""Errors a person can act on.

The CLI prints a UserError as one line on stderr and exits with its ``exit_code``; anything else is a bug
and shows a traceback with ``--debug``.
"""


class UserError(Exception):
    """Bad input: a wrong option, a missing path, an unknown name. Exit code 2."""

    exit_code = 2


class DataError(UserError):
    """The input exists but cannot be used at run time (an image that does not decode). Exit code 1."""

    exit_code = 1


class CheckpointError(UserError):
    """A checkpoint that cannot be read or does not fit. Exit code 1."""

    exit_code = 1
