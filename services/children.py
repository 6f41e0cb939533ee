"""Child processes that do not outlive the process that started them — even when it dies by SIGKILL.

    subprocess.Popen(command, **child_options())   # services.local: each service, the renewer
    die_with_parent()                              # in a child itself (services.offload's reader)

`make run`'s services and a service's background reader both need it; it lives apart from the `make run`
launcher (services.local) so that a running service does not import the launcher.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
from collections.abc import Callable
from typing import Any

__all__ = ["child_options", "die_with_parent"]


def _prctl() -> Callable[..., int] | None:
    """libc's prctl(2), looked up here in the parent: a child between fork and exec should only call it."""
    try:
        return ctypes.CDLL(None, use_errno=True).prctl  # type: ignore[no-any-return]
    except (OSError, AttributeError):  # not Linux
        return None


_PRCTL = _prctl()
_PR_SET_PDEATHSIG = 1  # the signal a process gets when the thread that started it ends, however it ends


def die_with_parent() -> None:
    """Have this process receive SIGTERM when its parent dies, even by SIGKILL: then no service outlives
    `make run` and keeps its port. Linux only; elsewhere a no-op. Called in each child before exec (below), and
    by `services.local` itself, so that the chain also goes when `make` does."""
    if _PRCTL is not None:
        _PRCTL(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _tie_to(parent: int) -> Callable[[], None]:
    def tie() -> None:
        die_with_parent()
        if os.getppid() != parent:  # the parent died before prctl: nobody would ever signal us
            os._exit(1)

    return tie


def child_options() -> dict[str, Any]:
    """Popen options for a child that must not outlive us. Its own session: a Ctrl-C in the terminal reaches only
    `services.local`, which stops the children itself (no child prints a KeyboardInterrupt traceback). prctl ties
    a child to the *thread* that started it, and only the main thread lives as long as the process."""
    if _PRCTL is None or threading.current_thread() is not threading.main_thread():
        return {"start_new_session": True}
    return {"start_new_session": True, "preexec_fn": _tie_to(os.getpid())}
