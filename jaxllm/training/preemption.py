"""SIGTERM/SIGINT: finish the current step, save, exit 0. A second signal exits at once.

Multi-host: JAX's preemption service (started by jax.distributed.initialize) has its own
SIGTERM notifier in C++; a Python handler for SIGTERM would replace it, and a SIGTERM to one
host would then stay that host's secret. So under that service only SIGINT gets a Python
handler, SIGTERM is left to JAX, and `should_stop` asks JAX's preemption sync point at every
step: it turns True on every host at the same step (the max step of all hosts + 1) once any
host got the notice, so all hosts save that step. Asking it is not a collective; it can only
fire at the agreed step, so it must be asked at every step, not at log boundaries.
"""
from __future__ import annotations

import os
import signal

import jax
import numpy as np


def jax_preemption_service() -> bool:
    """True when this is a multi-host run with JAX's preemption service (sync manager) up."""
    if jax.process_count() == 1:
        return False
    try:
        from jax._src import distributed  # no public accessor for the sync manager
        return distributed.global_state.preemption_sync_manager is not None
    except (ImportError, AttributeError):
        return False


class PreemptionGuard:
    def __init__(self, signals=None):
        self.requested = False
        self._previous = {}
        if signals is None:
            signals = (signal.SIGINT,) if jax_preemption_service() else (signal.SIGTERM, signal.SIGINT)
        self._signals = tuple(signals)

    @property
    def handles_sigterm(self) -> bool:
        return signal.SIGTERM in self._signals

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

    def start(self, checkpointer, step: int) -> None:
        """Tell JAX's sync point the step the loop starts from, before the first (compiling)
        step: a notice that arrives before any call is answered with sync step 1, which a
        resumed run never reaches (measured: a SIGTERM during a resumed run's first step was
        never acted on)."""
        if jax.process_count() > 1 and checkpointer is not None:
            checkpointer.reached_preemption(step)

    def should_stop(self, checkpointer=None, step: int = 0, *, agree: bool = True) -> bool:
        """True when this run must save and stop after `step`.
        One host: a signal arrived. Multi-host: JAX's preemption sync point was reached (asked
        on every call; the same answer on every host), or, when agree=True, any host got a
        signal its Python handler caught (exchanged with a collective, so every host must call
        with the same `agree` at the same step)."""
        if jax.process_count() == 1:
            return self.requested
        if checkpointer is not None and checkpointer.reached_preemption(step):
            return True
        if not agree:
            return False
        from jax.experimental import multihost_utils
        return bool(np.any(multihost_utils.process_allgather(np.array([self.requested]))))
