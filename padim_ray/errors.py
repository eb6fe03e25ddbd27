"""The one exception type the CLI turns into a one-line error."""


class PadimError(Exception):
    """A user-facing error: the message names the file or setting at fault and the fix."""


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (at most 200 characters), or its type's name."""
    lines = str(err).strip().splitlines()
    return lines[0][:200] if lines else type(err).__name__
