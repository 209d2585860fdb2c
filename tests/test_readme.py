"""The README's commands, as a user types them.

Every command line in the README's ``bash`` blocks is read with shell quoting (``shlex``):
each ``fatrain-*`` (and ``torchrun -m fatrain.cli.*``) command's settings must compose with the
project's configs (a misspelt key, a group option that does not exist or a value of the wrong
type fails here), and the scripts that take ``key=value`` settings must know every key. The fast
ones then run for real, in a subprocess through the shell, on a tiny corpus: the text corpus
with its separator example (which must split documents), evaluation, sampling, export and the
CPU benchmark, with only the README's placeholders (``<run>``, ``my_corpus/``) filled in and a
few speed settings appended.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shlex
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_module
from hydra.core.override_parser.overrides_parser import OverridesParser

from fatrain.config import register_configs

README = os.path.join(os.path.dirname(__file__), "..", "README.md")
BIN = os.path.dirname(sys.executable)  # the venv's console scripts

register_configs()


def readme_commands() -> list[str]:
    """Every command line of the README's bash blocks: continuations joined, comments dropped."""
    with open(README) as f:
        text = f.read()
    lines = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                lines.append(shlex.join(words))
    return lines


#: script -> the config a Hydra entry point composes
HYDRA_SCRIPTS = {"fatrain-train": "train", "fatrain.cli.train": "train", "fatrain-eval": "eval",
                 "fatrain.cli.eval": "eval", "fatrain-sample": "sample", "fatrain-bench": "bench",
                 "fatrain-extend": "train"}  # fatrain-extend: training overrides of the base run, and out=


def script_and_settings(words: list[str]):
    """(script, settings) of one command: ``bash scripts/setup.sh && .venv/bin/fatrain-train a=b``
    gives ("fatrain-train", ["a=b"]); ``torchrun ... -m fatrain.cli.train a=b`` gives
    ("fatrain.cli.train", ["a=b"]); other commands give (None, [])."""
    if "&&" in words:
        words = words[len(words) - words[::-1].index("&&"):]
    if words and words[0] == "torchrun":
        if "-m" not in words:
            return None, []
        at = words.index("-m")
        return words[at + 1], words[at + 2:]
    if words and os.path.basename(words[0]).startswith("fatrain-"):
        return os.path.basename(words[0]), words[1:]
    return None, []


def first_of_sweeps(settings: list[str]) -> list[str]:
    """A multirun's settings with each sweep (``a=x,y``) replaced by its first value, and the
    ``-m`` flag dropped: what one job of the sweep composes."""
    parser = OverridesParser.create()
    out = []
    for text in settings:
        if text in ("-m", "--multirun"):
            continue
        override = parser.parse_override(text)
        if override.is_sweep_override():
            first = next(iter(override.sweep_string_iterator()))
            text = f"{override.get_key_element()}={first}"
        out.append(text)
    return out


def filled_placeholders(command: str) -> str:
    """The README's placeholders (``<run>``, ``<date>``, ``<ckpt.pt>``) as a word a user would put there."""
    return re.sub(r"<[^<>\s]+>", "x", command)


COMMANDS = readme_commands()


def test_the_readme_has_its_commands():
    scripts = {script_and_settings(shlex.split(c))[0] for c in COMMANDS}
    assert {"fatrain-train", "fatrain-eval", "fatrain-sample", "fatrain-bench", "fatrain-report"} <= scripts
    assert any("experiment=quickstart" in c for c in COMMANDS)


@pytest.mark.parametrize("command", [c for c in COMMANDS if script_and_settings(shlex.split(c))[0] in HYDRA_SCRIPTS])
def test_readme_hydra_commands_compose(command):
    script, settings = script_and_settings(shlex.split(filled_placeholders(command)))
    settings = first_of_sweeps(settings)
    if script == "fatrain-extend":
        settings = [s for s in settings if not s.startswith("out=")]
    if any(s.startswith("hydra/launcher=slurm") for s in settings):
        pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="the slurm extra is not installed")
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        cfg = compose(config_name=HYDRA_SCRIPTS[script], overrides=settings, return_hydra_config=True)
    for text in settings:  # each plain key=value setting reached the config with its value
        key, eq, value = text.partition("=")
        if eq and "/" not in key and not key.startswith(("hydra.", "+", "~")) and "." in key:
            assert cfg is not None and _get(cfg, key) is not None or value in ("null", "None"), text


def _get(cfg, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def _settings_of(module: str):
    import importlib

    return importlib.import_module(module).SETTINGS


@pytest.mark.parametrize("command", [c for c in COMMANDS if script_and_settings(shlex.split(c))[0]
                                     in ("fatrain-report", "fatrain-max-context", "fatrain-export")])
def test_readme_setting_commands_parse(command):
    from fatrain.cli_help import parse_settings

    script, settings = script_and_settings(shlex.split(filled_placeholders(command)))
    if script == "fatrain-max-context":
        from fatrain.cli.max_context import compose_config

        module = "fatrain.cli.max_context"
        values, overrides = parse_settings(settings, _settings_of(module), prog=script, help_text="",
                                           pass_through=True)
        compose_config(first_of_sweeps(overrides))
        return
    module = {"fatrain-report": "fatrain.cli.report", "fatrain-export": "fatrain.cli.export"}[script]
    positional = "sweep_dir" if script == "fatrain-report" else None
    parse_settings(settings, _settings_of(module), prog=script, help_text="", positional=positional)


# ------------------------------------------------------------------ the fast ones, for real

SPEED = ["model=tiny", "data.seq_len=32", "trainer.max_steps=4", "trainer.batch_size=2", "trainer.eval_every=2",
         "trainer.eval_batches=1", "trainer.ckpt_every=2", "trainer.progress_bar=false", "logger.wandb.mode=disabled"]


def _readme_line(*needles: str) -> str:
    found = [c for c in COMMANDS if all(n in c for n in needles)]
    assert found, f"the README has no command with {needles}"
    return found[0]


def _run(command: str, cwd, env) -> subprocess.CompletedProcess:
    """``command`` through bash, with the venv's console scripts first on PATH, as a user runs it."""
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"{command}\nexit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc


@pytest.fixture
def user_env(tmp_path):
    env = dict(os.environ, PATH=BIN + os.pathsep + os.environ.get("PATH", ""), WANDB_MODE="offline",
               FATRAIN_CACHE=str(tmp_path / "cache"))
    return env


def _speed(command: str, extra=()) -> str:
    """The README's command with the speed settings it does not set itself appended."""
    keys = {w.partition("=")[0] for w in shlex.split(command)}
    return command + "".join(f" {shlex.quote(s)}" for s in [*SPEED, *extra] if s.partition("=")[0] not in keys)


def test_readme_walkthrough_runs_as_written(tmp_path, user_env):
    # A corpus folder as the README's separator example expects: paragraphs apart by blank lines.
    corpus = tmp_path / "my_corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("".join(f"Paragraph {i}: some words of a short text.\n\n" for i in range(120)))
    (corpus / "b.txt").write_text("".join(f"Another file, paragraph {i}.\n\n" for i in range(60)))

    line = _readme_line("data=text", "data.path=my_corpus/", "document_separator")
    train = _run(_speed(line, ["hydra.run.dir=outputs/train/readme"]), tmp_path, user_env)
    stores = re.findall(r"token store: [\d,]+ tokens, ([\d,]+) documents", train.stdout + train.stderr)
    assert stores and int(stores[-1].replace(",", "")) >= 180, "the separator '\\n\\n' did not split documents"
    run = tmp_path / "outputs" / "train" / "readme"
    assert json.loads((run / "result.json").read_text())["status"] == "ok"

    def filled(text):
        return text.replace("outputs/train/<run>", "outputs/train/readme").replace("<run>", "outputs/train/readme")

    evaluate = filled(_readme_line("fatrain-eval", "eval.seq_lens=")).replace("[128,512,2048]", "[16,32]")
    evaluate = evaluate.replace("eval.batch_size=8", "eval.batch_size=2").replace("eval.batches=20", "eval.batches=2")
    _run(evaluate + " eval.plots=false", tmp_path, user_env)
    assert glob.glob(str(run / "eval*" / "**" / "eval.json"), recursive=True) or \
        glob.glob(str(tmp_path / "outputs" / "eval" / "**" / "eval.json"), recursive=True)

    sample = filled(_readme_line("fatrain-sample", "ROMEO")).replace("max_new_tokens=300", "max_new_tokens=20")
    out = _run(sample, tmp_path, user_env)
    assert "ROMEO:" in out.stdout

    export_lines = [c for c in COMMANDS if c.startswith("fatrain-export")]
    if export_lines:
        _run(filled(export_lines[0]).replace("<ckpt.pt>", "outputs/train/readme"), tmp_path, user_env)
        assert glob.glob(str(tmp_path / "**" / "*.safetensors"), recursive=True)


def test_readme_cpu_bench_runs_as_written(tmp_path, user_env):
    proc = _run(_readme_line("fatrain-bench", "bench=smoke"), tmp_path, user_env)
    assert re.search(r"naive|flash_v2", proc.stdout + proc.stderr)
