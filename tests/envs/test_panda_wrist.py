"""robosuite 1.4.1's Panda wrist collision geom under LIBERO's robosuite 1.4.0: model, compiled env, wrist contact."""

from __future__ import annotations

import pytest

pytest.importorskip("libero.libero", reason="LIBERO is not installed (pip install 'pi0-lightning[libero]')")

from pi0_lightning.envs import panda_wrist  # noqa: E402
from pi0_lightning.envs.panda_wrist import (  # noqa: E402
    has_wrist_collision,
    install_wrist_collision,
    make_env,
    measure_wrist_contact,
    uninstall_wrist_collision,
    wrist_collision_installed,
    wrist_geom_properties,
)


@pytest.fixture(autouse=True)
def restore_install_state():
    """The wrapper is process-wide: leave it as the test found it."""
    was = wrist_collision_installed()
    yield
    if was:
        install_wrist_collision()
    else:
        uninstall_wrist_collision()


def _wrist_body(model):
    from robosuite.utils.mjcf_utils import find_elements

    return find_elements(root=model.worldbody, tags="body", attribs={"name": "robot0_link7"}, return_first=True)


def test_install_amends_the_panda_model_like_robosuite_141():
    from libero.libero.envs.robots import MountedPanda

    uninstall_wrist_collision()
    assert install_wrist_collision() is True  # first call installs
    assert wrist_collision_installed() and install_wrist_collision() is False  # idempotent
    model = MountedPanda()
    body = _wrist_body(model)
    geoms = [g for g in body.findall("geom") if g.get("name") == "robot0_link7_collision"]
    assert len(geoms) == 1
    # 1.4.1's attributes after robosuite's loader (name/mesh prefix, collision colour); nothing else
    assert geoms[0].attrib == {
        "type": "mesh",
        "group": "0",
        "mesh": "robot0_link7",
        "name": "robot0_link7_collision",
        "rgba": "0 0.5 0 1",
    }
    # 1.4.1's position: last geom of link7, before its child body right_hand
    children = list(body)
    i = children.index(geoms[0])
    assert children[i + 1].tag == "body" and children[i + 1].get("name") == "robot0_right_hand"
    assert all(c.tag == "geom" and c.get("group") == "1" for c in children if c.tag == "geom" and c is not geoms[0])
    assert model.contact_geoms[-1] == "robot0_link7_collision"
    assert panda_wrist.amend_robot_model(model) is False  # already there

    assert uninstall_wrist_collision() and not wrist_collision_installed()
    assert uninstall_wrist_collision() is False
    bare = MountedPanda()
    assert not [g for g in _wrist_body(bare).findall("geom") if g.get("group") in (None, "0")]
    assert "robot0_link7_collision" not in bare.contact_geoms


def test_compiled_env_has_the_geom_only_when_installed():
    uninstall_wrist_collision()
    without = make_env("libero_spatial", 0, wrist=False)
    try:
        assert not has_wrist_collision(without.sim)
        n_without = wrist_geom_properties(without.sim)["ngeom"]
    finally:
        without.close()
    with_ = make_env("libero_spatial", 0, wrist=True)
    try:
        assert has_wrist_collision(with_.sim)
        props = wrist_geom_properties(with_.sim)
        with_.reset()
        with_.step([0.0] * 6 + [-1.0])  # resets and steps
    finally:
        with_.close()
    assert not wrist_collision_installed()  # make_env restored the install state
    assert props == {
        "ngeom": n_without + 1,
        "name": "robot0_link7_collision",
        "body": "robot0_link7",
        "type": "mesh",
        "mesh": "robot0_link7",
        "group": 0,
        "contype": 1,
        "conaffinity": 1,
        "condim": 3,
        "friction": [1.0, 0.005, 0.0001],
        "rgba": [0.0, 0.5, 0.0, 1.0],
    }


def test_wrist_sweep_moves_the_bowl_only_with_the_geom():
    # Measured (init state 0, 5 mm below the rim): 8.98 cm with the geom (link7 only), 0.00 cm without (no contact)
    with_ = measure_wrist_contact(True, depth=0.005, init_state=0)
    without = measure_wrist_contact(False, depth=0.005, init_state=0)
    assert set(with_.robot_contacts) == {"robot0_link7_collision"} and with_.displacement_cm > 5.0
    assert without.robot_contacts == {} and without.displacement_cm < 0.2
    assert with_.self_contacts == without.self_contacts == 0


def test_libero_env_builds_the_141_panda_unless_told_otherwise():
    from pi0_lightning.envs.libero import LiberoEnv, LiberoEnvConfig

    for wrist in (True, False):
        env = LiberoEnv(LiberoEnvConfig(resolution=64, num_steps_wait=1, hard_reset=False, wrist_collision=wrist))
        env.set_render(False)
        env.reset(options={"task_id": 0, "init_state": 0})
        assert has_wrist_collision(env.sim) == wrist
        env.close()
