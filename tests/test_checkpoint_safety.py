"""A checkpoint is data, never code: a crafted pickle is refused by every entry point before it runs.

The attack: a ``.pt`` (or a ``.dcp`` folder) whose pickle calls ``os.system`` / ``exec`` through
``__reduce__`` when it is unpickled. The payload writes a marker file; the tests assert the
marker never appears, the command exits 2 with one ``error:`` line naming the file, and real
checkpoints still load (with plain ``torch.load(weights_only=True)``) and resume exactly.
"""

import os
import pickle
import random
import subprocess
import sys

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_module

from fatrain.checkpoint import FORMAT, UnsafeCheckpointError, load_checkpoint
from fatrain.config import register_configs
from fatrain.trainer import rng_state, run_training, set_rng_state

register_configs()

FAST = [
    "model.n_layer=1", "model.n_embd=32", "model.n_head=2", "data.seq_len=32",
    "trainer.max_steps=2", "trainer.batch_size=2", "trainer.log_every=1", "trainer.eval_every=0",
    "trainer.eval_batches=1", "trainer.ckpt_every=0", "trainer.progress_bar=false",
    "logger.wandb.mode=disabled", "optim.warmup_steps=1",
]


class SystemPayload:
    """Unpickling this runs ``touch <marker>`` through os.system."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


class ExecPayload(SystemPayload):
    """Unpickling this runs Python source through exec."""

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').close()",)


def crafted_checkpoint(path, marker, payload=SystemPayload):
    """A file that looks like a fatrain checkpoint (format marker, keys) with a payload in the model."""
    torch.save({"format": FORMAT, "model": {"w": payload(marker)}, "spec": {}, "step": 1, "config": {}}, path)
    return str(path)


def compose_train(overrides):
    with initialize_config_module(config_module="fatrain.configs", version_base=None):
        return compose(config_name="train", overrides=overrides)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A finished 2-step run folder with its checkpoint, and the data cache it used."""
    cache = tmp_path_factory.mktemp("cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FATRAIN_CACHE", str(cache))
        run_dir = tmp_path_factory.mktemp("run")
        result = run_training(compose_train(FAST), str(run_dir))
    return {"run_dir": run_dir, "ckpt": result["checkpoint"], "cache": str(cache)}


@pytest.mark.parametrize("payload", [SystemPayload, ExecPayload])
def test_crafted_pickle_is_refused_without_running(tmp_path, payload):
    marker = tmp_path / "pwned"
    path = crafted_checkpoint(tmp_path / "evil.pt", marker, payload)
    with pytest.raises(UnsafeCheckpointError) as err:
        load_checkpoint(path)
    assert not marker.exists()
    message = str(err.value)
    assert "\n" not in message and path in message and "refused" in message
    assert ("system" if payload is SystemPayload else "exec") in message


def test_real_checkpoint_is_plain_data(trained):
    """Tensors and plain containers only: torch's own safe loader reads it, RNG states included."""
    state = torch.load(trained["ckpt"], weights_only=True)
    assert state["format"] == FORMAT and state["step"] == 2
    assert isinstance(state["rng"]["numpy"]["keys"], torch.Tensor)
    assert load_checkpoint(trained["ckpt"])["step"] == 2


def test_rng_state_round_trips_through_a_safe_load(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # a cached Gaussian is part of numpy's state
    path = tmp_path / "rng.pt"
    torch.save(rng_state(), path)
    want = (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist())
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    set_rng_state(torch.load(path, weights_only=True))
    assert (random.random(), np.random.randn(3).tolist(), torch.rand(3).tolist()) == want


def test_checkpoint_of_an_older_version_is_refused_with_the_reason(tmp_path):
    """Older checkpoints pickled numpy's RNG state (an ndarray): refused, no unsafe fallback."""
    path = tmp_path / "old.pt"
    torch.save({"format": FORMAT, "model": {}, "spec": {}, "step": 1, "config": {},
                "rng": {"numpy": np.random.get_state()}}, path)
    with pytest.raises(UnsafeCheckpointError, match=r"refused: it needs numpy\S* .*older fatrain version"):
        load_checkpoint(str(path))


def _dcp_folder(path, tensors):
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict_saver import _save_state_dict

    _save_state_dict(tensors, storage_writer=FileSystemWriter(str(path)), no_dist=True)
    torch.save({"format": FORMAT, "spec": {}, "step": 1, "config": {}}, path / "fatrain_meta.pt")
    return str(path)


def test_sharded_checkpoint_loads_and_crafted_parts_are_refused(tmp_path):
    good = _dcp_folder(tmp_path / "ckpt_00000001.dcp", {"model": {"w": torch.arange(4.0)},
                                                        "optimizer": {"param_groups": [{"lr": 0.1}]}})
    state = load_checkpoint(good)
    assert state["model"]["w"].tolist() == [0.0, 1.0, 2.0, 3.0]
    assert state["optimizer"]["param_groups"][0]["lr"] == 0.1

    marker = tmp_path / "pwned"
    # A non-tensor entry (DCP stores it as torch.save bytes) that carries the payload.
    evil_entry = _dcp_folder(tmp_path / "entry.dcp", {"model": {"w": torch.zeros(2), "x": SystemPayload(marker)}})
    with pytest.raises(UnsafeCheckpointError, match=r"entry\.dcp \(entry model\.x\) refused: .*system"):
        load_checkpoint(evil_entry)
    # DCP's own .metadata pickle replaced by the payload.
    evil_meta = _dcp_folder(tmp_path / "meta.dcp", {"model": {"w": torch.zeros(2)}})
    with open(os.path.join(evil_meta, ".metadata"), "wb") as f:
        pickle.dump(SystemPayload(marker), f)
    with pytest.raises(UnsafeCheckpointError, match=r"meta\.dcp/\.metadata refused: .*system"):
        load_checkpoint(evil_meta)
    assert not marker.exists()


def _run(module, *args, cache, cwd):
    env = {**os.environ, "FATRAIN_CACHE": cache, "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, timeout=300,
                          env=env, cwd=cwd)


def test_no_entry_point_runs_a_crafted_checkpoint(trained, tmp_path):
    """fatrain-eval ckpt_path=, fatrain-sample ckpt_path=, fatrain-train resume=<path> and resume=auto."""
    marker = tmp_path / "pwned"
    evil = crafted_checkpoint(tmp_path / "evil.pt", marker)
    run_dir = trained["run_dir"]
    dropped = crafted_checkpoint(run_dir / "checkpoints" / "ckpt_99999999.pt", marker, ExecPayload)
    cases = [
        ("fatrain.cli.eval", [f"hydra.run.dir={tmp_path / 'eval'}", f"ckpt_path={evil}",
                              "logger.wandb.mode=disabled"], evil),
        ("fatrain.cli.sample", [f"ckpt_path={evil}", "prompt=ROMEO:", "max_new_tokens=4"], evil),
        ("fatrain.cli.train", [f"hydra.run.dir={tmp_path / 'train'}", *FAST, f"resume={evil}",
                               "trainer.max_steps=4"], evil),
        ("fatrain.cli.train", [f"hydra.run.dir={run_dir}", *FAST, "resume=auto", "trainer.max_steps=4"], dropped),
    ]
    try:
        for module, args, named in cases:
            proc = _run(module, *args, cache=trained["cache"], cwd=tmp_path)
            assert not marker.exists(), f"{module} ran the payload"
            errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
            assert proc.returncode == 2, (module, proc.stderr[-2000:])
            assert len(errors) == 1 and named in errors[0] and "refused" in errors[0], (module, proc.stderr)
            assert "Traceback" not in proc.stderr, (module, proc.stderr)
    finally:
        os.unlink(dropped)


def test_fsdp_resume_refuses_crafted_dcp_metadata(tmp_path, monkeypatch):
    """resume=<.dcp folder> with trainer.strategy=fsdp: DCP's own pickle is checked before DCP reads it."""
    import shutil

    monkeypatch.setenv("FATRAIN_CACHE", str(tmp_path / "cache"))
    fsdp = [*FAST, "trainer.strategy=fsdp", "trainer.device=cpu"]
    (tmp_path / "run").mkdir(), (tmp_path / "resumed").mkdir()
    result = run_training(compose_train(fsdp), str(tmp_path / "run"))
    evil = tmp_path / "ckpt_00000002.dcp"
    shutil.copytree(result["checkpoint"], evil)
    marker = tmp_path / "pwned"
    with open(evil / ".metadata", "wb") as f:
        pickle.dump(SystemPayload(marker), f)
    with pytest.raises(UnsafeCheckpointError, match=r"\.metadata refused: it needs posix\.system"):
        run_training(compose_train([*fsdp, f"resume={evil}", "trainer.max_steps=4"]), str(tmp_path / "resumed"))
    assert not marker.exists()
    assert not torch.distributed.is_initialized()
