"""Sweeps on the CPU: a Hydra multirun of the tiny model, an injected out-of-memory job,
every experiment file (and every point of its sweep) composing, and the max-context search."""

import csv
import gc
import json
import os
import subprocess
import sys
import weakref

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.core.global_hydra import GlobalHydra
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser

from fatrain import max_context
from fatrain import sweep_report as report
from fatrain.cli import max_context as max_context_cli
from fatrain.cli.report import main as report_main
from fatrain.config import register_configs, validate_train_config
from fatrain.model import GPT
from fatrain.trainer import attention_options, micro_batch_size

register_configs()

CONFIG_DIR = os.path.join(os.path.dirname(__file__), "..", "configs")
EXPERIMENTS = sorted(f[:-5] for f in os.listdir(os.path.join(CONFIG_DIR, "experiment")) if f.endswith(".yaml"))
# Shrinks experiment=ablate_backends_cpu to seconds per job.
SMALL = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "trainer.max_steps=4", "trainer.tokens_per_step=128",
         "trainer.eval_batches=1", "logger.wandb.mode=disabled", "logger.console=false"]


@pytest.fixture(autouse=True)
def cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("WANDB_MODE", "disabled")


def job_results(sweep_dir):
    """{(backend, seq_len): result.json} of every job directory in the sweep."""
    out = {}
    for job in report.find_job_dirs(str(sweep_dir)):
        cfg = report._read_yaml(os.path.join(job, ".hydra", "config.yaml"))
        with open(os.path.join(job, "result.json")) as f:
            out[(cfg["attention"]["backend"], cfg["data"]["seq_len"])] = json.load(f)
    return out


def test_cpu_multirun_completes_and_reports(tmp_path):
    sweep = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "fatrain.cli.train", "-m", "experiment=ablate_backends_cpu",
           f"hydra.sweep.dir={sweep}", "attention=naive,sdpa", "data.seq_len=32,64", *SMALL]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = job_results(sweep)
    assert sorted(results) == [("naive", 32), ("naive", 64), ("sdpa", 32), ("sdpa", 64)]
    assert all(r["status"] == "ok" and r["step"] == 4 for r in results.values())
    # Exact backends train the same model: the same final loss to float32 rounding.
    for n in (32, 64):
        assert results[("naive", n)]["final_val_loss"] == pytest.approx(results[("sdpa", n)]["final_val_loss"],
                                                                        rel=1e-4)

    assert report_main([str(sweep), "--warmup-steps", "1"]) == 0
    text = (sweep / "report.md").read_text()
    assert "| backend | 32 | 64 |" in text
    # tokens/s, memory (the process's peak RSS; no separate "requested" table on a CPU), loss; no MFU
    assert text.count("| naive |") == 3 and text.count("| sdpa |") == 3
    assert "not comparable across jobs of one process" in text
    for name in report.REPORT_FILES:
        assert (sweep / name).stat().st_size > 0, name
    with open(sweep / "report.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 4 and all(float(r["tokens_per_sec"]) > 0 and r["status"] == "ok" for r in rows)


def multirun_in_process(monkeypatch, overrides):
    """fatrain-train -m ... in this process, so a test can patch what the jobs run."""
    from fatrain.cli import train

    monkeypatch.setattr(sys, "argv", ["fatrain-train", "-m", *overrides])
    try:
        train.main()
    finally:
        GlobalHydra.instance().clear()


def test_injected_oom_is_recorded_and_the_sweep_goes_on(tmp_path, monkeypatch):
    forward = GPT.forward

    def forward_running_out_of_memory(self, idx, *args, **kwargs):
        if self.spec.attention == "naive" and idx.shape[1] == 64:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 64.00 GiB (injected by the test)")
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward_running_out_of_memory)
    sweep = tmp_path / "sweep"
    multirun_in_process(monkeypatch, ["experiment=ablate_backends_cpu", f"hydra.sweep.dir={sweep}",
                                      "attention=naive,sdpa", "data.seq_len=32,64", *SMALL, "trainer.max_steps=2"])
    results = job_results(sweep)
    assert results[("naive", 64)]["status"] == "oom"
    assert "injected by the test" in results[("naive", 64)]["error"]
    # The job before it and both after it finished.
    assert [results[k]["status"] for k in (("naive", 32), ("sdpa", 32), ("sdpa", 64))] == ["ok", "ok", "ok"]

    report.write_report(str(sweep), warmup_steps=0)
    text = (sweep / "report.md").read_text()
    assert "| naive | " in text and "| OOM |" in text and "1 out of memory" in text


def test_each_job_starts_with_the_previous_jobs_freed(tmp_path, monkeypatch):
    """The jobs of a sweep share one process: a finished or OOM job's model must be gone (GPU memory
    with it) before the next job builds its own, even where only reference cycles hold it."""
    models, alive_at_start = [], []
    init = GPT.__init__

    def tracking_init(self, spec):
        alive_at_start.append(sum(ref() is not None for ref in models))
        init(self, spec)
        models.append(weakref.ref(self))

    monkeypatch.setattr(GPT, "__init__", tracking_init)
    gc.disable()  # Python's own collector runs at unpredictable times; the entry point must not rely on it
    try:
        multirun_in_process(monkeypatch, ["experiment=ablate_backends_cpu", f"hydra.sweep.dir={tmp_path / 's'}",
                                          "attention=naive", "data.seq_len=32,64", *SMALL, "trainer.max_steps=1"])
    finally:
        gc.enable()
    assert alive_at_start == [0, 0]


@pytest.mark.gpu
def test_real_oom_on_the_gpu_is_recorded_and_the_next_job_measures_its_own_peak(tmp_path, monkeypatch):
    """naive attention at 16k x 32 sequences asks for >100 GiB of scores; the next, small job must run
    in the same process and log its own peak memory, not the failed job's."""
    sweep = tmp_path / "sweep"
    multirun_in_process(monkeypatch, ["experiment=ablate_backends_cpu", f"hydra.sweep.dir={sweep}", "attention=naive",
                                      "data.seq_len=16384,256", "trainer.device=cuda", "trainer.tokens_per_step=524288",
                                      "trainer.max_steps=2", "trainer.eval_batches=1", "logger.wandb.mode=disabled"])
    results = job_results(sweep)
    assert results[("naive", 16384)]["status"] == "oom" and results[("naive", 256)]["status"] == "ok"
    small = next(j for j in report.load_sweep(str(sweep), warmup_steps=0) if j.seq_len == 256)
    assert small.peak_allocated_gib < 30, small.peak_allocated_gib


def _sweep_points(hydra_cfg, command_line=()):
    """The jobs Hydra's basic sweeper makes of hydra.sweeper.params plus command-line overrides
    (a command-line value replaces the file's sweep of the same key), as override lists."""
    params = [f"{k}={v}" for k, v in (hydra_cfg.sweeper.params or {}).items()]
    overrides = OverridesParser.create().parse_overrides([*params, *command_line])
    (batch,) = BasicSweeper.split_arguments(overrides, max_batch_size=None)
    return batch


def test_block_sizes_flash_v1_command_sweeps_sram_bytes_only():
    command = ["attention=flash_v1", "attention.block_m=null", "attention.block_n=null",
               "attention.sram_bytes=16384,32768,65536,131072"]  # as in configs/experiment/block_sizes.yaml
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        base = compose(config_name="train", overrides=["experiment=block_sizes"], return_hydra_config=True)
        points = _sweep_points(base.hydra, command)
        assert len(points) == 4
        for point in points:
            cfg = compose(config_name="train", overrides=["experiment=block_sizes", *point])
            validate_train_config(cfg)
            assert cfg.attention.backend == "flash_v1" and attention_options(cfg.attention) == {
                "sram_bytes": cfg.attention.sram_bytes}


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_and_sweep_point_composes(experiment):
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        base = compose(config_name="train", overrides=[f"experiment={experiment}"], return_hydra_config=True)
        points = _sweep_points(base.hydra)
        for point in points or [[]]:
            cfg = compose(config_name="train", overrides=[f"experiment={experiment}", *point])
            validate_train_config(cfg)
            attention_options(cfg.attention)  # a tuning knob given to a backend that has none fails here
            assert micro_batch_size(cfg.trainer, cfg.data.seq_len) >= 1
            # The W&B tags resolve to plain strings (backend and seq_len) on every point.
            if experiment.startswith("ablate"):
                tags = list(cfg.logger.wandb.tags)
                assert cfg.attention.backend in tags and f"seq{cfg.data.seq_len}" in tags
    if experiment == "vs_nanogpt":
        chosen = []
        with initialize_config_module(config_module="fatrain.configs", version_base=None):
            for point in points:
                cfg = compose(config_name="train", overrides=[f"experiment={experiment}", *point])
                chosen.append((cfg.model.implementation, cfg.attention.backend, cfg.trainer.seed))
        assert chosen == [("reference", "sdpa_cudnn", 1337), ("reference", "sdpa_flash", 1337),
                          ("fatrain", "flash_v2", 1337), ("fatrain", "sdpa_cudnn", 1337),
                          ("fatrain", "flash_v2", 1338)]
    if experiment == "ablate_backends":
        assert len(points) == 25
        assert {p[0] for p in points} == {f"attention={b}" for b in
                                          ("naive", "flash_v1", "flash_v2", "sdpa_flash", "sdpa_cudnn")}


@pytest.mark.parametrize("threshold", [1000, 1024, 1500, 5000, 65536, 70000, 1 << 20, (1 << 20) + 4096])
def test_max_context_search_finds_the_last_length_that_fits(threshold):
    tried = []

    def fits(n):
        tried.append(n)
        return n <= threshold

    best, first_fail = max_context.search_max_context(fits, start=1024, granularity=1024, limit=1 << 20)
    if threshold < 1024:
        assert (best, first_fail) == (None, 1024)
    elif threshold >= 1 << 20:
        assert (best, first_fail) == (1 << 20, None)
    else:
        assert best == threshold // 1024 * 1024
        assert threshold < first_fail <= best + 1024
    assert all(n % 1024 == 0 for n in tried) and len(tried) <= 2 * 11


def test_max_context_cpu_run_with_injected_oom(tmp_path, monkeypatch):
    limits = {"naive": 200, "sdpa": 400}
    forward = GPT.forward

    def forward_with_memory_limit(self, idx, *args, **kwargs):
        if idx.shape[1] > limits[self.spec.attention]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward_with_memory_limit)
    out = tmp_path / "mc"
    code = max_context_cli.main(["--backends", "naive,sdpa", "--start", "32", "--granularity", "32", "--limit", "4096",
                             "--out", str(out), "model=tiny", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                             "trainer.precision=fp32", "trainer.device=cpu", "trainer.max_steps=1"])
    assert code == 0
    with open(out / "max_context.json") as f:
        data = json.load(f)
    found = {r["backend"]: (r["max_seq_len"], r["first_fail"]) for r in data["results"]}
    assert found == {"naive": (192, 224), "sdpa": (384, 416)}
    assert {r["fail_status"] for r in data["results"]} == {"oom"}
    statuses = {a["status"] for r in data["results"] for a in r["attempts"]}
    assert statuses == {"ok", "oom"}
    # the memory model's prediction beside every try that fit (a try that failed fails its trace too)
    assert all(a["predicted_peak_gib"] > 0 for r in data["results"] for a in r["attempts"] if a["status"] == "ok")
    with open(out / "max_context.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["max_seq_len"] for r in rows] == ["192", "384"]
    assert all(float(r["predicted_peak_gib"]) > 0 for r in rows)


def test_max_context_plan_predicts_and_trains_nothing(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code = max_context_cli.main(["plan=true", "backends=[naive,sdpa]", "start=256", "limit=1024", "model=tiny",
                                 "trainer.precision=fp32", "trainer.device=cpu"])
    assert code == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "seq_len" in line]
    assert len(lines) == 6 and all("GiB (" in line for line in lines)
    gib = {(line.split()[0], int(line.split()[2].rstrip(":"))): float(line.split()[3]) for line in lines}
    assert gib[("naive", 1024)] > gib[("naive", 256)] and gib[("naive", 1024)] > gib[("sdpa", 1024)]
    assert not list(tmp_path.iterdir())  # nothing written
    assert max_context_cli.main(["plan=maybe", "trainer.device=cpu"]) == 2


def test_max_context_rejects_bad_settings(tmp_path, capsys):
    assert max_context_cli.main(["--backends", "flash_v9", "--out", str(tmp_path), "trainer.device=cpu"]) == 2
    assert "attention.backend='flash_v9'" in capsys.readouterr().err
    assert max_context_cli.main(["--start", "1000", "--out", str(tmp_path), "trainer.device=cpu",
                             "trainer.precision=fp32"]) == 2
