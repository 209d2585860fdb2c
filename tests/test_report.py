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


def test_loss_curves_against_the_baseline(tmp_path):
    assert report.loss_curve_gap([(1, 3.0), (2, 2.5), (3, 2.0)], [(2, 2.0), (3, 2.5), (4, 1.0)]) == (0.5, 0.5)
    assert report.loss_curve_gap([(1, 3.0)], [(2, 2.0)]) is None
    s = tmp_path / "contenders"
    make_job(s, 0, "sdpa_cudnn", 8192, tokens_per_sec=[1, 2, 3], loss=[4.0, 3.0, 2.0],
             overrides=["contender=nanogpt_sdpa_cudnn"])
    make_job(s, 1, "flash_v2", 8192, tokens_per_sec=[1, 2, 3], loss=[4.0, 3.1, 2.3],
             overrides=["contender=fatrain_flash_v2"])
    report.write_report(str(s), warmup_steps=1, baseline="sdpa_cudnn contender=nanogpt_sdpa_cudnn")
    text = (s / "report.md").read_text()
    assert "### Training loss against sdpa_cudnn contender=nanogpt_sdpa_cudnn" in text
    assert "| flash_v2 contender=fatrain_flash_v2 | 0.1333 / 0.3000 |" in text


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


# ----- what the plots show ------------------------------------------------------------------------

H100 = {"device": "cuda:0", "gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-26T10:00:00+00:00"}
CPU = {"device": "cpu", "gpu": "cpu (Intel(R) Xeon(R) Processor)", "date": "2026-12-03T09:00:00+00:00"}
MODEL = {"model": {"n_layer": 12, "n_embd": 768}}


def with_environment(job, environment):
    """Give a job's result.json the run information fatrain-train records."""
    path = job / "result.json"
    result = json.loads(path.read_text())
    path.write_text(json.dumps({**result, "environment": environment}))
    return job


@pytest.fixture
def figures(monkeypatch):
    """Every figure the plot functions close, kept open to inspect (axes, lines, labels, texts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kept = []
    real_close = plt.close
    monkeypatch.setattr(plt, "close", lambda fig=None: kept.append(fig))
    yield kept
    for fig in kept:
        real_close(fig)


def wide_gpu_sweep(tmp_path):
    """naive at 60 tokens/s beside flash_v2 at 6,000 (over 10x), memory from 1 to 16 GiB, seq_len 1k-16k, an OOM."""
    s = tmp_path / "wide"
    jobs = [make_job(s, 0, "naive", 1024, tokens_per_sec=[60] * 3, peak=16.0, mfu=0.01, extra_config=MODEL),
            make_job(s, 1, "naive", 16384, status="oom", extra_config=MODEL),
            make_job(s, 2, "flash_v2", 1024, tokens_per_sec=[6000] * 3, peak=1.0, mfu=0.4, extra_config=MODEL),
            make_job(s, 3, "flash_v2", 16384, tokens_per_sec=[5000] * 3, peak=1.2, mfu=0.4, extra_config=MODEL)]
    for job in jobs:
        if (job / "result.json").exists() and "oom" not in (job / "result.json").read_text():
            with_environment(job, H100)
    return s


def flat(text):
    """A title or label as one line (titles wrap their what-ran-where line)."""
    return " ".join(text.split())


def by_name(figs, ylabel_part):
    return next(ax for fig in figs for ax in fig.axes if ylabel_part in ax.get_ylabel())


def test_gpu_plots_log_axes_labels_titles_and_clipped_guides(tmp_path, figures):
    s = wide_gpu_sweep(tmp_path)
    written = report.write_report(str(s), warmup_steps=0)
    assert [os.path.basename(p) for p in written] == list(report.REPORT_FILES)

    tps = by_name(figures, "tokens/s")
    assert tps.get_yscale() == "log" and tps.get_xscale() == "log"  # 60 beside 6,000: log
    assert tps.get_ylabel() == "training throughput (tokens/s)" and tps.get_xlabel() == "seq_len (tokens)"
    title = flat(tps.get_title())
    # the model from the config, its size from metrics.jsonl's model/params (1000 here), then the GPU and the date
    assert "0.001M-parameter GPT (12 layers, d_model 768), NVIDIA H100 80GB HBM3, 2026-11-26" in title
    assert "out of memory" in title and tps.collections  # the OOM x on the axis edge

    mem = by_name(figures, "GiB")
    assert mem.get_ylabel() == "peak GPU memory allocated (GiB)"
    assert mem.get_yscale() == "log" and "NVIDIA H100" in flat(mem.get_title())
    data = [line for line in mem.get_lines() if "(guide)" not in line.get_label()]
    guides = [line for line in mem.get_lines() if "(guide)" in line.get_label()]
    assert sorted(g.get_label() for g in guides) == ["~N (guide)", "~N^2 (guide)"]
    top = max(max(line.get_ydata()) for line in data)
    low, high = mem.get_ylim()
    assert high == pytest.approx(top * 1.15)  # the axis is the data's range, not N^2's far end
    for guide in guides:
        xs, ys = guide.get_xdata(), guide.get_ydata()
        assert min(xs) >= 1024 and max(xs) <= 16384 and max(ys) <= high * (1 + 1e-9)
        # anchored at the lowest point of the shortest seq_len: flash_v2's 1 GiB at 1024
        assert xs[0] == 1024 and ys[0] == pytest.approx(1.0)
    n1, n2 = (next(g for g in guides if g.get_label() == f"~N{p} (guide)") for p in ("", "^2"))
    assert max(n2.get_xdata()) == pytest.approx(1024 * (high / 1.0) ** 0.5)  # cut where it leaves the range
    assert max(n1.get_xdata()) == 16384  # 1 GiB x 16 stays inside it: cut at the longest seq_len

    text = (s / "report.md").read_text()
    assert "### Peak GPU memory allocated (GiB)" in text and "### Peak memory (GiB requested)" in text
    assert "NVIDIA H100 80GB HBM3" in text
    with open(s / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert rows[0]["device"] == "cuda" and rows[0]["device_name"] == "NVIDIA H100 80GB HBM3"


def test_narrow_throughput_stays_linear_from_zero(sweep, figures):
    report.write_report(str(sweep), warmup_steps=3)  # 100-210 tokens/s: under 10x
    tps = by_name(figures, "tokens/s")
    assert tps.get_yscale() == "linear" and tps.get_ylim()[0] == 0


def test_cpu_memory_is_marked_as_the_process_peak_rss(tmp_path, figures):
    s = tmp_path / "cpu"
    for i, n in enumerate((32, 64)):
        trainer = {"log_every": 1, "batch_size": 4, "device": "cpu", "precision": "fp32"}
        job = make_job(s, i, "naive", n, tokens_per_sec=[55, 148], peak=0.55 + 0.01 * i,
                       extra_config={"trainer": trainer})
        if i == 0:
            with_environment(job, CPU)  # the other job is known to be on the CPU from its config only
    report.write_report(str(s), warmup_steps=0)
    mem = by_name(figures, "GiB")
    assert flat(mem.get_ylabel()) == "peak RSS of the process (GiB), not comparable across jobs of one process"
    assert "Intel(R) Xeon(R) Processor" in flat(mem.get_title()) and "fp32" in flat(mem.get_title())
    text = (s / "report.md").read_text()
    assert "### Peak memory (GiB; peak RSS of the process, not comparable across jobs of one process)" in text
    assert "grows in job order" in text and "GiB requested" not in text


def test_a_committed_report_csv_is_replotted(tmp_path, figures):
    s = wide_gpu_sweep(tmp_path)
    report.write_report(str(s), warmup_steps=0)
    study = tmp_path / "study"
    study.mkdir()
    rows = list(csv.DictReader(open(s / "report.csv")))
    # A CSV from before the device columns: the titles get what the command line says.
    old_fields = [f for f in report.CSV_FIELDS if f not in ("device", "device_name", "date", "model")]
    with open(study / "report.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old_fields, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    figures.clear()
    assert report_main([f"sweep_dir={study}", "device_name=NVIDIA H100 80GB HBM3", "date=2026-11-26"]) == 0
    assert sorted(os.listdir(study)) == ["peak_memory.png", "report.csv", "tokens_per_sec.png"]
    tps = by_name(figures, "tokens/s")
    assert tps.get_yscale() == "log" and "NVIDIA H100 80GB HBM3, 2026-11-26" in flat(tps.get_title())
    assert by_name(figures, "GiB").get_ylabel() == "peak GPU memory allocated (GiB)"  # MFU logged: a GPU


def test_max_context_alone_log_axis_and_title(tmp_path, figures):
    results = [{"backend": "naive", "max_seq_len": 6144}, {"backend": "flash_v2", "max_seq_len": 129024},
               {"backend": "sdpa_cudnn", "max_seq_len": None, "first_fail": 1024}]
    path = tmp_path / "max_context_h100.json"
    path.write_text(json.dumps({"results": results, "gpu": "NVIDIA H100 80GB HBM3", "date": "2026-11-26T09:00:00",
                                "config": {"model": {"name": "gpt2-small"},
                                           "trainer": {"precision": "bf16", "batch_size": 1}}}))
    assert report_main([f"max_context={path}"]) == 0
    assert os.path.exists(tmp_path / "max_context_h100.png")
    ax = figures[-1].axes[0]
    assert ax.get_yscale() == "log" and ax.get_ylabel() == "longest seq_len trained (tokens)"
    assert "model gpt2-small, bf16, batch 1, NVIDIA H100 80GB HBM3, 2026-11-26" in flat(ax.get_title())
    assert [t.get_text() for t in ax.texts] == ["6,144", "129,024", "none fit"]


# ----- fatrain-eval's table and plots ---------------------------------------------------------------


def eval_result(checkpoint):
    buckets = [{"start": s, "end": s + 16, "loss": 3.0 - s / 100} for s in range(0, 64, 16)]
    return {"checkpoint": checkpoint, "step": 100, "tokens_seen": 6400, "attention": "naive",
            "train": {"seq_len": 64, "attention": "naive", "model": "0.05M-parameter GPT (1 layer, d_model 32)"},
            "data": {"split": "val"}, "bits_unit": "byte", "precision": "fp32", "bucket_size": 16,
            "environment": CPU,
            "lengths": [{"seq_len": 64, "loss": 2.5, "perplexity": 12.2, "bits_per_byte": 3.6, "buckets": buckets},
                        {"seq_len": 4096, "skipped": "the val split holds 1000 tokens"}],
            "passkey": {"context_lens": [16, 96], "depths": [0.0, 1.0], "trials": 2,
                        "accuracy": [[None, 1.0], [None, 0.0]],
                        "skipped": {"16": "16 tokens cannot hold the task (at least 40 with this tokenizer)"}}}


def test_eval_table_names_a_single_run(tmp_path):
    from fatrain.eval.report import table_rows

    ckpt = str(tmp_path / "outputs" / "train" / "my-run" / "checkpoints" / "ckpt_100.pt")
    rows = table_rows([("", eval_result(ckpt))], str(tmp_path / "outputs" / "train" / "my-run"))
    assert rows[0]["run"] == "my-run" and rows[0]["passkey@96"] == 0.5 and rows[0]["passkey@16"] is None


def test_eval_plots_titles_and_passkey_skip_reasons(tmp_path, figures):
    from fatrain.eval.report import write_plots

    files = write_plots(eval_result(str(tmp_path / "ckpt_100.pt")), str(tmp_path))
    assert set(files) == {"loss_vs_position", "passkey"} and all(os.path.getsize(p) for p in files.values())
    loss_fig, passkey_fig = figures
    ax = loss_fig.axes[0]
    assert ax.get_ylabel() == "mean loss (nats/token)" and ax.get_yscale() == "linear"
    assert "0.05M-parameter GPT (1 layer, d_model 32), fp32, cpu (Intel(R) Xeon(R) Processor), 2026-12-03" in flat(
        ax.get_title())
    heat = passkey_fig.axes[0]
    cells = [t.get_text() for t in heat.texts]
    assert cells == ["no room", "1.00", "no room", "0.00"] and "-" not in cells
    note = " ".join(t.get_text() for t in passkey_fig.texts)
    assert "no room: 16 tokens cannot hold the task" in note
    assert "2026-12-03" in heat.get_title() and heat.get_xlabel() == "context length (tokens)"
    assert passkey_fig.axes[1].get_ylabel() == "accuracy (fraction of trials retrieved)"  # the colour bar


# ----- fatrain-bench's plots ------------------------------------------------------------------------


def bench_rows():
    rows = []
    for impl, tflops in (("naive", 10.0), ("flash_v2", 400.0)):
        for causal, scale in (("True", 1.0), ("False", 1.0)):
            for n in (1024, 2048):
                value = tflops if causal == "True" else 300.0 + (impl == "naive") * 50  # non-causal: under 10x
                rows.append({"impl": impl, "mode": "fwd", "causal": causal, "seqlen": str(n), "headdim": "64",
                             "batch": str(16384 // n), "nheads": "32", "dtype": "bf16", "tflops": str(value * scale),
                             "ms": "1.0", "peak_mem_mib": "64", "status": "ok", "window": "-1", "doc_len": "0",
                             "dropout_p": "0.0", "gpu": "NVIDIA H200", "torch": "2.11.0", "triton": "3.6.0",
                             "date": "2026-12-01T10:00:00+00:00", "note": ""})
    return rows


def test_bench_plot_log_panels_units_and_title(tmp_path, figures):
    from fatrain.bench.report import plot

    assert plot(bench_rows(), str(tmp_path / "bench.png")) == str(tmp_path / "bench.png")
    fig = figures[-1]
    scales = {ax.get_title(): ax.get_yscale() for ax in fig.axes}
    assert scales == {"fwd, d=64, causal": "log", "fwd, d=64, non-causal": "linear"}
    assert {ax.get_ylabel() for ax in fig.axes} == {"attention throughput (TFLOP/s)"}
    assert {ax.get_xlabel() for ax in fig.axes} == {"seqlen (tokens)"}
    title = flat(fig._suptitle.get_text())
    for part in ("NVIDIA H200", "bf16", "batch x seqlen = 16k", "heads x d = 2048", "triton 3.6.0", "2026-12-01"):
        assert part in title


def test_bench_plots_redrawn_from_a_csv(tmp_path, capsys):
    from fatrain.bench.report import COLUMNS
    from fatrain.cli.bench_report import main as bench_report_main

    path = tmp_path / "bench_h200.csv"
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS, restval="")
        writer.writeheader()
        writer.writerows(bench_rows())
    assert bench_report_main([f"csv={path}"]) == 0
    out = capsys.readouterr().out
    assert f"wrote {tmp_path / 'bench_h200.png'}" in out and f"wrote {tmp_path / 'bench_h200_memory.png'}" in out
    assert bench_report_main([f"csv={tmp_path / 'none.csv'}"]) == 2
    assert capsys.readouterr().err.strip() == f"error: csv={tmp_path / 'none.csv'}: no such file"
