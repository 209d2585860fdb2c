"""fatrain-report on hand-made sweep folders: medians after warm-up, OOM and missing jobs,
variants (block sizes), the relative-throughput table, max context, bad input."""

import csv
import json
import os
import subprocess
import sys

import pytest
import yaml

from fatrain import sweep_report as report
from fatrain.cli.report import main as report_main


def make_job(sweep, num, backend, seq_len, *, status="ok", tokens_per_sec=(), loss=(), peak=1.0, mfu=None,
             val_loss=2.0, overrides=(), log_every=1, extra_config=None):
    """A job directory as fatrain-train writes it: .hydra/, metrics.jsonl, result.json."""
    ov = [f"attention={backend}", f"data.seq_len={seq_len}", *overrides]
    job = sweep / f"{num}_{','.join(ov)}"
    (job / ".hydra").mkdir(parents=True)
    config = {"attention": {"backend": backend, "block_m": None},
              "data": {"seq_len": seq_len},
              "trainer": {"log_every": log_every, "batch_size": 4, "tokens_per_step": None},
              "logger": {"wandb": {"group": "ablate-${now:%Y-%m-%d_%H-%M-%S}", "tags": ["${attention.backend}"]}}}
    config.update(extra_config or {})
    (job / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config))
    (job / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump([*ov, "logger.wandb.mode=disabled"]))
    rows = [{"step": 0, "model/params": 1000}]
    for i, tps in enumerate(tokens_per_sec):
        step = (i + 1) * log_every
        row = {"step": step, "train/loss": loss[i] if i < len(loss) else 3.0, "perf/tokens_per_sec": tps,
               "perf/step_time_s": 1.0 / tps, "mem/peak_allocated_gib": peak * (1 + i) / len(tokens_per_sec),
               "mem/peak_requested_gib": peak * (1 + i) / len(tokens_per_sec) - 0.01,
               "mem/peak_reserved_gib": peak * 1.5}
        if mfu is not None:
            row["perf/mfu"] = mfu
        rows.append(row)
    if status == "ok":
        rows.append({"step": len(tokens_per_sec) * log_every, "val/loss": val_loss})
    (job / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    if status == "ok":
        result = {"status": "ok", "final_val_loss": val_loss, "step": len(tokens_per_sec) * log_every}
    elif status == "oom":
        result = {"status": "oom", "error": "CUDA out of memory. Tried to allocate 8.00 GiB"}
    else:
        return job  # no result.json: the job crashed or is still running
    (job / "result.json").write_text(json.dumps(result))
    return job


@pytest.fixture
def sweep(tmp_path):
    s = tmp_path / "sweep"
    # Warm-up rows (steps 1-3) are slow; the median must ignore them.
    make_job(s, 0, "naive", 1024, tokens_per_sec=[10, 20, 30, 100, 110, 90, 100], peak=4.0, mfu=0.2)
    make_job(s, 1, "naive", 2048, status="oom")
    make_job(s, 2, "flash_v2", 1024, tokens_per_sec=[10, 20, 30, 200, 210, 190, 200], peak=1.0, mfu=0.4)
    make_job(s, 3, "flash_v2", 2048, tokens_per_sec=[10, 20, 30, 180, 180, 180, 180], peak=2.0, mfu=0.4)
    make_job(s, 4, "sdpa_flash", 1024, tokens_per_sec=[10, 20, 30, 100, 100, 100, 100], peak=1.0, mfu=0.2)
    make_job(s, 5, "sdpa_flash", 2048, tokens_per_sec=[10, 20, 30, 120, 120, 120, 120], peak=2.0, mfu=0.2)
    return s


def test_summary_numbers(sweep):
    jobs = {(j.backend, j.seq_len): j for j in report.load_sweep(str(sweep), warmup_steps=3)}
    naive = jobs[("naive", 1024)]
    assert naive.status == "ok" and naive.tokens_per_sec == 100 and naive.timed_steps == 4
    assert naive.mfu == 0.2 and naive.peak_allocated_gib == 4.0 and naive.final_val_loss == 2.0
    assert naive.peak_requested_gib == pytest.approx(3.99)
    assert naive.params == 1000 and naive.steps == 7 and len(naive.loss_curve) == 7
    assert jobs[("naive", 2048)].status == "oom" and jobs[("naive", 2048)].tokens_per_sec is None
    assert jobs[("flash_v2", 2048)].tokens_per_sec == 180


def test_report_files_tables_and_ratios(sweep):
    written = report.write_report(str(sweep), warmup_steps=3, baseline="sdpa_flash")
    assert [os.path.basename(p) for p in written] == list(report.REPORT_FILES)
    for path in written:
        assert os.path.getsize(path) > 0
    text = (sweep / "report.md").read_text()
    assert "| backend | 1024 | 2048 |" in text
    assert "| naive | 100 | OOM |" in text  # throughput
    assert "| flash_v2 | 40.0 | 40.0 |" in text  # MFU in percent
    assert "| naive | 4.00 | OOM |" in text  # peak memory
    assert "### Throughput relative to sdpa_flash" in text and "| flash_v2 | 2.00x | 1.50x |" in text
    assert "1 out of memory" in text
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert [(r["backend"], r["seq_len"], r["status"]) for r in rows][:2] == [("naive", "1024", "ok"),
                                                                            ("naive", "2048", "oom")]
    assert float(rows[2]["tokens_per_sec"]) == 200.0


def test_missing_result_and_torn_metrics_line(sweep):
    job = make_job(sweep, 6, "flash_v1", 1024, status="missing", tokens_per_sec=[10, 20])
    with open(job / "metrics.jsonl", "a") as f:
        f.write('{"step": 3, "train/lo')  # killed mid-write
    jobs = {(j.backend, j.seq_len): j for j in report.load_sweep(str(sweep), warmup_steps=3)}
    assert jobs[("flash_v1", 1024)].status == "missing" and jobs[("flash_v1", 1024)].steps == 2
    report.write_report(str(sweep), warmup_steps=3)
    text = (sweep / "report.md").read_text()
    assert "| flash_v1 | missing | - |" in text and "without a full result" in text


def test_variants_get_their_own_rows(tmp_path):
    s = tmp_path / "blocks"
    for i, (bm, bn) in enumerate([(64, 32), (64, 64), (128, 32)]):
        make_job(s, i, "flash_v2", 8192, tokens_per_sec=[50, 100 * (i + 1)],
                 overrides=[f"attention.block_m={bm}", f"attention.block_n={bn}", "model.n_layer=2"])
    jobs = report.load_sweep(str(s), warmup_steps=1)
    # Only the keys that differ between jobs name a variant (model.n_layer is the same everywhere).
    assert [j.label for j in jobs] == ["flash_v2 block_m=64,block_n=32", "flash_v2 block_m=64,block_n=64",
                                       "flash_v2 block_m=128,block_n=32"]
    report.write_report(str(s), warmup_steps=1)  # no baseline: no relative table
    text = (s / "report.md").read_text()
    assert "| flash_v2 block_m=128,block_n=32 | 300 |" in text and "relative to" not in text


def test_max_context_json_in_the_sweep_is_plotted(sweep):
    results = [{"backend": "naive", "max_seq_len": 8192, "first_fail": 9216},
               {"backend": "flash_v2", "max_seq_len": 131072, "first_fail": 132096},
               {"backend": "sdpa_cudnn", "max_seq_len": None, "first_fail": 1024}]
    (sweep / "max_context.json").write_text(json.dumps({"results": results}))
    written = report.write_report(str(sweep), warmup_steps=3)
    assert os.path.basename(written[-1]) == "max_context.png" and os.path.getsize(written[-1]) > 0
    text = (sweep / "report.md").read_text()
    assert "| flash_v2 | 131072 | 132096 (oom) |" in text and "| sdpa_cudnn | - | 1024 (oom) |" in text


def test_cli_writes_to_out_dir_and_rejects_a_folder_without_jobs(sweep, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "-m", "fatrain.cli.report", f"sweep_dir={sweep}", f"out={out}",
                           "warmup_steps=3", "baseline=sdpa_flash"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0 and "deprecated" not in proc.stderr, proc.stderr
    assert (out / "report.md").exists() and not (sweep / "report.md").exists()
    assert "### Throughput relative to sdpa_flash" in (out / "report.md").read_text()
    empty = tmp_path / "empty"
    empty.mkdir()
    assert report_main([str(empty)]) == 2
    assert report_main([str(tmp_path / "nowhere")]) == 2
