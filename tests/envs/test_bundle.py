"""The LIBERO bundle is self-contained: unpacked first on PYTHONPATH, a suite's env builds, resets and renders from the
bundle's own modules and assets (the installed copies are shadowed)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("libero")
pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parents[2]

CHECK = """
import sys, xml.etree.ElementTree as ET
bundle = sys.argv[1]
import libero, mujoco, numba, robosuite
from pi0_lightning.envs.libero import LiberoEnv, LiberoEnvConfig
assert all(m.__file__.startswith(bundle) for m in (libero, mujoco, numba, robosuite))
env = LiberoEnv(LiberoEnvConfig(suite="libero_spatial"))
obs, _ = env.reset(options={"task_id": 0, "init_state": 0})
obs, *_ = env.step([0.0] * 6 + [-1.0])
files = [el.attrib["file"] for el in ET.fromstring(env._env.env.sim.model.get_xml()).iter() if "file" in el.attrib]
assert files and all(f.startswith(bundle) for f in files), [f for f in files if not f.startswith(bundle)][:3]
assert obs["agentview"].shape == (256, 256, 3) and obs["agentview"].any()
env.close()
print("bundle ok", len(files))
"""


def test_bundle_builds_a_suite_from_its_own_files(tmp_path):
    out = tmp_path / "libero_spatial.tar.xz"
    run = [sys.executable, "-m", "pi0_lightning.envs.bundle"]
    env = {**os.environ, "MUJOCO_GL": os.environ.get("MUJOCO_GL", "egl")}
    built = subprocess.run([*run, "build", "--suite", "libero_spatial", "--tasks", "0", "--out", str(out)],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    assert out.stat().st_size < 64 * 2**20  # fits one transfer to the GPU machine
    unpacked = tmp_path / "site"
    unpack = [*run, "unpack", str(out), "--into", str(unpacked)]
    shown = subprocess.run(unpack, capture_output=True, text=True, cwd=ROOT)
    assert shown.returncode == 0 and f"PYTHONPATH={unpacked}" in shown.stdout
    assert "needs on the target: " in (unpacked / "libero_bundle.txt").read_text()
    env.update(PYTHONPATH=f"{unpacked}:{ROOT}", LIBERO_CONFIG_PATH=str(unpacked / "libero-config"))
    checked = subprocess.run([sys.executable, "-c", CHECK, str(unpacked)], cwd=tmp_path, env=env, capture_output=True,
                             text=True, timeout=300)  # fmt: skip
    assert checked.returncode == 0 and "bundle ok" in checked.stdout, checked.stderr[-3000:]


def test_bad_task_list_is_one_line(capsys):
    from pi0_lightning.envs.bundle import main

    assert main(["build", "--tasks", "zero", "--out", "x.tar.xz"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
