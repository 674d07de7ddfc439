"""The preemption callback: SIGUSR1 inside a SLURM job requeues it once and asks the run to stop."""

from __future__ import annotations

import os
import signal

from pi0_lightning import signals


def test_preemption_handler_requeues_slurm_job(tmp_path, monkeypatch):
    from pi0_lightning.callbacks.preemption import Preemption, slurm_job_id

    log = tmp_path / "scontrol.log"
    fake = tmp_path / "bin" / "scontrol"
    fake.parent.mkdir()
    fake.write_text(f'#!/bin/sh\necho "$@" >> {log}\n')
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}:{os.environ['PATH']}")
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    assert slurm_job_id() == "4242"
    signals.clear()
    callback = Preemption()
    callback._handle(signal.SIGUSR1, None)
    callback._handle(signal.SIGUSR1, None)  # a second signal does not requeue twice
    assert log.read_text().split("\n")[:-1] == ["requeue 4242"]
    assert signals.stop_requested() == signal.SIGUSR1
    signals.clear()
    callback._handle(signal.SIGTERM, None)  # SIGTERM stops without requeueing (the scheduler decides)
    assert log.read_text().count("requeue") == 1
    signals.clear()
