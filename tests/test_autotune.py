"""The refining autotuner (``kernels/_autotune.py``): triton's pass over the configs, then the
fastest few timed again in interleaved rounds; and flash_v2's report of its picks."""

import json

import torch
import triton
import triton.language as tl

from fatrain.kernels import _autotune


@triton.jit
def _accumulate_twice(X, Y, PICKED, Nq, BLOCK: tl.constexpr):
    """Y += 2 X (an accumulating output, as dQ in the atomic pass); PICKED = the BLOCK that ran."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < Nq
    tl.store(Y + offs, tl.load(Y + offs, mask=ok) + 2 * tl.load(X + offs, mask=ok), mask=ok)
    tl.store(PICKED + tl.program_id(0) * 0, BLOCK)


def test_autotuner_refines_its_pick_in_interleaved_rounds(monkeypatch):
    """The first pass's fastest config loses the interleaved rounds: the rounds' winner is
    picked, cached and launched last, so the outputs are its own (an accumulating output,
    reset before each trial, holds exactly one launch's sum); autotune_picks reports it."""
    from fatrain.kernels import flash_v2
    times = {16: [1.0, 1.5, 1.5, 1.5], 32: [1.1, 1.0, 1.2, 0.9], 64: [1.2, 1.4, 1.4, 1.4], 128: [2.0]}
    seen = []

    def scripted_bench(kernel_call, quantiles):
        kernel_call()
        block = int(picked.item())
        seen.append(block)
        return [times[block][seen.count(block) - 1]] * 3

    monkeypatch.setattr(_autotune, "AUTOTUNE", True)
    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64, 128)]
    tuner = _autotune.autotuned(_accumulate_twice, configs, key=["Nq", "HEAD_DIM"], reset_to_zero=["Y"],
                                do_bench=scripted_bench)
    assert tuner.keys == ["Nq"]  # only the kernel's own arguments
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.arange(100, dtype=torch.float32, device=dev)
    y = torch.zeros(100, device=dev)
    picked = torch.zeros(1, dtype=torch.int32, device=dev)
    tuner[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](x, y, picked, 100)
    assert seen == [16, 32, 64, 128] + [16, 32, 64] * _autotune.REFINE_ROUNDS  # top 3, interleaved
    assert tuner.best_config.kwargs == {"BLOCK": 32}  # rounds' medians 1.5, 1.0, 1.4
    assert picked.item() == 32
    torch.testing.assert_close(y, 2 * x, rtol=0, atol=0)
    (rounds,) = tuner.refined.values()
    assert sorted(rounds) == ["BLOCK=16, num_warps=4, num_ctas=1, num_stages=3",
                              "BLOCK=32, num_warps=4, num_ctas=1, num_stages=3",
                              "BLOCK=64, num_warps=4, num_ctas=1, num_stages=3"]
    tuner[lambda meta: (triton.cdiv(100, meta["BLOCK"]),)](x, y, picked, 100)  # cached: no timing
    assert len(seen) == 4 + 3 * _autotune.REFINE_ROUNDS and picked.item() == 32
    monkeypatch.setattr(flash_v2, "_INTERPRET", False)  # the interpreter's launchers have no autotuners
    monkeypatch.setattr(flash_v2, "_LAUNCHERS", {"fwd": (tuner, tuner)})
    (row,) = flash_v2.autotune_picks()
    assert row["kernel"] == "fwd" and row["config"] == "BLOCK=32, num_warps=4, num_ctas=1, num_stages=3"
    assert row["key"] == {"Nq": "100", "dtypes": ["torch.float32", "torch.float32", "torch.int32"]}
    assert row["rounds_ms"]["BLOCK=32, num_warps=4, num_ctas=1, num_stages=3"] == [1.0, 1.2, 0.9]


def test_autotuning_off_keeps_the_first_config(monkeypatch):
    monkeypatch.setattr(_autotune, "AUTOTUNE", False)
    configs = [triton.Config({"BLOCK": b}) for b in (16, 32)]
    tuner = _autotune.autotuned(_accumulate_twice, configs, key=["Nq"])
    assert [c.kwargs for c in tuner.configs] == [{"BLOCK": 16}]
    assert isinstance(tuner, _autotune.RefiningAutotuner)


# ---- shape classes and picks kept across processes ----

@triton.jit
def _copy_rows(X, Y, PICKED, Nq, Nk, BLOCK: tl.constexpr):
    """Y = X over Nq rows (Nk only keys the tuner); PICKED = the BLOCK that ran."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = offs < Nq
    tl.store(Y + offs, tl.load(X + offs, mask=ok), mask=ok)
    tl.store(PICKED + tl.program_id(0) * 0, BLOCK)


def _class_tuner(bench_calls, fastest=32):
    def counting_bench(kernel_call, quantiles):
        kernel_call()
        bench_calls.append(1)
        return [0.5 if kernel_call_block() == fastest else 1.0] * 3

    picked = torch.zeros(1, dtype=torch.int32)

    def kernel_call_block():
        return int(picked.item())

    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64)]
    tuner = _autotune.shape_class_autotuned(_copy_rows, configs, key=["Nq", "Nk"], name="copy_rows",
                                            do_bench=counting_bench)
    return tuner, picked


def _launch(tuner, picked, n, nk):
    x = torch.arange(n, dtype=torch.float32)
    y = torch.full_like(x, float("nan"))
    tuner[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, picked, n, nk)
    assert torch.equal(x, y)
    return int(picked.item())


def test_shape_class_tuner_tunes_once_per_class_and_a_fresh_one_reads_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(_autotune, "AUTOTUNE", True)
    monkeypatch.setattr(_autotune, "PERSIST", True)
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path))
    assert _autotune.shape_class(300, 1000) == "q512-k1024" and _autotune.shape_class(1, 4097) == "decode-k8192"
    calls = []
    tuner, picked = _class_tuner(calls)
    before = _autotune.autotune_seconds()
    assert _launch(tuner, picked, 300, 1000) == 32
    tuned = len(calls)
    assert tuned >= 3  # every config timed once, then the refining rounds
    assert _launch(tuner, picked, 400, 900) == 32  # same class (q512-k1024): no timing
    assert len(calls) == tuned
    rows = _autotune.picks(tuner)
    assert [(r["key"]["Nq"], r["shape_class"], r["cached"]) for r in rows] == \
        [("300", "q512-k1024", False), ("400", "q512-k1024", True)]
    assert rows[0]["tune_s"] > 0 and rows[1]["tune_s"] == 0
    assert _autotune.autotune_seconds() > before
    assert len(list((tmp_path / "autotune").glob("copy_rows-q512-k1024-*.json"))) == 1
    # A new tuner (as in a second process) reads the pick: nothing is timed.
    fresh_calls = []
    fresh, picked = _class_tuner(fresh_calls, fastest=64)
    assert _launch(fresh, picked, 500, 1024) == 32 and fresh_calls == []
    assert _autotune.picks(fresh)[0]["cached"] is True
    # Another class is tuned.
    assert _launch(fresh, picked, 5, 1024) == 64 and fresh_calls


def test_shape_class_cache_key_follows_the_kernel_source(monkeypatch, tmp_path):
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path))
    tuner, _ = _class_tuner([])
    key = ("q512-k1024", "float32")
    path = tuner.cache_path(key)
    assert path.parent == tmp_path / "autotune"
    monkeypatch.setattr(_autotune, "_kernel_source", lambda fn: "changed kernel source")
    assert tuner.cache_path(key) != path


def test_corrupt_cache_file_is_ignored_with_a_warning(monkeypatch, tmp_path):
    import pytest

    monkeypatch.setattr(_autotune, "AUTOTUNE", True)
    monkeypatch.setattr(_autotune, "PERSIST", True)
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path))
    calls = []
    tuner, picked = _class_tuner(calls)
    assert _launch(tuner, picked, 300, 1000) == 32  # writes the class's file
    [path] = (tmp_path / "autotune").glob("copy_rows-q512-k1024-*.json")
    marker = tmp_path / "executed"
    texts = ("{not json", '{"config": {"BLOCK": 48}}',
             f'{{"config": "__import__(\'pathlib\').Path({str(marker)!r}).touch()"}}',
             json.dumps({**json.loads(path.read_text()), "shortlist": [{"BLOCK": 48}]}))
    for n, text in zip((301, 302, 303, 304), texts):  # new lengths of the class: the tuner's own cache misses
        path.write_text(text)
        tuner.class_picks.clear()
        calls.clear()
        with pytest.warns(RuntimeWarning, match="ignoring autotune cache file"):
            assert _launch(tuner, picked, n, 1000) == 32
        assert calls  # tuned again
        assert not marker.exists()


# ---- a class next to a tuned one: only the neighbour's shortlist is timed ----

FULL_TIMINGS = 5 + _autotune.REFINE_TOP * _autotune.REFINE_ROUNDS  # five configs, then the rounds


def _scripted_class_tuner(speeds, seen):
    """A shape-class tuner over five BLOCKs whose bench reports ``speeds[BLOCK]`` (ms, read at
    each timing, so a test can change them between classes) and records the BLOCK timed."""
    picked = torch.zeros(1, dtype=torch.int32)

    def scripted_bench(kernel_call, quantiles):
        kernel_call()
        seen.append(int(picked.item()))
        return [speeds[seen[-1]]] * 3

    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64, 128, 256)]
    tuner = _autotune.shape_class_autotuned(_copy_rows, configs, key=["Nq", "Nk"], name="copy_rows",
                                            do_bench=scripted_bench)
    return tuner, picked


def _row(tuner, nq, nk):
    (row,) = [r for r in _autotune.picks(tuner) if (r["key"]["Nq"], r["key"]["Nk"]) == (str(nq), str(nk))]
    return row


def test_adjacent_class_times_only_the_neighbours_shortlist(monkeypatch, tmp_path):
    """q32-k1024 tuned in full; q64-k1024 (Nq next) and q128-k2048 (both next) time only the
    previous class's three fastest, once each; q64-k8192 (Nk three powers away) and float16
    (other dtypes) have no tuned neighbour and are tuned in full."""
    monkeypatch.setattr(_autotune, "AUTOTUNE", True)
    monkeypatch.setattr(_autotune, "PERSIST", True)
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path))
    assert _autotune.adjacent_classes(20, 1000)[:4] == ["decode-k1024", "q32-k512", "q32-k2048", "q64-k1024"]
    assert "q32-k1024" in _autotune.adjacent_classes(3, 600) and len(_autotune.adjacent_classes(1, 1)) == 3
    speeds = {16: 1.0, 32: 0.6, 64: 0.5, 128: 0.8, 256: 0.9}
    seen = []
    tuner, picked = _scripted_class_tuner(speeds, seen)
    assert _launch(tuner, picked, 20, 1000) == 64
    assert len(seen) == FULL_TIMINGS and seen[5:] == [64, 32, 128] * _autotune.REFINE_ROUNDS
    assert _row(tuner, 20, 1000)["tuned"] == "full"
    # The next class: BLOCK=16 is now the fastest of all, but only the shortlist is timed.
    speeds.update({16: 0.1, 32: 0.4})
    seen.clear()
    assert _launch(tuner, picked, 40, 1000) == 32 and seen == [64, 32, 128]
    row = _row(tuner, 40, 1000)
    assert row["tuned"] == "seeded from q32-k1024" and row["shape_class"] == "q64-k1024"
    assert row["cached"] is False and row["tune_s"] > 0 and sorted(row["rounds_ms"].values()) == [[0.4], [0.5], [0.8]]
    [path] = (tmp_path / "autotune").glob("copy_rows-q64-k1024-*.json")
    stored = json.loads(path.read_text())
    assert [c["BLOCK"] for c in stored["shortlist"]] == [32, 64, 128] and stored["tuned"] == "seeded from q32-k1024"
    seen.clear()
    assert _launch(tuner, picked, 100, 2000) == 32 and seen == [32, 64, 128]  # diagonal: seeded from q64-k1024
    assert _row(tuner, 100, 2000)["tuned"] == "seeded from q64-k1024"
    for nk, dtype in ((5000, torch.float32), (1000, torch.float16)):
        seen.clear()
        x = torch.arange(40, dtype=dtype)
        y = torch.full_like(x, float("nan"))
        tuner[lambda meta: (triton.cdiv(40, meta["BLOCK"]),)](x, y, picked, 40, nk)
        assert torch.equal(x, y) and picked.item() == 16 and len(seen) == FULL_TIMINGS
    assert _row(tuner, 40, 5000)["tuned"] == "full"


def test_a_fresh_tuner_seeds_from_a_neighbours_file_and_reads_files_without_a_shortlist(monkeypatch, tmp_path):
    import warnings

    monkeypatch.setattr(_autotune, "AUTOTUNE", True)
    monkeypatch.setattr(_autotune, "PERSIST", True)
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "a"))
    speeds = {16: 1.0, 32: 0.6, 64: 0.5, 128: 0.8, 256: 0.9}
    seen = []
    first, picked = _scripted_class_tuner(speeds, seen)
    assert _launch(first, picked, 20, 1000) == 64 and len(seen) == FULL_TIMINGS
    # A second process: the neighbour's file seeds the next class; the class's own file is its pick.
    speeds[32] = 0.4
    seen.clear()
    fresh, picked = _scripted_class_tuner(speeds, seen)
    assert _launch(fresh, picked, 40, 1000) == 32 and seen == [64, 32, 128]
    assert _launch(fresh, picked, 20, 1000) == 64 and seen == [64, 32, 128]
    assert (_row(fresh, 40, 1000)["tuned"], _row(fresh, 20, 1000)["tuned"]) == ("seeded from q32-k1024", "cache")
    assert _row(fresh, 20, 1000)["cached"] is True
    # A file written before shortlists were kept: its pick loads, without a warning, but seeds nothing.
    [path] = (tmp_path / "a" / "autotune").glob("copy_rows-q32-k1024-*.json")
    old = {k: v for k, v in json.loads(path.read_text()).items() if k not in ("shortlist", "tuned")}
    (tmp_path / "old" / "autotune").mkdir(parents=True)
    (tmp_path / "old" / "autotune" / path.name).write_text(json.dumps(old))
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "old"))
    seen.clear()
    later, picked = _scripted_class_tuner(speeds, seen)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert _launch(later, picked, 20, 1000) == 64 and seen == []
        assert _launch(later, picked, 40, 1000) == 32 and len(seen) == FULL_TIMINGS
    assert (_row(later, 20, 1000)["tuned"], _row(later, 40, 1000)["tuned"]) == ("cache", "full")


def test_a_seeded_class_leaves_one_launch_in_an_accumulating_output(monkeypatch):
    """The shortlist's trials add into Y too (reset before each): after a seeded tuning Y holds
    exactly the pick's one launch, as after a full one."""
    monkeypatch.setattr(_autotune, "AUTOTUNE", True)
    monkeypatch.setattr(_autotune, "PERSIST", False)
    picked = torch.zeros(1, dtype=torch.int32)
    seen = []

    def scripted_bench(kernel_call, quantiles):
        kernel_call()
        seen.append(int(picked.item()))
        return [{16: 0.3, 32: 0.2, 64: 0.1, 128: 0.4}[seen[-1]]] * 3

    configs = [triton.Config({"BLOCK": b}) for b in (16, 32, 64, 128)]
    tuner = _autotune.shape_class_autotuned(_accumulate_twice, configs, key=["Nq"], name="accumulate",
                                            reset_to_zero=["Y"], do_bench=scripted_bench)
    for n, tuned in ((20, "full"), (40, "seeded from q32-k1")):
        x = torch.arange(n, dtype=torch.float32)
        y = torch.zeros(n)
        seen.clear()
        tuner[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, picked, n)
        torch.testing.assert_close(y, 2 * x, rtol=0, atol=0)
        assert picked.item() == 64 and _autotune.picks(tuner)[-1]["tuned"] == tuned
    assert seen == [64, 32, 16]
