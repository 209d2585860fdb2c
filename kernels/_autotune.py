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

Shape classes (``shape_class_autotuned``): one tuning per power-of-two class of Nq and Nk,
picks kept in files across processes. A class next to one already tuned (each of Nq, Nk
within one power of two) times only that neighbour's shortlist, its ``REFINE_TOP`` fastest,
once each: REFINE_TOP timings instead of len(configs) + REFINE_TOP x REFINE_ROUNDS (3 instead
of 17 for flash_v2's 8 forward configs). The bet: the configs fastest at one length are
among the fastest at twice or half of it. A seeded class's shortlist (the same configs, in its
own order) seeds its neighbours in turn, so along a chain of classes no config outside the
first class's shortlist is timed again; a class with no tuned neighbour is tuned in full.

FATRAIN_AUTOTUNE=0 keeps only the first config of every list (no timing at all).

Caution / known limits: the refining tuner is installed by swapping the class of the
``triton.runtime.autotuner.Autotuner`` that ``triton.autotune`` builds (its constructor's
arguments differ between triton versions; the attributes used here, ``cache``,
``configs_timings``, ``_bench``, ``pre_hook``, ``nargs``, exist in triton 3.6-3.9), so
``torch.compile`` still sees a triton Autotuner.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import math
import os
import statistics
import time
import warnings
from pathlib import Path

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


def short_bench(kernel_call, quantiles):
    """As :func:`bench` with 25 ms of warm-up and 25 of repetitions: for kernels of microseconds
    (the decode split pass), where a thousand repetitions rank the configs and a longer timing
    would make the first decoding step of a class cost seconds."""
    from triton.testing import do_bench
    kernel_call()
    return do_bench(kernel_call, warmup=25, rep=25, quantiles=quantiles)


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
        medians = {config: statistics.median(rounds[config]) for config in top}
        best = min(top, key=medians.get)
        self.cache[key] = self.best_config = best
        if not hasattr(self, "refined"):
            self.refined = {}
        self.refined[key] = {config_label(c): rounds[c] for c in top}
        self.shortlisted = getattr(self, "shortlisted", {})
        self.shortlisted[key] = _ranked(medians)
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


def _ranked(times: dict) -> list:
    """The configs of ``times`` (config -> ms) that ran, fastest first (a config that does not
    fit the GPU times as inf and is left out)."""
    return sorted((config for config, t in times.items() if math.isfinite(t)), key=times.get)


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
    (the refining rounds' times in ms per candidate; empty when the list had one config). A
    shape-class tuner's rows also give shape_class, tune_s (seconds this row's call spent
    timing), cached (True when it timed nothing) and tuned (how its class's pick was made:
    ``full``, ``seeded from q512-k512`` (that neighbour's shortlist timed) or ``cache`` (read
    from the cache folder))."""
    if isinstance(tuner, ShapeClassTuner):
        return list(tuner.rows.values())
    rows = []
    names = [n for n in tuner.keys if n in tuner.arg_names]
    for key, config in getattr(tuner, "cache", {}).items():
        named = {n: str(k) for n, k in zip(names, key)}
        named["dtypes"] = [str(k) for k in key[len(names):]]
        rows.append(dict(key=named, config=config_label(config), rounds_ms=getattr(tuner, "refined", {}).get(key, {})))
    return rows


# ----------------------------------------------------------------------------------------
# Shape classes, picks kept across processes
# ----------------------------------------------------------------------------------------

#: FATRAIN_AUTOTUNE_CACHE=0: keep shape-class picks in the process only (no files read or written).
PERSIST = os.environ.get("FATRAIN_AUTOTUNE_CACHE", "1") != "0"
#: Query counts up to this form one class (decoding steps, whatever the cache length).
DECODE_MAX_Q = 16
_TUNING = {"seconds": 0.0}


def autotune_seconds() -> float:
    """Seconds this process spent timing configs in shape-class tuners (0 when every pick came
    from memory or from the cache folder)."""
    return _TUNING["seconds"]


def shape_class(nq: int, nk: int) -> str:
    """``decode-k1024``, ``q512-k2048``: Nq (or the decode class, Nq <= DECODE_MAX_Q) and Nk
    rounded up to powers of two."""
    q = "decode" if nq <= DECODE_MAX_Q else f"q{triton.next_power_of_2(nq)}"
    return f"{q}-k{triton.next_power_of_2(max(nk, 1))}"


def adjacent_classes(nq: int, nk: int) -> list[str]:
    """The shape classes next to ``shape_class(nq, nk)``: Nq and Nk classes each within one power
    of two (the decode class counts as Nq = DECODE_MAX_Q, so it is next to q32), the nearest
    first (one side changed before both)."""
    def log2(n):
        return triton.next_power_of_2(n).bit_length() - 1

    lowest_q = log2(DECODE_MAX_Q)
    q, k = max(log2(nq), lowest_q), log2(max(nk, 1))
    steps = sorted(((dq, dk) for dq in (-1, 0, 1) for dk in (-1, 0, 1) if (dq, dk) != (0, 0)),
                   key=lambda step: abs(step[0]) + abs(step[1]))
    return [shape_class(2 ** (q + dq), 2 ** (k + dk)) for dq, dk in steps if q + dq >= lowest_q and k + dk >= 0]


def cache_folder() -> Path:
    """$FATRAIN_CACHE/autotune, else ~/.cache/fatrain/autotune (the root fatrain's data cache uses)."""
    return Path(os.environ.get("FATRAIN_CACHE") or "~/.cache/fatrain").expanduser() / "autotune"


def _kernel_source(fn) -> str:
    """The source of the module that defines ``fn`` (its kernel and every helper it calls)."""
    while not hasattr(fn, "__module__") or not inspect.isfunction(fn):
        fn = fn.fn
    return inspect.getsource(inspect.getmodule(fn))


def _device_name() -> str:
    import torch

    return torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"


class ShapeClassTuner(RefiningAutotuner):
    """A RefiningAutotuner that tunes once per shape class (``shape_class`` of the Nq and Nk
    arguments, the other key arguments and dtypes exact) and keeps each class's pick and its
    shortlist (its ``REFINE_TOP`` fastest configs, fastest first) as a JSON file under
    ``cache_folder()``, named by a hash of the GPU name, the Triton version, the kernel module's
    source, the tuner's name and configs, and the class: a later process with the same kernel on
    the same GPU reads the pick and times nothing.

    A class next to one already tuned (``adjacent_classes``, the other key arguments and dtypes
    equal; in this process or in a file) is seeded: only that neighbour's shortlist is timed,
    once each in one round, and the fastest picked. A class with no neighbour is tuned in full
    (every config, then the refining rounds). A file that does not parse or names a config
    outside the list is ignored with a warning (only matched against the list, never executed);
    a file without a shortlist (written before shortlists were kept) gives its pick but cannot
    seed a neighbour."""

    name: str
    class_picks: dict
    class_shortlists: dict
    class_tuned: dict
    rows: dict

    def run(self, *args, **kwargs):
        if len(self.configs) < 2:  # FATRAIN_AUTOTUNE=0 or a one-config list: nothing to tune
            return super().run(*args, **kwargs)
        nargs = dict(zip(self.arg_names, args))
        all_args = {**nargs, **kwargs}
        names = [n for n in self.keys if n in all_args]
        exact = tuple(all_args[n] for n in names) + tuple(str(a.dtype) for a in all_args.values()
                                                          if hasattr(a, "dtype"))
        config = self.class_picks.get(exact)
        if config is not None:
            return self._launch(config, args, kwargs)
        nq, nk = int(all_args.get("Nq", 1)), int(all_args.get("Nk", 1))
        class_key = self._class_key(all_args, names, exact[len(names):])
        config, tune_s, rounds = self.class_picks.get(class_key), 0.0, {}
        cached = config is not None
        if config is None:
            config, shortlist = self._load(class_key)
            if config is not None:
                cached, self.class_tuned[class_key] = True, "cache"
                if shortlist:
                    self.class_shortlists[class_key] = shortlist
        if config is None:
            start = time.perf_counter()
            ret, config, rounds, shortlist, tuned = self._tune(exact, nq, nk, class_key[1:], args, kwargs)
            tune_s = time.perf_counter() - start
            _TUNING["seconds"] += tune_s
            self.class_tuned[class_key] = tuned
            if shortlist:
                self.class_shortlists[class_key] = shortlist
            self._store(class_key, config, shortlist, tuned)
        else:
            ret = self._launch(config, args, kwargs)
        self.class_picks[class_key] = self.class_picks[exact] = config
        key = {n: str(all_args[n]) for n in names}
        key["dtypes"] = list(exact[len(names):])
        self.rows[exact] = dict(key=key, shape_class=class_key[0], config=config_label(config), rounds_ms=rounds,
                                tune_s=round(tune_s, 4), cached=cached, tuned=self.class_tuned[class_key])
        return ret

    def _tune(self, exact, nq, nk, rest, args, kwargs):
        """Tune a new class: seeded from a neighbour's shortlist if one is known (and one of its
        configs runs), else in full. Returns the call's result, the pick, the rounds' times by
        config label, the class's shortlist and how it was tuned."""
        seed = self._neighbour_shortlist(nq, nk, rest)
        if seed is not None:
            neighbour, shortlist = seed
            seeded = self._time_shortlist(shortlist, args, kwargs)
            if seeded is not None:
                ret, ranked, rounds = seeded
                return ret, ranked[0], rounds, ranked, f"seeded from {neighbour}"
        ret = super().run(*args, **kwargs)
        rounds = getattr(self, "refined", {}).get(exact, {})
        return ret, self.best_config, rounds, getattr(self, "shortlisted", {}).get(exact), "full"

    def _neighbour_shortlist(self, nq, nk, rest):
        """(class name, shortlist) of the nearest adjacent class with a shortlist, in this process or
        in its cache file; None when there is none."""
        for name in adjacent_classes(nq, nk):
            class_key = (name, *rest)
            shortlist = self.class_shortlists.get(class_key)
            if shortlist is None and class_key not in self.class_picks:
                _, shortlist = self._load(class_key)
                if shortlist:
                    self.class_shortlists[class_key] = shortlist
            if shortlist:
                return name, shortlist
        return None

    def _time_shortlist(self, shortlist, args, kwargs):
        """Each config of ``shortlist`` timed once, in one round, then the fastest launched again
        last, so the outputs are its own (accumulators reset first, as after the refining rounds).
        Returns (the call's result, the configs that ran fastest first, the times by label), or
        None when none of them ran (none fits this shape)."""
        self.nargs = dict(zip(self.arg_names, args))
        times = {config: _first(self._bench(*args, config=config, **kwargs)) for config in shortlist}
        ranked = _ranked(times)
        if ranked:
            self.pre_hook({**self.nargs, **kwargs, **ranked[0].all_kwargs()}, reset_only=True)
        self.nargs = None
        if not ranked:
            return None
        return self._launch(ranked[0], args, kwargs), ranked, {config_label(c): [times[c]] for c in shortlist}

    def _launch(self, config, args, kwargs):
        """The launch with a known pick, as triton's autotuner launches a cached one."""
        self.best_config = config
        if config.pre_hook is not None:
            config.pre_hook({**dict(zip(self.arg_names, args)), **kwargs, **config.all_kwargs()})
        return self.fn.run(*args, **kwargs, **config.all_kwargs())

    def _class_key(self, all_args, names, dtypes) -> tuple:
        exact = [f"{n}={all_args[n]}" for n in names if n not in ("Nq", "Nk")]
        return (shape_class(int(all_args.get("Nq", 1)), int(all_args.get("Nk", 1))), *exact, *dtypes)

    def cache_path(self, class_key: tuple) -> Path:
        ident = [_device_name(), triton.__version__, hashlib.sha256(_kernel_source(self.fn).encode()).hexdigest(),
                 self.name, [config_label(c) for c in self.configs], list(class_key)]
        digest = hashlib.sha256(json.dumps(ident).encode()).hexdigest()[:32]
        return cache_folder() / f"{self.name}-{class_key[0]}-{digest}.json"

    def _config_in_list(self, stored):
        """The config of the tuner's list whose settings equal ``stored`` (a dict from a file), else None."""
        return next((config for config in self.configs if config.all_kwargs() == stored), None)

    def _load(self, class_key: tuple) -> tuple:
        """(pick, shortlist) from the class's cache file; the shortlist is None in a file written
        before shortlists were kept, both are None when there is no usable file."""
        if not PERSIST or len(self.configs) < 2:
            return None, None
        path = self.cache_path(class_key)
        if not path.exists():
            return None, None
        try:
            stored = json.loads(path.read_text())
            entries = [stored["config"], *stored.get("shortlist", [])]
            configs = [self._config_in_list(entry) for entry in entries]
            # NOTE: `is None`, not `None in configs`: triton.Config's == reads the other's settings.
            missing = [entry for entry, config in zip(entries, configs) if config is None]
            if not missing:
                return configs[0], configs[1:] if "shortlist" in stored else None
            reason = f"config {missing[0]!r} is not in the tuner's list"
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            reason = f"{type(err).__name__}: {err}"
        warnings.warn(f"ignoring autotune cache file {path} ({reason}); tuning again", RuntimeWarning, stacklevel=3)
        return None, None

    def _store(self, class_key: tuple, config, shortlist, tuned: str) -> None:
        if not PERSIST or len(self.configs) < 2:
            return
        path = self.cache_path(class_key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_text(json.dumps(dict(config=config.all_kwargs(),
                                           shortlist=[c.all_kwargs() for c in shortlist or []], tuned=tuned,
                                           shape_class=list(class_key), tuner=self.name,
                                           triton=triton.__version__, gpu=_device_name())))
            os.replace(tmp, path)
        except OSError as err:
            warnings.warn(f"could not write autotune cache file {path} ({err}); the pick is kept in this "
                          f"process only", RuntimeWarning, stacklevel=3)


def shape_class_autotuned(kernel, configs: list, key: list[str], name: str, reset_to_zero=None, do_bench=bench):
    """As :func:`autotuned`, tuning once per shape class of Nq and Nk with picks kept under
    ``cache_folder()`` (``ShapeClassTuner``); ``name`` tells this tuner's files from others'."""
    tuner = autotuned(kernel, configs, key, reset_to_zero=reset_to_zero, do_bench=do_bench)
    tuner.__class__ = ShapeClassTuner
    tuner.name = name
    tuner.class_picks = {}
    tuner.class_shortlists = {}
    tuner.class_tuned = {}
    tuner.rows = {}
    return tuner
