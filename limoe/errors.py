"""The one kind of error every `limoe` command reports the same way: one line, `limoe: error: ...`, exit 2.

Each module keeps its own error class (ConfigError, CheckpointError, DataError, ...) for callers that catch one
kind; they all derive from UserError, so the command line needs to know only this one.
"""

import signal


class UserError(Exception):
    """A mistake in the user's input (a config, a path, a file, an argument); the message is one line."""


class Terminated(KeyboardInterrupt):
    """SIGTERM where no job handles it yet (training installs its own handler): the command stops with one line and
    exit 143 instead of dying silently. A KeyboardInterrupt, so it unwinds like Ctrl-C."""

    signum = signal.SIGTERM
