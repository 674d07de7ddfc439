"""A tiny deterministic env for the EnvPool tests; imported by name in the worker processes (keep it light).

The state is an integer counter: ``reset(options={"start": k})`` sets it to k, ``step(a)`` adds ``int(a.sum())``.
Observations are ``{"x": np.array([counter])}``, plus ``"image"`` (a 4x4x3 uint8 image filled with the counter) on
the step or reset right after ``set_render(True)``. Constructor options make the worker crash, hang or raise as soon
as a step brings the counter to (or past) a given value.
"""

from __future__ import annotations

import os
import signal
import time

import numpy as np


class CounterEnv:
    def __init__(
        self,
        *,
        crash_at: int | None = None,
        crash_mode: str = "exit",
        hang_at: int | None = None,
        raise_at: int | None = None,
        env_var: str | None = None,
    ):
        self.counter = 0
        self.render = False
        self.crash_at = crash_at
        self.crash_mode = crash_mode
        self.hang_at = hang_at
        self.raise_at = raise_at
        # Captured at construction, i.e. after the pool applied its env_vars.
        self.env_value = os.environ.get(env_var) if env_var else None

    def _obs(self) -> dict:
        obs = {"x": np.array([self.counter], dtype=np.int64)}
        if self.render:
            obs["image"] = np.full((4, 4, 3), self.counter, dtype=np.uint8)
            self.render = False
        return obs

    def reset(self, *, seed: int | None = None, options: dict | None = None) -> tuple[dict, dict]:
        self.counter = int((options or {}).get("start", 0))
        return self._obs(), {"seed": seed}

    def step(self, action: np.ndarray) -> tuple[dict, float, bool, bool, dict]:
        self.counter += int(np.asarray(action).sum())
        if self.crash_at is not None and self.counter >= self.crash_at:
            if self.crash_mode == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            os._exit(3)
        if self.hang_at is not None and self.counter >= self.hang_at:
            time.sleep(3600)
        if self.raise_at is not None and self.counter >= self.raise_at:
            raise ValueError(f"counter reached {self.counter}")
        return self._obs(), float(self.counter), self.counter >= 10, False, {}

    def set_render(self, render: bool) -> None:
        self.render = bool(render)

    def info(self) -> dict:
        return {"pid": os.getpid(), "counter": self.counter, "env_value": self.env_value}

    def close(self) -> None:
        pass
