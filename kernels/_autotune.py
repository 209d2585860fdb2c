"""Autotuning for any Triton kernel: triton's autotuner, then the fastest few configs timed
again in interleaved rounds before one is picked and cached per shape key.

    tuner = autotuned(kernel, configs, key=["Nq", "Nk", "HEAD_DIM"])
    tuner[grid](*args)              # times the configs on the first call of a key, then caches
    picks(tuner)                    # (key, config label, round times) per cached key

Why the rounds: triton's autotuner times each config once, in list order, and over the
seconds that takes the GPU's clocks and temperature drift, so its pick for one shape can
differ between processes by more than the gaps between configs (on an H100 it picked a
dK/dV config 7% slower than the best in one process and the best in others). Timing the
``REFINE_TOP`` fastest again in ``REFINE_ROUNDS`` interleaved rounds puts every candidate
under the same conditions; the median of its rounds picks. Cost: REFINE_TOP x REFINE_ROUNDS
more timings per new key (about 0.2 s each with ``bench``'s 100 + 100 ms).

FATRAIN_AUTOTUNE=0 keeps only the first config of every list (no timing at all).

Caution / known limits: the refining tuner is installed by swapping the class of the
``triton.runtime.autotuner.Autotuner`` that ``triton.autotune`` builds (its constructor's
arguments differ between triton versions; the attributes used here, ``cache``,
``configs_timings``, ``_bench``, ``pre_hook``, ``nargs``, exist in triton 3.6-3.9), so
``torch.compile`` still sees a triton Autotuner.
"""

from __future__ import annotations

import os
import statistics

import triton

#: FATRAIN_AUTOTUNE=0: launch the first config of each list, untimed.
AUTOTUNE = os.environ.get("FATRAIN_AUTOTUNE", "1") != "0"
#: Configs re-timed after the autotuner's pass over the list, and the interleaved rounds they get.
REFINE_TOP = 3
REFINE_ROUNDS = 3


def bench(kernel_call, quantiles):
    """The timing of one config: one call first (its compilation, seconds during which the GPU
    idles and its clocks drop), then ``do_bench`` with 100 ms of warm-up.

    NOTE: with triton's default (compile inside a 25 ms warm-up) one config measured 1.34 and
    1.95 ms in one process on an H100; picks moved between runs by more than the gaps between
    configs."""
    from triton.testing import do_bench
    kernel_call()
    return do_bench(kernel_call, warmup=100, rep=100, quantiles=quantiles)


class RefiningAutotuner(triton.runtime.autotuner.Autotuner):
    """triton's autotuner, then the fastest ``REFINE_TOP`` configs timed again in
    ``REFINE_ROUNDS`` interleaved rounds; the median of the rounds picks. ``refined`` keeps
    each key's round times."""

    def run(self, *args, **kwargs):
        known = set(self.cache)
        ret = super().run(*args, **kwargs)
        new = [key for key in self.cache if key not in known]
        timings = getattr(self, "configs_timings", None)
        if not new or not timings or len(timings) < 2:
            return ret
        key = new[0]
        top = sorted(timings, key=lambda c: _first(timings[c]))[:REFINE_TOP]
        self.nargs = dict(zip(self.arg_names, args))
        rounds = {config: [] for config in top}
        for _ in range(REFINE_ROUNDS):
            for config in top:
                rounds[config].append(_first(self._bench(*args, config=config, **kwargs)))
        best = min(top, key=lambda c: statistics.median(rounds[c]))
        self.cache[key] = self.best_config = best
        if not hasattr(self, "refined"):
            self.refined = {}
        self.refined[key] = {config_label(c): rounds[c] for c in top}
        # NOTE: the trials overwrote the outputs (accumulators included, reset before each):
        # the launch again with the pick leaves exactly its results.
        full_nargs = {**self.nargs, **kwargs, **best.all_kwargs()}
        self.pre_hook(full_nargs, reset_only=True)
        ret = self.fn.run(*args, **kwargs, **best.all_kwargs())
        self.nargs = None
        return ret


def config_label(config: triton.Config) -> str:
    """``BLOCK_M=128, BLOCK_N=64, num_warps=8, ...``: a config as autotune_picks reports it."""
    return ", ".join(f"{k}={v}" for k, v in config.all_kwargs().items())


def _first(timing):
    """A config's time from the autotuner: a float, or [median, p20, p80] with quantiles."""
    return timing[0] if isinstance(timing, (list, tuple)) else timing


def autotuned(kernel, configs: list, key: list[str], reset_to_zero=None, do_bench=bench):
    """``kernel`` autotuned over ``configs`` (only the first when FATRAIN_AUTOTUNE=0), keyed by
    the names of ``key`` that are arguments of the kernel; ``reset_to_zero`` names outputs that
    accumulate (zeroed before every trial)."""
    configs = configs if AUTOTUNE else configs[:1]
    key = [name for name in key if name in kernel.arg_names]
    tuner = triton.autotune(configs, key=key, reset_to_zero=reset_to_zero, do_bench=do_bench)(kernel)
    # NOTE: the class swapped rather than the constructor called, whose arguments differ
    # between triton versions; torch.compile still sees a triton Autotuner.
    tuner.__class__ = RefiningAutotuner
    return tuner


def picks(tuner) -> list[dict]:
    """The configs ``tuner`` picked in this process, one row per shape key: key ({key name:
    value as a string, dtypes: the tensor arguments' dtypes}), config (its label) and rounds_ms
    (the refining rounds' times in ms per candidate; empty when the list had one config)."""
    rows = []
    names = [n for n in tuner.keys if n in tuner.arg_names]
    for key, config in getattr(tuner, "cache", {}).items():
        named = {n: str(k) for n, k in zip(names, key)}
        named["dtypes"] = [str(k) for k in key[len(names):]]
        rows.append(dict(key=named, config=config_label(config), rounds_ms=getattr(tuner, "refined", {}).get(key, {})))
    return rows
