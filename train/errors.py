"""The errors a training run reports in one line, under one base class.

`main.py` catches `RunError` alone: it prints `<prefix>: <message>` and exits with
`exit_code`. The message of each says what happened and what to do next; anything else that
escapes a run is a bug and keeps its traceback.
"""


class RunError(Exception):
    """A run stopped for a reason its message explains in one line."""

    prefix = "error"
    exit_code = 1


class ConfigError(RunError, ValueError):
    """The config names an unknown key or holds an impossible value."""


class WorkdirError(RunError, OSError):
    """The workdir cannot be written or belongs to a run with another config."""
