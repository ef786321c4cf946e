"""SIGTERM/SIGINT: finish the current step, save, exit 0. A second signal exits at once."""
from __future__ import annotations

import os
import signal

import jax
import numpy as np


class PreemptionGuard:
    def __init__(self, signals=(signal.SIGTERM, signal.SIGINT)):
        self.requested = False
        self._previous = {}
        self._signals = signals

    def _handler(self, signum, frame):
        if self.requested:  # second signal: the user means it
            os._exit(128 + signum)
        self.requested = True

    def __enter__(self):
        for s in self._signals:
            try:
                self._previous[s] = signal.signal(s, self._handler)
            except ValueError:  # not the main thread: leave signals alone
                pass
        return self

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)

    def should_stop(self, checkpointer=None, step: int = 0) -> bool:
        """True when any host got a signal, or jax's multi-host preemption notice arrived.
        All processes must agree, or one would save while the others wait in a collective."""
        local = self.requested
        if checkpointer is not None and jax.process_count() > 1:
            local = local or checkpointer.reached_preemption(step)
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            local = bool(np.any(multihost_utils.process_allgather(np.array([local]))))
        return local
