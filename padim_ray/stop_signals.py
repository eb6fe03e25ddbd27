"""Stop signals: SIGTERM and SIGHUP end a command as Ctrl-C does, and the CLI learns which one it was."""

from __future__ import annotations

import signal
import threading

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)  # what timeout, systemd, Kubernetes and `ray job stop` send
_STOP_SIGNALS = {"handle": False, "received": None}  # whether stop signals raise KeyboardInterrupt (the CLI), and the last one


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
        for signum in STOP_SIGNALS:
            signal.signal(signum, _raise_stopped)


def _raise_stopped(signum, frame) -> None:
    _STOP_SIGNALS["received"] = signal.Signals(signum)  # Ray's blocking calls re-raise it as a plain KeyboardInterrupt
    raise KeyboardInterrupt(signal.Signals(signum).name)


def stop_signal() -> signal.Signals | None:
    """The stop signal (SIGTERM, SIGHUP) that interrupted this process, if one did."""
    return _STOP_SIGNALS["received"]
