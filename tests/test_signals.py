"""Stop requests raised by signals are seen by the loops that poll them."""

from __future__ import annotations

import signal

import pytest

from pi0_lightning import signals


def test_stop_request_is_raised_once_polled():
    signals.clear()
    signals.check()  # nothing requested: no-op
    signals.request_stop(signal.SIGUSR1)
    with pytest.raises(signals.Preempted, match="SIGUSR1") as e:
        signals.check()
    assert e.value.signum == signal.SIGUSR1 and signals.stop_requested() == signal.SIGUSR1
    signals.clear()
    assert signals.stop_requested() is None
