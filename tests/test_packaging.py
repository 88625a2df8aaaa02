"""The wheel holds what a non-editable install (``pip install .``, ``pip install git+...``) needs.

setup.py discovers the packages (``configs/`` is installed as ``kprune_cli/configs``): a new
sub-package or config file missing from the wheel fails here, and so does a build that warns
(setuptools' ``BuildBackendWarning`` for a config directory left undeclared).
"""

from __future__ import annotations

import importlib.util
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_build(tmp_path_factory) -> tuple[Path, str]:
    """The built wheel and the build's output (stdout and stderr)."""
    pytest.importorskip("setuptools")
    out = tmp_path_factory.mktemp("wheel")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation",
                            "--wheel-dir", str(out), str(REPO)], capture_output=True, text=True, timeout=300)
    if build.returncode != 0:
        pytest.fail(f"building the wheel failed:\n{build.stderr[-2000:]}")
    (built,) = out.glob("*.whl")
    return built, build.stdout + build.stderr


@pytest.fixture(scope="module")
def wheel(wheel_build) -> Path:
    return wheel_build[0]


def test_wheel_builds_without_setuptools_warnings(wheel_build):
    output = wheel_build[1]
    for warning in ("BuildBackendWarning", "would be ignored", "SetuptoolsDeprecationWarning"):
        assert warning not in output


@pytest.fixture(scope="module")
def wheel_files(wheel) -> set[str]:
    with zipfile.ZipFile(wheel) as archive:
        return set(archive.namelist())


def test_wheel_has_every_module(wheel_files):
    modules = {path.relative_to(REPO).as_posix() for package in ("kprune_cli", "hydra_plugins")
               for path in (REPO / package).rglob("*.py")}
    assert modules - wheel_files == set()


def test_wheel_has_every_config_under_the_package(wheel_files):
    configs = {"kprune_cli/configs/" + path.relative_to(REPO / "configs").as_posix()
               for path in (REPO / "configs").rglob("*.yaml")}
    assert configs and configs - wheel_files == set()


def test_installed_copy_finds_its_configs(wheel, tmp_path):
    """Unpacked alone (no source tree next to it), the package resolves its config directory inside itself."""
    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    probe = subprocess.run([sys.executable, "-c", "from kprune_cli.config.paths import CONFIG_DIR; print(CONFIG_DIR)"],
                           cwd=tmp_path, env={"PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, probe.stderr
    found = Path(probe.stdout.strip())
    assert found == target / "kprune_cli" / "configs" and (found / "run.yaml").is_file()


@pytest.mark.skipif(importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
                    reason="hydra-submitit-launcher is not installed (pip install -e .[cluster])")
def test_installed_copy_registers_its_launchers_with_hydra(wheel, tmp_path):
    """Unpacked alone, Hydra knows the package's launchers (hydra/launcher=slurm|local, issue #22)."""
    from test_console_script import LAUNCHERS_REGISTERED

    target = tmp_path / "site"
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(target)
    probe = subprocess.run([sys.executable, "-c", LAUNCHERS_REGISTERED + "import kprune_cli; print(kprune_cli.__file__)"],
                           cwd=tmp_path, env={"PYTHONPATH": str(target)}, capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr
    assert Path(probe.stdout.strip()).is_relative_to(target)  # the unpacked copy, not the source tree
