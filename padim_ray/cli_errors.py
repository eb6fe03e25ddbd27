"""How a command ends: one line on stderr and an exit code, whatever went wrong (the library raises; only the CLI ends)."""

from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from pathlib import Path

import typer

from padim_ray.errors import PadimError


@contextmanager
def one_line_errors():
    """Turn any failure into one line on stderr and exit code 1 (130 when interrupted, 143 on SIGTERM, 129 on SIGHUP).

    A PadimError is the whole message; anything else (a lost actor or node, a bug) is summarised in a
    line and its traceback written to a log file, or shown with --verbose.
    """
    try:
        yield
    except PadimError as error:
        # Ray Data appends retry advice to errors raised in its tasks; our message is the first line
        typer.echo(f"error: {str(error).splitlines()[0]}", err=True)
        raise typer.Exit(code=1) from None
    except KeyboardInterrupt:
        message, code = interrupted()
        typer.echo(message, err=True)
        raise typer.Exit(code=code) from None
    except Exception as error:
        if logging.getLogger().isEnabledFor(logging.DEBUG):
            raise
        log_file = _write_traceback(error)
        error = getattr(error, "cause", None) or error  # a task's or actor's own exception, not Ray's wrapper
        lines = str(error).strip().splitlines()
        typer.echo(f"error: {type(error).__name__}: {lines[0][:300] if lines else ''} (traceback in {log_file}; --verbose shows it)", err=True)
        raise typer.Exit(code=1) from None


def interrupted() -> tuple[str, int]:
    """The last line and exit code of a run stopped by Ctrl-C (SIGINT) or a stop signal (SIGTERM, SIGHUP)."""
    from padim_ray.stop_signals import stop_signal

    signum = stop_signal()
    return (f"error: terminated by {signum.name}", 128 + signum) if signum else ("error: interrupted", 130)


def _write_traceback(error: BaseException) -> Path:
    import tempfile
    import time
    import traceback

    log_file = Path(tempfile.gettempdir()) / f"padim-ray-error-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}.log"
    log_file.write_text("".join(traceback.format_exception(error)))
    return log_file
