"""scripts/gpu_check.sh, the prepared GPU check: it parses, refuses unknown options, and names only
test files that exist (its --dry-run, the whole check on the CPU, takes minutes: run it by hand)."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def test_the_script_parses():
    assert subprocess.run(["bash", "-n", str(SCRIPT)], capture_output=True).returncode == 0


def test_an_unknown_option_is_refused_with_the_usage(tmp_path):
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2 and "usage: scripts/gpu_check.sh [--dry-run]" in done.stderr


def test_the_test_files_it_runs_exist():
    named = set(re.findall(r"tests/test_\w+\.py", SCRIPT.read_text()))
    assert named and all((SCRIPT.parents[1] / name).is_file() for name in named)
