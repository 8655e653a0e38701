"""The one exception type for mistakes a user can fix (bad file, unknown column, unknown method).

It subclasses ValueError so Python callers can catch it as such; the command line prints its
message without a traceback.
"""


class UsageError(ValueError):
    """A problem in the user's input, with a message that names the problem and the fix."""


class UnknownAdapterError(UsageError, KeyError):
    """A name that is not one of the model's adapters; a KeyError too, as for a dict lookup."""

    __str__ = BaseException.__str__  # the message as written, not KeyError's repr of it
