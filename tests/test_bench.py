"""fatrain-bench: the FLOP formula, a tiny CPU sweep through the real config, failures as rows."""

import csv
import os
from importlib import resources
import subprocess
import sys

import pytest
import torch
from hydra import compose, initialize_config_module
from hydra.errors import ConfigCompositionException

import fatrain.cli.bench as bench_cli
from fatrain.bench import COLUMNS, attended_pairs, attention_flops, make_cases, make_doc_ids, summarize
from fatrain.bench import summarize_features, sweep
from fatrain.config import validate_bench_config
from fatrain.kernels import available_backends
from fatrain.kernels._common import allowed_mask

TINY = ["bench=smoke", "impls=[naive,sdpa]", "modes=[fwd,bwd,fwdbwd]", "seqlens=[16,32]", "causal=[false,true]",
        "headdims=[16]", "dtypes=[fp32]", "tokens_per_batch=64", "hidden=32", "cpu_reps=1"]
REQUIRED = ["impl", "mode", "causal", "seqlen", "headdim", "batch", "nheads", "dtype", "tflops", "ms",
            "peak_mem_mib", "status", "window", "doc_len", "dropout_p", "modelled_hbm_gb", "gpu", "torch", "triton",
            "git_sha", "date"]


def compose_bench(overrides):
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        return compose(config_name="bench", overrides=overrides)


def run_main(tmp_path, overrides):
    cfg = compose_bench(TINY + [f"out_dir={tmp_path}"] + overrides)
    csv_path = bench_cli.main.__wrapped__(cfg)  # the body of the Hydra entry point, on a composed config
    with open(csv_path, newline="") as f:
        return csv_path, list(csv.DictReader(f))


def test_flops_formula():
    # B=2, H=4, N=1024, D=64: 4 * 2 * 4 * 1024 * 1024 * 64 = 2^31
    assert attention_flops(2, 4, 1024, 1024, 64, causal=False) == 2.0 ** 31
    assert attention_flops(2, 4, 1024, 1024, 64, causal=True) == 2.0 ** 30
    assert attention_flops(2, 4, 1024, 1024, 64, causal=True, mode="bwd") == 2.5 * 2.0 ** 30
    assert attention_flops(2, 4, 1024, 1024, 64, causal=False, mode="fwdbwd") == 3.5 * 2.0 ** 31


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [-1, 0, 5])
@pytest.mark.parametrize("doc_len", [0, 7])
def test_attended_pairs_match_the_mask(causal, window, doc_len):
    n, batch = 41, 3
    doc_ids = make_doc_ids(batch, n, doc_len, torch.Generator().manual_seed(1)) if doc_len else None
    right = -1 if window < 0 else (0 if causal else window)
    mask = allowed_mask(n, n, causal=causal, window_size=(window, right), doc_ids=doc_ids)
    expected = mask.sum().item() * (batch if doc_ids is None else 1)
    pairs = attended_pairs(n, causal=causal, window=window, doc_ids=doc_ids) * (batch if doc_ids is None else 1)
    assert pairs == expected


def test_tiny_sweep_writes_csv_plot_and_table(tmp_path, capsys):
    csv_path, rows = run_main(tmp_path, [])
    assert set(REQUIRED) <= set(rows[0])
    assert len(rows) == 2 * 3 * 2 * 2  # impls x modes x seqlens x causal
    assert all(r["status"] == "ok" for r in rows), [r["note"] for r in rows if r["status"] != "ok"]
    for r in rows:
        flops = attention_flops(int(r["batch"]), int(r["nheads"]), int(r["seqlen"]), int(r["seqlen"]),
                                int(r["headdim"]), causal=r["causal"] == "True", mode=r["mode"])
        assert float(r["tflops"]) == pytest.approx(flops / (float(r["ms"]) * 1e-3) / 1e12)
        assert int(r["batch"]) == 64 // int(r["seqlen"]) and int(r["nheads"]) == 2
    assert os.path.getsize(os.path.splitext(csv_path)[0] + ".png") > 0
    assert "TFLOP/s" in capsys.readouterr().out


def test_features_are_rows_and_failures_do_not_stop_the_sweep(tmp_path, monkeypatch):
    def not_implemented(q, k, v, **kwargs):
        raise NotImplementedError("attention backend 'sdpa' does not support this")

    real = sweep.resolve_impl
    fakes = {"sdpa": not_implemented, "flash_v1": ImportError("No module named 'fatrain.kernels.flash_v1'")}
    monkeypatch.setattr(sweep, "resolve_impl", lambda name: fakes.get(name, real(name)))
    _, rows = run_main(tmp_path, ["impls=[sdpa,flash_v1,naive]", "seqlens=[32]", "causal=[true]",
                                  "windows=[-1,4]", "doc_lens=[0,8]", "dropout_ps=[0.0,0.1]"])
    assert len(rows) == 3 * 3 * 2 * 2 * 2
    status = {(r["impl"], r["status"]) for r in rows}
    assert status == {("sdpa", "unsupported"), ("flash_v1", "unavailable"), ("naive", "ok")}
    naive = [r for r in rows if r["impl"] == "naive"]
    assert {(r["window"], r["doc_len"], r["dropout_p"]) for r in naive} == {
        (w, d, p) for w in ("-1", "4") for d in ("0", "8") for p in ("0.0", "0.1")}


@pytest.mark.parametrize("preset", sorted(p.name[:-5] for p in (resources.files("fatrain.configs") / "bench").iterdir()
                                           if p.name.endswith(".yaml")))
def test_every_preset_composes_and_validates(preset):
    cfg = compose_bench([f"bench={preset}"])
    unregistered = set(cfg.impls) - set(available_backends(variants=True))
    if unregistered:
        pytest.skip(f"{sorted(unregistered)} not in this registry")
    validate_bench_config(cfg)
    assert make_cases(cfg)


@pytest.mark.parametrize("override", ["impl=[naive]", "seqlens=[abc]", "causal=maybe"])
def test_typo_or_wrong_type_fails_at_composition(override):
    with pytest.raises(ConfigCompositionException):
        compose_bench([override])


def test_unknown_backend_fails_before_work(tmp_path, capsys):
    cfg = compose_bench(TINY + ["impls=[naive,flash_v3]", f"out_dir={tmp_path}"])
    with pytest.raises(SystemExit) as exit_:
        bench_cli.main.__wrapped__(cfg)
    assert exit_.value.code == 2 and "flash_v3" in capsys.readouterr().err
    assert not os.listdir(tmp_path)


def test_summarize_ratios(tmp_path, capsys):
    path = tmp_path / "rows.csv"
    base = {c: "" for c in COLUMNS} | {"causal": "True", "headdim": "128", "dtype": "bf16", "window": "-1",
                                      "doc_len": "0", "dropout_p": "0.0", "mode": "fwd", "status": "ok"}
    rows = [base | {"impl": "flash_v2", "seqlen": "8192", "tflops": "400"},
            base | {"impl": "sdpa_flash", "seqlen": "8192", "tflops": "300"},
            base | {"impl": "flex", "seqlen": "8192", "tflops": "372"},
            base | {"impl": "sdpa_cudnn", "seqlen": "8192", "tflops": "500", "status": "oom"},
            base | {"impl": "flash_v2", "seqlen": "4096", "tflops": "350"},
            base | {"impl": "sdpa_flash", "seqlen": "4096", "tflops": "320"}]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    short, long = summarize(str(path), "flash_v2", ["sdpa_flash", "flex", "sdpa_cudnn"],
                            targets={"sdpa_flash": 1.25, "flex": 1.0}, target_min_seqlen=2048)
    assert long["sdpa_flash"] == pytest.approx(4 / 3) and long["flex"] == pytest.approx(400 / 372)
    assert long["sdpa_cudnn"] is None and short["flex"] is None
    out = capsys.readouterr().out
    assert "| 1.33 | 1.08 |  |" in out and "| 1.09! |" in out  # below the 1.25x target is marked


@pytest.mark.slow
def test_console_entry_point(tmp_path):
    # The real Hydra entry point: finds configs/ as the package fatrain.configs.
    cmd = [sys.executable, "-m", "fatrain.cli.bench", "bench=smoke", "impls=[naive]", "modes=[fwd]", "seqlens=[16]",
           "causal=[true]", f"out_dir={tmp_path}", f"hydra.run.dir={tmp_path}/hydra"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    with open(tmp_path / "attention_bench.csv", newline="") as f:
        assert [r["status"] for r in csv.DictReader(f)] == ["ok"]


def test_append_resumes_without_repeating_rows(tmp_path):
    _, first = run_main(tmp_path, ["seqlens=[16]"])
    _, both = run_main(tmp_path, ["seqlens=[16,32]", "append=true"])
    assert len(first) == 2 * 3 * 2 and len(both) == 2 * 3 * 2 * 2
    assert both[:len(first)] == first
    assert {r["seqlen"] for r in both[len(first):]} == {"32"}


def test_rounds_time_round_robin_and_report_the_median(tmp_path, monkeypatch):
    """rounds=3: the first pass measures each (impl, mode); two more passes time them again in
    the same order; each row holds the median of its three timings and their spread."""
    calls = []
    real = sweep.time_ms

    def fake_time_ms(fn, device, cfg, grad_to_none):
        real(fn, device, cfg, grad_to_none)  # the call still runs (and must work again)
        calls.append(len(calls))
        return [3.0, 1.0, 2.0][(len(calls) - 1) // 6]  # pass 1: 3 ms, pass 2: 1 ms, pass 3: 2 ms
    monkeypatch.setattr(sweep, "time_ms", fake_time_ms)
    _, rows = run_main(tmp_path, ["seqlens=[16]", "causal=[false]", "rounds=3"])
    assert len(rows) == 2 * 3 and len(calls) == 3 * 6  # 2 impls x 3 modes, three passes
    for r in rows:
        assert r["status"] == "ok" and r["rounds"] == "3"
        assert float(r["ms"]) == 2.0 and float(r["ms_spread"]) == pytest.approx(1.0)
        flops = attention_flops(int(r["batch"]), int(r["nheads"]), 16, 16, int(r["headdim"]), causal=False,
                                mode=r["mode"])
        assert float(r["tflops"]) == pytest.approx(flops / 2e-3 / 1e12)


@pytest.mark.parametrize("rounds", [0, -1, 1.5, True])
def test_rounds_are_validated(rounds):
    with pytest.raises((ConfigCompositionException, ValueError), match="rounds"):
        validate_bench_config(compose_bench(TINY + [f"rounds={rounds}"]))


def test_append_to_a_csv_with_an_older_header_keeps_its_columns(tmp_path):
    csv_path, first = run_main(tmp_path, ["seqlens=[16]"])
    old = [c for c in COLUMNS if c not in ("rounds", "ms_spread")]
    with open(csv_path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=old, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    _, both = run_main(tmp_path, ["seqlens=[16,32]", "append=true"])
    assert list(both[0]) == old and len(both) == 2 * len(first)
    assert all(r["status"] == "ok" and r["impl"] in ("naive", "sdpa") for r in both)


@pytest.mark.gpu
def test_gpu_sweep_times_every_backend(tmp_path):
    # The CUDA path: do_bench, peak memory, FlexAttention compiled, bf16; small enough for seconds.
    _, rows = run_main(tmp_path, ["impls=[naive,flash_v1,flash_v2,flash_v2_atomic,sdpa_flash,sdpa_cudnn,flex]",
                                  "seqlens=[256,1024]",
                                  "headdims=[64]", "dtypes=[bf16]", "tokens_per_batch=4096", "hidden=512",
                                  "warmup_ms=5", "rep_ms=20"])
    assert len(rows) == 7 * 3 * 2 * 2
    failed = [(r["impl"], r["mode"], r["status"], r["note"]) for r in rows if r["status"] != "ok"]
    assert not failed, failed
    assert all(float(r["peak_mem_mib"]) > 0 and float(r["tflops"]) > 0 for r in rows)
    assert all(r["modelled_hbm_gb"] for r in rows if r["impl"] == "flash_v1")
    assert rows[0]["gpu"] == torch.cuda.get_device_name()


def test_summarize_features(tmp_path):
    path = tmp_path / "rows.csv"
    base = {c: "" for c in COLUMNS} | {"impl": "flash_v2", "causal": "True", "headdim": "128", "dtype": "bf16",
                                      "mode": "fwdbwd", "seqlen": "32768", "status": "ok", "doc_len": "0",
                                      "dropout_p": "0.0"}
    rows = [base | {"window": "-1", "ms": "100"}, base | {"window": "1024", "ms": "16"},
            base | {"window": "-1", "dropout_p": "0.1", "ms": "110"}]
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    table = summarize_features(str(path), "flash_v2")
    assert {(r["window"], r["dropout_p"]): r["speedup"] for r in table} == pytest.approx(
        {(1024, 0.0): 100 / 16, (-1, 0.1): 100 / 110})


def test_rows_carry_the_git_sha_override(tmp_path, monkeypatch):
    monkeypatch.setenv("FATRAIN_GIT_SHA", "abc1234")
    _, rows = run_main(tmp_path, ["impls=[naive]", "seqlens=[16]", "causal=[true]", "modes=[fwd]"])
    assert [r["git_sha"] for r in rows] == ["abc1234"]


def test_flash_v1_bh_is_a_bench_impl(tmp_path):
    # flash_v1 on the paper's grid (num_splits=1), timed beside the default on the same cases.
    _, rows = run_main(tmp_path, ["impls=[flash_v1,flash_v1_bh]", "seqlens=[32]", "modes=[fwdbwd]"])
    assert {r["impl"] for r in rows} == {"flash_v1", "flash_v1_bh"}
    assert all(r["status"] == "ok" for r in rows), [r["note"] for r in rows]


def test_modelled_traffic_of_flash_v1_and_its_variant(tmp_path):
    # The variant's fixed num_splits=1 reaches the model: the paper's grid loads K and V once per head.
    traffic = pytest.importorskip("fatrain.bench.traffic")
    from fatrain.kernels.flash_v1 import device_sram_bytes

    _, rows = run_main(tmp_path, ["impls=[flash_v1,flash_v1_bh,naive]", "seqlens=[32]", "causal=[false]",
                                  "modes=[fwd,fwdbwd]"])
    modelled = {(r["impl"], r["mode"]): r["modelled_hbm_gb"] for r in rows}
    assert modelled[("naive", "fwd")] == "" and float(modelled[("flash_v1", "fwdbwd")]) > 0
    (case,) = make_cases(compose_bench(TINY + ["seqlens=[32]", "causal=[false]"]))
    expected = traffic.flash_v1_hbm_traffic(case.batch, case.nheads, 32, 32, case.headdim, dtype_bytes=4,
                                            sram_bytes=device_sram_bytes(torch.device("cpu")),
                                            causal=case.causal, num_splits=1)
    assert float(modelled[("flash_v1_bh", "fwd")]) == pytest.approx(expected.forward / 1e9)


def test_flash_v2_atomic_is_a_bench_impl(tmp_path):
    # flash_v2 with deterministic=False, timed beside the default on the same cases.
    _, rows = run_main(tmp_path, ["impls=[flash_v2,flash_v2_atomic]", "seqlens=[32]", "modes=[fwdbwd]"])
    assert {r["impl"] for r in rows} == {"flash_v2", "flash_v2_atomic"}
    assert all(r["status"] == "ok" for r in rows), [r["note"] for r in rows]
