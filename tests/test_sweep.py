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


def _counting_fits(threshold):
    tried = []

    def fits(n):
        assert n not in tried, f"seq_len {n} tried twice"
        tried.append(n)
        return n <= threshold

    return fits, tried


@pytest.mark.parametrize("threshold, guess, found, tries", [
    (50 * 1024 + 500, 50 * 1024, (50 * 1024, 51 * 1024), 2),  # the answer: it fits, one granule more does not
    (50 * 1024 + 500, 51 * 1024, (50 * 1024, 51 * 1024), 2),  # one granule high
    (50 * 1024, 150 * 1024, (50 * 1024, 51 * 1024), 15),  # 100 granules high: 8 down, then bisect 64 granules
    (150 * 1024, 50 * 1024, (150 * 1024, 151 * 1024), 15),  # 100 granules low: 8 up, then bisect 64 granules
    (1000, 8 * 1024, (None, 1024), 5),  # nothing fits: 8k, 7k, 6k, 4k, then the floor
    (1 << 30, 512 * 1024, (1 << 20, None), 11),  # the limit fits: +1k, +2k, ... +512k (capped at the limit)
    (1 << 30, 1 << 24, (1 << 20, None), 1),  # above the limit: clamped to it, which fits
    (3000, 0, (2048, 3072), 3),  # below the floor: clamped to it, then +1k, +2k
    (5 * 1024, 5 * 1024 + 1000, (5 * 1024, 6 * 1024), 2),  # not a multiple of granularity: rounded down
])
def test_max_context_guided_search_gallops_from_the_guess(threshold, guess, found, tries):
    fits, tried = _counting_fits(threshold)
    assert max_context.guided_search(fits, guess, granularity=1024, limit=1 << 20) == found
    assert len(tried) == tries, tried
    assert all(n % 1024 == 0 and 1024 <= n <= 1 << 20 for n in tried)


def test_max_context_guided_search_agrees_with_doubling_for_every_guess():
    # Every threshold and guess on a small grid: the same answer as doubling, at most about
    # 2 log2(granules off) + 1 tries, nothing below floor or above the limit, no length twice.
    for threshold in range(0, 80):
        expected = max_context.search_max_context(lambda n: n <= threshold, start=4, granularity=1, limit=64)
        for guess in range(-2, 80):
            fits, tried = _counting_fits(threshold)
            best, first_fail = max_context.guided_search(fits, guess, granularity=1, limit=64, floor=4)
            assert best == expected[0] and (first_fail is None) == (expected[1] is None), (threshold, guess)
            if first_fail is not None:
                assert first_fail == (4 if best is None else best + 1)
            off = abs(min(max(guess, 4), 64) - min(max(threshold, 3), 64))
            assert len(tried) <= 2 * max(1, off.bit_length()) + 1, (threshold, guess, tried)
            assert all(4 <= n <= 64 for n in tried)


def test_max_context_guided_search_refuses_a_floor_off_the_grid():
    with pytest.raises(ValueError, match=r"floor=1000 must be a positive multiple of granularity=1024"):
        max_context.guided_search(lambda n: True, 4096, granularity=1024, limit=8192, floor=1000)


def _linear_peak(gib_per_1k, asked):
    def peak(n):
        asked.append(n)
        return 1.0 + gib_per_1k * n / 1024
    return peak


def test_max_context_guess_is_the_longest_length_predicted_below_capacity():
    asked = []
    # 1 GiB + 1 GiB per 1k tokens under 10 GiB: 8k fits (9 GiB), 9k does not (10 GiB).
    guess, made = max_context.guess_from_predictions(_linear_peak(1.0, asked), 10.0, start=1024, granularity=1024,
                                                     limit=1 << 20)
    assert guess == 8 * 1024
    assert made == [{"seq_len": n, "predicted_peak_gib": 1.0 + n / 1024} for n in asked]
    assert asked[:2] == [1024, 1 << 20] and len(asked) <= 2 + 10  # start, limit, then log2(1023 granules)
    assert all(n % 1024 == 0 and 1024 <= n <= 1 << 20 for n in asked)
    # A quadratic prediction (attention's scores): still the longest below capacity.
    guess, _ = max_context.guess_from_predictions(lambda n: (n / 1024) ** 2, 50.0, start=1024, granularity=1024,
                                                  limit=1 << 20)
    assert guess == 7 * 1024


@pytest.mark.parametrize("capacity, limit, guess, predictions", [
    (1.5, 1 << 20, 1024, 1),  # not even start is predicted to fit: start (its try settles it)
    (1e9, 1 << 20, 1 << 20, 2),  # the limit is predicted to fit
    (1e9, (1 << 20) + 500, 1 << 20, 2),  # the longest multiple of granularity under the limit
    (10.0, 1024, 1024, 1),  # limit == start: one prediction
])
def test_max_context_guess_at_the_ends(capacity, limit, guess, predictions):
    asked = []
    assert max_context.guess_from_predictions(_linear_peak(1.0, asked), capacity, start=1024, granularity=1024,
                                              limit=limit)[0] == guess
    assert len(asked) == predictions


def test_max_context_guess_without_a_prediction_is_none():
    made_at = []

    def peak(n):
        made_at.append(n)
        return None if n > 4096 else 1.0

    guess, made = max_context.guess_from_predictions(peak, 10.0, start=1024, granularity=1024, limit=1 << 20)
    assert guess is None and made_at == [1024, 1 << 20]
    assert made[-1] == {"seq_len": 1 << 20, "predicted_peak_gib": None}
    assert max_context.guess_from_predictions(lambda n: None, 10.0, start=1024, granularity=1024,
                                              limit=1 << 20) == (None, [{"seq_len": 1024, "predicted_peak_gib": None}])


def test_max_context_guide_has_no_capacity_on_the_cpu():
    capacity, why = max_context.guide_capacity(torch.device("cpu"), None)
    assert capacity is None and "CPU" in why


def inject_oom_past(monkeypatch, limits: dict[str, int]) -> None:
    """GPT's forward runs out of memory (as CUDA reports it) past limits[backend] tokens."""
    forward = GPT.forward

    def forward_with_memory_limit(self, idx, *args, **kwargs):
        if idx.shape[1] > limits[self.spec.attention]:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (injected by the test)")
        return forward(self, idx, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward_with_memory_limit)


def test_max_context_cpu_run_with_injected_oom(tmp_path, monkeypatch):
    limits = {"naive": 200, "sdpa": 400}
    inject_oom_past(monkeypatch, limits)
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
    # guide=true (the default) has no capacity to aim at on the CPU: it doubles from start.
    assert all(r["guide"]["search"] == "doubling" and "CPU" in r["guide"]["why"] for r in data["results"])
    assert [a["seq_len"] for a in data["results"][0]["attempts"]][:4] == [32, 64, 128, 256]
    # the memory model's prediction beside every try that fit (a try that failed fails its trace too)
    assert all(a["predicted_peak_gib"] > 0 for r in data["results"] for a in r["attempts"] if a["status"] == "ok")
    # every step's time and loss beside each try that fit: random tokens of a fresh model, about ln(vocab)
    ok = [a for r in data["results"] for a in r["attempts"] if a["status"] == "ok"]
    assert all(len(a["losses"]) == len(a["step_times_s"]) == 1 and 4.0 < a["losses"][0] < 8.0 for a in ok)
    with open(out / "max_context.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["max_seq_len"] for r in rows] == ["192", "384"]
    assert all(float(r["predicted_peak_gib"]) > 0 for r in rows)


def test_max_context_guided_run_with_a_fake_capacity(tmp_path, monkeypatch, capsys):
    # The CPU has no capacity to aim at: a fake one (1 GiB) and a fake memory model (seq_len / the
    # injected limit GiB) stand in for a GPU's, so the guess is the answer and each search costs 2 tries.
    limits = {"naive": 200, "sdpa": 400}
    inject_oom_past(monkeypatch, limits)
    predicted_at = []

    def fake_predict(cfg, seq_len, device, dist_env):
        predicted_at.append((cfg.attention.backend, seq_len))
        return {"peak_gib": seq_len / limits[cfg.attention.backend], "host_gib": None}, ""

    monkeypatch.setattr(max_context, "predict", fake_predict)
    monkeypatch.setattr(max_context, "guide_capacity",
                        lambda device, dist_env: ({"free_gib": 1 / 0.97, "margin": 0.97, "capacity_gib": 1.0}, ""))
    out = tmp_path / "mc"
    code = max_context_cli.main(["backends=[naive,sdpa]", "start=32", "granularity=32", "limit=4096", f"out={out}",
                                 "model=tiny", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                                 "trainer.precision=fp32", "trainer.device=cpu", "trainer.max_steps=1"])
    assert code == 0
    with open(out / "max_context.json") as f:
        data = json.load(f)
    assert data["search"]["guide"] is True
    found = {r["backend"]: (r["max_seq_len"], r["first_fail"]) for r in data["results"]}
    assert found == {"naive": (192, 224), "sdpa": (384, 416)}
    assert len(predicted_at) == len(set(predicted_at))  # a try at a predicted length reuses the prediction
    logged = capsys.readouterr().out
    for r in data["results"]:
        g = r["guide"]
        assert g["search"] == "guided" and g["guess"] == r["max_seq_len"] and g["capacity_gib"] == 1.0
        assert [a["seq_len"] for a in r["attempts"]] == [r["max_seq_len"], r["first_fail"]]
        assert g["predictions"][:2] == [{"seq_len": 32, "predicted_peak_gib": 32 / limits[r["backend"]]},
                                        {"seq_len": 4096, "predicted_peak_gib": 4096 / limits[r["backend"]]}]
        assert sum(f"{r['backend']:>12} seq_len" in line and "(guide)" in line
                   for line in logged.splitlines()) == len(g["predictions"])
        assert f"{r['backend']:>12}: first try at seq_len {g['guess']}" in logged


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


def test_max_context_plan_names_the_longest_length_predicted_to_fit(capsys):
    cfg, _ = max_context_cli.compose_config(["model=tiny", "trainer.precision=fp32", "trainer.device=cpu"])
    rows = max_context.plan_max_context(cfg, ["sdpa"], start=256, limit=4096, granularity=256, capacity_gib=0.05)
    doubling = {r["seq_len"]: r["prediction"]["peak_gib"] for r in rows if "seq_len" in r}
    longest = rows[-1]["longest_predicted"]
    assert rows[-1]["capacity_gib"] == 0.05 and longest % 256 == 0
    # the longest multiple of 256 predicted below the capacity: it fits, 256 more does not
    assert doubling[256] < 0.05 < doubling[4096] and 256 <= longest < 4096
    cache = {}
    for n in (longest, longest + 256):
        cache[n] = max_context.predict(cfg, n, torch.device("cpu"), None)[0]["peak_gib"]
    assert cache[longest] < 0.05 <= cache[longest + 256]
    assert f"longest predicted to fit in 0.05 GiB: {longest} tokens" in capsys.readouterr().out


def test_a_try_whose_loss_is_not_finite_does_not_fit(monkeypatch):
    cfg, _ = max_context_cli.compose_config(["model=tiny", "model.n_layer=1", "trainer.precision=fp32",
                                              "trainer.device=cpu", "trainer.max_steps=2", "attention=sdpa"])
    train_step = max_context.train_step
    calls = []

    def nan_on_the_second_step(*args, **kwargs):
        loss = train_step(*args, **kwargs)
        calls.append(1)
        return loss * float("nan") if len(calls) == 2 else loss

    monkeypatch.setattr(max_context, "train_step", nan_on_the_second_step)
    attempt = max_context.try_seq_len(cfg, 64, torch.device("cpu"))
    assert attempt["status"] == "nonfinite" and attempt["error"] == "loss nan at step 2"
    assert len(attempt["step_times_s"]) == 2


def test_max_context_rejects_bad_settings(tmp_path, capsys):
    assert max_context_cli.main(["--backends", "flash_v9", "--out", str(tmp_path), "trainer.device=cpu"]) == 2
    assert "attention.backend='flash_v9'" in capsys.readouterr().err
    assert max_context_cli.main(["--start", "1000", "--out", str(tmp_path), "trainer.device=cpu",
                             "trainer.precision=fp32"]) == 2
