"""Peak memory of a training step, predicted from the shapes before anything is allocated.

``predict_step_memory(cfg, seq_len, device)`` runs the step ``fatrain-max-context`` tries (the
model and optimizer of the config, ``trainer.batch_size`` x ``seq_len`` random tokens, forward,
backward, AdamW step, twice so that the optimizer state exists) on fake tensors: tensors with a
shape, dtype and device but no storage (``torch._subclasses.FakeTensorMode``). Every op runs its
shape function instead of its kernel, fatrain's Triton kernels included (they are torch.library
ops with fake implementations), so the prediction follows the code that will run: the backend,
activation checkpointing and host offload, the chunked loss, autocast's casts, the optimizer.
PyTorch's ``MemTracker`` counts the bytes alive after each op, by kind (parameters, gradients,
optimizer state, activations, temporaries) and by device; the peak is the prediction.

What it predicts is the most bytes held by tensors at once, the number
``torch.cuda.max_memory_allocated`` reports (and, on the CPU, what the process's resident size
grows by when the allocator returns freed blocks). It does not count the CUDA context, cuBLAS
and Triton workspaces, or the caching allocator's fragmentation; what the GPU runs out of is
reserved memory, a little above. A trace takes seconds whatever the length: nothing is computed.

Caution / known limits: an op with no fake implementation fails the trace (flash_v1 under the
CPU's Triton interpreter, whose kernels cannot run on fake tensors): no prediction, and why. A CUDA prediction needs a CUDA build of torch with a visible GPU
(autocast is off for CUDA tensors without one, so the activations would be float32), though no
GPU memory is used. torch.compile is not traced: the prediction is the eager step's (compiled
steps free some temporaries earlier). Single device only (no DDP, FSDP or context parallelism).
"""

from __future__ import annotations

import copy
import logging
import time
import warnings
from typing import Optional

import torch
from omegaconf import open_dict

GIB = 2**30


def predict_step_memory(cfg, seq_len: int, device: torch.device) -> dict:
    """{peak_gib, by_kind (GiB at the device's peak), host_gib, trace_s} of one training step.

    ``host_gib`` is the peak of host memory the step's tensors take when the device is a GPU (the
    offloaded block inputs with trainer.activation_offload), else None.
    """
    from torch._subclasses.fake_tensor import FakeTensorMode
    from torch.distributed._tools.mem_tracker import MemTracker

    from fatrain.max_context import build_try, train_step

    start = time.perf_counter()
    plain = copy.deepcopy(cfg)
    with open_dict(plain):
        plain.trainer.compile = False  # the eager step (see the module's limits)
    # An op without a fake implementation fails the trace, and torch logs the whole traceback
    # before raising: the caller reports the one line (try_predict).
    fake_log = logging.getLogger("torch._subclasses.fake_tensor")
    level = fake_log.level
    fake_log.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings(), FakeTensorMode(allow_non_fake_inputs=True):
            warnings.simplefilter("ignore")  # MemTracker's and autocast's notes on fake tensors
            model, forward, optimizer, autocast, vocab = build_try(plain, device)
            tracker = MemTracker()
            tracker.track_external(model, optimizer)
            with tracker:
                for i in range(2):
                    train_step(plain, seq_len, device, model, forward, optimizer, autocast, vocab)
                    if i == 0:
                        tracker.reset_mod_stats()  # MemTracker counts one iteration of module hooks
            peak = tracker.get_tracker_snapshot("peak")
    finally:
        fake_log.setLevel(level)
    dev = _device_key(peak, device)
    at_peak = peak.get(dev, {})
    by_kind = {getattr(k, "value", str(k)).lower(): v / GIB for k, v in at_peak.items() if k != "Total" and v}
    host = None
    if device.type != "cpu":
        host_key = _device_key(peak, torch.device("cpu"))
        host = peak.get(host_key, {}).get("Total", 0) / GIB if host_key is not None else 0.0
    return {"peak_gib": at_peak.get("Total", 0) / GIB, "by_kind": by_kind, "host_gib": host,
            "trace_s": time.perf_counter() - start}


def _device_key(snapshot: dict, device: torch.device) -> Optional[torch.device]:
    """The snapshot's key for ``device`` (cuda and cuda:0 name one GPU)."""
    for key in snapshot:
        if key.type == device.type and (device.index is None or key.index in (None, device.index)):
            return key
    return None


def try_predict(cfg, seq_len: int, device: torch.device) -> tuple[Optional[dict], str]:
    """(prediction, "") or (None, why there is none): a failed trace must not stop a search."""
    try:
        return predict_step_memory(cfg, seq_len, device), ""
    except Exception as e:  # noqa: BLE001 (a prediction is advice; the measurement is the answer)
        from fatrain.runtime import short

        return None, short(e)
