"""``fatrain-train``: compose the config, train one run, write result.json, return the final val loss.

    fatrain-train experiment=quickstart
    fatrain-train model=gpt2-small attention=<name> data.seq_len=8192 trainer.precision=bf16
    fatrain-train -m experiment=ablate_backends_cpu          # a Hydra multirun sweep
    torchrun --standalone --nproc_per_node=8 -m fatrain.cli.train trainer.strategy=fsdp ...

``attention=<name>`` is one of configs/attention/ (one file per registry backend). Each run
directory holds the composed config (.hydra/), metrics.jsonl, checkpoints/, the W&B run
(wandb/) and result.json. A bad setting exits 2 with one line naming it; so does a run stopped at a
non-finite step (trainer.on_nonfinite=stop; result.json status "nonfinite"). Under torchrun every
rank runs this entry point; all use rank 0's run directory, and only rank 0 writes metrics,
W&B, the console lines and result.json.
"""

from __future__ import annotations

import glob
import os
import shlex
import shutil
import sys

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from fatrain import distributed
from fatrain.config import register_configs, validate_train_config
from fatrain.distributed import DistEnv
from fatrain.checkpoint import list_checkpoints
from fatrain.files import WRITE_ERROR_EXIT, RunWriteError, write_json_atomic
from fatrain.interrupt import deliver_to_previous, exit_code
from fatrain.metrics import strict_json
from fatrain.runlock import RunDirLocked
from fatrain.runtime import USER_ERROR_EXIT, USER_ERRORS, free_memory, report_user_error, select_device
from fatrain.trainer import run_training

register_configs()


def shared_run_dir(run_dir: str, dist_env: DistEnv) -> str:
    """Rank 0's Hydra output folder, on every rank.

    Each rank composes its own config, and a time-stamped ``hydra.run.dir`` can differ by a
    second between ranks (or nodes); a folder that Hydra made for another rank and that holds
    only Hydra's own files is removed. Passing ``hydra.run.dir=...`` avoids the question.
    """
    shared = distributed.broadcast_object(run_dir, dist_env)
    if os.path.abspath(shared) != os.path.abspath(run_dir) and os.path.isdir(run_dir):
        if set(os.listdir(run_dir)) <= {".hydra", f"{HydraConfig.get().job.name}.log"}:
            shutil.rmtree(run_dir, ignore_errors=True)
    return shared


def write_result(run_dir: str, result: dict) -> bool:
    """result.json, whole or not at all; False (and one line on stderr) when it cannot be written."""
    try:
        write_json_atomic(os.path.join(run_dir, "result.json"), strict_json(result))
        return True
    except RunWriteError as e:
        print(f"error: {e}", file=sys.stderr)
        return False


def _overridden(key: str) -> bool:
    return any(o.split("=", 1)[0].lstrip("+~") == key for o in HydraConfig.get().overrides.hydra)


def holds_only_hydra_files(run_dir: str) -> bool:
    """A folder that Hydra made for this job and nothing of the run was written into."""
    return os.path.isdir(run_dir) and set(os.listdir(run_dir)) <= {".hydra", f"{HydraConfig.get().job.name}.log"}


def newest_run_with_checkpoints(run_dir: str) -> str | None:
    """Among the time-stamped folders beside ``run_dir``, the newest that holds checkpoints."""
    parent = os.path.dirname(os.path.abspath(run_dir))
    found = [d for d in glob.glob(os.path.join(parent, "*")) if os.path.isdir(d)
             and os.path.abspath(d) != os.path.abspath(run_dir) and list_checkpoints(os.path.join(d, "checkpoints"))]
    return max(found, key=os.path.getmtime) if found else None


def check_resume_folder(cfg: DictConfig, run_dir: str) -> None:
    """``resume=auto`` continues the run in its folder; Hydra's default folder is a new time-stamped
    one, which never holds a checkpoint. Refuse rather than start fresh without a word."""
    if cfg.get("resume") != "auto" or list_checkpoints(os.path.join(run_dir, "checkpoints")):
        return
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    if _overridden(key) or _overridden("hydra.run.dir"):
        return  # a fixed folder: the first run of a requeued job starts there, later ones resume
    newest = None if multirun else newest_run_with_checkpoints(run_dir)
    hint = (f"; the newest run with checkpoints is {os.path.relpath(newest)}: add hydra.run.dir={os.path.relpath(newest)}"
            if newest else "")
    raise ValueError(f"resume=auto: pass {key}=<the run's folder> (Hydra's default is a new folder, which has "
                     f"nothing to resume){hint}")


def resume_command(run_dir: str, dist_env: DistEnv | None) -> str:
    """The command line that resumes this run in its folder."""
    task = [o for o in HydraConfig.get().overrides.task if o.split("=", 1)[0].lstrip("+~") != "resume"]
    args = " ".join(shlex.quote(o) for o in [*task, f"hydra.run.dir={os.path.relpath(run_dir)}", "resume=auto"])
    if dist_env is not None and dist_env.distributed:
        return f"the same torchrun command with: {args}"
    return f"fatrain-train {args}"


def _say_interrupted(result: dict, run_dir: str, dist_env: DistEnv | None) -> None:
    ckpt = result.get("checkpoint")
    saved = f"saved {os.path.relpath(ckpt, run_dir)}" if ckpt else "no checkpoint written yet"
    sys.stderr.write(f"interrupted by {result['signal']} at step {result['step']}: {saved}; "
                     f"resume with: {resume_command(run_dir, dist_env)}\n")
    sys.stderr.flush()


@hydra.main(version_base=None, config_path="pkg://fatrain.configs", config_name="train")
def main(cfg: DictConfig) -> float:
    run_dir = HydraConfig.get().runtime.output_dir
    dist_env = None
    try:
        return _main(cfg, run_dir)
    except KeyboardInterrupt:
        # A Ctrl-C outside the step loop (start-up) or the second one inside it: stop now, one line.
        is_main = int(os.environ.get("RANK", "0") or 0) == 0
        found = list_checkpoints(os.path.join(run_dir, "checkpoints"))
        if is_main:
            if not found and holds_only_hydra_files(run_dir) and HydraConfig.get().mode != RunMode.MULTIRUN:
                shutil.rmtree(run_dir, ignore_errors=True)
                where = "nothing was written"
            else:
                where = (f"the last checkpoint written whole is {os.path.relpath(found[-1], run_dir)}; resume with: "
                         f"{resume_command(run_dir, None)}") if found else "no checkpoint was written"
            sys.stderr.write(f"interrupted by SIGINT: stopped at once ({where})\n")
        sys.exit(130)


def _main(cfg: DictConfig, run_dir: str) -> float:
    dist_env = None
    try:
        check_resume_folder(cfg, run_dir)
        validate_train_config(cfg)
        dist_env = distributed.init_distributed(cfg.trainer)
        with distributed.process_group(dist_env):
            run_dir = shared_run_dir(run_dir, dist_env)
            result = run_training(cfg, run_dir, dist_env)
    except torch.cuda.OutOfMemoryError as e:
        if dist_env is not None and dist_env.distributed and dist_env.world_size > 1:
            raise  # the other ranks wait in a collective: end the job (torchrun stops them)
        # Recorded, not raised: in a sweep one point running out of memory must not stop the rest.
        result = {"status": "oom", "error": str(e).splitlines()[0]}
        print(f"out of memory: {result['error']}", file=sys.stderr)
    except RunWriteError as e:
        # A full disk or a lost folder: one line naming the file; the last checkpoint that was written
        # whole is still there to resume from once there is room.
        print(f"error: {e}", file=sys.stderr)
        result = {"status": "error", "error": str(e)}
        free_memory(select_device("auto"))
        if dist_env is None or dist_env.is_main:
            write_result(run_dir, result)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(WRITE_ERROR_EXIT)
        return float("inf")
    except USER_ERRORS as e:
        # Every rank that fails says so (a failure on one rank must not be hidden); rank 0 plainly.
        rank = dist_env.rank if dist_env is not None else int(os.environ.get("RANK", "0") or 0)
        report_user_error(e, rank)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            # A run refused before its first write leaves no empty folder behind (a locked folder
            # is another run's: never touched).
            if rank == 0 and not isinstance(e, RunDirLocked) and holds_only_hydra_files(run_dir):
                shutil.rmtree(run_dir, ignore_errors=True)
            sys.exit(USER_ERROR_EXIT)
        if isinstance(e, RunDirLocked):
            return float("inf")  # the folder is another run's: nothing of this job is written into it
        # In a sweep, a point a backend cannot run (a length, a block size) is recorded like an OOM.
        result = {"status": "error", "error": str(e).splitlines()[0]}
    # Freed here, not in the except block: until it ends, the traceback keeps the run's frames (model,
    # optimizer, activations) alive; and the trainer holds reference cycles that only gc frees. The
    # next job of a sweep runs in this same process.
    free_memory(select_device("auto"))
    if (dist_env is None or dist_env.is_main) and not write_result(run_dir, result):
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(WRITE_ERROR_EXIT)
    if result["status"] == "interrupted":
        if dist_env is None or dist_env.is_main:
            _say_interrupted(result, run_dir, dist_env)
        if result.get("signum") is not None:
            deliver_to_previous(result["signum"])  # e.g. submitit's requeue handler, now the files are written
        sys.exit(exit_code(result["signum"]) if result.get("signum") is not None else 128 + 15)
    if result["status"] == "nonfinite":
        # Like a bad setting: one line and exit 2; a sweep records the point (result.json) and goes on.
        if dist_env is None or dist_env.is_main:
            print(f"error: {result['error']}", file=sys.stderr)
        if HydraConfig.get().mode != RunMode.MULTIRUN:
            sys.exit(USER_ERROR_EXIT)
    return result.get("final_val_loss", float("inf"))


if __name__ == "__main__":
    main()
