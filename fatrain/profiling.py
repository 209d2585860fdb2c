"""A per-kernel profile of a few training steps: ``trainer.profile_start=N trainer.profile_steps=K``.

``torch.profiler`` records steps N .. N + K - 1 (the step numbers the console logs) on the CPU
and, on a GPU, CUDA; at the end of step N + K - 1 the main rank writes into ``<run>/profile/``:

  trace.json    the timeline (chrome://tracing or https://ui.perfetto.dev)
  kernels.csv   one row per op or kernel: calls, self device time, self and total CPU time in
                microseconds, heaviest first by self device time (by self CPU time on the CPU)
  kernels.txt   the same as torch.profiler's table, the top 60 rows

A validation or checkpoint that falls between two profiled steps is in the profile too (as its
own ops); pick a window between multiples of trainer.eval_every and trainer.ckpt_every to
leave them out. The profiled steps run slower than the others (the profiler's own cost); a sweep's tokens/s
is a median over the logged steps, so a few of them hardly move it.
"""

from __future__ import annotations

import csv
import os
from typing import Optional

import torch

def _time(event, *names: str) -> float:
    """The first of ``names`` the event has (torch renamed cuda_* to device_*), in microseconds."""
    for name in names:
        value = getattr(event, name, None)
        if value is not None:
            return float(value)
    return 0.0


class StepProfiler:
    """Starts torch.profiler before step ``start`` and writes the files after ``start + steps - 1``."""

    def __init__(self, run_dir: str, start: int, steps: int, device: torch.device, is_main: bool = True):
        self.dir = os.path.join(run_dir, "profile")
        self.start, self.last = start, start + steps - 1
        self.device, self.is_main = device, is_main
        self.prof: Optional[torch.profiler.profile] = None

    @property
    def enabled(self) -> bool:
        return self.start > 0 and self.is_main

    def before_step(self, step: int) -> None:
        """``step``: the number the coming step will have (1-based)."""
        if self.enabled and step == self.start and self.prof is None:
            activities = [torch.profiler.ProfilerActivity.CPU]
            if self.device.type == "cuda":
                activities.append(torch.profiler.ProfilerActivity.CUDA)
            self.prof = torch.profiler.profile(activities=activities)
            self.prof.start()

    def after_step(self, step: int) -> Optional[str]:
        """Stops and writes after the last profiled step; returns the folder then."""
        if self.prof is None or step < self.last:
            return None
        prof, self.prof = self.prof, None
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        prof.stop()
        self.write(prof)
        return self.dir

    def close(self) -> None:
        """A run that ends inside the profiled steps writes what it recorded."""
        if self.prof is not None:
            self.after_step(self.last)

    def write(self, prof) -> None:
        os.makedirs(self.dir, exist_ok=True)
        prof.export_chrome_trace(os.path.join(self.dir, "trace.json"))
        cuda = self.device.type == "cuda"
        rows = []
        for e in prof.key_averages():
            rows.append({"name": e.key, "calls": e.count,
                         "self_device_us": _time(e, "self_device_time_total", "self_cuda_time_total"),
                         "self_cpu_us": _time(e, "self_cpu_time_total"), "total_cpu_us": _time(e, "cpu_time_total")})
        rows.sort(key=lambda r: -(r["self_device_us"] if cuda else r["self_cpu_us"]))
        with open(os.path.join(self.dir, "kernels.csv"), "w", newline="", encoding="utf-8") as f:
            writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else ["name"])
            writer.writeheader()
            writer.writerows(rows)
        sort = "self_cuda_time_total" if cuda else "self_cpu_time_total"
        try:
            table = prof.key_averages().table(sort_by=sort, row_limit=60)
        except (KeyError, AttributeError, ValueError):  # the column's name in other torch versions
            table = prof.key_averages().table(sort_by="self_device_time_total" if cuda else sort, row_limit=60)
        with open(os.path.join(self.dir, "kernels.txt"), "w", encoding="utf-8") as f:
            f.write(f"steps {self.start}-{self.last}\n{table}\n")
