"""A disk that fills or a file that cannot be written: one line naming the file and the OS error, a
non-zero exit, result.json "status": "error", no torn checkpoint or metrics line, and the run resumes
once there is room. The faults are real OS write errors: a file-size limit (RLIMIT_FSIZE gives
EFBIG on the write that crosses it) and /dev/full (ENOSPC on every write)."""

import glob
import json
import os
import resource
import signal
import subprocess
import sys

import pytest

from fatrain.cli.train import write_result
from fatrain.files import RunWriteError, append_line
from fatrain.metrics import read_jsonl
from test_train import FAST

CKPT_BYTES_LIMIT = 100_000  # the FAST model's checkpoint is ~300 KB; its metrics and result ~2 KB


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))


def train(run_dir, *overrides, file_limit=None):
    def limit():
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of a signal
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_limit, resource.RLIM_INFINITY))

    cmd = [sys.executable, "-m", "fatrain.cli.train", f"hydra.run.dir={run_dir}", *FAST, "trainer.eval_every=0",
           *overrides]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, preexec_fn=limit if file_limit else None)


def error_lines(proc):
    return [line for line in proc.stderr.splitlines() if line.startswith("error:")]


def steps(run_dir, key="train/loss"):
    return [r["step"] for r in read_jsonl(os.path.join(run_dir, "metrics.jsonl")) if key in r]


def test_checkpoint_write_on_a_full_disk_then_resume(tmp_path):
    run = tmp_path / "run"
    first = train(run, "trainer.max_steps=2", "trainer.ckpt_every=2")
    assert first.returncode == 0, first.stderr
    good = run / "checkpoints" / "ckpt_00000002.pt"
    good_bytes = good.read_bytes()

    full = train(run, "resume=auto", "trainer.max_steps=4", "trainer.ckpt_every=2", file_limit=CKPT_BYTES_LIMIT)
    assert full.returncode == 1, full.stderr
    lines = error_lines(full)
    assert len(lines) == 1, full.stderr
    assert "ckpt_00000004.pt" in lines[0] and "File too large" in lines[0]
    assert "Traceback" not in full.stderr and "inline_container" not in full.stderr
    # The failed write left nothing behind; the last good checkpoint is intact.
    assert sorted(os.listdir(run / "checkpoints")) == ["ckpt_00000002.pt"]
    assert good.read_bytes() == good_bytes
    result = json.loads((run / "result.json").read_text())
    assert result["status"] == "error" and "ckpt_00000004.pt" in result["error"]

    again = train(run, "resume=auto", "trainer.max_steps=4", "trainer.ckpt_every=2")
    assert again.returncode == 0, again.stderr
    assert steps(run) == [1, 2, 3, 4]
    assert json.loads((run / "result.json").read_text())["status"] == "ok"


def test_metrics_write_on_a_full_disk_names_the_file(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    os.symlink("/dev/full", run / "metrics.jsonl")  # every write: ENOSPC
    proc = train(run, "trainer.max_steps=2")
    assert proc.returncode == 1, proc.stderr
    lines = error_lines(proc)
    assert len(lines) == 1 and "metrics.jsonl" in lines[0] and "No space left on device" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert json.loads((run / "result.json").read_text())["status"] == "error"


def test_a_metrics_write_that_fails_part_way_leaves_whole_lines(tmp_path):
    path = str(tmp_path / "metrics.jsonl")
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    append_line(fd, path, json.dumps({"step": 1}) + "\n")
    pid = os.fork()
    if pid == 0:  # a child under a file-size limit just past the first line
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (os.path.getsize(path) + 10, resource.RLIM_INFINITY))
        try:
            append_line(fd, path, json.dumps({"step": 2, "train/loss": 1.2345678}) + "\n")
            os._exit(0)
        except RunWriteError as e:
            os._exit(3 if "metrics.jsonl" in str(e) and "File too large" in str(e) else 4)
    _, status = os.waitpid(pid, 0)
    os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 3
    with open(path) as f:
        assert f.read() == '{"step": 1}\n'  # the 10 bytes that fitted were cut back off


def test_a_torn_metrics_line_is_dropped_on_resume_with_a_warning(tmp_path):
    run = tmp_path / "run"
    assert train(run, "trainer.max_steps=2", "trainer.ckpt_every=2").returncode == 0
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')  # a process killed in the middle of a line
    proc = train(run, "resume=auto", "trainer.max_steps=4", "trainer.ckpt_every=2")
    assert proc.returncode == 0, proc.stderr
    warnings = [line for line in proc.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "metrics.jsonl" in warnings[0] and "line" in warnings[0]
    assert steps(run) == [1, 2, 3, 4]
    with open(run / "metrics.jsonl") as f:
        for line in f:
            json.loads(line)


def test_result_json_that_cannot_be_written_says_so(tmp_path, capsys):
    assert not write_result(str(tmp_path / "gone"), {"status": "ok"})
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "result.json" in err[0] and "No such file or directory" in err[0]
    assert not glob.glob(str(tmp_path / "*.tmp"))
