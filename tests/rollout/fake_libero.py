"""A LIBERO-shaped fake env for collector tests (imported by name in worker processes; keep it light).

A 1-D point starts at `init_state` and moves by action[0] per step; the episode succeeds when it reaches
`goal + task_id`. Images (2x2x3 uint8 filled with the position) are returned only after `set_render(True)`.
If `crash_flag` names an existing file, the first worker to claim it (atomic rename) dies at its first step past
`crash_at`. Episodes of task `raise_task` raise inside the env at their first step.
"""

from __future__ import annotations

import os

import numpy as np


class PointEnv:
    def __init__(self, goal: int = 6, crash_flag: str | None = None, crash_at: int = 2, raise_task: int | None = None):
        self.goal, self.crash_flag, self.crash_at, self.raise_task = goal, crash_flag, crash_at, raise_task
        self.pos, self.task_id, self.render, self.steps = 0, 0, True, 0

    def _obs(self) -> dict:
        obs = {"pos": np.array([self.pos], dtype=np.int64)}
        if self.render:
            obs["agentview"] = np.full((2, 2, 3), self.pos, dtype=np.uint8)
            obs["wrist"] = obs["agentview"].copy()
        self.render = True
        return obs

    def set_render(self, render: bool) -> None:
        self.render = bool(render)

    def reset(self, *, seed=None, options=None):
        options = options or {}
        self.task_id, self.pos, self.steps = int(options["task_id"]), int(options["init_state"]), 0
        return self._obs(), {}

    def step(self, action):
        self.steps += 1
        if self.task_id == self.raise_task:
            raise RuntimeError("simulated env error")
        if self.crash_flag and self.steps > self.crash_at:
            try:  # claim the flag atomically: exactly one worker crashes, even when several reach it together
                os.rename(self.crash_flag, self.crash_flag + ".claimed")
            except FileNotFoundError:
                pass
            else:
                os._exit(3)
        self.pos += int(round(float(action[0])))
        success = self.pos >= self.goal + self.task_id
        return self._obs(), float(success), success, False, {}

    def close(self) -> None:
        pass
