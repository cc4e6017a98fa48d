"""The one exception type for user mistakes: the CLI prints its message alone, no traceback."""


class UserError(Exception):
    """A mistake the user can fix (config key, missing data, bad checkpoint).

    The message names the problem and the fix in one line.
    """
