"""The one exception type that means "the user asked for something we cannot do"."""


class UserError(Exception):
    """A mistake in the user's input (flags, files, paths).

    Job entry points print its message as one line on stderr and exit non-zero, with no traceback.
    Everything else is a bug and keeps its traceback.
    """
