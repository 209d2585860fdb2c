"""The refining autotuner (``kernels/_autotune.py``): triton's pass over the configs, then the
fastest few timed again in interleaved rounds; and flash_v2's report of its picks."""

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
