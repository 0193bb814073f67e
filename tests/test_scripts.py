"""scripts/install.sh, with stand-ins for python3, apt-get, nvidia-smi and id on PATH: the
virtual environment made on a Python without venv support (PEP 668 systems), CuPy chosen by the
driver's CUDA version, and a second run that installs nothing."""
from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

INSTALL = Path(__file__).resolve().parents[1] / "scripts" / "install.sh"

# A system python3 whose `-m venv` fails, leaving a half-made directory as Debian's does without
# python3-venv, until the stand-in apt-get has "installed" that package.
SYSTEM_PYTHON = """#!/bin/bash
echo "python3 $*" >> "$LOG"
if [ "$1 $2" = "-m venv" ]; then
    mkdir -p "$3/bin"
    [ -f "$STATE/python3-venv" ] || { echo "The virtual environment was not created: ensurepip is not available" >&2; exit 1; }
    cp "$STANDINS/venv-python" "$3/bin/python"
    exit 0
fi
exit 1
"""
VENV_PYTHON = """#!/bin/bash
case "$*" in
    --version) echo "Python 3.11.2" ;;
    "-m pip --version") echo "pip 23.0.1" ;;
    "-m pip install"*) echo "pip $*" >> "$LOG" ;;
    *) exit 1 ;;
esac
"""
APT_GET = """#!/bin/bash
echo "apt-get $*" >> "$LOG"
case "$*" in *" python3-venv"*) touch "$STATE/python3-venv" ;; esac
"""


@pytest.fixture
def machine(tmp_path):
    standins = tmp_path / "bin"
    standins.mkdir()
    for name, text in (("python3", SYSTEM_PYTHON), ("venv-python", VENV_PYTHON), ("apt-get", APT_GET)):
        (standins / name).write_text(text)
        (standins / name).chmod(0o755)
    (tmp_path / "state").mkdir()
    env = {"PATH": f"{standins}:/usr/bin:/bin", "HOME": str(tmp_path), "LOG": str(tmp_path / "log"),
           "STATE": str(tmp_path / "state"), "STANDINS": str(standins), "GPUCONV_VENV": str(tmp_path / "venv")}

    def run(*extras, cuda=None, uid=0):
        for name, text in (("nvidia-smi", None if cuda is None else f'echo "| NVIDIA-SMI 580.65  Driver Version: '
                                                                      f'580.65  CUDA Version: {cuda}     |"'),
                           ("id", None if uid == 0 else f"echo {uid}")):
            (standins / name).unlink(missing_ok=True)
            if text is not None:
                (standins / name).write_text(f"#!/bin/bash\n{text}\n")
                (standins / name).chmod(0o755)
        log = tmp_path / "log"
        log.write_text("")
        result = subprocess.run(["bash", str(INSTALL), *extras], env=env, capture_output=True, text=True,
                                stdin=subprocess.DEVNULL, timeout=60)
        return result, [line for line in log.read_text().splitlines() if not line.startswith("python3 -m venv")]

    run.venv = tmp_path / "venv"
    return run


def test_creates_the_environment_after_installing_python3_venv_and_then_reuses_it(machine):
    result, calls = machine("test")
    assert result.returncode == 0, result.stderr
    assert calls[:2] == ["apt-get update -qq", "apt-get install -y -qq python3-venv"]
    assert calls[-1] == "pip -m pip install -q -e .[test]"
    result, calls = machine("test")
    assert result.returncode == 0 and calls == [] and result.stderr == ""  # nothing to do
    result, calls = machine()  # what train.sh asks for: a subset of what is there
    assert result.returncode == 0 and calls == []


@pytest.mark.parametrize("cuda,extra", [("13.0", "cuda13"), ("12.4", "cuda12")])
def test_cupy_follows_the_drivers_cuda_version(machine, cuda, extra):
    result, calls = machine("test", cuda=cuda)
    assert result.returncode == 0, result.stderr
    assert calls[-1] == f"pip -m pip install -q -e .[{','.join(sorted([extra, 'test']))}]"
    result, calls = machine(cuda=cuda)
    assert result.returncode == 0 and calls == []


def test_an_old_driver_gets_no_cupy_and_a_note(machine):
    result, calls = machine(cuda="11.8")
    assert result.returncode == 0
    assert calls[-1] == "pip -m pip install -q -e ."
    assert "older than the 12 CuPy needs" in result.stderr


def test_extras_accumulate(machine):
    machine()
    result, calls = machine("test")  # test.sh after train.sh installs what is missing, keeping the rest
    assert calls == ["pip -m pip install -q -e .[test]"]


def test_without_root_it_says_what_to_install(machine):
    result, calls = machine("test", uid=1000)
    assert result.returncode == 1
    assert "install python3-venv (e.g. 'sudo apt-get install python3-venv') and run again" in result.stderr
    assert calls == []
    assert not machine.venv.exists()  # the half-made environment is not left to look like one
