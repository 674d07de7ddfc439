"""Stop requests: a preemption signal (SLURM's SIGUSR1 before the time limit, SIGTERM from a scheduler or `kill`)
asks the run to stop at its next safe point.

A signal handler may only set a flag; the long loops poll it (`check()` after every lockstep environment step of the
rollout collector, before every training batch) and raise `Preempted`, so a run stops within one step instead of
finishing an iteration the scheduler will not wait for. The flag is process-wide because signals are.
"""

from __future__ import annotations

import signal

_requested: int | None = None


class Preempted(Exception):
    """The run was asked to stop by a signal; it resumes from its newest complete checkpoint."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by {signal.Signals(signum).name}")


def request_stop(signum: int) -> None:
    global _requested
    _requested = signum


def clear() -> None:
    global _requested
    _requested = None


def stop_requested() -> int | None:
    """The signal that asked for a stop, or None."""
    return _requested


def check() -> None:
    """Raise `Preempted` if a stop was requested."""
    if _requested is not None:
        raise Preempted(_requested)
