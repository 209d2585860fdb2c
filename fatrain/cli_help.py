"""What ``--help`` of the Hydra console scripts lists, and the internal options they refuse.

Every config group holds a ``schema`` option: the typed dataclass its files extend (see
fatrain.config), which is no choice a user makes. Hydra's own help lists every group in the
package for every script, with those options; ``configs/hydra/help/<script>.yaml`` lists
instead only the groups the script composes, through the ``fatrain_groups`` resolver
registered here, leaving out the internal options. ``refuse_internal_choices`` stops a
composed config that picked one (``attention=schema``) with one line naming the group.

``fatrain-report`` and ``fatrain-max-context`` are plain scripts (they compose no config of
their own) that take the same ``key=value`` form: ``parse_settings`` reads it, and still reads
their old ``--flag value`` spellings with a line saying how to write them now.
"""

from __future__ import annotations

import sys
import textwrap
from dataclasses import dataclass
from typing import Any, Optional

# Options that are parts of the schema, not settings: hidden from --help, refused when chosen.
INTERNAL_OPTIONS = ("schema",)
# `checkpoint` (the checkpoint's own attention/data settings) exists for the scripts that read one.
CHECKPOINT_SCRIPTS = ("eval", "sample")
RESOLVER = "fatrain_groups"


def group_options(group: str) -> list[str]:
    """The options of ``group`` a user can choose, from the config loader of the running app."""
    from hydra.core.global_hydra import GlobalHydra

    if not GlobalHydra.instance().is_initialized():
        return []
    loader = GlobalHydra.instance().config_loader()
    return sorted(o for o in loader.get_group_options(group) if o not in INTERNAL_OPTIONS)


def format_groups(script: str, *groups: str) -> str:
    """One ``group: option, option`` line per group, for the help of ``script``."""
    lines = []
    for group in groups:
        options = group_options(group)
        if script not in CHECKPOINT_SCRIPTS:
            options = [o for o in options if o != "checkpoint"]
        lines.append(f"  {group}: {', '.join(options)}")
    return "\n".join(lines)


def register_help_resolver() -> None:
    """Register ``${fatrain_groups:<script>,<group>,...}`` for the help templates (idempotent)."""
    from omegaconf import OmegaConf

    if not OmegaConf.has_resolver(RESOLVER):
        OmegaConf.register_new_resolver(RESOLVER, format_groups)


def refuse_internal_choices(choices: Optional[dict] = None) -> None:
    """ValueError when a config group was set to an internal option (``attention=schema``).

    ``choices``: group -> chosen option; by default the running Hydra app's
    (``hydra.runtime.choices``). Without a running app there is nothing to check.
    """
    if choices is None:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return
        choices = dict(HydraConfig.get().runtime.choices)
    for group, option in choices.items():
        if group.startswith("hydra/") or option not in INTERNAL_OPTIONS:
            continue
        valid = ", ".join(o for o in group_options(group) if o != "checkpoint") or "see --help"
        raise ValueError(f"{group}={option} is the group's internal schema, not an option (valid: {valid})")


# ----- key=value settings for the console scripts that are not Hydra apps -----------------------


@dataclass(frozen=True)
class Setting:
    """One ``key=value`` setting of a plain console script: its type, default and help line."""

    key: str
    kind: type  # str, int, bool (true | false) or list (a list: [a,b] or a,b)
    default: Any
    help: str
    flag: Optional[str] = None  # the old --flag spelling, still read, with a note that it is deprecated


def _convert(setting: Setting, text: str):
    if setting.kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError(f"{setting.key}={text} must be an integer") from None
    if setting.kind is bool:
        if text.lower() not in ("true", "false"):
            raise ValueError(f"{setting.key}={text} must be true or false")
        return text.lower() == "true"
    if setting.kind is list:
        return [part.strip() for part in text.strip().strip("[]").split(",") if part.strip()]
    return text


def settings_help(prog: str, description: str, examples: list[str], settings: list[Setting],
                  rest: str = "") -> str:
    """The ``--help`` text: description, examples, and each setting with its default."""
    lines = [description, "", "Examples:", *(f"  {e}" for e in examples), "", "Settings (key=value):"]
    for s in settings:
        default = ",".join(map(str, s.default)) if isinstance(s.default, list) else s.default
        lines.append(textwrap.fill(s.help, width=100, initial_indent=f"  {s.key}={'' if default is None else default}"
                                   .ljust(35), subsequent_indent=" " * 35))
    if rest:
        lines += ["", rest]
    return "\n".join(lines)


def parse_settings(argv: list[str], settings: list[Setting], *, prog: str, help_text: str,
                   positional: Optional[str] = None, pass_through: bool = False) -> tuple[dict, list[str]]:
    """(values of ``settings``, the other ``key=value`` overrides) from ``argv``.

    ``key=value`` is the convention of every fatrain script. The old ``--flag value`` and
    ``--flag=value`` spellings are still read, each with one line saying how to write it now;
    a bare value (no ``=``) is the ``positional`` setting (``fatrain-report DIR``). ``pass_through``: keys that are not settings are returned
    as overrides (for Hydra to compose); otherwise they are an error naming the valid keys.
    ``-h``/``--help`` prints ``help_text`` and exits 0.
    """
    by_key = {s.key: s for s in settings}
    by_flag = {s.flag: s for s in settings if s.flag}
    values = {s.key: s.default for s in settings}
    overrides: list[str] = []
    args = list(argv)
    while args:
        arg = args.pop(0)
        if arg in ("-h", "--help"):
            print(help_text)
            raise SystemExit(0)
        if arg.startswith("--"):
            flag, _, text = arg.partition("=")
            if flag not in by_flag:
                raise ValueError(f"{prog}: unknown option {flag} (settings are key=value: "
                                 f"{', '.join(by_key)}; --help lists them)")
            if not _:
                if not args:
                    raise ValueError(f"{prog}: {flag} needs a value")
                text = args.pop(0)
            s = by_flag[flag]
            print(f"note: {flag} is deprecated; write {s.key}={text}", file=sys.stderr)
            values[s.key] = _convert(s, text)
            continue
        key, eq, text = arg.partition("=")
        if not eq:
            if positional is None or values.get(positional) not in (None, by_key[positional].default):
                raise ValueError(f"{prog}: '{arg}' is not key=value (settings: {', '.join(by_key)})")
            values[positional] = _convert(by_key[positional], arg)
        elif key in by_key:
            values[key] = _convert(by_key[key], text)
        elif pass_through:
            overrides.append(arg)
        else:
            raise ValueError(f"{prog}: unknown setting '{key}' (valid: {', '.join(by_key)})")
    return values, overrides
