"""The one exception type for mistakes a user can make (bad paths, bad input, bad options)."""


class MidfillError(Exception):
    """A user-facing error: its message is one line that says what is wrong and how to fix it.

    The CLI turns it into exit code 2 and the server into a 4xx response; nothing else catches it.
    """
