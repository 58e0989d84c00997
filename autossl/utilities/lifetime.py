"""Worker processes that end when their parent ends, whatever ends it.

A daemonic ``multiprocessing`` worker is only stopped by its parent's normal exit; a parent
killed by a signal (SIGKILL, an unhandled SIGTERM, the OOM killer) leaves it running. Call
``exit_with_parent()`` first thing in a worker:

- on Linux, ``prctl(PR_SET_PDEATHSIG, SIGKILL)``: the kernel kills the worker the moment the
  thread that started it ends (so it is only used when that thread is the main thread);
- everywhere, a daemon thread that polls ``os.getppid()`` every ``interval`` seconds: a worker
  whose parent has died is re-parented, so its parent pid changes, and it exits.

``expected_parent`` (the parent's pid, taken before the worker started) closes the gap of a
parent that died before the worker got here.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1
POLL_INTERVAL = 0.25


def set_parent_death_signal(sig: int = signal.SIGKILL) -> bool:
    """Linux: ask the kernel to send ``sig`` to this process when its parent (thread) ends.
    Returns whether it was set."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def _watch(parent: int, interval: float) -> None:
    while True:
        time.sleep(interval)
        if os.getppid() != parent:
            os._exit(0)


def exit_with_parent(expected_parent: int | None = None, use_prctl: bool = True,
                     interval: float = POLL_INTERVAL) -> None:
    """End this (worker) process when its parent ends; see the module docstring."""
    if use_prctl:
        set_parent_death_signal(signal.SIGKILL)
    parent = os.getppid()
    if expected_parent is not None and parent != expected_parent:
        os._exit(0)  # the parent died before this worker got here
    threading.Thread(target=_watch, args=(parent, interval), daemon=True, name="autossl-parent-watch").start()
