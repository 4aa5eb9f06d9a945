"""run.sh: a venv that cannot be made, or no longer fits, is named with what to do. These test the
script as a process, in a copy of the project, with stand-ins for Python that fail as a machine
without python3-venv, or with an old Python, does."""

import shutil
import subprocess
import sys

import pytest
from conftest import REPO


@pytest.fixture
def project(tmp_path):
    """A copy of run.sh and the requirements, with a folder for stand-in interpreters."""
    for name in ("run.sh", "requirements.txt", "requirements-dev.txt"):
        shutil.copy(REPO / name, tmp_path / name)
    (tmp_path / "stand-ins").mkdir()
    return tmp_path


def stand_in(project, name, body):
    """A bash script that plays a Python interpreter; "$@" are the arguments run.sh gives it."""
    path = project / "stand-ins" / name
    path.write_text(f"#!/usr/bin/env bash\n{body}\n")
    path.chmod(0o755)
    return path


def run_sh(project, *args, python=None):
    environment = {"PATH": "/usr/bin:/bin", **({"PYTHON": str(python)} if python else {})}
    return subprocess.run(
        ["bash", str(project / "run.sh"), *args], capture_output=True, text=True, timeout=60, env=environment
    )


def test_a_venv_that_cannot_be_made_is_removed_with_what_to_install(project):
    # As Debian's python3 without python3-venv: `-m venv` leaves a python but no pip, and fails.
    python = stand_in(
        project,
        "python3",
        f"""
if [ "$1" = "-m" ] && [ "$2" = "venv" ]; then
    mkdir -p "$3/bin" && ln -s {sys.executable} "$3/bin/python"
    echo "The virtual environment was not created successfully because ensurepip is not available." >&2
    exit 1
fi
exec {sys.executable} "$@" """,
    )
    result = run_sh(project, "--help", python=python)
    assert result.returncode == 2
    assert "apt-get install python3-venv" in result.stderr and "venv/ was removed" in result.stderr
    assert not (project / "venv").exists()  # the next run starts afresh


def test_a_venv_without_pip_is_named_with_what_to_do(project):
    (project / "venv" / "bin").mkdir(parents=True)
    stand_in(
        project,
        "python-without-pip",
        f"""
if [ "$1" = "-m" ] && [ "$2" = "pip" ]; then echo "No module named pip" >&2; exit 1; fi
exec {sys.executable} "$@" """,
    ).rename(project / "venv" / "bin" / "python")
    result = run_sh(project, "--help")
    assert result.returncode == 2
    assert "venv/ has no pip" in result.stderr and "rm -rf venv" in result.stderr


def test_a_venv_of_an_old_python_is_refused(project):
    (project / "venv" / "bin").mkdir(parents=True)
    stand_in(
        project,
        "python3.10",
        """
if [ "$1" = "--version" ]; then echo "Python 3.10.12"; exit 0; fi
exec python3.10-is-not-here "$@" """,
    ).rename(project / "venv" / "bin" / "python")
    result = run_sh(project, "--help")
    assert result.returncode == 2
    assert "venv/ holds Python 3.10.12" in result.stderr and "3.11 or newer" in result.stderr
    assert (project / "venv" / "bin" / "python").exists()  # the user's folder is left to them


def test_an_old_python_is_refused_before_making_a_venv(project):
    python = stand_in(
        project,
        "python3",
        """
if [ "$1" = "--version" ]; then echo "Python 3.9.2"; exit 0; fi
exit 1""",
    )
    result = run_sh(project, "--help", python=python)
    assert result.returncode == 2 and "needs Python 3.11 or newer" in result.stderr and "3.9.2" in result.stderr
    assert not (project / "venv").exists()


def recording_venv(project):
    """A venv whose python only writes down each command it is given, as one line of venv/calls."""
    (project / "venv" / "bin").mkdir(parents=True)
    stand_in(
        project,
        "recording-python",
        """
if [ "$1" = "-c" ]; then exit 0; fi  # the version check: 3.11 or newer
echo "$*" >> "$(dirname "$0")/../calls" """,
    ).rename(project / "venv" / "bin" / "python")
    return project / "venv" / "calls"


def test_the_program_installs_only_what_it_runs_with_and_the_tests_add_theirs(project):
    calls = recording_venv(project)
    assert run_sh(project, "--epochs", "1").returncode == 0
    assert run_sh(project, "--epochs", "2").returncode == 0  # installed already: nothing again
    assert run_sh(project, "test", "-q").returncode == 0
    assert run_sh(project, "test", "-x").returncode == 0
    assert calls.read_text().splitlines() == [
        "-m pip --version",
        "-m pip install --disable-pip-version-check -r requirements.txt",
        "mnist_recognition.py --epochs 1",
        "mnist_recognition.py --epochs 2",
        "-m pip --version",
        "-m pip install --disable-pip-version-check -r requirements-dev.txt",
        "-m pytest -q",
        "-m pytest -x",
    ]


def test_the_tools_of_the_tests_are_not_the_programs_requirements():
    runtime = (REPO / "requirements.txt").read_text().lower()
    development = (REPO / "requirements-dev.txt").read_text().lower()
    for tool in ("pytest", "selenium", "ruff"):
        assert tool not in runtime and f"{tool}==" in development
    assert "-r requirements.txt" in development
