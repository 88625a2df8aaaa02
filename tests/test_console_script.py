"""The installed ``kprune`` console script, run as a user runs it: from a directory outside the
repository, so that nothing but the installation puts kprune on ``sys.path`` (pytest puts the
repository root there, which hid issue #22: Hydra's plugin scan missed kprune's launchers in an
editable install)."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import write_mrpc_data, write_tiny_checkpoint

# The script of the environment running the tests (.venv/bin/kprune): whatever install made it.
KPRUNE = Path(sys.executable).with_name("kprune")

needs_script = pytest.mark.skipif(not KPRUNE.exists(), reason=f"no kprune console script beside {sys.executable}")
needs_submitit = pytest.mark.skipif(
    importlib.util.find_spec("hydra_plugins.hydra_submitit_launcher") is None,
    reason="hydra-submitit-launcher is not installed (pip install -e .[cluster])",
)


def outside_env() -> dict[str, str]:
    """The environment without anything that would put the repository on ``sys.path``."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    return {**env, "OMP_NUM_THREADS": "1"}


LAUNCHERS_REGISTERED = """
from hydra.core.plugins import Plugins
from kprune_cli.sweeps.launchers import register_launchers
register_launchers()
known = Plugins.instance().class_name_to_class
for name in ("ResumingSlurmLauncher", "ResumingLocalLauncher"):
    assert "hydra_plugins.kprune_launchers.resuming." + name in known, name
"""


@needs_submitit
def test_hydra_knows_the_launchers_outside_the_repository(tmp_path):
    """What the console script does before Hydra starts, in this environment's install, from elsewhere."""
    probe = subprocess.run([sys.executable, "-c", LAUNCHERS_REGISTERED], cwd=tmp_path, env=outside_env(),
                           capture_output=True, text=True, timeout=120)
    assert probe.returncode == 0, probe.stderr


@needs_script
def test_the_console_script_runs_from_any_directory(tmp_path):
    result = subprocess.run([str(KPRUNE), "run", "--cfg", "job"], cwd=tmp_path, env=outside_env(),
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "rate: 0.5" in result.stdout


@pytest.mark.slow  # two job processes import torch: ~30 s on 2 cores
@needs_script
@needs_submitit
def test_the_console_script_finds_the_local_launcher_outside_the_repository(tmp_path):
    """Issue #22: ``kprune run -m hydra/launcher=local`` from a directory outside the repository
    ended with "Unknown plugin class : 'hydra_plugins.kprune_launchers.resuming.ResumingLocalLauncher'"."""
    model, data = write_tiny_checkpoint(tmp_path / "model"), write_mrpc_data(tmp_path / "data")
    work = tmp_path / "work"
    work.mkdir()
    args = ["run", "-m", "hydra/launcher=local", "task=mrpc", f"model.path={model}", f"data_dir={data}",
            "pruner=magnitude", "rate=0.4,0.6", "calibration.num_tokens=300", "device=cpu", "output_dir=sweep"]
    result = subprocess.run([str(KPRUNE), *args], cwd=work, env=outside_env(), capture_output=True, text=True,
                            timeout=600)
    assert result.returncode == 0, result.stderr
    assert "Unknown plugin class" not in result.stderr
    reports = sorted((work / "sweep").glob("*/report.json"))
    assert [path.parent.name for path in reports] == ["0-mrpc-magnitude-r0.4-s0", "1-mrpc-magnitude-r0.6-s0"]
    assert [json.loads(path.read_text())["rate"] for path in reports] == [0.4, 0.6]
    assert list((work / "sweep" / ".submitit").iterdir())  # the jobs ran through submitit
