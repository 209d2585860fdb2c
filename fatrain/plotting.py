"""The conventions every fatrain plot follows, so a figure can go into a paper as written.

- A value axis is logarithmic where its values span more than ``LOG_SPAN`` (10x): 55 and
  6,000 tokens/s on a linear axis leave the small ones flat on the floor.
- Tick labels are plain numbers (``20``, ``300``, ``4096``), not powers of ten.
- Titles say what ran where: the model, the device (GPU name, or the CPU's model name) and
  the date, from what the run recorded (``fatrain.runtime.run_info``).
"""

from __future__ import annotations

import math
from typing import Iterable, Optional

LOG_SPAN = 10.0  # a value axis whose largest value exceeds this many times its smallest is drawn log


def pyplot():
    """matplotlib.pyplot on the Agg backend: files only, no display on a GPU box or in CI."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def spans_decade(values: Iterable[Optional[float]]) -> bool:
    """True when the positive finite values span more than LOG_SPAN (max / min > 10)."""
    finite = [v for v in values if v is not None and math.isfinite(v) and v > 0]
    return bool(finite) and max(finite) > LOG_SPAN * min(finite)


def plain_number(value: float) -> str:
    """20, 0.5, 5,000, 400,000: no powers of ten, thousands separated."""
    return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:g}"


def plain_numbers():
    from matplotlib.ticker import FuncFormatter

    return FuncFormatter(lambda value, _: plain_number(value))


def log_axis(ax, axis: str = "y") -> None:
    """A log10 ``axis`` with plain tick labels; the 2s and 5s between powers of ten are labelled
    too while the view spans under two decades, and every tick under one (else a narrow axis would
    show one label or none)."""
    from matplotlib.ticker import FuncFormatter

    getattr(ax, f"set_{axis}scale")("log")
    target = ax.yaxis if axis == "y" else ax.xaxis

    def minor(value, _):
        low, high = sorted(target.get_view_interval())
        if value <= 0 or low <= 0 or high / low > 100:
            return ""
        mantissa = value / 10 ** math.floor(math.log10(value) + 1e-9)
        if high / low < 10:  # under a decade: every minor tick, or there would be one or two labels
            return plain_number(float(f"{value:.6g}"))
        return plain_number(value) if min(abs(mantissa - 2), abs(mantissa - 5)) < 1e-6 else ""

    target.set_major_formatter(plain_numbers())
    target.set_minor_formatter(FuncFormatter(minor))


def value_axis(ax, values: Iterable[Optional[float]], axis: str = "y") -> str:
    """Make ``ax``'s ``axis`` log if ``values`` span more than 10x (else leave it linear); return the scale."""
    if not spans_decade(values):
        return "linear"
    log_axis(ax, axis)
    return "log"


def seq_len_axis(ax, seq_lens: Iterable[int], label: str = "seq_len (tokens)") -> None:
    """Sequence lengths on a log2 axis, one labelled tick per length (1k for 1024, 4k for 4096)."""
    seq_lens = sorted(set(int(n) for n in seq_lens))
    ax.set_xscale("log", base=2)
    ax.set_xticks(seq_lens, [short_length(n) for n in seq_lens])
    ax.minorticks_off()
    ax.set_xlabel(label)


def short_length(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def date_span(dates: Iterable[Optional[str]]) -> str:
    """'2026-11-26', or '2026-11-26 to 2026-11-27' when the runs spread over days; '' if none."""
    days = sorted({str(d)[:10] for d in dates if d})
    if not days:
        return ""
    return days[0] if len(days) == 1 else f"{days[0]} to {days[-1]}"


def title(what: str, where: str = "", width: int = 80) -> str:
    """A plot title: what it shows, then what ran where, wrapped to ``width`` characters a line."""
    import textwrap

    return "\n".join([what, *textwrap.wrap(where, width)]) if where else what


def describe(*parts: Optional[str]) -> str:
    """The non-empty parts joined with ', ' (a title's what-ran-where line)."""
    return ", ".join(p for p in parts if p)


def device_names(names: Iterable[Optional[str]]) -> str:
    """The distinct device names, in first-seen order, joined with ' + '."""
    return " + ".join(dict.fromkeys(n for n in names if n))


def describe_model(params: Optional[int], model: dict, precision: Optional[str]) -> str:
    """'124M-parameter GPT (12 layers, d_model 768), bf16' from what a job's config and metrics hold."""
    size = ""
    if params:
        size = f"{params / 1e9:.3g}B-parameter " if params >= 1e9 else f"{params / 1e6:.3g}M-parameter "
    layers = model.get("n_layer")
    shape = ", ".join(part for part in (f"{layers} layer{'' if layers == 1 else 's'}" if layers else "",
                                        f"d_model {model['n_embd']}" if model.get("n_embd") else "") if part)
    name = f"{size}GPT" + (f" ({shape})" if shape else "")
    return describe(name, precision)
