"""Build the project's wheel and make venvs of Debian's python3, for tests that run the installed tool.

A venv made from root's pyenv Python cannot be run by other users (its interpreter lives under
/root); Debian's /usr/bin/python3 makes one every user can run.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SYSTEM_PYTHON = "/usr/bin/python3"


def build_wheel(base: Path) -> Path:
    """The project's wheel, built under ``base`` from a copy of the checkout; returns its path."""
    # Built from a copy: setuptools would ship stale files left in the checkout's build/ dir.
    source = base / "source"
    shutil.copytree(
        ROOT,
        source,
        symlinks=True,
        ignore=shutil.ignore_patterns(
            ".git", ".venv", "build", "*.egg-info", "__pycache__", ".*cache", ".hypothesis"
        ),
    )
    wheels = base / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(wheels), str(source)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    shutil.rmtree(source)
    (wheel,) = wheels.glob("iosea_wf-*.whl")
    return wheel


def system_venv(path: Path) -> Path:
    """A new venv of Debian's python3 at ``path``; returns its bin/."""
    subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(path)], check=True, timeout=120)
    return path / "bin"


def editable_user_venv() -> Path:
    """bin/ of a venv of Debian's python3 with this checkout installed (editable), runnable by all.

    Kept in /var/tmp across runs, one per checkout and pyproject.toml. RuntimeError if it cannot be.
    """
    if not os.access(SYSTEM_PYTHON, os.X_OK):
        raise RuntimeError(f"{SYSTEM_PYTHON} is missing: install Debian's python3-venv")
    for part in [ROOT, *ROOT.parents]:
        if not os.stat(part).st_mode & 0o001:
            raise RuntimeError(f"{part} is not traversable by other users: they cannot run this checkout")
    stamp = hashlib.sha1(f"{ROOT}\n{(ROOT / 'pyproject.toml').read_text()}".encode()).hexdigest()[:12]
    venv = Path(f"/var/tmp/iosea-wf-user-venv-{stamp}")
    tool = venv / "bin" / "iosea-wf"
    if not tool.exists() or subprocess.run([str(tool), "--version"], capture_output=True).returncode:
        shutil.rmtree(venv, ignore_errors=True)
        subprocess.run([SYSTEM_PYTHON, "-m", "venv", str(venv)], check=True, timeout=120)
        pip = [str(venv / "bin" / "pip"), "install", "-q", "--disable-pip-version-check"]
        subprocess.run([*pip, "-e", str(ROOT)], check=True, timeout=600, capture_output=True)
    return venv / "bin"
