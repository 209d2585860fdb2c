"""Stopping and resuming a run: stop signals at a step boundary, a second Ctrl-C, resume=auto
without a folder, damaged newest checkpoints, changed settings, a finished run resumed, and
SIGKILL at random points (mid-write included) giving the same curve."""

import glob
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest

from fatrain import metrics
from fatrain.checkpoint import list_checkpoints, load_checkpoint
from fatrain.interrupt import deliver_to_previous
from fatrain.trainer import run_training
from test_train import FAST, compose_train, read_metrics


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "offline")


def signal_at_step(monkeypatch, step, *signums):
    """Send ``signums`` to this process while the loop logs ``step`` (inside the step loop)."""
    log = metrics.JsonlLogger.log

    def log_and_signal(self, row, at):
        log(self, row, at)
        if at == step and "train/loss" in row:
            for signum in signums:
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(metrics.JsonlLogger, "log", log_and_signal)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT])
def test_stop_signal_checkpoints_the_step_and_resume_continues_the_curve(signum, monkeypatch, tmp_path):
    steps = [*FAST, "trainer.max_steps=8", "trainer.ckpt_every=100", "trainer.eval_every=100"]
    run_training(compose_train(steps), str(tmp_path / "full"))

    signal_at_step(monkeypatch, 3, signum)
    before = signal.getsignal(signum)
    result = run_training(compose_train(steps), str(tmp_path / "stopped"))
    assert signal.getsignal(signum) is before  # the handler the run replaced is back
    assert result["status"] == "interrupted" and result["signal"] == signal.Signals(signum).name
    assert result["step"] == 3 and result["signum"] == signum
    assert load_checkpoint(result["checkpoint"])["step"] == 3
    monkeypatch.undo()
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))
    assert run_training(compose_train([*steps, "resume=auto"]), str(tmp_path / "stopped"))["status"] == "ok"

    def curve(run):
        return [(r["step"], r["train/loss"]) for r in read_metrics(tmp_path / run) if "train/loss" in r]

    assert curve("stopped") == curve("full") and len(curve("full")) == 8


def test_a_handler_installed_before_the_run_gets_the_signal_after_the_checkpoint(monkeypatch, tmp_path):
    # SLURM's submitit requeues the job from its own SIGUSR1 handler: it must still run, after the save.
    seen = []
    previous = signal.signal(signal.SIGUSR1, lambda signum, frame: seen.append(
        list_checkpoints(str(tmp_path / "checkpoints"))))
    try:
        signal_at_step(monkeypatch, 2, signal.SIGUSR1)
        result = run_training(compose_train([*FAST, "trainer.max_steps=6", "trainer.ckpt_every=100"]), str(tmp_path))
        assert seen == []  # held while the step finished and the checkpoint was written
        deliver_to_previous(result["signum"])
        assert seen == [[result["checkpoint"]]]
    finally:
        signal.signal(signal.SIGUSR1, previous)


def test_second_ctrl_c_stops_at_once_and_releases_the_folder(monkeypatch, tmp_path):
    signal_at_step(monkeypatch, 2, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt):
        run_training(compose_train([*FAST, "trainer.max_steps=6", "trainer.ckpt_every=100"]), str(tmp_path))
    assert list_checkpoints(str(tmp_path / "checkpoints")) == []  # nothing of the step in flight
    monkeypatch.undo()
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))
    # The lock went with the process's stack: the folder takes a new run at once.
    assert run_training(compose_train([*FAST, "trainer.max_steps=2"]), str(tmp_path / "again"))["status"] == "ok"
    assert not os.path.exists(tmp_path / ".fatrain.lock")


def _cli(*overrides):
    return [sys.executable, "-m", "fatrain.cli.train", *FAST, *overrides]


@pytest.mark.slow
def test_ctrl_c_on_the_command_line_prints_the_resume_command(tmp_path):
    run = tmp_path / "run"
    env = {**os.environ, "FATRAIN_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    proc = subprocess.Popen(_cli("trainer.max_steps=100000", "trainer.ckpt_every=100000", f"hydra.run.dir={run}"),
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not (run / "metrics.jsonl").exists() or len(read_metrics(run)) < 3:
        assert proc.poll() is None and time.time() < deadline
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130
    assert "Traceback" not in err
    line, = [x for x in err.splitlines() if x.startswith("interrupted by SIGINT")]
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "interrupted"
    assert f"at step {result['step']}: saved checkpoints/ckpt_{result['step']:08d}.pt" in line
    command = line.split("resume with: ", 1)[1].split()
    assert command[0] == "fatrain-train" and command[-2:] == ["hydra.run.dir=run", "resume=auto"]
    assert "train step" in out
    # The printed command resumes (with a nearer end, so the test stays short).
    command = [sys.executable, "-m", "fatrain.cli.train", *command[1:]]
    command = [a for a in command if not a.startswith("trainer.max_steps=")] + [f"trainer.max_steps={result['step'] + 2}"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f"resumed from checkpoints/ckpt_{result['step']:08d}.pt at step {result['step']}" in done.stdout
    assert "settings changed since the checkpoint: trainer.max_steps 100000 -> " in done.stdout


@pytest.mark.slow
def test_resume_auto_without_a_folder_is_refused_and_names_the_newest_run(tmp_path):
    env = {**os.environ, "FATRAIN_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    earlier = tmp_path / "outputs" / "train" / "2026-01-01_00-00-00"
    run_training(compose_train([*FAST, "trainer.max_steps=2"]), str(earlier))
    proc = subprocess.run(_cli("resume=auto"), cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    line, = [x for x in proc.stderr.splitlines() if x.startswith("error:")]
    assert "hydra.run.dir" in line and "outputs/train/2026-01-01_00-00-00" in line
    # No new, empty, time-stamped folder was left behind.
    assert os.listdir(tmp_path / "outputs" / "train") == ["2026-01-01_00-00-00"]


def test_resume_auto_skips_a_damaged_newest_checkpoint(capsys, tmp_path):
    run_training(compose_train([*FAST, "trainer.max_steps=4", "trainer.ckpt_every=2"]), str(tmp_path))
    newest = list_checkpoints(str(tmp_path / "checkpoints"))[-1]
    with open(newest, "r+b") as f:
        f.truncate(os.path.getsize(newest) // 2)
    capsys.readouterr()
    result = run_training(compose_train([*FAST, "trainer.max_steps=6", "trainer.ckpt_every=2", "resume=auto"]),
                          str(tmp_path))
    out = capsys.readouterr()
    assert result["status"] == "ok" and result["step"] == 6
    assert f"checkpoint {newest} is unreadable" in out.err and "skipped" in out.err
    assert "resumed from checkpoints/ckpt_00000002.pt at step 2" in out.out
    steps = [r["step"] for r in read_metrics(tmp_path) if "train/loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]  # the steps after 2 logged once, by the resumed run


def test_resume_auto_with_every_checkpoint_damaged_says_so(tmp_path):
    run_training(compose_train([*FAST, "trainer.max_steps=2"]), str(tmp_path))
    for path in list_checkpoints(str(tmp_path / "checkpoints")):
        open(path, "wb").close()
    with pytest.raises(Exception, match="none of the 1 checkpoints"):
        run_training(compose_train([*FAST, "trainer.max_steps=4", "resume=auto"]), str(tmp_path))


def test_resume_with_changed_settings_keeps_the_original_and_records_the_change(tmp_path):
    run_training(compose_train([*FAST, "trainer.max_steps=2", "optim.lr=0.001"]), str(tmp_path))
    run_training(compose_train([*FAST, "trainer.max_steps=4", "optim.lr=0.0005", "resume=auto"]), str(tmp_path))
    run_training(compose_train([*FAST, "trainer.max_steps=5", "optim.lr=0.0005", "resume=auto"]), str(tmp_path))
    rows = [json.loads(line) for line in (tmp_path / "resumes.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    assert rows[0]["changed"] == {"optim.lr": [0.001, 0.0005], "trainer.max_steps": [2, 4]}
    assert rows[1]["changed"] == {"trainer.max_steps": [4, 5]}
    original = (tmp_path / "config.original.yaml").read_text()
    assert "lr: 0.001" in original and "max_steps: 2" in original


def test_resuming_a_finished_run_logs_nothing_twice(tmp_path):
    cfg = [*FAST, "trainer.max_steps=4", "trainer.eval_every=2"]
    first = run_training(compose_train(cfg), str(tmp_path))
    rows = read_metrics(tmp_path)
    again = run_training(compose_train([*cfg, "resume=auto"]), str(tmp_path))
    assert read_metrics(tmp_path) == rows
    assert again["status"] == "ok" and again["final_val_loss"] == first["final_val_loss"]


@pytest.mark.slow
def test_twenty_sigkills_at_random_points_leave_one_curve(tmp_path):
    """SIGKILL at 20 random moments (some during checkpoint writes, which here happen every
    other step): no corrupt checkpoint, every resume works, the curve is bit-identical."""
    env = {**os.environ, "FATRAIN_CACHE": str(tmp_path / "cache"), "WANDB_MODE": "offline"}
    common = ["trainer.max_steps=60", "trainer.ckpt_every=2", "trainer.eval_every=10", "model.dropout=0.1",
              "trainer.keep_last=2"]
    full, killed = tmp_path / "full", tmp_path / "killed"
    subprocess.run(_cli(f"hydra.run.dir={full}", *common), env=env, check=True, capture_output=True, timeout=300)
    rng = random.Random(int(os.environ.get("FATRAIN_TEST_SEED", "0")) or None)
    kills = 0
    while kills < 20:
        resume = ["resume=auto"] if list_checkpoints(str(killed / "checkpoints")) else []
        proc = subprocess.Popen(_cli(f"hydra.run.dir={killed}", *common, *resume), env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # Wait until this process is training (its metrics grow), then kill it a random moment later.
        start = len(read_metrics(killed)) if (killed / "metrics.jsonl").exists() else 0
        deadline = time.time() + 120
        while proc.poll() is None and time.time() < deadline:
            try:
                if len((killed / "metrics.jsonl").read_text().splitlines()) > start:
                    break
            except FileNotFoundError:
                pass
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.05))
        if proc.poll() is not None:
            break  # the run finished before this kill
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        kills += 1
        for path in list_checkpoints(str(killed / "checkpoints")):
            load_checkpoint(path)  # every checkpoint a kill left is whole
    subprocess.run(_cli(f"hydra.run.dir={killed}", *common, "resume=auto"), env=env, check=True,
                   capture_output=True, timeout=300)

    def curve(run, key):
        return [(r["step"], r[key]) for r in read_metrics(run) if key in r]

    assert kills >= 10, f"only {kills} kills landed before the run finished"
    assert [s for s, _ in curve(killed, "train/loss")] == list(range(1, 61))
    assert curve(killed, "train/loss") == curve(full, "train/loss")
    assert curve(killed, "val/loss") == curve(full, "val/loss")
    assert not glob.glob(str(killed / "checkpoints" / "*.tmp*"))
