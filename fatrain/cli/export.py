"""``fatrain-export``: a checkpoint's model weights as safetensors, for sharing.

    fatrain-export ckpt_path=outputs/train/<run>                       # -> <run>/model.safetensors
    fatrain-export ckpt_path=<ckpt.pt or .dcp> out=gpt.safetensors

The checkpoint is read as data (``torch.load(weights_only=True)``, as every entry point reads it);
the file holds the model's tensors only (no optimizer, RNG or loader state), under the names of
``GPT.state_dict()``, with the model spec and the step in the safetensors metadata (strings), so
``GPTSpec(**json.loads(metadata["fatrain_spec"]))`` rebuilds the model. It is written through a
temporary file and a rename: the old file or the new one, never half of one.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from dataclasses import asdict, is_dataclass
from typing import Optional

from fatrain.cli_help import Setting, parse_settings, settings_help
from fatrain.files import RunWriteError, WRITE_ERROR_EXIT, default_mode
from fatrain.runtime import USER_ERROR_EXIT, USER_ERRORS, report_user_error

SETTINGS = [
    Setting("ckpt_path", str, None, "a checkpoint (.pt file or .dcp folder) or a run folder (its newest); required"),
    Setting("out", str, None, "the .safetensors file to write (default: model.safetensors in the run folder)"),
]
HELP = settings_help(
    "fatrain-export",
    "fatrain-export: a checkpoint's model weights as one .safetensors file (tensors only; spec and step in\n"
    "its metadata), for sharing and for loading without pickle.",
    ["fatrain-export ckpt_path=outputs/train/<run>", "fatrain-export ckpt_path=<ckpt.pt> out=gpt.safetensors"],
    SETTINGS)


def export_safetensors(ckpt_path: str, out: Optional[str] = None) -> str:
    """Write the model weights of the checkpoint ``ckpt_path`` names to ``out``; returns the path."""
    from safetensors.torch import save_file

    from fatrain.checkpoint import load_checkpoint
    from fatrain.eval.loading import _plain_state_dict, one_checkpoint

    path = one_checkpoint(ckpt_path)
    state = load_checkpoint(path)
    tensors = {k: v.detach().contiguous().clone() for k, v in _plain_state_dict(state["model"]).items()}
    spec = state["spec"]
    spec = asdict(spec) if is_dataclass(spec) else dict(spec)
    metadata = {"format": "fatrain-weights", "fatrain_spec": json.dumps(spec), "step": str(int(state["step"]))}
    if out is None:
        run_dir = os.path.dirname(os.path.dirname(os.path.abspath(path)))
        out = os.path.join(run_dir, "model.safetensors")
    if not out.endswith(".safetensors"):
        raise ValueError(f"out={out}: must end in .safetensors")
    folder = os.path.dirname(os.path.abspath(out))
    tmp = None
    try:
        os.makedirs(folder, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=os.path.basename(out) + ".", suffix=".tmp", dir=folder)
        default_mode(fd)
        os.close(fd)
        save_file(tensors, tmp, metadata=metadata)
        os.replace(tmp, out)
    except OSError as e:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)
        raise RunWriteError(out, e) from None
    return out


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        args, _ = parse_settings(argv, SETTINGS, prog="fatrain-export", help_text=HELP, positional="ckpt_path")
        if not args["ckpt_path"]:
            raise ValueError("fatrain-export: ckpt_path=<checkpoint or run folder> is required")
        written = export_safetensors(args["ckpt_path"], args["out"])
    except RunWriteError as e:
        report_user_error(e)
        return WRITE_ERROR_EXIT
    except USER_ERRORS as e:
        report_user_error(e)
        return USER_ERROR_EXIT
    print(written)
    return 0


if __name__ == "__main__":
    sys.exit(main())
