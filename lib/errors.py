"""The one exception type scripts turn into a one-line error and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user (a path, a file, a flag): say what and where, no traceback."""
