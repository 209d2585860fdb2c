"""Backend agreement: the same weights and batches through several attention backends, in fp32.

Every backend computes the same attention to within floating-point error, so a trained
model's loss must not depend on which one runs it. A backend that cannot run this model
(a feature it lacks) is reported, not raised.
"""

from __future__ import annotations

import torch

from fatrain.data import PackedBlocks, iter_once
from fatrain.eval.loading import LoadedCheckpoint, with_backend
from fatrain.progress import note_interpreter, progress
from fatrain.runtime import check_precision


def backend_agreement(loaded: LoadedCheckpoint, backends, blocks: PackedBlocks, *, batch_size: int,
                      batches: int, tolerance: float) -> dict:
    """Mean loss of the same batches with each backend, in fp32, and the largest difference.

    ``max_abs_diff`` is max - min over the backends' mean losses; ``max_token_abs_diff`` the
    largest difference of any single token's loss from the first backend's. A backend that
    cannot run this model (a missing feature) is listed under ``errors``.
    """
    device = loaded.device
    losses, errors, token_losses = {}, {}, {}
    for name in progress(list(backends), desc="backend agreement", unit="backend"):
        try:
            check_precision("fp32", device, name, key="eval.precision")
            if device.type == "cpu":
                note_interpreter(name)
            model = with_backend(loaded, name)
            per_token = []
            with torch.no_grad():
                for batch in iter_once(blocks, batch_size, max_batches=batches, device=device):
                    _, loss = model(batch["input_ids"], batch["labels"], doc_ids=batch["doc_ids"], reduction="none")
                    per_token.append(loss.double().cpu())
        except (NotImplementedError, ValueError, RuntimeError) as e:
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        token_losses[name] = torch.cat(per_token)
        losses[name] = token_losses[name].mean().item()
    result = {"seq_len": blocks.seq_len, "batches": batches, "precision": "fp32", "losses": losses,
              "errors": errors, "tolerance": tolerance}
    if losses:
        first = next(iter(token_losses.values()))
        result["max_abs_diff"] = max(losses.values()) - min(losses.values())
        result["max_token_abs_diff"] = max((t - first).abs().max().item() for t in token_losses.values())
        result["agree"] = result["max_abs_diff"] <= tolerance and not errors
    return result
