"""The one exception type for mistakes a user can fix (bad file, unknown column, unknown method).

It subclasses ValueError so Python callers can catch it as such; the command line prints its
message without a traceback.
"""


class UsageError(ValueError):
    """A problem in the user's input, with a message that names the problem and the fix."""
