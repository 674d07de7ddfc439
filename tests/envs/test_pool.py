"""EnvPool: round results, render flag, chunks of steps, rounds in flight (submit / wait / gather), crash / hang /
exception handling with replacement, clean shutdown.

The workers (forkserver) unpickle the env factory by module name, so ``fake_env`` must be importable in them: the
child receives the parent's ``sys.path`` at start time, so putting this directory on ``sys.path`` here is enough.
"""

from __future__ import annotations

import functools
import gc
import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from fake_env import CounterEnv  # noqa: E402

from pi0_lightning.envs.pool import Command, EnvPool, WorkerFailure  # noqa: E402


def a(k: int) -> np.ndarray:
    return np.array([k], dtype=np.int64)


def pid_alive(pid: int) -> bool:
    """True while the process exists and is not a zombie (an unreaped zombie has already exited)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:  # no /proc: fall back to signal 0
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        return True
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_dead(pids, timeout: float = 5.0) -> list[int]:
    """The pids still alive after waiting up to ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while (alive := [p for p in pids if pid_alive(p)]) and time.monotonic() < deadline:
        time.sleep(0.05)
    return alive


@pytest.fixture
def pool():
    with EnvPool(functools.partial(CounterEnv), 3, timeout_s=20) as p:
        yield p


def test_lockstep_reset_and_step_in_worker_order(pool):
    out = pool.reset([2, 0, 1], seeds=[7, 8, None], options=[{"start": 2}, {"start": 0}, None])
    assert [o["x"].tolist() for o, _ in out] == [[2], [0], [0]]
    assert [info["seed"] for _, info in out] == [7, 8, None]

    out = pool.step([1, 2], [a(3), a(9)])  # a subset, in any order
    (obs1, r1, term1, trunc1, _), (obs2, r2, term2, trunc2, _) = out
    assert (obs1["x"].tolist(), r1, term1, trunc1) == ([3], 3.0, False, False)
    assert (obs2["x"].tolist(), r2, term2, trunc2) == ([11], 11.0, True, False)
    assert pool.call([0, 1, 2], "info")[1]["counter"] == 3
    assert pool.restarts == 0
    assert pool.reset([]) == [] and pool.step([], []) == []


def test_render_flag_only_affects_the_selected_step(pool):
    pool.reset([0, 1, 2], options=[{"start": 1}, {"start": 2}, {"start": 3}])
    out = pool.step([0, 1, 2], [a(1)] * 3, render=[True, False, True])
    assert [("image" in obs) for obs, *_ in out] == [True, False, True]
    image = out[2][0]["image"]
    assert image.shape == (4, 4, 3) and image.dtype == np.uint8 and (image == 4).all()
    # One-shot: the next step (render not given, so set_render is not sent) has no image.
    out = pool.step([0, 1, 2], [a(1)] * 3)
    assert not any("image" in obs for obs, *_ in out)


def test_call_and_env_vars_reach_the_env():
    env_fn = functools.partial(CounterEnv, env_var="POOL_TEST_VAR")
    with EnvPool(env_fn, 2, timeout_s=20, env_vars={"POOL_TEST_VAR": "egl"}) as pool:
        infos = pool.call([1, 0], "info")
        assert [i["env_value"] for i in infos] == ["egl", "egl"]
        assert infos[0]["pid"] == pool._procs[1].pid and infos[1]["pid"] == pool._procs[0].pid
        out = pool.call([0], "reset", kwargs_list=[{"options": {"start": 4}}])
        assert out[0][0]["x"].tolist() == [4]


def test_worker_killed_mid_episode_is_replaced(pool):
    pool.reset([0, 1, 2])
    pool.step([0, 1, 2], [a(1), a(2), a(3)])
    old_pid = pool._procs[1].pid
    os.kill(old_pid, signal.SIGKILL)

    t0 = time.monotonic()
    out = pool.step([0, 1, 2], [a(1)] * 3)
    assert time.monotonic() - t0 < 5  # detected through the sentinel, not the 20 s timeout
    assert out[1] == WorkerFailure(1, "crashed (exit code -9)")
    assert [out[0][0]["x"].tolist(), out[2][0]["x"].tolist()] == [[2], [4]]
    assert pool.restarts == 1

    assert pool._procs[1].pid != old_pid
    obs, _ = pool.reset([1], options=[{"start": 5}])[0]
    assert obs["x"].tolist() == [5]
    assert pool.step([1, 0], [a(1), a(1)])[0][0]["x"].tolist() == [6]
    assert pool.restarts == 1


@pytest.mark.parametrize(("mode", "exitcode"), [("exit", 3), ("kill", -9)])
def test_worker_crash_inside_env(mode, exitcode):
    with EnvPool(functools.partial(CounterEnv, crash_at=5, crash_mode=mode), 2, timeout_s=20) as pool:
        pool.reset([0, 1], options=[{"start": 4}, {"start": 0}])
        out = pool.step([0, 1], [a(1), a(1)])
        assert out[0] == WorkerFailure(0, f"crashed (exit code {exitcode})")
        assert out[1][0]["x"].tolist() == [1]
        assert pool.restarts == 1
        pool.reset([0])
        assert pool.step([0], [a(2)])[0][0]["x"].tolist() == [2]


def test_hang_times_out_and_is_replaced(caplog):
    with EnvPool(functools.partial(CounterEnv, hang_at=5), 2, timeout_s=1.5) as pool:
        pool.reset([0, 1], options=[{"start": 4}, {"start": 0}])
        t0 = time.monotonic()
        with caplog.at_level("WARNING", logger="pi0_lightning.envs.pool"):
            out = pool.step([0, 1], [a(1), a(1)])
        elapsed = time.monotonic() - t0
        assert 1.4 < elapsed < 6
        assert out[0] == WorkerFailure(0, "timed out after 1.5 s")
        assert out[1][0]["x"].tolist() == [1]
        assert pool.restarts == 1
        assert [r.getMessage() for r in caplog.records if "worker 0" in r.getMessage()] == [
            "env worker 0 failed: timed out after 1.5 s; replacing it with a fresh process (restart #1)"
        ]
        pool.reset([0])
        assert pool.step([0, 1], [a(1), a(1)])[0][0]["x"].tolist() == [1]


def test_env_exception_is_a_failure_with_the_message():
    with EnvPool(functools.partial(CounterEnv, raise_at=3), 2, timeout_s=20) as pool:
        pool.reset([0, 1])
        old_pid = pool._procs[1].pid
        out = pool.step([0, 1], [a(1), a(3)])
        assert out[0][0]["x"].tolist() == [1]
        assert out[1] == WorkerFailure(1, "error: ValueError: counter reached 3")
        assert "Traceback" in out[1].traceback and "fake_env.py" in out[1].traceback
        assert pool.restarts == 1 and pool._procs[1].pid != old_pid

        out = pool.call([0], "no_such_method")  # any exception, same path
        assert out[0].reason == "error: AttributeError: 'CounterEnv' object has no attribute 'no_such_method'"
        assert pool.restarts == 2


def test_close_leaves_no_live_children():
    pool = EnvPool(functools.partial(CounterEnv), 2, timeout_s=20)
    pool.reset([0, 1])
    procs = list(pool._procs)
    pids = [p.pid for p in procs]
    pool.close()
    pool.close()  # idempotent
    assert pool.closed
    assert wait_dead(pids) == []
    assert not set(pids) & {c.pid for c in mp.active_children()}
    with pytest.raises(RuntimeError, match="closed"):
        pool.step([0], [a(1)])


def test_garbage_collection_closes_the_pool():
    pool = EnvPool(functools.partial(CounterEnv), 2, timeout_s=20)
    pool.call([0, 1], "info")  # workers fully up
    pids = [p.pid for p in pool._procs]
    del pool
    gc.collect()
    assert wait_dead(pids) == []


def _run_script(body: str) -> list[int]:
    """Run ``body`` in a fresh interpreter that prints its worker pids on the first line; return them.

    The workers inherit the script's stdout, so read just that line and wait for the script itself, rather than
    wait for EOF (which an orphaned worker would hold off).
    """
    script = textwrap.dedent(
        f"""
        import functools, os, signal, sys, threading
        sys.path.insert(0, {str(HERE)!r})
        import numpy as np
        from fake_env import CounterEnv
        from pi0_lightning.envs.pool import EnvPool
        """
    ) + textwrap.dedent(body)
    with subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True) as proc:
        try:
            first_line = proc.stdout.readline()
            proc.wait(timeout=20)
        finally:
            proc.kill()
    pids = [int(p) for p in first_line.split()]
    assert len(pids) == 2, (proc.returncode, first_line)
    return pids


def test_interpreter_exit_without_close_leaves_no_orphans():
    pids = _run_script(
        """
        pool = EnvPool(functools.partial(CounterEnv), 2, timeout_s=20)
        pool.reset([0, 1])
        print(*[p.pid for p in pool._procs], flush=True)
        """
    )
    assert wait_dead(pids) == []


def test_hard_killed_parent_leaves_no_orphans_even_with_busy_workers():
    # The workers hang inside step, so they never read their command pipe's EOF; the lifeline thread must end them.
    pids = _run_script(
        """
        pool = EnvPool(functools.partial(CounterEnv, hang_at=1), 2, timeout_s=60)
        pool.reset([0, 1])
        print(*[p.pid for p in pool._procs], flush=True)
        threading.Timer(0.5, os.kill, (os.getpid(), signal.SIGKILL)).start()
        pool.step([0, 1], [np.array([1]), np.array([1])])
        """
    )
    assert wait_dead(pids) == []


def test_invalid_arguments():
    env_fn = functools.partial(CounterEnv)
    with pytest.raises(ValueError, match="start_method must be one of"):
        EnvPool(env_fn, 1, start_method="threads")
    with pytest.raises(ValueError, match="num_workers"):
        EnvPool(env_fn, 0)
    with pytest.raises(TypeError, match="picklable"):
        EnvPool(lambda: CounterEnv(), 1)
    with EnvPool(env_fn, 2, timeout_s=20) as pool:
        with pytest.raises(ValueError, match="out of range"):
            pool.reset([2])
        with pytest.raises(ValueError, match="distinct"):
            pool.reset([0, 0])
        with pytest.raises(ValueError, match="actions"):
            pool.step([0, 1], [a(1)])
        with pytest.raises(ValueError, match="seeds"):
            pool.reset([0, 1], seeds=[1])
        assert pool.call([0, 1], "info")[0]["counter"] == 0  # nothing was sent by the rejected calls


# ----------------------------------------------------------------------------------------------------------------
# Rounds in flight: submit / wait / gather


def test_steps_command_runs_a_chunk_and_stops_at_the_episode_end(pool):
    pool.reset([0, 1], options=[{"start": 0}, {"start": 0}])
    chunk = Command.steps([a(4)] * 4, render=[False, True, False, True])
    out = pool.gather(pool.submit([0, 1], [chunk, Command.steps([a(1)] * 2)]))
    # worker 0: 4, 8, 12 (terminated at >= 10): the fourth action is not run
    assert [(o["x"].tolist(), term) for o, _, term, _, _ in out[0]] == [([4], False), ([8], False), ([12], True)]
    assert [("image" in o) for o, *_ in out[0]] == [False, True, False]
    assert [o["x"].tolist() for o, *_ in out[1]] == [[1], [2]]
    assert pool.call([0, 1], "info")[0]["counter"] == 12


def test_rounds_in_flight_on_disjoint_workers(pool):
    pool.reset([0, 1, 2], options=[{"start": 0}, {"start": 10}, {"start": 20}])
    first = pool.submit([0, 2], [Command.step(a(1)), Command.step(a(2))])
    second = pool.submit([1], [Command.call("info")])
    with pytest.raises(RuntimeError, match="not gathered"):
        pool.submit([2], [Command.step(a(1))])  # worker 2 is still in the first round
    assert pool.wait([first, second], timeout=10) != []
    assert pool.gather(second)[0]["counter"] == 10  # gathered in any order
    assert [o["x"].tolist() for o, *_ in pool.gather(first)] == [[1], [22]]
    with pytest.raises(RuntimeError, match="already gathered"):
        pool.gather(first)
    assert pool.step([2], [a(1)])[0][0]["x"].tolist() == [23]  # free again
    assert pool.restarts == 0


def test_wait_returns_the_round_that_completes_while_another_hangs(caplog):
    with EnvPool(functools.partial(CounterEnv, hang_at=5), 2, timeout_s=1.5) as pool:
        pool.reset([0, 1], options=[{"start": 4}, {"start": 0}])
        hung = pool.submit([0], [Command.step(a(1))])
        fast = pool.submit([1], [Command.steps([a(1)] * 3)])
        assert pool.wait([hung], timeout=0) == [] and not hung.done
        t0 = time.monotonic()
        assert pool.wait([hung, fast]) == [fast]
        assert time.monotonic() - t0 < 1.0
        assert [o["x"].tolist() for o, *_ in pool.gather(fast)[0]] == [[1], [2], [3]]
        with caplog.at_level("WARNING", logger="pi0_lightning.envs.pool"):
            assert pool.wait([hung]) == [hung]  # at its deadline
            assert pool.gather(hung) == [WorkerFailure(0, "timed out after 1.5 s")]
        assert 1.4 < time.monotonic() - t0 < 6 and pool.restarts == 1
        assert len([r for r in caplog.records if "worker 0 failed" in r.getMessage()]) == 1
        pool.reset([0])
        assert pool.step([0, 1], [a(1), a(1)])[1][0]["x"].tolist() == [4]


def test_worker_killed_while_its_round_is_in_flight_leaves_the_other_round_intact():
    with EnvPool(functools.partial(CounterEnv, hang_at=100), 3, timeout_s=20) as pool:
        pool.reset([0, 1, 2], options=[{"start": 0}, {"start": 99}, {"start": 0}])
        doomed = pool.submit([0, 1], [Command.steps([a(1)] * 2), Command.steps([a(1)] * 2)])  # worker 1 hangs
        other = pool.submit([2], [Command.steps([a(2)] * 2)])
        assert pool.wait([doomed, other]) == [other]
        os.kill(pool._procs[1].pid, signal.SIGKILL)
        t0 = time.monotonic()
        out = pool.gather(doomed)
        assert time.monotonic() - t0 < 5  # seen through the sentinel, not at the 20 s deadline
        assert [o["x"].tolist() for o, *_ in out[0]] == [[1], [2]]
        assert out[1] == WorkerFailure(1, "crashed (exit code -9)") and pool.restarts == 1
        assert [o["x"].tolist() for o, *_ in pool.gather(other)[0]] == [[2], [4]]
        pool.reset([1])
        assert [i["counter"] for i in pool.call([0, 1, 2], "info")] == [2, 0, 4]
