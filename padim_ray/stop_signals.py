"""Stop signals: SIGTERM and SIGHUP end a command as Ctrl-C does, the CLI learns which one it was, and a
stopped command always ends: a second signal, or a cleanup that outlasts STOP_GRACE, exits at once."""

from __future__ import annotations

import faulthandler
import os
import signal
import tempfile
import threading
import time
from contextlib import contextmanager

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # what timeout, systemd, Kubernetes and `ray job stop` send
STOP_GRACE = 30.0  # seconds a stopped command may spend cleaning up (Kubernetes' default grace before its SIGKILL)
_STOP_SIGNALS = {"handle": False, "received": None, "stopping": False, "defer": 0, "pending": None}
# handled (the CLI)? the stop signal; stopping? inside deferred() (depth)? the stop deferred there


def handle_stop_signals() -> None:
    """From now on SIGTERM and SIGHUP raise KeyboardInterrupt in the main thread, as SIGINT does (see stop_signal).

    ray.init installs its own SIGTERM handlers (a driver's sys.exit, and a local head node's that kills
    its Ray processes under the running driver, which then aborts with a C++ stack dump); connect()
    puts ours back after it (restore_stop_handlers).
    """
    _STOP_SIGNALS["handle"] = True
    restore_stop_handlers()


def restore_stop_handlers() -> None:
    """Install our handlers again (after ray.init replaced them), if handle_stop_signals asked for them."""
    if _STOP_SIGNALS["handle"] and threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGINT, *STOP_SIGNALS):
            signal.signal(signum, _raise_stopped)


def _raise_stopped(signum, frame) -> None:
    stop = signal.Signals(signum)
    if _STOP_SIGNALS["stopping"]:  # a second Ctrl-C or stop signal: the user (or supervisor) will not wait
        os._exit(128 + stop)
    _STOP_SIGNALS["stopping"] = True
    if stop != signal.SIGINT:
        _STOP_SIGNALS["received"] = stop  # Ray's blocking calls re-raise it as a plain KeyboardInterrupt
    threading.Thread(target=_exit_after_grace, args=(stop,), name="stop grace", daemon=True).start()
    if _STOP_SIGNALS["defer"]:
        _STOP_SIGNALS["pending"] = stop
        return
    raise KeyboardInterrupt(stop.name)


@contextmanager
def deferred():
    """A stop that arrives inside is raised (KeyboardInterrupt) as the block ends: for writes that must
    not be cut in two, e.g. a line written to two places. A second stop still ends the process at once."""
    _STOP_SIGNALS["defer"] += 1
    try:
        yield
    finally:
        _STOP_SIGNALS["defer"] -= 1
    stop = _STOP_SIGNALS["pending"]
    if stop is not None and not _STOP_SIGNALS["defer"]:
        _STOP_SIGNALS["pending"] = None
        raise KeyboardInterrupt(stop.name)


def _exit_after_grace(stop: signal.Signals) -> None:
    """End the process if it is still cleaning up STOP_GRACE seconds after `stop`, leaving every thread's
    stack in a file: a stopped command must end, even when a cleanup hangs (staging and checkpoints
    left behind are a later run's leftovers, removed under its lease)."""
    time.sleep(STOP_GRACE)
    path = os.path.join(tempfile.gettempdir(), f"padim-ray-stopping-{os.getpid()}.log")
    with open(path, "w") as file:
        faulthandler.dump_traceback(file, all_threads=True)
    os.write(2, f"error: still stopping {STOP_GRACE:g} s after {stop.name}; exiting now (threads' stacks in {path})\n".encode())
    os._exit(128 + stop)


def stop_signal() -> signal.Signals | None:
    """The stop signal (SIGTERM, SIGHUP) that interrupted this process, if one did (None for Ctrl-C)."""
    return _STOP_SIGNALS["received"]
