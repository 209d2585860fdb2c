"""scripts/setup.sh --plan: which torch is installed from where, decided without installing anything.

A fake ``nvidia-smi`` first on PATH says whether a GPU is visible; the CPU wheel index is a local
folder (reachable) or a local port nothing listens on (unreachable).
"""

import os
import socket
import subprocess
import sys

import pytest

SETUP = os.path.join(os.path.dirname(__file__), "..", "scripts", "setup.sh")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def fake_command(folder, name, script):
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


def plan(tmp_path, *, gpu: bool, index: str, venv=None, **env):
    bin_dir = tmp_path / "bin"
    fake_command(bin_dir, "nvidia-smi", "echo 'GPU 0: NVIDIA H200'" if gpu else "exit 9")
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("FATRAIN_")}
    run_env.update(PATH=f"{bin_dir}{os.pathsep}{run_env['PATH']}", PYTHON=sys.executable,
                   FATRAIN_VENV=str(venv or tmp_path / "venv"), FATRAIN_TORCH_INDEX=index,
                   FATRAIN_INDEX_TIMEOUT="5", **env)
    proc = subprocess.run(["bash", SETUP, "--plan"], env=run_env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    lines = dict(line.split(": ", 1) for line in proc.stdout.splitlines())
    assert set(lines) == {"venv", "torch", "fatrain"}, proc.stdout
    return lines, proc.stderr


@pytest.mark.parametrize("case", ["cpu_index", "cpu_index_unreachable", "nvidia_gpu_visible"])
def test_plan_picks_torch_and_its_index(tmp_path, case):
    local_index = tmp_path / "whl-cpu"
    (local_index / "torch").mkdir(parents=True)
    unreachable = f"http://127.0.0.1:{closed_port()}/whl/cpu"
    index = unreachable if case == "cpu_index_unreachable" else local_index.as_uri()
    lines, stderr = plan(tmp_path, gpu=case == "nvidia_gpu_visible", index=index)
    assert lines["venv"].startswith(f"create {tmp_path / 'venv'} with ")
    assert not (tmp_path / "venv").exists(), "--plan installed something"
    if case == "cpu_index":
        assert lines["torch"] == f"torch==2.13.0 from {index} (no NVIDIA GPU visible: the CPU build)"
        assert stderr == ""
    elif case == "cpu_index_unreachable":
        assert lines["torch"].startswith("torch==2.13.0 from pip's configured index (no NVIDIA GPU visible; "
                                         f"{index} cannot be reached)")
        assert stderr.startswith(f"warning: the CPU wheel index {index} cannot be reached (")
        assert "FATRAIN_TORCH_INDEX" in stderr and len(stderr.splitlines()) == 1
    else:
        assert lines["torch"].startswith("torch from pip's configured index (an NVIDIA GPU is visible")
        assert stderr == ""


def test_plan_keeps_an_installed_torch_and_takes_a_torch_spec(tmp_path):
    venv = tmp_path / "existing"
    fake_command(venv / "bin", "python", "echo 2.11.0+cpu")
    lines, _ = plan(tmp_path, gpu=False, index=(tmp_path / "none").as_uri(), venv=venv)
    assert lines["venv"] == f"{venv} exists, kept"
    assert lines["torch"] == f"2.11.0+cpu is already in {venv}, kept"
    index = tmp_path / "idx"
    (index / "torch").mkdir(parents=True)
    lines, _ = plan(tmp_path, gpu=False, index=index.as_uri(), FATRAIN_TORCH_SPEC="torch==2.11.0")
    assert lines["torch"].startswith(f"torch==2.11.0 from {index.as_uri()} ")
