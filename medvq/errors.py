"""The exceptions a job turns into one line on stderr and an exit code, with no traceback."""


class UserError(Exception):
    """A mistake in the user's input (flags, files, paths): exit 2.

    Everything not listed in this module is a bug and keeps its traceback.
    """


class RunFailed(Exception):
    """The job ran as asked but has nothing to deliver (every trial diverged or failed): exit 1."""


class Stopped(Exception):
    """A signal (Ctrl-C, SIGTERM) stopped the job; what it saved lets the same command continue: exit 130."""
