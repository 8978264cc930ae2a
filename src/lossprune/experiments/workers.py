"""Worker processes that end when the sweep that started them ends, however it ends.

A sweep killed with SIGTERM or SIGKILL runs no cleanup code, so its worker processes would keep
computing (and holding about 500 MB each) forever. Each worker therefore watches its parent from
the start: on Linux the kernel sends it SIGKILL when the parent exits
(``prctl(PR_SET_PDEATHSIG)``, see prctl(2)); everywhere, a daemon thread also checks once a second
that the parent is still its parent (an orphan is re-parented, so ``os.getppid`` changes).
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
import threading
import time

__all__ = ["die_with_parent"]

_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
_WATCH_SECONDS = 1.0


def die_with_parent(parent_pid: int) -> None:
    """Make this process exit when ``parent_pid`` exits (a pool's ``initializer``)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    # The parent may already have died before prctl took effect: look once now.
    _exit_if_orphaned(parent_pid)
    threading.Thread(target=_watch, args=(parent_pid,), name="parent-watchdog", daemon=True).start()


def _exit_if_orphaned(parent_pid: int) -> None:
    if os.getppid() != parent_pid:
        os._exit(1)  # no cleanup to run: the records are written by the parent alone


def _watch(parent_pid: int) -> None:
    while True:
        time.sleep(_WATCH_SECONDS)
        _exit_if_orphaned(parent_pid)
