"""The one exception type the CLI turns into a one-line error."""


class PadimError(Exception):
    """A user-facing error: the message names the file or setting at fault and the fix."""
