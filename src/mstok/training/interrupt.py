"""Ctrl-C during training: finish the step under way, save it, then stop.

A ``KeyboardInterrupt`` raised in the middle of a step would leave the optimizer, scheduler,
EMA and data position out of step with each other, so nothing could be saved safely. While
:class:`DeferredInterrupt` is active, the first SIGINT only sets :attr:`DeferredInterrupt.requested`
and the training loop stops at the next step boundary (where it saves); a second SIGINT acts as
usual and stops at once, saving nothing.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
from types import FrameType, TracebackType
from typing import Any


class DeferredInterrupt:
    """A context manager that turns the first Ctrl-C into a flag (module docstring).

    Args:
        enabled: install the handler at all. It is only ever installed in the main thread (Python
            delivers signals there) and when SIGINT is not ignored (a ``nohup`` job). Under DDP
            every rank installs it and the engine makes the ranks agree on the step to stop at.
    """

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.requested = False
        self._previous: Any = None
        self._installed = False
        self._pid = os.getpid()

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        if os.getpid() != self._pid:  # a forked data-loader worker inherited the handler: the main process decides
            return
        self.requested = True
        signal.signal(signal.SIGINT, self._previous)  # a second Ctrl-C stops at once
        print("\ninterrupted: finishing this step and saving it (Ctrl-C again to stop at once)", file=sys.stderr)

    def __enter__(self) -> DeferredInterrupt:
        self.requested = False
        if not self.enabled or threading.current_thread() is not threading.main_thread():
            return self
        self._previous = signal.getsignal(signal.SIGINT)
        if self._previous in (signal.SIG_IGN, None):
            return self
        self._pid = os.getpid()
        signal.signal(signal.SIGINT, self._handle)
        self._installed = True
        return self

    def __exit__(self, kind: type[BaseException] | None, err: BaseException | None, tb: TracebackType | None) -> None:
        if self._installed:
            signal.signal(signal.SIGINT, self._previous)
            self._installed = False
