"""A pool of simulator environments, each in its own subprocess, driven in rounds by the main process.

Design
------
RL rollouts run N heavy simulator environments (LIBERO: ~1.8 GB of RAM and ~2 s to build each) while the policy
lives only in the main process. The unit of work is a *round*: the main process sends one command to each of a set of
workers, and later gathers their replies, in the order of ``workers``. The two halves are separate calls:
:meth:`EnvPool.submit` sends a round and returns a :class:`Round` handle at once, :meth:`EnvPool.gather` blocks until
that round's replies are in and returns them. Several rounds may be in flight at a time as long as no worker is in
two of them (a worker answers one command before it reads the next), and :meth:`EnvPool.wait` blocks until any of
several rounds can be gathered. A caller can therefore run the policy for some workers while others are stepping
(see `rollout/collector.py`). The blocking calls :meth:`EnvPool.reset`, :meth:`EnvPool.step` and
:meth:`EnvPool.call` are one round each, submitted and gathered at once.

A command (:class:`Command`) is a short list of env method calls executed back to back in the worker. Normally only
the last result comes back; this is how :meth:`EnvPool.step` sends ``set_render`` together with ``step`` in one round
trip. A *steps* command (:meth:`Command.steps`) runs several steps (each with its own render flag) and returns all
their results, stopping early after a step that ends the episode (terminated or truncated): a whole action chunk in
one round trip.

Failure handling
----------------
A round never hangs and never fails as a whole: a worker that cannot answer yields a :class:`WorkerFailure` in its
slot, while the other workers' results are returned intact.

* Crash (segfault, OOM kill, ``os._exit``): replies are awaited on the pipes *and* the process sentinels with
  :func:`multiprocessing.connection.wait`, so a dead worker is noticed at once, not after the timeout.
* Hang: each round has a deadline of ``timeout_s`` after its submission; workers still silent at the deadline are
  reported as timed out.
* Exception inside the env: caught in the worker and sent back as a one-line ``"error: Type: message"`` (the full
  traceback comes along; it is logged at DEBUG level and kept in :attr:`WorkerFailure.traceback`).

In all three cases the env's state is unknown, so when the round is gathered the worker is killed and replaced by a
fresh process built from the same ``env_fn`` (one warning per replacement, counted in :attr:`EnvPool.restarts`). The
new env is *not* reset: the caller marks that episode invalid, then resets the worker and re-runs it.

Processes
---------
Workers start eagerly, but each builds its env lazily on its first command, so creating a pool (and replacing a
worker) is cheap and the build cost lands in the first ``reset``, in parallel across workers. ``env_vars`` (for
example ``MUJOCO_GL=egl``) are set in the worker before ``env_fn`` is even unpickled, so they are in place when the
env's module imports its simulator.

The default start method is ``"forkserver"``: workers are forked from a small, clean server process instead of from
the main process, which by then may hold CUDA contexts and many threads (forking those is unsafe), and it saves
``"spawn"``'s fresh interpreter per worker. With ``"forkserver"`` and ``"spawn"`` the factory is pickled, so it must be
importable by name (e.g. ``functools.partial(SomeEnv, **kwargs)`` with ``SomeEnv`` at module level); the child
receives the parent's current ``sys.path``. Note that the parent's environment variables reach a forkserver worker
as they were when the server started, which is one more reason to pass ``env_vars`` explicitly.

Workers ignore SIGINT (Ctrl-C reaches the whole process group; the main process handles it and closes the pool).
A ``KeyboardInterrupt`` while sending a round or waiting for replies closes the pool, since its pipes are then out of
step. A round submitted and never gathered keeps its workers busy (they reject further rounds); a caller that gives
up on its rounds (an exception between submit and gather) gathers them to free the workers.
:meth:`EnvPool.close` is idempotent and also runs on garbage collection and at interpreter exit; workers are
daemonic, and each holds the read end of a "lifeline" pipe whose only writer is the main process: a thread in the
worker exits the process as soon as that pipe reports EOF, i.e. when the main process is gone, even if it died from
SIGKILL while the env was busy or hung. (The forkserver is no help here: every worker holds its "alive" fd, so the
server outlives the main process as long as any worker does. Under ``"fork"`` the lifeline is not used, since every
forked worker inherits the writer; an idle worker still exits when its command pipe reports EOF.) So no orphan
simulators are left behind.

The pool is not thread-safe: drive it from one thread.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing as mp
import os
import pickle
import signal
import sys
import threading
import time
import traceback
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection, wait
from typing import Any, Protocol

import numpy as np

logger = logging.getLogger(__name__)

_CLOSE_GRACE_S = 3.0  # how long close() lets workers close their envs before terminating them


class EnvProtocol(Protocol):
    """What the pool needs from an env (gymnasium-like). The env is built inside the worker by ``env_fn``."""

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]: ...

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]: ...

    def set_render(self, render: bool) -> None:
        """Whether the NEXT step/reset returns camera images (rendering is expensive)."""

    def close(self) -> None: ...


@dataclass(frozen=True)
class WorkerFailure:
    """Stands in a result slot for a worker that crashed, hung or raised; that worker has been replaced.

    ``reason`` is one line: ``"crashed (exit code -9)"``, ``"timed out after 5.0 s"`` or ``"error: <Type>: <msg>"``.
    ``traceback`` holds the worker-side traceback for env exceptions (empty otherwise).
    """

    worker: int
    reason: str
    traceback: str = field(default="", repr=False, compare=False)


@dataclass(frozen=True)
class Command:
    """What one worker runs in a round: env method calls, back to back.

    The reply is the last call's result, or with ``until_done`` (:meth:`steps`) the list of the ``step`` results,
    the worker stopping after a step that ends the episode (``terminated`` or ``truncated``).
    """

    calls: tuple[tuple[str, tuple, dict], ...]
    until_done: bool = False

    @classmethod
    def call(cls, method: str, args: Sequence[Any] | None = None, kwargs: dict[str, Any] | None = None) -> Command:
        """``getattr(env, method)(*args, **kwargs)``."""
        return cls(((method, () if args is None else tuple(args), {} if kwargs is None else dict(kwargs)),))

    @classmethod
    def reset(cls, seed: int | None = None, options: dict | None = None) -> Command:
        """``env.reset(seed=seed, options=options)``."""
        return cls.call("reset", kwargs={"seed": seed, "options": options})

    @classmethod
    def step(cls, action: np.ndarray, render: bool | None = None) -> Command:
        """``env.step(action)``, preceded by ``env.set_render(render)`` unless ``render`` is None."""
        calls = [] if render is None else [("set_render", (bool(render),), {})]
        return cls((*calls, ("step", (action,), {})))

    @classmethod
    def steps(cls, actions: Sequence[np.ndarray], render: Sequence[bool] | None = None) -> Command:
        """Several steps back to back (``render[j]`` as in :meth:`step`); the reply is the list of their results,
        ending with the step that ended the episode if one did."""
        if render is None:
            render = [None] * len(actions)
        elif len(render) != len(actions):
            raise ValueError(f"got {len(render)} render flags for {len(actions)} actions")
        calls = tuple(c for a, r in zip(actions, render, strict=True) for c in cls.step(a, r).calls)
        return cls(calls, until_done=True)


class Round:
    """A round in flight: returned by :meth:`EnvPool.submit`, redeemed (once) by :meth:`EnvPool.gather`."""

    def __init__(self, workers: list[int], deadline: float, timeout_s: float):
        self.workers = workers
        self.deadline = deadline
        self.timeout_s = timeout_s
        self.results: list[Any] = [None] * len(workers)
        self.failures: dict[int, WorkerFailure] = {}  # position -> failure
        self.pending: dict[int, int] = {}  # worker -> position, until its reply (or its death) is seen
        self.gathered = False

    @property
    def done(self) -> bool:
        """Whether :meth:`EnvPool.gather` would return without waiting (all replies seen, or the deadline passed).
        Replies are read by :meth:`EnvPool.wait` and :meth:`EnvPool.gather`; this property reads nothing."""
        return not self.pending or time.monotonic() >= self.deadline

    def __repr__(self) -> str:
        state = "gathered" if self.gathered else f"{len(self.pending)} pending"
        return f"Round(workers={self.workers}, {state})"


class EnvPool:
    """``num_workers`` env subprocesses driven in rounds; see the module docstring for the design."""

    def __init__(
        self,
        env_fn: Callable[[], EnvProtocol],
        num_workers: int,
        *,
        timeout_s: float = 300.0,
        start_method: str = "forkserver",
        env_vars: dict[str, str] | None = None,
    ):
        methods = mp.get_all_start_methods()
        if start_method not in methods:
            raise ValueError(f"start_method must be one of {methods} on this platform, got {start_method!r}")
        if num_workers < 1:
            raise ValueError(f"num_workers must be at least 1, got {num_workers}")
        if not timeout_s > 0:
            raise ValueError(f"timeout_s must be positive, got {timeout_s}")
        self.num_workers = num_workers
        self.timeout_s = float(timeout_s)
        self.start_method = start_method
        self.restarts = 0
        self._ctx = mp.get_context(start_method)
        self._env_vars = {str(k): str(v) for k, v in (env_vars or {}).items()}
        if start_method == "fork":
            self._env_fn: Any = env_fn  # inherited through fork, need not be picklable
        else:
            # Pickled here, unpickled in the worker after env_vars are set (its module may read them on import).
            try:
                self._env_fn = pickle.dumps(env_fn)
            except Exception as e:
                raise TypeError(
                    f"env_fn must be picklable with start_method={start_method!r} (use e.g. functools.partial of a "
                    f"module-level class): {type(e).__name__}: {e}"
                ) from e
        self._procs: list[Any] = []
        self._conns: list[Connection] = []
        # Lifeline: workers get the reader; we keep the only writer and never write, so EOF means we are gone.
        self._lifeline: tuple[Connection, Connection] | None = None
        if start_method != "fork":
            self._lifeline = self._ctx.Pipe(duplex=False)
        self._closed = False
        self._busy: dict[int, Round] = {}  # worker -> the submitted, not yet gathered round it belongs to
        # Shares the lists (mutated in place on replacement), never `self`, so the pool can be collected.
        self._finalizer = weakref.finalize(
            self, _shutdown, self._procs, self._conns, self._lifeline or (), _CLOSE_GRACE_S
        )
        try:
            for i in range(num_workers):
                proc, conn = self._start_worker(i)
                self._procs.append(proc)
                self._conns.append(conn)
        except BaseException:
            self.close()
            raise

    # ----------------------------------------------------------------------------------------------------------
    # Public API

    def reset(
        self,
        workers: Sequence[int],
        seeds: Sequence[int | None] | None = None,
        options: Sequence[dict | None] | None = None,
    ) -> list[tuple[dict, dict] | WorkerFailure]:
        """``env.reset(seed=..., options=...)`` on each selected worker; results in the order of ``workers``."""
        n = len(workers)
        seeds = _per_worker(seeds, n, "seeds")
        options = _per_worker(options, n, "options")
        return self.gather(self.submit(workers, [Command.reset(s, o) for s, o in zip(seeds, options, strict=True)]))

    def step(
        self,
        workers: Sequence[int],
        actions: Sequence[np.ndarray],
        render: Sequence[bool] | None = None,
    ) -> list[tuple[dict, float, bool, bool, dict] | WorkerFailure]:
        """``env.step(action)`` on each selected worker, in one round trip.

        ``render[k]`` (if given) is passed to ``env.set_render`` just before that worker's step, in the same message;
        with ``render=None`` ``set_render`` is not called at all.
        """
        n = len(workers)
        if len(actions) != n:
            raise ValueError(f"got {len(actions)} actions for {n} workers")
        render = _per_worker(render, n, "render")
        return self.gather(self.submit(workers, [Command.step(a, r) for a, r in zip(actions, render, strict=True)]))

    def call(
        self,
        workers: Sequence[int],
        method: str,
        args_list: Sequence[Sequence[Any]] | None = None,
        kwargs_list: Sequence[dict[str, Any] | None] | None = None,
    ) -> list[Any | WorkerFailure]:
        """``getattr(env, method)(*args_list[k], **kwargs_list[k])`` on each selected worker ``workers[k]``."""
        n = len(workers)
        args_list = _per_worker(args_list, n, "args_list")
        kwargs_list = _per_worker(kwargs_list, n, "kwargs_list")
        commands = [Command.call(method, a, kw) for a, kw in zip(args_list, kwargs_list, strict=True)]
        return self.gather(self.submit(workers, commands))

    def submit(self, workers: Sequence[int], commands: Sequence[Command]) -> Round:
        """Send ``commands[k]`` to ``workers[k]`` for all k and return at once; :meth:`gather` collects the replies.

        The round's deadline is ``timeout_s`` from now. A worker may be in one round at a time: one of a round not
        yet gathered is rejected (RuntimeError), as are repeated or out-of-range indices (ValueError).
        """
        if self._closed:
            raise RuntimeError("EnvPool is closed")
        workers = [int(w) for w in workers]
        if len(set(workers)) != len(workers):
            raise ValueError(f"workers must be distinct, got {workers}")
        if len(commands) != len(workers):
            raise ValueError(f"got {len(commands)} commands for {len(workers)} workers")
        for w in workers:
            if not 0 <= w < self.num_workers:
                raise ValueError(f"worker index {w} out of range for {self.num_workers} workers")
            if w in self._busy:
                raise RuntimeError(f"worker {w} is in a round that was not gathered yet")
        rnd = Round(workers, time.monotonic() + self.timeout_s, self.timeout_s)
        try:
            for pos, (w, command) in enumerate(zip(workers, commands, strict=True)):
                self._busy[w] = rnd
                try:
                    self._conns[w].send(("run", (list(command.calls), command.until_done)))
                except (BrokenPipeError, ConnectionResetError, EOFError):  # the worker died while idle
                    rnd.failures[pos] = WorkerFailure(w, self._crash_reason(w))
                    continue
                rnd.pending[w] = pos
        except BaseException:
            # Ctrl-C (or a bug) mid-send leaves the pipes out of step: give up on the pool.
            self.close(grace_s=0.5)
            raise
        return rnd

    def gather(self, rnd: Round) -> list[Any]:
        """Wait for the replies of a submitted round (until its deadline) and return them in the order of its
        workers; a worker that crashed, hung or raised gives a :class:`WorkerFailure` and is replaced here."""
        if rnd.gathered:
            raise RuntimeError("this round was already gathered")
        if self._closed:
            raise RuntimeError("EnvPool is closed")
        try:
            while rnd.pending:
                self._poll([rnd], None)
        except BaseException:
            # Ctrl-C (or a bug) mid-round leaves replies in flight: the pipes are out of step, so give up on the pool.
            self.close(grace_s=0.5)
            raise
        rnd.gathered = True
        for w in rnd.workers:
            if self._busy.get(w) is rnd:
                del self._busy[w]
        for pos, failure in sorted(rnd.failures.items()):
            if failure.traceback:
                logger.debug("env worker %d raised:\n%s", failure.worker, failure.traceback)
            self._replace(failure.worker, failure.reason)
            rnd.results[pos] = failure
        return rnd.results

    def wait(self, rounds: Sequence[Round], timeout: float | None = None) -> list[Round]:
        """Read the replies that arrive, until at least one of ``rounds`` is :attr:`~Round.done` or ``timeout``
        seconds have passed (None: no limit, the rounds' deadlines end the wait anyway); return the done ones, in
        the order given. ``timeout=0`` only reads the replies already there."""
        if self._closed:
            raise RuntimeError("EnvPool is closed")
        if not rounds:
            return []
        until = None if timeout is None else time.monotonic() + timeout
        try:
            while True:
                remaining = None if until is None else max(0.0, until - time.monotonic())
                self._poll(rounds, remaining)
                done = [r for r in rounds if r.done]
                if done or remaining == 0.0:
                    return done
        except BaseException:
            self.close(grace_s=0.5)
            raise

    def close(self, grace_s: float = _CLOSE_GRACE_S) -> None:
        """Ask every worker to close its env and exit; terminate (then kill) those still alive after ``grace_s``."""
        if self._closed:
            return
        self._closed = True
        if self._finalizer.detach() is not None:
            _shutdown(self._procs, self._conns, self._lifeline or (), grace_s)

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self) -> EnvPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"restarts={self.restarts}"
        return f"EnvPool(num_workers={self.num_workers}, start_method={self.start_method!r}, {state})"

    # ----------------------------------------------------------------------------------------------------------
    # Internals

    def _start_worker(self, index: int) -> tuple[Any, Connection]:
        parent_conn, child_conn = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=_worker_main,
            args=(child_conn, self._lifeline and self._lifeline[0], self._env_fn, self._env_vars),
            name=f"EnvPool-worker-{index}",
            daemon=True,
        )
        with _without_main_module() if self.start_method != "fork" else contextlib.nullcontext():
            proc.start()
        child_conn.close()  # only the worker holds its end: the parent then sees EOF when the worker dies
        return proc, parent_conn

    def _poll(self, rounds: Sequence[Round], timeout: float | None) -> None:
        """One wait on the pipes and sentinels of the pending workers of ``rounds``, at most until the earliest of
        their deadlines (and at most ``timeout`` seconds); store what arrived. Workers still pending once their
        round's deadline has passed are marked as timed out."""
        watched: dict[Any, tuple[Round, int]] = {}
        for rnd in rounds:
            for w in rnd.pending:
                watched[self._conns[w]] = watched[self._procs[w].sentinel] = (rnd, w)
        if watched:
            now = time.monotonic()
            limit = min(rnd.deadline for rnd in rounds if rnd.pending) - now
            if timeout is not None:
                limit = min(limit, timeout)
            for obj in wait(list(watched), timeout=max(0.0, limit)):
                rnd, w = watched[obj]
                pos = rnd.pending.pop(w, None)
                if pos is None:  # its pipe and its sentinel were both ready; already handled
                    continue
                outcome = self._receive(w)
                if isinstance(outcome, WorkerFailure):
                    rnd.failures[pos] = outcome
                else:
                    rnd.results[pos] = outcome
        now = time.monotonic()
        for rnd in rounds:
            if rnd.pending and now >= rnd.deadline:
                for w, pos in rnd.pending.items():
                    rnd.failures[pos] = WorkerFailure(w, f"timed out after {rnd.timeout_s:.1f} s")
                rnd.pending.clear()

    def _receive(self, w: int) -> Any:
        """Read worker ``w``'s reply once its pipe or sentinel is ready: the result, or a WorkerFailure."""
        conn = self._conns[w]
        try:
            if not conn.poll():  # sentinel ready and nothing to read: the worker is gone
                return WorkerFailure(w, self._crash_reason(w))
            reply = conn.recv()
        except (EOFError, OSError):  # died before or while writing its reply
            return WorkerFailure(w, self._crash_reason(w))
        if reply[0] == "ok":
            return reply[1]
        _, message, tb = reply
        return WorkerFailure(w, f"error: {message}", tb)

    def _crash_reason(self, w: int) -> str:
        proc = self._procs[w]
        proc.join(timeout=1.0)  # its pipe may close a moment before the exit code is available
        if proc.exitcode is None:
            return "crashed (connection to worker lost)"
        return f"crashed (exit code {proc.exitcode})"

    def _replace(self, w: int, reason: str) -> None:
        """Kill worker ``w`` (whatever its state) and start a fresh one with the same env_fn in its slot."""
        self.restarts += 1
        logger.warning(
            "env worker %d failed: %s; replacing it with a fresh process (restart #%d)", w, reason, self.restarts
        )
        _kill(self._procs[w])
        self._conns[w].close()
        self._procs[w], self._conns[w] = self._start_worker(w)


def _per_worker(values: Sequence[Any] | None, n: int, name: str) -> list[Any]:
    if values is None:
        return [None] * n
    if len(values) != n:
        raise ValueError(f"got {len(values)} {name} for {n} workers")
    return list(values)


def _kill(proc: Any) -> None:
    if proc.is_alive():
        proc.kill()
    proc.join(timeout=5.0)
    if proc.exitcode is not None:
        proc.close()


def _shutdown(procs: list[Any], conns: list[Connection], lifeline: Sequence[Connection], grace_s: float) -> None:
    """Close all workers: polite request, then SIGTERM, then SIGKILL. Used by close(), GC and atexit."""
    for conn in conns:
        with contextlib.suppress(Exception):  # a dead or unusable pipe: its process is dealt with below
            conn.send(("close", None))
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(timeout=max(0.0, deadline - time.monotonic()))
    stragglers = [p for p in procs if p.is_alive()]
    for proc in stragglers:
        proc.terminate()
    for proc in stragglers:
        proc.join(timeout=1.0)
    for proc in procs:
        _kill(proc)
    for conn in [*conns, *lifeline]:
        conn.close()
    procs.clear()
    conns.clear()


# --------------------------------------------------------------------------------------------------------------
# Worker side


def _exit_when_parent_dies(lifeline: Connection) -> None:
    """Worker thread: block on the lifeline until the main process (its only writer) is gone, then exit at once."""
    with contextlib.suppress(EOFError, OSError):
        lifeline.recv_bytes()
    os._exit(1)


@contextlib.contextmanager
def _without_main_module() -> Iterator[None]:
    """Hide the parent's entry script from multiprocessing while a worker starts.

    spawn/forkserver children re-import the parent's `__main__` (for a console script such as `pi0-lightning`,
    that means torch and Lightning: ~400 MB and seconds per worker). Workers only need the pickled env factory,
    whose module they import by name, so the entry script is hidden during `Process.start()`.
    """
    main = sys.modules.get("__main__")
    if main is None:
        yield
        return
    saved_file, saved_spec = getattr(main, "__file__", None), getattr(main, "__spec__", None)
    try:
        if saved_file is not None:
            del main.__file__
        main.__spec__ = None  # multiprocessing reads the attribute, so it must exist
        yield
    finally:
        if saved_file is not None:
            main.__file__ = saved_file
        main.__spec__ = saved_spec


def _worker_main(conn: Connection, lifeline: Connection | None, env_fn: Any, env_vars: dict[str, str]) -> None:
    """Worker loop: build the env on the first command, run commands until "close" or the main process goes away."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if lifeline is not None:
        threading.Thread(target=_exit_when_parent_dies, args=(lifeline,), name="lifeline", daemon=True).start()
    os.environ.update(env_vars)
    env = None
    try:
        while True:
            try:
                kind, payload = conn.recv()
            except (EOFError, OSError):  # the main process closed its end or died
                return
            except Exception as e:  # the command could not be unpickled
                _send_error(conn, e)
                continue
            if kind == "close":
                return
            try:
                if env is None:
                    factory = pickle.loads(env_fn) if isinstance(env_fn, bytes) else env_fn
                    env = factory()
                calls, until_done = payload
                result, steps = None, []
                for method, args, kwargs in calls:
                    result = getattr(env, method)(*args, **kwargs)
                    if until_done and method == "step":
                        steps.append(result)
                        if result[2] or result[3]:  # terminated or truncated: the rest of the chunk is not run
                            break
                if until_done:
                    result = steps
            except Exception as e:
                _send_error(conn, e)
                continue  # the parent kills and replaces us
            try:
                conn.send(("ok", result))
            except (BrokenPipeError, ConnectionResetError):
                return
            except Exception as e:  # the result could not be pickled (nothing was written)
                _send_error(conn, e)
    finally:
        if env is not None:
            try:
                env.close()
            except Exception:
                logging.getLogger(__name__).debug("env.close() failed in worker", exc_info=True)


def _send_error(conn: Connection, e: BaseException) -> None:
    message = f"{type(e).__name__}: {e}".splitlines()[0] if str(e) else type(e).__name__
    tb = traceback.format_exc()  # sent along; the main process logs it at DEBUG level
    with contextlib.suppress(Exception):
        conn.send(("err", message, tb))
