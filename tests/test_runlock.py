"""One run per folder: a second run in a live run's folder is refused naming the holder, and the
holder's files stay its own; a lock file left by a SIGKILLed run is taken over; fatrain-report
refuses a folder that is not a sweep and writes nothing."""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from fatrain.cli.report import main as report_main
from fatrain.runlock import LOCK_NAME, RunDirLocked, RunLock
from test_report import make_job
from test_train import FAST, read_metrics

# Long enough (several seconds on a loaded CPU) that the second run starts while the first writes.
SLOW = ["trainer.eval_every=50", "trainer.ckpt_every=20", "trainer.log_every=1"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")


def _cli(run_dir, *overrides):
    return [sys.executable, "-m", "fatrain.cli.train", f"hydra.run.dir={run_dir}", *FAST, *SLOW, *overrides]


def _snapshot(root):
    """Every file under ``root`` (hidden ones too) with its mtime and size."""
    return {p: (os.path.getmtime(p), os.path.getsize(p))
            for p in glob.glob(os.path.join(root, "**"), recursive=True, include_hidden=True) if os.path.isfile(p)}


def test_second_lock_on_a_folder_names_the_holder(tmp_path):
    with RunLock(str(tmp_path)) as held:
        assert held.took_over is None
        with pytest.raises(RunDirLocked) as e:
            RunLock(str(tmp_path)).acquire()
        msg = str(e.value)
        assert f"pid {os.getpid()} on host {socket.gethostname()}" in msg and LOCK_NAME in msg
        assert "\n" not in msg
    assert not os.path.exists(tmp_path / LOCK_NAME)  # a finished run leaves no lock file
    RunLock(str(tmp_path)).acquire().release()  # and the folder is free again


def test_second_run_in_a_live_runs_folder_exits_2_and_the_first_run_keeps_its_files(tmp_path):
    run_dir = tmp_path / "run"
    # Different lengths, so the files on disk say which run wrote them.
    first = subprocess.Popen(_cli(run_dir, "trainer.max_steps=300"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    while not (os.path.exists(run_dir / LOCK_NAME) or os.path.exists(run_dir / "metrics.jsonl")):  # it writes
        assert first.poll() is None and time.time() < deadline, "first run ended before it took the folder"
        time.sleep(0.01)
    time.sleep(0.5)
    second = subprocess.run(_cli(run_dir, "trainer.max_steps=200"), capture_output=True, text=True, timeout=300)
    assert first.poll() is None, "the first run ended before the second one started: make it longer"
    first_err = first.communicate(timeout=300)[1]
    assert first.returncode == 0, first_err
    assert second.returncode == 2, second.stderr
    lines = second.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), second.stderr
    assert f"pid {first.pid} on host {socket.gethostname()}" in lines[0] and str(run_dir) in lines[0]

    result = json.loads((run_dir / "result.json").read_text())
    assert result["status"] == "ok" and result["step"] == 300
    assert result["checkpoint"].endswith("ckpt_00000300.pt") and os.path.exists(result["checkpoint"])
    train_steps = [r["step"] for r in read_metrics(run_dir) if "train/loss" in r]
    assert train_steps == list(range(1, 301))  # one series, all of it the first run's
    assert not glob.glob(str(run_dir / "metrics.jsonl.*"))  # nothing set aside or rewound
    assert not os.path.exists(run_dir / LOCK_NAME)


def test_lock_left_by_a_sigkilled_run_is_taken_over_and_resume_works(tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_cli(run_dir, "trainer.max_steps=300"), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 240
    while not glob.glob(str(run_dir / "checkpoints" / "ckpt_*.pt")):
        assert proc.poll() is None and time.time() < deadline, "run ended before its first checkpoint"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    lock_text = (run_dir / LOCK_NAME).read_text()
    assert f"pid {proc.pid} on host" in lock_text  # the dead run's lock file is still there

    resumed = subprocess.run(_cli(run_dir, "trainer.max_steps=300", "resume=auto"), capture_output=True,
                             text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert f"took over {run_dir / LOCK_NAME} from a run that is no longer running (pid {proc.pid}" \
        in resumed.stderr
    assert json.loads((run_dir / "result.json").read_text())["step"] == 300
    assert [r["step"] for r in read_metrics(run_dir) if "train/loss" in r] == list(range(1, 301))
    assert not os.path.exists(run_dir / LOCK_NAME)


def test_lock_of_a_killed_process_is_taken_over_in_process(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", (
        "import os, signal, sys; from fatrain.runlock import RunLock; "
        f"RunLock({str(tmp_path)!r}).acquire(); os.kill(os.getpid(), signal.SIGKILL)")])
    child.wait(timeout=120)
    assert child.returncode == -signal.SIGKILL and os.path.exists(tmp_path / LOCK_NAME)
    with RunLock(str(tmp_path)) as lock:
        assert lock.took_over.startswith(f"pid {child.pid} on host ")
        assert (tmp_path / LOCK_NAME).read_text().startswith(f"pid {os.getpid()} on host ")


@pytest.mark.parametrize("folder", ["single_run", "empty"])
def test_report_on_a_folder_that_is_not_a_sweep_exits_2_and_writes_nothing(folder, tmp_path, capsys):
    target = tmp_path / "target"
    if folder == "single_run":  # a run folder as fatrain-train writes it: .hydra/, metrics.jsonl, result.json
        job = make_job(tmp_path, 0, "naive", 1024, tokens_per_sec=[10, 20, 30])
        job.rename(target)
    else:
        target.mkdir()
    before = _snapshot(str(tmp_path))
    for extra in ([], [f"out={tmp_path / 'new_out'}"]):
        assert report_main([str(target), *extra]) == 2
        out, err = capsys.readouterr()
        lines = err.strip().splitlines()
        assert out == "" and len(lines) == 1 and lines[0].startswith(f"error: {target}"), err
        if folder == "single_run":
            assert "not a sweep" in lines[0]
        else:
            assert "no job directories" in lines[0]
        assert _snapshot(str(tmp_path)) == before and not os.path.exists(tmp_path / "new_out")


def test_two_rank_run_in_a_held_folder_is_refused_on_every_rank(tmp_path):
    """Only rank 0 takes the lock; the other ranks learn of the refusal from it instead of waiting for
    a collective that never comes."""
    run_dir = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "fatrain.cli.train", f"hydra.run.dir={run_dir}", *FAST, "trainer.strategy=ddp"]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                           "MASTER_PORT")}
    with RunLock(str(run_dir)):
        before = _snapshot(str(run_dir))
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                              env={**env, "OMP_NUM_THREADS": "1"})
        holder = (run_dir / LOCK_NAME).read_text()
        after = _snapshot(str(run_dir))
    assert proc.returncode != 0
    errors = sorted(line for line in proc.stderr.splitlines() if line.startswith("error:"))
    assert len(errors) == 2 and errors[1].startswith("error: [rank 1] "), proc.stderr[-4000:]
    assert all(f"pid {os.getpid()} on host" in line for line in errors)
    assert holder.startswith(f"pid {os.getpid()} on host ")  # the holder's lock file untouched
    # Hydra writes its own files (.hydra/, the job log) before the task starts; the run writes nothing.
    assert {p: v for p, v in after.items() if "/.hydra/" not in p and not p.endswith(".log")} == before
    assert not os.path.exists(run_dir / "checkpoints") and not os.path.exists(run_dir / "metrics.jsonl")
