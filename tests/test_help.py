"""--help of the console scripts, the internal schema option refused, one key=value convention.

The Hydra scripts are called in this process (``main()`` with a patched ``sys.argv``), which is
what the console script does, without a second interpreter start per case.
"""

import json
import os
import sys

import pytest

from fatrain.cli import bench as bench_cli
from fatrain.cli import eval as eval_cli
from fatrain.cli import max_context as max_context_cli
from fatrain.cli import bench_report as bench_report_cli
from fatrain.cli import report as report_cli
from fatrain.cli import sample as sample_cli
from fatrain.cli import train as train_cli
from fatrain.cli_help import refuse_internal_choices

GROUPS = {  # the groups each script composes, in the order its help lists them
    "train": ["model", "attention", "data", "optim", "trainer", "logger", "experiment", "contender"],
    "eval": ["attention", "data"],
    "sample": ["attention"],
    "bench": ["bench"],
}
MAINS = {"train": train_cli.main, "eval": eval_cli.main, "sample": sample_cli.main, "bench": bench_cli.main}
TINY_TRAIN = ["model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.seq_len=32", "trainer.max_steps=2",
              "trainer.batch_size=2", "trainer.eval_every=0", "trainer.ckpt_every=0", "trainer.progress_bar=false",
              "trainer.save_final=false", "logger.wandb.mode=disabled", "optim.warmup_steps=1"]


def run_hydra_main(monkeypatch, script, *args):
    monkeypatch.setattr(sys, "argv", [f"fatrain-{script}", *args])
    with pytest.raises(SystemExit) as stopped:
        MAINS[script]()
        raise SystemExit(0)  # a run that returns normally
    return stopped.value.code


def group_lines(text):
    section = text.split("== Config groups", 1)[1].split("== Config (", 1)[0]
    return {line.split(":")[0].strip(): line.split(":", 1)[1] for line in section.splitlines()[1:] if ":" in line}


@pytest.mark.parametrize("script", sorted(GROUPS))
def test_help_opens_with_a_description_and_examples_and_lists_only_used_groups(script, monkeypatch, capsys):
    assert run_hydra_main(monkeypatch, script, "--help") == 0
    text = capsys.readouterr().out
    assert text.startswith(f"fatrain-{script}: ")
    assert "powered by Hydra" not in text
    assert f"  fatrain-{script} " in text  # at least one example command line
    groups = group_lines(text)
    assert list(groups) == GROUPS[script]
    for group, options in groups.items():
        names = [o.strip() for o in options.split(",")]
        assert "schema" not in names and all(names), (group, names)
        if script in ("train", "bench"):
            assert "checkpoint" not in names
    if script == "train":
        assert "naive" in groups["attention"] and "quickstart" in groups["experiment"]
        assert "bench" not in groups


@pytest.mark.parametrize("script, args", [
    ("train", ["attention=schema", *TINY_TRAIN]),
    ("train", ["model=schema", *TINY_TRAIN]),
    ("eval", ["ckpt_path=nowhere.pt", "attention=schema"]),
])
def test_internal_schema_option_is_refused_with_one_line(script, args, monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))
    assert run_hydra_main(monkeypatch, script, *args, f"hydra.run.dir={tmp_path / 'run'}") == 2
    err = capsys.readouterr().err.strip().splitlines()
    group = args[0].split("=")[0] if script == "train" else "attention"
    assert len(err) == 1 and err[0].startswith(f"error: {group}=schema is the group's internal schema"), err
    assert "naive" in err[0] or group != "attention"


def test_refuse_internal_choices_reads_given_choices():
    refuse_internal_choices({"attention": "flash_v2", "hydra/launcher": "basic"})
    with pytest.raises(ValueError, match=r"^data=schema is the group's internal schema"):
        refuse_internal_choices({"data": "schema"})


def test_training_writes_no_empty_log_file(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))
    run_dir = tmp_path / "run"
    assert run_hydra_main(monkeypatch, "train", *TINY_TRAIN, f"hydra.run.dir={run_dir}") == 0
    assert (run_dir / "result.json").exists()
    assert not [name for name in os.listdir(run_dir) if name.endswith(".log")]


@pytest.mark.parametrize("cli, prog", [(report_cli, "fatrain-report"), (max_context_cli, "fatrain-max-context"),
                                       (bench_report_cli, "python -m fatrain.cli.bench_report")])
def test_plain_scripts_help_lists_key_value_settings(cli, prog, capsys):
    with pytest.raises(SystemExit) as stopped:
        cli.main(["--help"])
    assert stopped.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith(f"{prog}: ") and "Examples:" in text and "Settings (key=value):" in text
    for setting in cli.SETTINGS:
        assert f"  {setting.key}=" in text
    assert "--" not in text.split("Settings (key=value):")[1]  # the old --flags are not advertised


def test_report_takes_key_value_and_old_flags_with_a_note(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    assert report_cli.main([f"sweep_dir={missing}", "warmup_steps=3"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: {missing}: no such sweep directory"]
    assert report_cli.main([str(missing), "--warmup-steps", "3", "--baseline=sdpa"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[:2] == ["note: --warmup-steps is deprecated; write warmup_steps=3",
                       "note: --baseline is deprecated; write baseline=sdpa"]
    assert err[2].startswith("error: ") and len(err) == 3


@pytest.mark.parametrize("args, message", [
    (["colour=red"], "error: fatrain-report: unknown setting 'colour' (valid: sweep_dir, out, warmup_steps"),
    (["sweep_dir=x", "warmup_steps=ten"], "error: warmup_steps=ten must be an integer"),
    (["--bogus", "1"], "error: fatrain-report: unknown option --bogus"),
    ([], "error: fatrain-report: sweep_dir=<the folder a multirun wrote> is required"),
])
def test_report_bad_settings_one_line(args, message, capsys):
    assert report_cli.main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(message), err


def test_max_context_key_value_search_settings(tmp_path, capsys):
    out = tmp_path / "mc"
    code = max_context_cli.main(["backends=[naive]", "start=32", "granularity=32", "limit=64", "guide=false",
                                 f"out={out}", "model=tiny", "model.n_layer=1", "model.n_embd=32", "model.n_head=2",
                                 "trainer.precision=fp32", "trainer.device=cpu", "trainer.max_steps=1"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "deprecated" not in captured.err
    assert captured.out.splitlines()[-2:] == ["naive: 64", str(out / "max_context.json")]
    with open(out / "max_context.json") as f:
        data = json.load(f)
    assert data["search"]["guide"] is False
    guide = data["results"][0]["guide"]
    assert (guide["search"], guide["why"], guide["predictions"]) == ("doubling", "guide=false", [])


def test_max_context_on_the_cpu_refuses_half_precision_with_one_line(tmp_path, capsys):
    # The default search (GPT-2 small in bf16) is refused before anything starts, saying what runs there.
    out = tmp_path / "mc"
    assert max_context_cli.main([f"out={out}", "trainer.device=cpu"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: trainer.precision=bf16 with model gpt2-small is not searched on the CPU: for a functional "
                   "check there use backends=[naive,sdpa] trainer.precision=fp32 model=tiny start=32 granularity=32 "
                   "limit=1024, or run on a GPU"]
    assert not out.exists()


def test_fatrain_extend_exits_zero(capsys):
    """A console script's return value is its exit status: fatrain-extend returns 0 (its summary
    dict would make the shell see a failure and print the dict)."""
    from fatrain.cli import extend as extend_cli

    assert extend_cli.main(["--help"]) == 0
    assert capsys.readouterr().out.startswith('``fatrain-extend``')
